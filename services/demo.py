"""Demo traffic: a few simulated visitors and a backend, sent to ingest the way
analytics.js and analytics-python send it."""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

BROWSERS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
]
PAGES = ["/", "/pricing", "/docs", "/blog/launch", "/p/123"]
CAMPAIGNS = ["", "?utm_source=newsletter&utm_medium=email&utm_campaign=nov", "?gclid=abc123"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _auth(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def _visit(anon: str, user: str | None) -> list[dict[str, Any]]:
    page = random.choice(PAGES)
    url = f"http://localhost:3000{page}{random.choice(CAMPAIGNS)}"
    base: dict[str, Any] = {
        "anonymousId": anon,
        "userId": user,
        "timestamp": _now(),
        "context": {
            "page": {"url": url, "path": page, "referrer": "https://www.google.com/"},
            "library": {"name": "analytics.js", "version": "next-1.84.0"},
        },
    }
    events = [{**base, "type": "page", "name": page.strip("/") or "home"}]
    if random.random() < 0.5:
        events.append(
            {**base, "type": "track", "event": "Product Viewed", "properties": {"product_id": "p-123", "price": 19.99}}
        )
    if user and random.random() < 0.2:
        events.append(
            {
                **base,
                "type": "track",
                "event": "Order Completed",
                "properties": {"revenue": round(random.uniform(5, 200), 2), "currency": "EUR"},
            }
        )
    return events


async def run_demo(
    ingest_url: str,
    *,
    rate_per_s: float = 20.0,
    duration_s: float | None = None,
    web_key: str = "demo-web-write-key",
    server_key: str = "demo-server-write-key",
) -> int:
    """Send demo events until cancelled (or for ``duration_s``); returns events accepted."""
    visitors = [(str(uuid.uuid4()), f"user-{i}" if i % 3 else None, random.choice(BROWSERS)) for i in range(25)]
    accepted = 0
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while duration_s is None or time.monotonic() - started < duration_s:
            anon, user, ua = random.choice(visitors)
            for event in _visit(anon, user):
                # analytics.js: one event per call to the short path, text/plain, Basic auth.
                short = {"page": "p", "track": "t"}[event["type"]]
                async with http.post(
                    f"{ingest_url}/v1/{short}",
                    data=orjson.dumps(event),
                    headers={
                        "Content-Type": "text/plain",
                        "Authorization": _auth(web_key),
                        "User-Agent": ua,
                        "Origin": "http://localhost:3000",
                    },
                ) as resp:
                    accepted += resp.status == 200
            if random.random() < 0.1:
                # analytics-python: a batch from the backend.
                batch = {
                    "batch": [
                        {
                            "type": "identify",
                            "userId": user or "user-1",
                            "traits": {"plan": "pro"},
                            "timestamp": _now(),
                        },
                        {
                            "type": "track",
                            "event": "Invoice Paid",
                            "userId": user or "user-1",
                            "properties": {"revenue": 49.0, "quantity": 1},
                            "timestamp": _now(),
                        },
                    ],
                    "sentAt": _now(),
                }
                async with http.post(
                    f"{ingest_url}/v1/batch", json=batch, headers={"Authorization": _auth(server_key)}
                ) as resp:
                    accepted += 2 if resp.status == 200 else 0
            await asyncio.sleep(1.0 / rate_per_s)
    return accepted
