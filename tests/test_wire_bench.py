"""bench/wire.py: timing a proxy from the packets on the loopback device.

The pairing is checked on made-up packets (keep-alive reuse, interleaved connections, a request
that never finished); the capture itself against a real proxy on loopback with known delays,
where this process may capture packets (root), as in CI."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bench import wire

FRONT, UP = 18001, 17001


def request(at: float, src: int, dst: int, tag: str) -> wire.Packet:
    return wire.Packet(at, src, dst, "request", tag)


def done(at: float, src: int, dst: int) -> wire.Packet:
    return wire.Packet(at, src, dst, "done")


def test_a_crossing_is_the_way_in_plus_the_way_out() -> None:
    packets = [
        request(10.000, 40000, FRONT, "a"),  # client -> proxy
        request(10.002, 50000, UP, "a"),  # proxy -> upstream, 2 ms later
        done(10.300, UP, 50000),  # upstream's [DONE]
        done(10.301, FRONT, 40000),  # proxy's [DONE], 1 ms later
    ]
    crossing = wire.pair(packets, FRONT, UP).crossings["a"]
    assert crossing.ingress_ms == pytest.approx(2.0)
    assert crossing.egress_ms == pytest.approx(1.0)
    assert crossing.total_ms == pytest.approx(3.0)


def test_a_reused_upstream_connection_belongs_to_the_request_last_sent_on_it() -> None:
    packets = [
        request(1.000, 40000, FRONT, "a"),
        request(1.001, 50000, UP, "a"),
        request(1.100, 40002, FRONT, "b"),
        done(1.200, UP, 50000),  # a's answer
        done(1.2015, FRONT, 40000),
        request(1.203, 50000, UP, "b"),  # b goes out on a's connection, once it is free
        done(1.500, UP, 50000),  # b's answer
        done(1.5005, FRONT, 40002),
        done(1.600, FRONT, 40002),  # a second [DONE] on the connection: the first one counts
    ]
    found = wire.pair(packets, FRONT, UP).crossings
    assert found["a"].ingress_ms == pytest.approx(1.0)
    assert found["a"].egress_ms == pytest.approx(1.5)
    assert found["b"].ingress_ms == pytest.approx(103.0)  # it waited for the connection
    assert found["b"].egress_ms == pytest.approx(0.5)


def test_packets_are_paired_by_time_whatever_order_they_were_read_in() -> None:
    packets = [
        done(2.010, FRONT, 40000),
        request(2.000, 40000, FRONT, "a"),
        done(2.009, UP, 50000),
        request(2.001, 50000, UP, "a"),
    ]
    assert wire.pair(packets, FRONT, UP).crossings["a"].total_ms == pytest.approx(2.0)


def test_a_request_without_an_answer_is_counted_not_timed() -> None:
    packets = [request(3.0, 40000, FRONT, "lost"), request(3.001, 50000, UP, "lost")]
    capture = wire.pair(packets, FRONT, UP)
    assert capture.crossings == {}
    assert capture.unpaired == 1


def test_only_tagged_requests_and_done_events_are_kept() -> None:
    body = b'POST /v1/chat/completions HTTP/1.1\r\n\r\n{"content":"Hi [req 32-7]"}'
    kept = wire.classify(1.0, 40000, FRONT, body, front=FRONT, upstream=UP)
    assert kept == wire.Packet(1.0, 40000, FRONT, "request", "32-7")
    assert wire.classify(1.0, UP, 50000, b"5\r\ndata: [DONE]\n\n", front=FRONT, upstream=UP)
    assert wire.classify(1.0, 40000, FRONT, b"GET /metrics", front=FRONT, upstream=UP) is None
    assert wire.classify(1.0, 40000, 9999, body, front=FRONT, upstream=UP) is None  # not ours


def test_a_tag_must_be_one_word() -> None:
    assert wire.tag_text("warm32-5") == "[req warm32-5]"
    with pytest.raises(ValueError, match="a tag is"):
        wire.tag_text("two words")


# --- a real capture --------------------------------------------------------------------------

IN_DELAY_S, OUT_DELAY_S = 0.030, 0.020


def _serve(listener: socket.socket, handle: object) -> None:
    conn, _ = listener.accept()
    with conn:
        handle(conn)  # type: ignore[operator]


def _read_until(conn: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        piece = conn.recv(65536)
        if not piece:
            break
        seen += piece
    return seen


@pytest.fixture
def proxy_pair() -> Iterator[tuple[int, int]]:
    """An upstream that answers ``[DONE]`` at once, and a proxy in front of it that holds each
    request ``IN_DELAY_S`` before passing it on and the answer ``OUT_DELAY_S`` before passing it
    back; both on loopback, one exchange each."""
    upstream = socket.create_server(("127.0.0.1", 0))
    front = socket.create_server(("127.0.0.1", 0))
    up_port = upstream.getsockname()[1]

    def answer(conn: socket.socket) -> None:
        _read_until(conn, b"]")
        conn.sendall(b"data: [DONE]\n\n")

    def relay(conn: socket.socket) -> None:
        asked = _read_until(conn, b"]")
        time.sleep(IN_DELAY_S)
        with socket.create_connection(("127.0.0.1", up_port)) as out:
            out.sendall(asked)
            reply = _read_until(out, b"[DONE]")
        time.sleep(OUT_DELAY_S)
        conn.sendall(reply)

    threads = [
        threading.Thread(target=_serve, args=(upstream, answer), daemon=True),
        threading.Thread(target=_serve, args=(front, relay), daemon=True),
    ]
    for t in threads:
        t.start()
    yield front.getsockname()[1], up_port
    for t in threads:
        t.join(10)
    upstream.close()
    front.close()


@pytest.mark.skipif(wire.can_capture() is not None, reason=str(wire.can_capture()))
def test_the_capture_times_a_real_proxy_by_its_packets(proxy_pair: tuple[int, int]) -> None:
    front, up = proxy_pair
    with wire.sniffing(front, up) as out:
        with socket.create_connection(("127.0.0.1", front)) as client:
            client.sendall(b"POST / HTTP/1.1\r\n\r\nhello [req t-1]")
            assert b"[DONE]" in _read_until(client, b"[DONE]")
        time.sleep(0.2)  # the last packets reach the capture socket
    capture = out[0]
    crossing = capture.crossings["t-1"]
    assert IN_DELAY_S * 1000 <= crossing.ingress_ms < IN_DELAY_S * 1000 + 25
    assert OUT_DELAY_S * 1000 <= crossing.egress_ms < OUT_DELAY_S * 1000 + 25
    assert capture.dropped == 0
    assert capture.unpaired == 0
