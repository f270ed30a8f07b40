"""benchmarks/decode_speed.py --quick: every path it measures runs and agrees with the eager loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_mode_measures_every_path(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    anchor = ROOT.parent / "shared" / "anchor"
    command = [sys.executable, str(ROOT / "benchmarks" / "decode_speed.py"), "--quick"]
    command += ["--json", str(out)]
    if (anchor / "bench_original.py").is_file():
        command += ["--anchor", str(anchor)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    paths = {row["path"] for row in data["rows"]}
    assert {"CLI (one call, with capture)", "pldr_llm.generate (warm)"} <= paths
    assert "transformers generate() static (warm)" in paths
    for row in data["rows"]:
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0
    cli = [r for r in data["rows"] if r["path"].startswith("CLI")]
    assert all(r["new_tokens"] > 0 and r["capture_seconds"] == 0.0 for r in cli)  # CPU: no graph
    again = [r for r in cli if r["path"].startswith("CLI again") and r["batch"] == 1]
    assert again  # batch 1's later call: the median of three calls, each recorded
    for row in again:
        assert len(row["tokens_per_s_calls"]) == 3
        assert row["tokens_per_s"] == sorted(row["tokens_per_s_calls"])[1]
    hf = next(r for r in data["rows"] if r["path"].startswith("transformers"))
    assert hf["ids_equal_native"] is True
    assert data["ids_equal_eager"] and all(data["ids_equal_eager"].values())
    assert result.stdout.strip().splitlines()[-1].startswith("ids equal to the eager loop")
