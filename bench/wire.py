"""A proxy's own share of each request, timed from packets on the loopback device.

``bench/gateway.py --wire`` uses this to measure what the gateway adds as a network engineer
would measure any proxy: by the kernel's timestamps on the packets going in and out of it, so
neither the load generator's nor the stand-in's scheduling (which share CPU 0 on a 2-vCPU
machine and are themselves late by up to ~20 ms at p99 at 32 streams) blurs the figure.

For one streamed request, identified by a tag in its prompt (``[req <tag>]``):

* **ingress**: the client's request packet carrying the tag arriving at the proxy's port, to the
  proxy's own request packet carrying the same tag leaving for the upstream port: socket queueing
  while the proxy's event loop is busy, HTTP parsing, auth, routing, building and writing the
  upstream request;
* **egress**: the upstream's packet carrying ``data: [DONE]`` arriving, to the proxy's packet
  carrying ``data: [DONE]`` leaving for the client: reading the end of the upstream body,
  relaying, the closing events and usage, and writing them.

Their sum is the proxy's critical path on the wire: what a user waits for because of it. The
per-token relaying in between overlaps generation and is not counted. The proxy's work in
the kernel (its ``recv`` and ``send`` system calls) is inside both intervals; the client's
reading and the upstream's writing are outside them.

HTTP/1.1 carries one request at a time per connection, so an upstream ``[DONE]`` belongs to the
tag last sent on its connection (the proxy reuses upstream connections). A tag and a ``[DONE]``
are looked for within one TCP segment: the bench's requests (well under the loopback's 64 KiB
MTU) are written whole, and a request's last segment is the one with its body. Capturing needs
``CAP_NET_RAW`` (root): an ``AF_PACKET`` socket on ``lo`` with kernel timestamps
(``SO_TIMESTAMPNS``), in its own process, so that how late it reads does not matter.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

TAG = re.compile(rb"\[req ([0-9A-Za-z._-]+)\]")
DONE = b"data: [DONE]"

_ETH_P_ALL = 0x0003
_SO_TIMESTAMPNS = 35  # <asm-generic/socket.h>
_SO_ATTACH_FILTER = 26
_SOL_PACKET = 263
_PACKET_STATISTICS = 6
_PACKET_OUTGOING = 4
_ETH_HEADER = 14  # lo frames carry a zeroed Ethernet header under AF_PACKET/SOCK_RAW
_IPPROTO_TCP = 6

Kind = Literal["request", "done"]


@dataclass(frozen=True, slots=True)
class Packet:
    """A TCP segment with a payload that matters: a tagged request or a ``[DONE]`` event."""

    at: float  # kernel timestamp, seconds since the epoch
    src: int  # source port
    dst: int  # destination port
    kind: Kind
    tag: str | None = None  # for requests


@dataclass
class Crossing:
    """One request's way in and way out of the proxy, in milliseconds."""

    ingress_ms: float
    egress_ms: float

    @property
    def total_ms(self) -> float:
        return self.ingress_ms + self.egress_ms


@dataclass
class Capture:
    """What a capture saw: crossings by tag, and how many packets the kernel dropped."""

    crossings: dict[str, Crossing] = field(default_factory=dict)
    packets: int = 0
    dropped: int = 0
    unpaired: int = 0  # tags seen on the way in with no complete crossing


def tag_text(tag: str) -> str:
    """The text to put in a prompt so that its packets can be told apart."""
    if not TAG.fullmatch(f"[req {tag}]".encode()):
        raise ValueError(f"a tag is letters, digits, '.', '_' or '-': {tag!r}")
    return f"[req {tag}]"


def classify(
    at: float, src: int, dst: int, payload: bytes, *, front: int, upstream: int
) -> Packet | None:
    """The packet that matters among the proxy's traffic: a tagged request going to either
    port, or a ``[DONE]`` coming from either; ``None`` for anything else."""
    if dst in (front, upstream):
        found = TAG.search(payload)
        if found:
            return Packet(at, src, dst, "request", found.group(1).decode())
    elif src in (front, upstream) and DONE in payload:
        return Packet(at, src, dst, "done")
    return None


def pair(packets: list[Packet], front: int, upstream: int) -> Capture:
    """Crossings from the packets of one run, by tag.

    A connection is named by its server port and the client's port; the tag last sent on it
    owns the ``[DONE]`` that comes back on it (the first one, if several)."""
    owner: dict[tuple[int, int], str] = {}
    came_in: dict[str, float] = {}
    went_up: dict[str, float] = {}
    done_up: dict[str, float] = {}
    went_out: dict[str, float] = {}
    for p in sorted(packets, key=lambda p: p.at):
        if p.kind == "request" and p.tag is not None:
            owner[(p.dst, p.src)] = p.tag
            (came_in if p.dst == front else went_up)[p.tag] = p.at
            continue
        tag = owner.get((p.src, p.dst))
        if tag is None:
            continue
        (done_up if p.src == upstream else went_out).setdefault(tag, p.at)
    result = Capture(packets=len(packets))
    for tag, t_in in came_in.items():
        parts = (went_up.get(tag), done_up.get(tag), went_out.get(tag))
        if None in parts:
            result.unpaired += 1
            continue
        t_up, t_done, t_out = parts
        assert t_up is not None and t_done is not None and t_out is not None
        result.crossings[tag] = Crossing((t_up - t_in) * 1000, (t_out - t_done) * 1000)
    return result


