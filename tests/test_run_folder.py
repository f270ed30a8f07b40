"""A run folder belongs to one trainer and holds only a run; exports never overwrite a model
without --force and are byte-reproducible."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from pldr_llm import PLDRConfig, PLDRModel, save_reference_checkpoint
from pldr_llm.cli import main
from pldr_llm.core.errors import PLDRError
from support import MINI_TRAIN_ARGS, TINY_HPDICT, error_line

REPO = Path(__file__).resolve().parents[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def _own_log_handlers():
    """An in-process ``train`` adds a handler on the stderr pytest captures and later closes."""
    import logging

    logger = logging.getLogger("pldr_llm")
    before = list(logger.handlers)
    yield
    logger.handlers[:] = before


# ---------------------------------------------------------------------- train --out
def test_train_refuses_a_model_folder_and_leaves_it_untouched(model_dir: Path, capsys) -> None:
    before = _snapshot(model_dir)
    assert main(["train", "--preset", "tiny", "--out", str(model_dir), "--max-steps", "1"]) == 2
    line = error_line(capsys)
    assert "is not a run folder" in line
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        assert name in line
    assert _snapshot(model_dir) == before
    assert not (model_dir / ".lock").exists()


def test_foreign_entries_accepts_new_empty_and_run_folders(tmp_path: Path) -> None:
    from pldr_llm.train.runlock import foreign_entries

    assert foreign_entries(tmp_path / "new") == []
    assert foreign_entries(tmp_path) == []
    (tmp_path / "notes.txt").write_text("x")
    assert foreign_entries(tmp_path) == ["notes.txt"]
    (tmp_path / ".lock").write_text("")  # a run started here (and failed before run.yaml)
    assert foreign_entries(tmp_path) == []


# ---------------------------------------------------------------------- the lock
class _Main:
    is_main = True


def test_second_claim_is_refused_naming_the_holder_and_released_after(tmp_path: Path) -> None:
    from pldr_llm.train.runlock import claim_run_folder

    run = tmp_path / "run"
    with claim_run_folder(run, _Main()):
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(PLDRError, match=rf"in use by process {os.getpid()} "):
            with claim_run_folder(run, _Main()):
                pass
    with claim_run_folder(run, _Main()):  # released on exit: the next run takes it
        pass


@pytest.mark.slow
def test_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    from pldr_llm.train.runlock import claim_run_folder

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(run)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(PLDRError, match=f"in use by process {holder.pid} "):
        with claim_run_folder(run, _Main()):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # the file stays ...
    with claim_run_folder(run, _Main()):  # ... and blocks nothing
        assert (run / ".lock").read_text().strip() == str(os.getpid())


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from pldr_llm.train.runlock import claim_run_folder
class Main: is_main = True
with claim_run_folder(Path(sys.argv[1]), Main()):
    print("locked", flush=True)
    time.sleep(300)
"""

MINI = [*MINI_TRAIN_ARGS, "--warmup_steps", "2", "--save_every", "4", "--log_every", "4"]
MINI += ["--max-steps", "8"]


def _train(out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pldr_llm", "train", *MINI, "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_two_trainers_on_one_folder(tmp_path: Path) -> None:
    """The second exits 2 at once naming the first's PID; the first ends as an unshared run."""
    from safetensors.torch import load_file

    shared = tmp_path / "shared"
    first = _train(shared)
    deadline = time.monotonic() + 120
    lock = shared / ".lock"
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1]
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # holds the lock while the second one starts
    try:
        second = _train(shared)
        _, err = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pldr-llm: error: ") and f"in use by process {first.pid} " in last
    assert "Traceback" not in err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err

    alone = _train(tmp_path / "alone")
    _, err = alone.communicate(timeout=300)
    assert alone.returncode == 0, err
    got = load_file(str(shared / "model.safetensors"))
    want = load_file(str(tmp_path / "alone" / "model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# ---------------------------------------------------------------------- convert / .pth
@pytest.mark.parametrize("to", ["pldr", "hf"])
def test_convert_refuses_an_existing_model_folder_without_force(
    model_dir: Path, tmp_path: Path, capsys, to: str
) -> None:
    if to == "hf":
        pytest.importorskip("transformers")
    target = tmp_path / "target"
    shutil.copytree(model_dir, target)
    before = _snapshot(target)
    assert main(["convert", "--model", str(model_dir), "--out", str(target), "--to", to]) == 2
    line = error_line(capsys)
    assert "already holds config.json" in line and "--force" in line
    assert _snapshot(target) == before


def test_pth_export_is_byte_reproducible(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig.from_hpdict(TINY_HPDICT))
    a = save_reference_checkpoint(model, tmp_path / "a" / "m-model-checkpoint.pth", loss=1.5)
    b = save_reference_checkpoint(model, tmp_path / "b" / "m-model-checkpoint.pth", loss=1.5)
    assert a.read_bytes() == b.read_bytes()
    # The zip's inner folder is the file's own name (as the original's), not a temporary one.
    assert {n.split("/")[0] for n in zipfile.ZipFile(a).namelist()} == {"m-model-checkpoint"}
    assert sorted(p.name for p in a.parent.iterdir()) == ["m-model-checkpoint.pth"]
