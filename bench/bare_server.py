"""Baseline for the ingest benchmark: an aiohttp handler on uvloop that only
reads and parses the body, then answers like ingest does."""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web

SUCCESS = orjson.dumps({"success": True})


async def handle(request: web.Request) -> web.Response:
    orjson.loads(await request.read())
    return web.Response(body=SUCCESS, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/{path}", handle)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
