"""bench/relay.py, the bare TCP relay that ``bench/gateway.py --floor`` puts in the gateway's
place, and bench/wakeup.py's ping-pong: both must pass bytes on faithfully for their figures to
mean anything."""

from __future__ import annotations

import http.client
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import wakeup
from tests.support.net import free_port

RELAY = Path(__file__).resolve().parent.parent / "bench" / "relay.py"


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[int]]]:
    """A keep-alive HTTP/1.1 server that echoes each POST body back; counts its connections."""
    connections = [0]

    class Echo(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            connections[0] += 1

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], connections
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def relay(upstream: tuple[int, list[int]]) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(RELAY), str(port), str(upstream[0])])
    deadline = time.monotonic() + 30
    while True:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the relay did not start") from None
            time.sleep(0.05)
    while upstream[1][0] < 1:  # the probe's own upstream connection, made in the background
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield port
    proc.terminate()
    assert proc.wait(10) == 0  # SIGTERM is a clean stop


def test_the_relay_passes_requests_and_answers_on_one_kept_connection(
    relay: int, upstream: tuple[int, list[int]]
) -> None:
    before = upstream[1][0]  # the fixture's probe
    client = http.client.HTTPConnection("127.0.0.1", relay, timeout=10)
    for body in (b"first [req 1-1]", b"second " * 10_000):  # the second spans many packets
        client.request("POST", "/v1/chat/completions", body=body)
        answer = client.getresponse()
        assert (answer.status, answer.read()) == (200, body)
    client.close()
    assert upstream[1][0] - before == 1  # one client connection, one upstream connection


def test_a_ping_pong_times_every_round_trip() -> None:
    times = wakeup.round_trips_us(answer_cpu=0, gap_s=0.0, pings=20)
    assert len(times) == 20
    assert times == sorted(times)
    assert all(t > 0 for t in times)
