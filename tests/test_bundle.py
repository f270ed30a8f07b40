"""Resolving ``--model``: published bundles, the project's own folders, hub ids, and the checks
made before any weight is read; ``pldr-llm convert``."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.bundle import (
    inspect_bundle,
    load_bundle,
    resolve_bundle,
    resolve_device,
    resolve_dtype,
)
from pldr_llm.core.errors import PLDRError
from support import PAPER_TOKENIZER_MODEL as MODEL_NAME
from support import PAPER_VOCAB_HP, copy_folder, make_bundle, write_hyperparameters
from support import run_cli as _cli

HP = PAPER_VOCAB_HP


@pytest.fixture(scope="module")
def bundle(
    tmp_path_factory: pytest.TempPathFactory, paper_tokenizer_dir: Path
) -> tuple[Path, PLDRModel]:
    folder = tmp_path_factory.mktemp("bundles") / "PLDRv51-Tiny-1"
    return folder, make_bundle(folder, paper_tokenizer_dir, HP)


def _same_weights(a: PLDRModel, b: PLDRModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(
            sa[key].float().cpu(), sb[key].float().cpu(), rtol=0, atol=0, msg=key
        )


# ---------------------------------------------------------------------- published bundles


@pytest.mark.slow
def test_reference_bundle_loads(bundle: tuple[Path, PLDRModel]) -> None:
    folder, original = bundle
    files = inspect_bundle(folder)
    assert files.kind == "reference"
    assert files.weights.name == "PLDRv51-Tiny-1-model-checkpoint.pth"
    assert (
        files.hyperparameters is not None
        and files.hyperparameters.name == "PLDRv51_Tiny_1_hyperparameters.py"
    )
    assert files.config.input_vocab_size == 32000 and files.config.activation == "silu"
    model, tok = load_bundle(folder)
    assert tok is not None and tok.vocab_size == 32000
    _same_weights(model, original)
    assert not model.training
    ids = torch.tensor([tok.prompt_ids("Power law graph attention")])
    torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_bundle_with_two_hyperparameter_files_picks_by_name(
    tmp_path: Path, paper_tokenizer_dir: Path
) -> None:
    folder = tmp_path / "b"
    make_bundle(folder, paper_tokenizer_dir, HP, name="PLDRv51-110M-2")
    write_hyperparameters(folder / "Something_else_hyperparameters.py", {**HP, "d_model": 32})
    files = inspect_bundle(folder)
    assert (
        files.hyperparameters is not None
        and files.hyperparameters.name == "PLDRv51_110M_2_hyperparameters.py"
    )
    (folder / "Third_hyperparameters.py").write_text(
        (folder / "Something_else_hyperparameters.py").read_text()
    )
    (folder / "PLDRv51_110M_2_hyperparameters.py").rename(folder / "Fourth_hyperparameters.py")
    with pytest.raises(PLDRError, match="several hyperparameter files"):
        inspect_bundle(folder)


def test_dtype_and_device(bundle: tuple[Path, PLDRModel]) -> None:
    model, _ = load_bundle(bundle[0], device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(None) is None
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PLDRError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(PLDRError, match="unknown dtype"):
        resolve_dtype("int8")
    if not torch.cuda.is_available():
        with pytest.raises(PLDRError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_a_torch_device_is_checked_like_a_name(bundle: tuple[Path, PLDRModel]) -> None:
    # A GPU index past the last one: "not available" without CUDA, "does not exist" with it;
    # either way a one-line PLDRError before any weight is read, not torch's error at .to().
    missing = torch.device("cuda", torch.cuda.device_count() + 7)
    with pytest.raises(PLDRError, match="CUDA is not available|does not exist"):
        load_bundle(bundle[0], device=missing)
    model, _ = load_bundle(bundle[0], device=torch.device("cpu"))
    assert model.device == torch.device("cpu")


# ---------------------------------------------------------------------- bad folders


def test_missing_and_ambiguous_files(tmp_path: Path, bundle: tuple[Path, PLDRModel]) -> None:
    folder = bundle[0]
    with pytest.raises(PLDRError, match="model folder not found"):
        resolve_bundle(tmp_path / "nowhere")
    with pytest.raises(PLDRError, match="not a file"):
        resolve_bundle(folder / "PLDRv51-Tiny-1-model-checkpoint.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PLDRError, match="no model in"):
        resolve_bundle(tmp_path / "empty")

    no_hp = copy_folder(folder, tmp_path / "no_hp", skip=("_hyperparameters.py",))
    with pytest.raises(PLDRError, match="no '\\*_hyperparameters.py' file"):
        resolve_bundle(no_hp)

    no_tok = copy_folder(folder, tmp_path / "no_tok", skip=(".tar.gz",))
    with pytest.raises(PLDRError, match="no tokenizer in"):
        load_bundle(no_tok)
    model, tok = load_bundle(no_tok, require_tokenizer=False)
    assert tok is None and model.config.d_model == HP["d_model"]

    two = copy_folder(folder, tmp_path / "two")
    (two / "PLDRv51-Tiny-2-model-checkpoint.pth").write_bytes(
        (two / "PLDRv51-Tiny-1-model-checkpoint.pth").read_bytes()
    )
    with pytest.raises(PLDRError, match="holds 2 checkpoints"):
        resolve_bundle(two)

    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text(PLDRConfig.from_hpdict(HP).to_json())
    with pytest.raises(PLDRError, match="has config.json but no model.safetensors"):
        resolve_bundle(own)
    hf_like = tmp_path / "hf_like"
    hf_like.mkdir()
    (hf_like / "config.json").write_text('{"model_type": "llama", "architectures": ["X"]}')
    (hf_like / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        PLDRError, match="transformers folder of model type 'llama', not a PLDR-LLM"
    ):
        resolve_bundle(hf_like)


def test_tampered_tokenizer_archive(
    tmp_path: Path, bundle: tuple[Path, PLDRModel], paper_tokenizer_dir: Path
) -> None:
    folder = copy_folder(bundle[0], tmp_path / "evil", skip=(".tar.gz",))
    with tarfile.open(folder / "tokenizer.tar.gz", "w:gz") as tar:
        tar.add(paper_tokenizer_dir / MODEL_NAME, arcname="../../escaped.model")
    with pytest.raises(PLDRError, match="escapes the target folder"):
        load_bundle(folder)
    assert not (tmp_path / "escaped.model").exists()


def test_vocabulary_mismatch_is_found_before_weights_are_read(
    tmp_path: Path, bundle: tuple[Path, PLDRModel]
) -> None:
    folder = copy_folder(bundle[0], tmp_path / "small_vocab")
    write_hyperparameters(
        folder / "PLDRv51_Tiny_1_hyperparameters.py", {**HP, "input_vocab_size": 1000}
    )
    # the weights are garbage: the vocabulary check must fire first
    (folder / "PLDRv51-Tiny-1-model-checkpoint.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PLDRError, match="32000 pieces but the model .* input_vocab_size=1000"):
        load_bundle(folder)


# ---------------------------------------------------------------------- own format and convert


def _assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pldr-llm: error:"), result.stderr
    assert message in lines[0], lines[0]


@pytest.mark.slow
def test_convert_to_own_format(
    tmp_path: Path, bundle: tuple[Path, PLDRModel], paper_tokenizer_dir: Path
) -> None:
    folder, original = bundle
    out = tmp_path / "converted"
    result = _cli("convert", "--model", str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer.vocab",
    ]
    assert (out / "tokenizer.model").read_bytes() == (paper_tokenizer_dir / MODEL_NAME).read_bytes()
    files = inspect_bundle(out)
    assert files.kind == "pldr" and files.config == PLDRConfig.from_hpdict(HP)
    model, tok = load_bundle(out)
    _same_weights(model, original)
    reference_tok = load_bundle(folder)[1]
    assert tok is not None and reference_tok is not None
    assert tok.encode("abc") == reference_tok.encode("abc")

    again = _cli("convert", "--model", str(folder), "--out", str(out))
    _assert_one_line_error(again, "pass --force")
    assert _cli("convert", "--model", str(folder), "--out", str(out), "--force").returncode == 0


@pytest.mark.slow
def test_convert_to_hf_and_back(tmp_path: Path, bundle: tuple[Path, PLDRModel]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("pldr_llm.hf.export")
    folder, original = bundle
    out = tmp_path / "hf"
    result = _cli("convert", "--model", str(folder), "--out", str(out), "--to", "hf")
    assert result.returncode == 0, result.stderr
    files = inspect_bundle(out)
    assert files.kind == "hf" and files.config == PLDRConfig.from_hpdict(HP)
    model, tok = load_bundle(out)  # read back without transformers
    _same_weights(model, original)
    assert tok is not None and tok.vocab_size == 32000


def test_convert_to_hf_without_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    from pldr_llm.commands import convert

    monkeypatch.setitem(sys.modules, "pldr_llm.hf.export", None)  # import now fails as "missing"
    with pytest.raises(PLDRError, match="needs pldr_llm.hf.export"):
        convert._export_hf()


@pytest.mark.slow
def test_cli_bad_bundles(
    tmp_path: Path, bundle: tuple[Path, PLDRModel], paper_tokenizer_dir: Path
) -> None:
    folder = bundle[0]
    two = copy_folder(folder, tmp_path / "two")
    (two / "Other-model-checkpoint.pth").write_bytes(
        (two / "PLDRv51-Tiny-1-model-checkpoint.pth").read_bytes()
    )
    _assert_one_line_error(
        _cli("convert", "--model", str(two), "--out", str(tmp_path / "o")), "holds 2 checkpoints"
    )
    _assert_one_line_error(
        _cli("convert", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")),
        "model folder not found",
    )
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- hub ids


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """The layout huggingface_hub keeps on disk: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    copy_folder(source, repo / "snapshots" / commit)