# --- capturing ------------------------------------------------------------------------------


def _drop_outgoing_filter() -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """A classic BPF program for ``SO_ATTACH_FILTER``: drop the copy of each loopback packet
    seen on its way out (every packet on ``lo`` shows up twice), keep the rest whole. Returns
    the ``struct sock_fprog`` and the instructions it points to, which must stay alive until
    ``setsockopt`` has copied them."""
    pkttype = 0xFFFFF000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE
    program = [
        (0x20, 0, 0, pkttype),  # ld [pkttype]   (BPF_LD | BPF_W | BPF_ABS)
        (0x15, 0, 1, _PACKET_OUTGOING),  # jeq #OUTGOING, drop, keep
        (0x06, 0, 0, 0),  # drop: ret #0
        (0x06, 0, 0, 0x40000),  # keep: ret #262144
    ]
    insns = b"".join(struct.pack("HBBI", *i) for i in program)
    buffer = ctypes.create_string_buffer(insns)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    return struct.pack("HL", len(program), ctypes.addressof(buffer)), buffer


def open_socket() -> socket.socket:
    """The capture socket on ``lo``; ``PermissionError`` without ``CAP_NET_RAW``."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    program, _instructions = _drop_outgoing_filter()
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    sock.bind(("lo", 0))
    sock.settimeout(0.1)
    return sock


def _parse(frame: bytes) -> tuple[int, int, bytes] | None:
    """Source port, destination port and payload of an IPv4 TCP frame."""
    ip = frame[_ETH_HEADER:]
    if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != _IPPROTO_TCP:
        return None
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0]
    tcp = ip[ihl:total]
    if len(tcp) < 20:
        return None
    src, dst = struct.unpack_from("!HH", tcp)
    return src, dst, tcp[(tcp[12] >> 4) * 4 :]


def _capture(front: int, upstream: int, ready: Connection, results: Connection) -> None:
    """The capture process: read packets until told to stop, then send what it kept."""
    sock = open_socket()
    ready.send(True)
    kept: list[Packet] = []
    look_at = time.monotonic()
    while True:
        if time.monotonic() >= look_at:  # told to stop? (asked ten times a second)
            if results.poll():
                break
            look_at = time.monotonic() + 0.1
        try:
            frame, ancillary, _, _ = sock.recvmsg(1 << 18, 64)
        except TimeoutError:
            continue
        at = None
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanos = struct.unpack("qq", data[:16])
                at = seconds + nanos / 1e9
        parsed = _parse(frame)
        if at is None or parsed is None or not parsed[2]:
            continue
        packet = classify(at, *parsed, front=front, upstream=upstream)
        if packet is not None:
            kept.append(packet)
    stats = sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8)
    _, dropped = struct.unpack("II", stats)
    results.recv()
    results.send((kept, dropped))
    sock.close()


class Sniffer:
    """Captures the traffic of a proxy listening on ``front`` with its upstream on
    ``upstream``, from ``start()`` to ``stop()``."""

    def __init__(self, front: int, upstream: int) -> None:
        self.front, self.upstream = front, upstream
        context = multiprocessing.get_context("spawn")
        ready_here, ready_there = context.Pipe()
        self._results, there = context.Pipe()
        self._process = context.Process(
            target=_capture, args=(front, upstream, ready_there, there), daemon=True
        )
        self._process.start()
        if not ready_here.poll(30):
            self._process.kill()
            raise RuntimeError("the packet capture did not start")
        ready_here.recv()

    def stop(self) -> Capture:
        self._results.send(None)
        deadline = time.monotonic() + 60
        while not self._results.poll(0.1):
            if not self._process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the packet capture died")
        packets, dropped = self._results.recv()
        self._process.join(10)
        capture = pair(packets, self.front, self.upstream)
        capture.dropped = dropped
        return capture


def can_capture() -> str | None:
    """None when this process may capture packets, else why not."""
    try:
        open_socket().close()
    except PermissionError:
        return "capturing packets needs CAP_NET_RAW (run as root)"
    except OSError as exc:
        return f"cannot capture on lo: {exc}"
    return None


@contextlib.contextmanager
def sniffing(front: int, upstream: int) -> Iterator[list[Capture]]:
    """``with sniffing(a, b) as out:`` ... ``out[0]`` is the capture once the block ends."""
    sniffer = Sniffer(front, upstream)
    out: list[Capture] = []
    try:
        yield out
    finally:
        out.append(sniffer.stop())
