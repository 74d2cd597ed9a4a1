"""A bare TCP relay: the least any proxy process can add on this machine (``bench/gateway.py
--floor``).

Each client connection gets one connection to the upstream, and bytes are passed on as they
come, both ways, by ``asyncio`` protocols on uvloop (the gateway's event loop): no HTTP parsing,
no JSON, no logging. Put in the gateway's place, pinned to the gateway's CPU and timed on the
wire the same way, it measures what the machine itself charges for one more process on the
path: the two loopback hops, the kernel, and waking that process's CPU for each packet. Whatever
the gateway adds beyond this floor is its own software.

``python bench/relay.py LISTEN_PORT UPSTREAM_PORT`` serves on 127.0.0.1 until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    """One end of a relayed connection; what it receives is written to its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # received before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Client(_Side):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            _, upstream = await loop.create_connection(_Side, "127.0.0.1", self.upstream_port)
        except OSError:
            self.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        assert upstream.transport is not None
        for data in self.pending:
            upstream.transport.write(data)
        self.pending.clear()


async def serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream_port), "127.0.0.1", listen_port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    listen_port, upstream_port = (int(x) for x in sys.argv[1:3])
    uvloop.run(serve(listen_port, upstream_port))


if __name__ == "__main__":
    main()