def _resolve_in_subprocess(spec: str, env: dict) -> subprocess.CompletedProcess[str]:
    # huggingface_hub reads HF_HUB_OFFLINE/HF_ENDPOINT at import: a fresh process per setting.
    return _cli("convert", "--model", spec, "--out", env.pop("_OUT"), env=env)


@pytest.mark.slow
def test_hub_id_from_cache_offline_and_network_failure(
    tmp_path: Path, bundle: tuple[Path, PLDRModel]
) -> None:
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "fromthesky/PLDRv51-Tiny-1", bundle[0])
    # an endpoint nobody listens on: any network access fails at once
    base = {
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }

    offline = _resolve_in_subprocess(
        "fromthesky/PLDRv51-Tiny-1", {**base, "HF_HUB_OFFLINE": "1", "_OUT": str(tmp_path / "a")}
    )
    assert offline.returncode == 0, offline.stderr
    _same_weights(load_bundle(tmp_path / "a")[0], bundle[1])

    # online but unreachable: the cached snapshot is used
    cached = _resolve_in_subprocess(
        "fromthesky/PLDRv51-Tiny-1", {**base, "_OUT": str(tmp_path / "b")}
    )
    assert cached.returncode == 0, cached.stderr

    missing = _resolve_in_subprocess("fromthesky/not-cached", {**base, "_OUT": str(tmp_path / "c")})
    _assert_one_line_error(
        missing, "could not fetch fromthesky/not-cached from the Hugging Face hub"
    )
    missing_offline = _resolve_in_subprocess(
        "fromthesky/not-cached", {**base, "HF_HUB_OFFLINE": "1", "_OUT": str(tmp_path / "d")}
    )
    _assert_one_line_error(
        missing_offline, "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    )


# ---------------------------------------------------------------------- resolve_weights


def _sharded_transformers_folder(folder: Path, model: PLDRModel) -> Path:
    """A transformers folder whose weights are split over two safetensors shards."""
    import json

    from pldr_llm.core.fileio import save_safetensors
    from pldr_llm.core.hf_folder import hf_state_from_core

    folder.mkdir(parents=True)
    state = hf_state_from_core(
        {k: v.contiguous() for k, v in model.state_dict().items()}, model.config
    )
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for shard, keys in shards.items():
        save_safetensors({k: state[k] for k in keys}, folder / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "pldrllm", **model.config.to_hf_dict()}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_resolve_weights_reads_every_layout_init_from_and_model_take(
    bundle: tuple[Path, PLDRModel], tmp_path: Path
) -> None:
    """One dispatcher for "path -> weights": the original's .pth (bundle or bare file), a
    project folder or its safetensors file, a sharded transformers folder; each gives the
    weights the model was saved with, and train.init_from loads them strictly."""
    from pldr_llm.bundle import resolve_weights
    from pldr_llm.train.run import _load_initial_weights

    folder, expected = bundle
    project = tmp_path / "project"
    expected.save(project)
    sharded = _sharded_transformers_folder(tmp_path / "hf", expected)
    pth = next(folder.glob("*.pth"))
    specs = [folder, pth, project, project / "model.safetensors", sharded]
    for spec in specs:
        state, config, _ = resolve_weights(str(spec))
        assert (config is None) == spec.is_file()
        started = PLDRModel(expected.config)
        _load_initial_weights(started, str(spec))
        _same_weights(started, expected)
    # --model reads the sharded folder through the same function
    _same_weights(load_bundle(sharded, require_tokenizer=False)[0], expected)


def test_resolve_weights_refuses_what_holds_no_weights(tmp_path: Path) -> None:
    from pldr_llm.bundle import resolve_weights
    from pldr_llm.train.run import _load_initial_weights

    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    with pytest.raises(PLDRError, match=r"notes\.txt is not a weights file"):
        resolve_weights(notes)
    with pytest.raises(PLDRError, match=r"^'train\.init_from': model folder not found"):
        _load_initial_weights(PLDRModel(PLDRConfig.from_hpdict(HP)), str(tmp_path / "nothing"))
