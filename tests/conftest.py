"""Shared fixtures: the golden data beside the repository, small configurations, GPU skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests cleanly on machines without CUDA (and say so in the summary)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared golden data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def paper_tokenizer_dir(shared_dir: Path) -> Path:
    """The paper's SentencePiece tokenizer folder (.model, .vocab, tokenizer_cases.json)."""
    from support import PAPER_TOKENIZER_MODEL

    path = shared_dir / "paper" / "tokenizer"
    if not (path / PAPER_TOKENIZER_MODEL).is_file():
        pytest.skip(f"paper tokenizer not found in {path}")
    return path


@pytest.fixture(scope="session")
def paper_g_dir(shared_dir: Path) -> Path:
    """The paper's published G_LM pickles."""
    path = shared_dir / "paper" / "G_LM"
    if not path.is_dir():
        pytest.skip(f"paper G_LM files not found at {path}")
    return path


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    path = shared_dir / "golden" / "tiny"
    if not path.is_dir():
        pytest.skip(f"golden data not found at {path}")
    return path


@pytest.fixture(scope="session")
def golden_case(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "case.json").read_text())


@pytest.fixture(scope="session")
def golden_expected(golden_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "expected.safetensors"))


@pytest.fixture()
def golden_model(golden_dir: Path, golden_case: dict):
    """The golden tiny model loaded from the original's .pth checkpoint (fresh per test)."""
    from pldr_llm import load_reference_checkpoint

    return load_reference_checkpoint(golden_dir / "reference_checkpoint.pth", golden_case["hpdict"])


TINY_HPDICT = {
    "num_layers": 2,
    "d_model": 64,
    "num_heads": 4,
    "dff": 96,
    "num_reslayerA": 2,
    "num_denseA": 2,
    "A_dff": 24,
    "input_vocab_size": 300,
    "max_seq_len": 64,
}


@pytest.fixture()
def tiny_model():
    """A random tiny model (seeded) for tests that need no golden data."""
    from pldr_llm import PLDRConfig, PLDRModel

    torch.manual_seed(0)
    return PLDRModel(PLDRConfig.from_hpdict(TINY_HPDICT)).eval()
