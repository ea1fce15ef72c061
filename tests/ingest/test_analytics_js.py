"""analytics.js loads from us: analytics-next (npm) in headless Chromium (Debian's
chromium, driven by playwright-core from npm) with ``cdnURL`` set to ingest and
no settings inline loads its settings document from ingest, sends track, page,
identify and group, and the events are read back from events.raw.

The npm packages (tests/ingest/browser/package.json) are installed once into
``$HEADWATER_STACK_HOME/npm/ingest-browser`` (default ``~/.cache/headwater``),
keyed by that file, never into the repository.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from services.devstack import stack
from tests.helpers import read_topic
from tests.ingest.conftest import IngestClient, decode

BROWSER_DIR = Path(__file__).parent / "browser"
JS_KEY = "js-write-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _node_modules(settings: stack.StackSettings) -> Path:
    """npm install the browser test's packages into the cache once per package.json."""
    manifest = (BROWSER_DIR / "package.json").read_bytes()
    target = settings.home / "npm" / f"ingest-browser-{hashlib.sha256(manifest).hexdigest()[:12]}"
    modules = target / "node_modules"
    if (modules / "@segment" / "analytics-next").exists() and (modules / "playwright-core").exists():
        return modules
    npm = shutil.which(settings.npm)
    assert npm, "npm is needed for the analytics.js test (.ci/run installs it)"
    target.mkdir(parents=True, exist_ok=True)
    (target / "package.json").write_bytes(manifest)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--omit=dev"],
        cwd=target,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return modules


PAGE = """<!doctype html><html><head><title>shop</title>
<script src="/ajs/index.js"></script></head><body><script>
(async () => {
  try {
    const [analytics] = await AnalyticsNext.AnalyticsBrowser.load({writeKey: %(key)s, cdnURL: %(cdn)s});
    const sent = [];
    sent.push(await analytics.track("Order Completed", {revenue: 12.5}));
    sent.push(await analytics.page("Shop", "Checkout"));
    sent.push(await analytics.identify("user-7", {plan: "pro"}));
    sent.push(await analytics.group("org-3", {name: "Org"}));
    window.__result = {messageIds: sent.map((ctx) => ctx.event.messageId),
                       failed: sent.filter((ctx) => ctx.failedDelivery()).length};
  } catch (e) {
    window.__result = {error: String(e)};
  }
  window.__done = true;
})();
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
async def test_analytics_next_loads_settings_from_ingest_and_sends_events(
    ingest: IngestClient, kafka_bootstrap: str, stack_settings: stack.StackSettings, tmp_path: Path
) -> None:
    modules = await asyncio.to_thread(_node_modules, stack_settings)
    sources = tmp_path / "js-sources.json"
    sources.write_text(
        json.dumps({"sources": [{"id": "shop-web", "name": "Shop", "write_key": JS_KEY, "allowed_origins": ["*"]}]})
    )
    client, settings = await ingest(sources_file=sources)
    cdn = str(client.make_url("")).rstrip("/")

    page_app = web.Application()

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=PAGE % {"key": json.dumps(JS_KEY), "cdn": json.dumps(cdn)}, content_type="text/html")

    page_app.router.add_get("/", index)
    page_app.router.add_static("/ajs/", modules / "@segment" / "analytics-next" / "dist" / "umd")
    runner = web.AppRunner(page_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(BROWSER_DIR / "run.cjs"),
            f"http://127.0.0.1:{port}/",
            str(CHROMIUM),
            env={**os.environ, "NODE_PATH": str(modules)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await runner.cleanup()
    assert proc.returncode == 0, err.decode()[-3000:]
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    assert report["result"] and "error" not in report["result"], report
    assert report["result"]["failed"] == 0, report
    requests = report["requests"]
    assert f"GET {cdn}/v1/projects/{JS_KEY}/settings" in requests, requests
    for path in ("/v1/t", "/v1/p", "/v1/i", "/v1/g"):
        assert f"POST {cdn}{path}" in requests, requests

    ids = report["result"]["messageIds"]
    records = await read_topic(kafka_bootstrap, settings.raw_topic, expected=4)
    events = {decode(r)[0].message_id: decode(r) for r in records}
    assert set(events) == set(ids)
    by_type = {event["type"]: (env, event) for env, event in events.values()}
    assert by_type["track"][1]["event"] == "Order Completed"
    assert by_type["track"][1]["properties"] == {"revenue": 12.5}
    assert by_type["page"][1]["name"] == "Checkout"
    assert by_type["identify"][1]["userId"] == "user-7"
    assert by_type["group"][1]["groupId"] == "org-3"
    for env, event in by_type.values():
        assert env.source_id == "shop-web" and env.path in ("/v1/t", "/v1/p", "/v1/i", "/v1/g")
        assert "writeKey" not in event
        assert event["context"]["library"]["name"] == "analytics.js"


async def test_settings_document_caching_cors_and_404(ingest: IngestClient) -> None:
    from tests.ingest.conftest import SERVER_KEY, WEB_KEY

    client, _ = await ingest()
    resp = await client.get(f"/v1/projects/{WEB_KEY}/settings", headers={"Origin": "https://shop.example"})
    assert resp.status == 200
    doc = await resp.json()
    segment_io = doc["integrations"]["Segment.io"]
    assert segment_io["apiHost"] == f"{client.host}:{client.port}/v1" and segment_io["protocol"] == "http"
    assert segment_io["apiKey"] == WEB_KEY and list(doc["integrations"]) == ["Segment.io"]
    assert doc["metrics"]["sampleRate"] == 0 and doc["plan"]["track"]["__default"]["enabled"] is True
    assert resp.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert resp.headers["Cache-Control"] == "public, max-age=300" and "Origin" in resp.headers["Vary"]
    again = await client.get(f"/v1/projects/{WEB_KEY}/settings", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304
    other = await client.get(f"/v1/projects/{WEB_KEY}/settings", headers={"Origin": "https://evil.example"})
    assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers
    anyone = await client.get(f"/v1/projects/{SERVER_KEY}/settings", headers={"Origin": "https://a.example"})
    assert anyone.headers["Access-Control-Allow-Origin"] == "*"
    for key in ("no-such-key", "disabled-key"):
        missing = await client.get(f"/v1/projects/{key}/settings")
        assert missing.status == 404 and (await missing.json())["error"] == "unknown_write_key"
        assert key.encode() not in await missing.read()
