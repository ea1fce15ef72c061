"""The generated protobuf code matches proto/ (no servers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.common.proto.envelope_pb2 import Envelope

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto/headwater/v1'}",
            f"--python_out={tmp_path}",
            str(ROOT / "proto/headwater/v1/envelope.proto"),
        ],
        check=True,
    )
    generated = (tmp_path / "envelope_pb2.py").read_text()
    committed = (ROOT / "services/common/proto/envelope_pb2.py").read_text()
    assert generated == committed, "regenerate services/common/proto (see proto/README.md)"


def test_envelope_round_trip() -> None:
    env = Envelope(schema_version=1, source_id="s", message_id="m", received_at_ms=1, event=b'{"a":1}')
    back = Envelope()
    back.ParseFromString(env.SerializeToString())
    assert back == env and back.event == b'{"a":1}'
