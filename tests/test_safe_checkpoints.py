"""No pickle in a checkpoint or run folder runs code: DCP's ``.metadata``, DCP's non-tensor values
and the per-step ``.pt`` files are read through allow-lists; a file that needs anything else is
refused with one line naming the file and the global, and the test's marker file is never made."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from pldr_llm.core.errors import PLDRError
from support import MINI_TRAIN_ARGS, run_cli


class _RunsCode:
    """Pickles as ``os.system("touch <marker>")``: unpickling it with plain pickle makes the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save_dcp(folder: Path, state: dict) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(folder))


def _state() -> dict:
    torch.manual_seed(0)
    return {
        "model": {"w": torch.randn(4, 3), "b": torch.randn(3)},
        "optim": {"param_groups": [{"lr": 0.25, "betas": (0.9, 0.95), "params": ["w", "b"]}]},
    }


def _empty_like(state: dict) -> dict:
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0), "params": []}]},
    }


def test_normal_dcp_folder_loads_tensors_and_plain_values(tmp_path: Path) -> None:
    from pldr_llm.train.safe_dcp import safe_dcp_load

    saved = _state()
    _save_dcp(tmp_path / "dcp", saved)
    loaded = _empty_like(saved)
    safe_dcp_load(loaded, tmp_path / "dcp")
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optim"]["param_groups"][0]["lr"] == 0.25
    assert tuple(loaded["optim"]["param_groups"][0]["betas"]) == (0.9, 0.95)


def test_crafted_metadata_is_refused_naming_file_and_global(tmp_path: Path) -> None:
    from pldr_llm.train.safe_dcp import read_dcp_metadata, safe_dcp_load

    _save_dcp(tmp_path / "dcp", _state())
    marker = tmp_path / "MARKER"
    meta = read_dcp_metadata(tmp_path / "dcp")
    # At the top, and nested inside a genuine Metadata object.
    for crafted in (_RunsCode(marker), {"planner": _RunsCode(marker)}):
        meta.planner_data = crafted
        (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
        with pytest.raises(PLDRError) as err:
            safe_dcp_load(_empty_like(_state()), tmp_path / "dcp")
        assert "'posix.system'" in str(err.value) and ".metadata" in str(err.value)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_metadata_cannot_set_attributes_on_a_class(tmp_path: Path) -> None:
    """``GLOBAL Metadata; BUILD`` would setattr on DCP's class for the whole process."""
    from torch.distributed.checkpoint.metadata import Metadata

    from pldr_llm.train.safe_dcp import read_dcp_metadata

    (tmp_path / ".metadata").write_bytes(
        b"ctorch.distributed.checkpoint.metadata\nMetadata\n(N(dS'pwned'\nI1\nstb."
    )
    with pytest.raises(PLDRError, match="refusing to set state on a type"):
        read_dcp_metadata(tmp_path)
    assert not hasattr(Metadata, "pwned")


def test_storage_entry_outside_the_folder_is_refused(tmp_path: Path) -> None:
    from pldr_llm.train.safe_dcp import read_dcp_metadata

    _save_dcp(tmp_path / "dcp", _state())
    meta = read_dcp_metadata(tmp_path / "dcp")
    first = next(iter(meta.storage_data))
    meta.storage_data[first].relative_path = "../../elsewhere.pt"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(PLDRError, match="not a file of the folder"):
        read_dcp_metadata(tmp_path / "dcp")


def test_crafted_non_tensor_value_is_refused(tmp_path: Path) -> None:
    """DCP writes non-tensor values with torch.save and its planner reads them back with
    ``weights_only=False``; the project's planner reads them weights-only."""
    from pldr_llm.train.safe_dcp import safe_dcp_load

    marker = tmp_path / "MARKER"
    state = _state()
    state["optim"]["param_groups"][0]["lr"] = _RunsCode(marker)
    _save_dcp(tmp_path / "dcp", state)
    with pytest.raises(PLDRError) as err:
        safe_dcp_load(_empty_like(_state()), tmp_path / "dcp")
    assert "'posix.system'" in str(err.value) and "optim.param_groups.0.lr" in str(err.value)
    assert not marker.exists()


def test_crafted_torch_file_is_refused_naming_the_global(tmp_path: Path) -> None:
    from pldr_llm.core.fileio import safe_torch_load

    marker = tmp_path / "MARKER"
    torch.save({"step": 3, "rng": _RunsCode(marker)}, tmp_path / "trainer.pt")
    with pytest.raises(PLDRError) as err:
        safe_torch_load(tmp_path / "trainer.pt")
    text = str(err.value)
    assert "trainer.pt" in text and "'posix.system'" in text and "nothing in the file" in text
    assert "weights_only" not in text  # torch's own advice (load it unsafely) is not repeated
    assert not marker.exists()


# ---------------------------------------------------------------------- through the CLI
MINI = [*MINI_TRAIN_ARGS, "--warmup_steps", "2", "--save_every", "4", "--log_every", "4"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step CLI run with one checkpoint (shared: each test copies it)."""
    out = tmp_path_factory.mktemp("safe") / "run"
    done = run_cli("train", *MINI, "--max-steps", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _checkpoint(run: Path) -> Path:
    (found,) = sorted((run / "checkpoints").glob("step_*"))
    return found


def _assert_refused(done, *needles: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("pldr-llm: error: "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


@pytest.mark.slow
def test_init_from_crafted_checkpoint_exits_2_without_running_it(
    finished_run: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    source = tmp_path / "elsewhere"
    shutil.copytree(_checkpoint(finished_run), source)
    (source / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    done = run_cli(
        "train", *MINI, "--max-steps", "4", "--train.init_from", str(source),
        "--out", str(tmp_path / "new"),
    )  # fmt: skip
    _assert_refused(done, str(source / "dcp" / ".metadata"), "'posix.system'")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("crafted", ["dcp/.metadata", "rank00000.pt", "trainer.pt"])
def test_resuming_a_crafted_run_folder_exits_2_without_running_it(
    finished_run: Path, tmp_path: Path, crafted: str
) -> None:
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    target = _checkpoint(run) / crafted
    if crafted.endswith(".metadata"):
        target.write_bytes(pickle.dumps(_RunsCode(marker)))
    else:
        torch.save({"data": _RunsCode(marker)}, target)
    done = run_cli("train", *MINI, "--max-steps", "8", "--out", str(run))
    _assert_refused(done, str(target), "'posix.system'")
    assert not marker.exists()
    assert not (run / "checkpoints" / "step_00000008").exists()


@pytest.mark.parametrize(
    "text,needle",
    [("not json", "not a readable JSON"), ('{"step": "x"}', "'step' must be"), ("[]", "object")],
)
def test_malformed_checkpoint_marker_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    from pldr_llm.train.checkpointing import _read_marker

    marker = tmp_path / "COMPLETE"
    marker.write_text(text)
    with pytest.raises(PLDRError, match=needle):
        _read_marker(marker)
