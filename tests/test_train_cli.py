"""``pldr-llm train --preset tiny`` end to end (short), then ``generate`` and ``plot`` on its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STEP_KEYS = {"step", "loss", "accuracy", "lr", "tokens", "loss_running",
             "loss_global", "loss_epoch", "accuracy_global", "epoch"}  # fmt: skip
# On the last step of each log interval (log_every = 10 here).
INTERVAL_KEYS = {"tokens_seen", "tokens_per_s", "tokens_per_s_cumulative", "step_time_s",
                 "elapsed_s"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from pldr_llm.cli import main

    out = tmp_path_factory.mktemp("tiny") / "run"
    code = main(
        ["train", "--preset", "tiny", "--max-steps", "20", "--out", str(out), "--log_every", "10",
         "--save_every", "10", "--progress", "false"]
    )  # fmt: skip
    assert code == 0
    return out


@pytest.mark.slow
def test_tiny_preset_run_folder(tiny_run: Path) -> None:
    for name in (
        "run.yaml",
        "tokenizer.model",
        "metrics.jsonl",
        "config.json",
        "model.safetensors",
    ):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "checkpoints" / "step_00000020" / "COMPLETE").is_file()
    assert (tiny_run / "checkpoints" / "step_00000010" / "COMPLETE").is_file()
    original = tiny_run / "original"
    assert (original / "pldr-llm-model-checkpoint.pth").is_file()
    assert (original / "pldr-llm_hyperparameters.py").is_file()
    assert (original / "tokenizer.model").is_file()


@pytest.mark.slow
def test_tiny_preset_metrics_and_loss_falls(tiny_run: Path) -> None:
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    steps = [r for r in records if r.get("event") is None]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for record in steps:
        assert STEP_KEYS <= set(record), STEP_KEYS - set(record)
        assert (INTERVAL_KEYS <= set(record)) == (record["step"] % 10 == 0), record
    # tokens/s of an interval counts that interval's tokens only
    tenth, twentieth = steps[9], steps[19]
    assert twentieth["tokens_seen"] - tenth["tokens_seen"] == sum(r["tokens"] for r in steps[10:])
    assert twentieth["tokens_per_s"] > 0 and twentieth["tokens_per_s_cumulative"] > 0
    assert steps[0]["lr"] == 0.0  # step 0 of the schedule runs at rate 0
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5  # ~7.6 -> ~6.6 in 20 steps
    # the running mean resets every log_every steps, the global one never
    assert steps[9]["loss_running"] == pytest.approx(sum(r["loss"] for r in steps[:10]) / 10)
    assert steps[14]["loss_running"] == pytest.approx(sum(r["loss"] for r in steps[10:15]) / 5)
    assert steps[19]["loss_global"] == pytest.approx(sum(r["loss"] for r in steps) / 20)


@pytest.mark.slow
def test_generate_from_the_run_folder(tiny_run: Path, capsys) -> None:
    from pldr_llm.cli import main

    code = main(
        ["generate", "--model", str(tiny_run), "--prompt", "The list", "--max-new-tokens", "8",
         "--top-k", "1"]
    )  # fmt: skip
    out = capsys.readouterr().out.strip()
    assert code == 0
    assert out.startswith("The list") and len(out) > len("The list")


@pytest.mark.slow
def test_original_bundle_export_loads(tiny_run: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from pldr_llm import load_reference_checkpoint
    from pldr_llm.core.config import read_hyperparameters_file

    original = tiny_run / "original"
    hp = read_hyperparameters_file(original / "pldr-llm_hyperparameters.py")
    assert hp["learning_rate"] == pytest.approx(2e-3) and hp["num_layers"] == 2
    model = load_reference_checkpoint(original / "pldr-llm-model-checkpoint.pth", hp)
    saved = load_file(str(tiny_run / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.slow
def test_rerun_of_a_finished_run_resumes_and_extends(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from pldr_llm.cli import main

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    # No --preset: the folder's own run.yaml is the config.
    assert main(["train", "--out", str(run), "--max-steps", "22", "--progress", "false"]) == 0
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("event") is None] == list(range(1, 23))
    # Changing what the run computes is refused, naming the key.
    assert main(["train", "--out", str(run), "--seed", "7"]) == 2


@pytest.mark.slow
def test_plot_draws_a_png(tiny_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from pldr_llm.cli import main

    target = tmp_path / "curves.png"
    assert main(["plot", str(tiny_run), "--out", str(target), "--smooth", "5"]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_notebook_run_is_the_cli_run(tiny_run: Path, tmp_path: Path) -> None:
    """The three-line Python start (docs/training.md) runs the same run as the command."""
    from safetensors.torch import load_file

    from pldr_llm.train.run import start_run

    overrides = {"train.max_steps": 20, "log_every": 10, "save_every": 10, "progress": False}
    result = start_run(tmp_path / "run", preset="tiny", overrides=overrides)
    assert result.status == "completed" and result.step == 20
    assert (tmp_path / "run" / "run.yaml").read_text() == (tiny_run / "run.yaml").read_text()
    ours = load_file(str(tmp_path / "run" / "model.safetensors"))
    theirs = load_file(str(tiny_run / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    # Same seed, same one-thread tokenizer, same CPU kernels: the same weights to the bit.
    for name, tensor in theirs.items():
        assert ours[name].equal(tensor), name


def test_prepare_run_checks_like_the_command(tmp_path: Path) -> None:
    from pldr_llm.core.errors import PLDRError
    from pldr_llm.train.runconfig import prepare_run

    cfg = prepare_run(None, preset="tiny", overrides={"chkpt_batches": [5], "dk": 16})
    assert cfg.train.save_steps == (5,)  # the original's name, from the one alias table
    assert cfg.model["d_model"] == 16 * cfg.model["num_heads"]
    with pytest.raises(PLDRError, match="unknown key 'no_such_key'"):
        prepare_run(None, preset="tiny", overrides={"no_such_key": 1})
