"""The run loop's components (train/loop.py, train/validation.py, train/metrics.py): each owns one
policy -- when to log, validate, save, end an epoch -- and is checked here without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pldr_llm.train.metrics import METRICS_FILE, MetricsWriter, read_metrics


def _writer_with_steps(run_dir: Path, steps: range) -> MetricsWriter:
    writer = MetricsWriter(run_dir, tensorboard=False)
    for step in steps:
        writer.write({"step": step, "loss": float(step)})
    return writer


def test_truncating_the_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    writer = _writer_with_steps(tmp_path, range(1, 6))
    writer.truncate_after(3)
    writer.write({"step": 4, "loss": 40.0})  # the resumed run appends after the kept records
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


def test_a_failed_truncation_leaves_the_metrics_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _writer_with_steps(tmp_path, range(1, 6))
    before = (tmp_path / METRICS_FILE).read_bytes()
    calls = {"n": 0}
    real_dumps = json.dumps

    def dumps_failing_on_the_second_record(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr("pldr_llm.train.metrics.json.dumps", dumps_failing_on_the_second_record)
    with pytest.raises(OSError):
        writer.truncate_after(3)
    assert (tmp_path / METRICS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temporary left
