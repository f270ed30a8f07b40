"""Shared fixtures: the committed test data (tests/data), small configurations, GPU skips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels of pldr_llm.core.fused run in Triton's CPU interpreter (when
# Triton is installed), so that their tests run here too; this must be set before the kernels are
# defined, i.e. before pldr_llm is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support import PAPER_TOKENIZER_MODEL, TINY_HPDICT

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Everything the tests read lives here (tests/data/README.md says where each file came from).
DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests cleanly on machines without CUDA (and say so in the summary)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The test data committed with the repository."""
    return DATA


@pytest.fixture(scope="session")
def paper_tokenizer_dir() -> Path:
    """The paper's SentencePiece tokenizer folder (.model, .vocab, tokenizer_cases.json)."""
    return DATA / "paper" / "tokenizer"


@pytest.fixture(scope="session")
def paper_hyperparameters_file() -> Path:
    """The published ``PLDRv51_110M_2_hyperparameters.py``."""
    return DATA / "paper" / "PLDRv51_110M_2_hyperparameters.py"


@pytest.fixture(scope="session")
def paper_g_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper's G_LM pickles, rebuilt in their published format from the committed tensors.

    Pickles are not committed (project policy); the tensors are, as safetensors, and the identity
    ones are exact, so each file is written back as a protocol-5 pickle of CUDA-tagged tensors,
    byte-for-byte the structure of the published files (see tests/data/README.md).
    """
    from safetensors.torch import load_file

    from support import write_cuda_pickle

    folder = tmp_path_factory.mktemp("G_LM")
    source = DATA / "paper" / "G_LM"
    identity = [torch.eye(64).expand(1, 14, 64, 64).clone() for _ in range(5)]
    write_cuda_pickle(
        folder / "predefined_G_LM_cache_list_IDENTITY_5layer_14head_64x64_paper.pkl", identity
    )
    pairs = [[torch.zeros(1, 14, 64, 64), g.clone()] for g in identity]
    write_cuda_pickle(folder / "Gcachelst_init_mismatched_identity_NAB1_ablation.pkl", pairs)
    for name, stored in (
        ("PLDRv51_110M_1", "PLDRv51_110M_1_G_LM.safetensors"),
        ("RANDOM_NORMAL", "RANDOM_NORMAL_G_LM.safetensors"),
    ):
        tensors = load_file(str(source / stored))
        g_list = [tensors[f"layer{i}.G_LM"] for i in range(5)]
        write_cuda_pickle(
            folder / f"predefined_G_LM_cache_list_{name}_5layer_14head_64x64_paper.pkl", g_list
        )
    nab2 = load_file(str(source / "NAB2_random_normal_G_LM.safetensors"))
    pairs = [[torch.zeros(1, 14, 64, 64), nab2[f"layer{i}.G_LM"]] for i in range(5)]
    write_cuda_pickle(folder / "Gcachelst_init_mismatched_random_normal_NAB2_ablation.pkl", pairs)
    return folder


@pytest.fixture(scope="session")
def golden_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden tiny case, with the original's ``reference_checkpoint.pth`` rebuilt.

    The ``.pth`` is not committed (no checkpoints in git); it is written here exactly as the
    original writes it -- ``torch.save({"model_state_dict": ..., ...})`` with the original's key
    order -- from the committed ``reference_state.safetensors``.
    """
    from safetensors.torch import load_file

    source = DATA / "golden" / "tiny"
    folder = tmp_path_factory.mktemp("golden_tiny")
    for name in (
        "case.json",
        "expected.safetensors",
        "reference_state.safetensors",
        "trained_state.safetensors",
    ):
        (folder / name).symlink_to(source / name)
    layout = json.loads((source / "reference_checkpoint.json").read_text())
    state = load_file(str(source / "reference_state.safetensors"))
    ordered = {key: state[key] for key in layout["key_order"]}
    assert len(ordered) == len(state)
    torch.save(
        {
            "model_state_dict": ordered,
            "optimizer_state_dict": layout["optimizer_state_dict"],
            "loss": layout["loss"],
            "accuracy": layout["accuracy"],
        },
        folder / "reference_checkpoint.pth",
    )
    return folder


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


@pytest.fixture()
def tiny_model():
    """A random tiny model (seeded) for tests that need no golden data."""
    from pldr_llm import PLDRConfig, PLDRModel

    torch.manual_seed(0)
    return PLDRModel(PLDRConfig.from_hpdict(TINY_HPDICT)).eval()


@pytest.fixture()
def model_dir(tmp_path: Path, paper_tokenizer_dir: Path) -> Path:
    """A model folder (config.json, model.safetensors, tokenizer.model) that is not a run: the
    tiny model with the paper tokenizer. (A test file that needs another model defines its own
    ``model_dir``.)"""
    import shutil

    from pldr_llm import PLDRConfig, PLDRModel

    folder = tmp_path / "model"
    torch.manual_seed(0)
    PLDRModel(PLDRConfig.from_hpdict(TINY_HPDICT)).eval().save(folder)
    shutil.copy(paper_tokenizer_dir / PAPER_TOKENIZER_MODEL, folder / "tokenizer.model")
    return folder
