"""bench/routing.py runs every variant it reports, each call a complete request."""

from __future__ import annotations

import asyncio

from bench import routing


def test_every_variant_is_timed() -> None:
    results = asyncio.run(routing.measure(calls=5, rounds=2))
    assert len(results) == 5
    for name, values in results.items():
        assert len(values) == 2, name
        assert all(v > 0 for v in values), name


def test_every_route_validates_the_body_and_answers() -> None:
    app = routing.routes()

    async def one(path: str) -> list[dict[str, object]]:
        sent: list[dict[str, object]] = []
        first = True

        async def receive() -> dict[str, object]:
            nonlocal first
            assert first, "the route asked for more than the body"
            first = False
            return {"type": "http.request", "body": routing.PAYLOAD, "more_body": False}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await app(routing.scope(path), receive, send)  # type: ignore[arg-type]
        return sent

    for path in routing.ROUTES:
        sent = asyncio.run(one(path))
        assert sent[0]["status"] == 200, path  # 422 would mean nothing past validation was timed
        assert sent[-1]["body"] == b"ok", path
