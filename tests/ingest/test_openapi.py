"""The OpenAPI document is exact: schemathesis (all checks) against the running
service finds no request the document allows refused, none it forbids taken,
no 5xx and no answer the document does not describe.

Bounded: a fixed number of examples per operation and a fixed seed, so a run
is reproducible (``st run ... --seed``) and takes a minute or two.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.ingest.conftest import SERVER_KEY
from tests.ingest.helpers import LiveIngest, http

ST = Path(sys.executable).with_name("st")


def test_the_document_says_what_the_service_takes() -> None:
    from services.ingest.openapi import build
    from services.ingest.settings import Settings

    doc = build(Settings(), "test")
    track = doc["components"]["schemas"]["Single_track"]
    assert "event" in track["required"] and track["properties"]["event"]["minLength"] == 1
    assert {
        "required": ["userId"],
        "properties": {"userId": {"anyOf": [{"type": "string", "minLength": 1}, {"type": ["number", "boolean"]}]}},
    } in track["anyOf"]
    assert doc["paths"]["/v1/pixel/{type}"]["get"]["responses"].keys() == {"200"}
    assert "408" in doc["paths"]["/v1/track"]["post"]["responses"]


@pytest.mark.timeout(420)
def test_schemathesis_finds_nothing_against_the_running_service(live_ingest: LiveIngest, tmp_path: Path) -> None:
    status, _, _ = http("GET", f"{live_ingest.url}/openapi.json")
    assert status == 200
    result = subprocess.run(
        [
            str(ST),
            "run",
            f"{live_ingest.url}/openapi.json",
            "--auth",
            f"{SERVER_KEY}:",
            "--checks",
            "all",
            "--max-examples",
            "8",
            "--seed",
            "20261201",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=380,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Schema-valid" not in result.stdout and "API Operations" in result.stdout, result.stdout[-3000:]
