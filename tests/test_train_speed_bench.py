"""benchmarks/train_speed.py: its reading of metrics.jsonl, and its --quick mode end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "train_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_window_figures_take_the_median_of_the_window(bench, tmp_path) -> None:
    rows = [{"step": s, "loss": 1.0} for s in range(1, 41)]
    for step, rate, memory in ((10, 1.0, 3.0), (20, 500.0, 4.0), (30, 300.0, 5.0), (40, 9.0, 6.0)):
        rows[step - 1].update(tokens_per_s=rate, peak_memory_gib=memory, mfu=rate / 1000)
    rows.append({"event": "epoch_end", "step": 40})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = bench.window_figures(path, (10, 30))  # intervals ending at 20 and 30
    assert figures["intervals"] == 2
    assert figures["tokens_per_s"] == 400.0
    assert figures["mfu"] == pytest.approx(0.4)
    assert figures["peak_memory_gib"] == 6.0  # the run's peak, not the window's
    assert figures["last_step"] == 40


@pytest.mark.slow
def test_quick_mode_runs_the_cli_and_reports(bench, tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    code = bench.main(
        ["--quick", "--variants", "default", "--steps", "4", "--window", "0", "4",
         "--json", str(out), "--out", str(tmp_path / "runs")]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["name"] == "default" and row["returncode"] == 0
    assert row["intervals"] == 2 and row["tokens_per_s"] > 0  # steps 2 and 4 (log_every 2)
    assert "--preset tiny" in row["command"] and "--train.device cpu" in row["command"]
    assert (tmp_path / "runs" / "default_b2_w1" / "metrics.jsonl").is_file()
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-1].startswith("| default |")


@pytest.mark.slow
def test_context_and_checkpointing_reach_the_cli(bench, tmp_path) -> None:
    """``--context`` sets the run's context (and the model's max_seq_len when longer); the
    checkpointing variants pass the option: the run's own resolved config says so."""
    import yaml

    out = tmp_path / "speed.json"
    code = bench.main(
        ["--quick", "--variants", "ckpt_layer", "--steps", "2", "--window", "0", "2",
         "--context", "256", "--json", str(out), "--out", str(tmp_path / "runs")]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["context"] == 256
    (row,) = report["results"]
    assert row["returncode"] == 0 and row["tokens_per_s"] > 0
    run = yaml.safe_load((tmp_path / "runs" / "ckpt_layer_b2_w1" / "run.yaml").read_text())
    assert run["model"]["max_seq_len"] == 256 and run["train"]["context_length"] == 256
    assert run["train"]["activation_checkpointing"] == "layer"


def test_world_runs_cover_strategies_and_variants_and_scale_per_gpu(bench, monkeypatch) -> None:
    """``--world 2`` runs every strategy x world variant once per batch, with the flags that
    select them, and divides tokens/s per GPU by the one-GPU figures (no GPU needed: the CLI
    runs are stubbed)."""
    calls = []

    def fake_run(args, root, name, flags, batch, world=1):
        calls.append((name, flags, batch, world))
        return {"name": name, "batch": batch, "world": world, "tokens_per_s": 300.0}

    monkeypatch.setattr(bench, "run_cli", fake_run)
    args = bench.parse_args(
        ["--world", "2", "--strategies", "FULL_SHARD,NO_SHARD", "--world-variants",
         "default,graphs", "--batches", "16"]
    )  # fmt: skip
    single = [
        {"name": "default", "batch": 16, "tokens_per_s": 200.0},
        {"name": "no_cuda_graphs", "batch": 16, "tokens_per_s": 120.0},
    ]
    rows = bench.world_runs(args, None, single)
    assert [c[0] for c in calls] == [
        "fsdp_full_shard", "fsdp_full_shard_graphs", "fsdp_no_shard", "fsdp_no_shard_graphs"
    ]  # fmt: skip
    assert calls[1][1] == [
        "--train.fsdp_sharding_strategy",
        "FULL_SHARD",
        "--train.cuda_graphs",
        "true",
    ]
    assert all(c[3] == 2 for c in calls)
    assert rows[0]["per_gpu_scaling"] == pytest.approx(0.75)  # 300 / 2 / 200
    assert rows[0]["per_gpu_vs_no_graphs"] == pytest.approx(1.25)  # 300 / 2 / 120
    with pytest.raises(SystemExit):
        bench.parse_args(["--world-variants", "nope"])
