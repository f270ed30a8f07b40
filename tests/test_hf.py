"""transformers integration: config, tokenizer, export, auto classes, generate(), remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pldr_llm.core  # noqa: E402
from pldr_llm import PLDRConfig, PLDRModel, generate  # noqa: E402
from pldr_llm.core.errors import PLDRError  # noqa: E402
from support import PAPER_TOKENIZER_MODEL, hf_greedy, paper_vocab_model  # noqa: E402

MODES = [(True, True), (True, False), (False, True), (False, False)]


@pytest.fixture(scope="module")
def hf():
    import pldr_llm.hf

    return pldr_llm.hf


@pytest.fixture(scope="module")
def tokenizer_path(paper_tokenizer_dir: Path) -> Path:
    return paper_tokenizer_dir / PAPER_TOKENIZER_MODEL


@pytest.fixture(scope="module")
def golden_export(tmp_path_factory, golden_dir: Path, golden_case: dict, hf) -> Path:
    """The golden checkpoint exported as a transformers folder (no tokenizer: vocab 300)."""
    from pldr_llm import load_reference_checkpoint

    model = load_reference_checkpoint(
        golden_dir / "reference_checkpoint.pth", golden_case["hpdict"]
    )
    out = tmp_path_factory.mktemp("golden_hf")
    hf.export_hf(model, None, out)
    return out


def _mode_key(kv: bool, g: bool) -> str:
    return f"gen_kv{int(kv)}_g{int(g)}"


def _native_greedy(model: PLDRModel, prompt: torch.Tensor, steps: int, **options) -> torch.Tensor:
    """The native loop's greedy ids, not stopping at end-of-text (what ``hf_greedy`` must give)."""
    return generate(model, prompt, steps, top_k=1, stop_at_eos=False, **options)


# ---------------------------------------------------------------------------- config / tokenizer


def test_config_round_trips_core_config(hf):
    core = PLDRConfig(
        num_layers=3,
        d_model=48,
        num_heads=4,
        dff=80,
        A_dff=12,
        input_vocab_size=500,
        max_seq_len=96,
    )
    config = hf.PldrllmConfig.from_architecture(core.to_dict())
    assert PLDRConfig(**config.architecture()) == core
    # transformers-standard names read through to the PLDR names
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (48, 3, 4)
    assert (config.vocab_size, config.max_position_embeddings) == (500, 96)
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 3, 2)
    assert config.tie_word_embeddings is False


def test_config_defaults_are_the_core_defaults(hf):
    assert hf.PldrllmConfig().pldr_config() == PLDRConfig()
    # head_dim follows the width and heads given; older exports' PLDRConfig names still load
    config = hf.PldrllmConfig(d_model=64, num_heads=4, version="v510G")
    assert (config.hidden_size, config.head_dim, config.custom_G_type) == (64, 16, "external")


def test_tokenizer_encodes_without_end_of_text(hf, tokenizer_path: Path, paper_tokenizer_dir: Path):
    from pldr_llm.tokenizer import load_tokenizer

    tok = hf.PldrllmTokenizer(vocab_file=str(tokenizer_path))
    native = load_tokenizer(tokenizer_path)
    cases = json.loads((paper_tokenizer_dir / "tokenizer_cases.json").read_text())["cases"]
    for case in cases:
        ids = tok(case["text"])["input_ids"]
        assert ids == case["ids"][:-1], case["text"]
        assert tok.decode(ids) == case["decoded_without_eos"]
        assert tok.decode(case["ids"], skip_special_tokens=True) == case["decoded_without_eos"]
        if ids:
            assert ids == native.prompt_ids(case["text"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (
        0,
        3,
        1,
        None,
    )
    # A literal special piece is text, as SentencePiece (and the original) encode it.
    assert 3 not in tok("a [END] b")["input_ids"]
    batch = tok(["a b c", "hello"], padding=True, padding_side="left", return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == 0 and batch["attention_mask"][1].tolist() == [0, 0, 1]


# ---------------------------------------------------------------------------- export / loading


def test_export_layout_weights_and_code(golden_export: Path, golden_model):
    from safetensors.torch import load_file

    names = {p.name for p in golden_export.iterdir()}
    for required in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "modeling_pldrllm.py",
        "configuration_pldrllm.py",
        "tokenization_pldrllm.py",
        "model.py",
        "plga.py",
    ):
        assert required in names
    state = load_file(str(golden_export / "model.safetensors"))
    reference = golden_model.state_dict()
    assert set(state) == set(reference)  # the original's key names, nothing else
    for key, tensor in reference.items():
        assert torch.equal(state[key], tensor), key
    config = json.loads((golden_export / "config.json").read_text())
    assert config["model_type"] == "pldrllm"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pldrllm.PldrllmForCausalLM"
    # The copied code is the core's, unchanged (so what loads there is what the tests ran).
    core = Path(pldr_llm.core.__file__).parent
    for path in golden_export.glob("*.py"):
        assert path.read_text() == (core / path.name).read_text(), path.name


def test_code_bundle_refuses_what_a_flat_folder_cannot_carry():
    from pldr_llm.core.code_bundle import CodeBundleError, sibling_imports

    imports = "from .errors import PLDRError\n\ndef f():\n    from .plga import A\n"
    assert sibling_imports("fake.py", imports) == {"errors", "plga"}
    for source in (
        "from pldr_llm.core.errors import PLDRError\n",  # not installed where the folder is used
        "import pldr_llm\n",
        "from ..core import errors\n",  # transformers copies one flat folder
        "from . import errors\n",  # transformers' scan does not follow this form
        '"""Doc.\nfrom pldr_llm.core.config import X\n"""\n',  # its scan reads docstrings too
        '"""Doc.\n    from .train import X\n"""\n',  # ... and would look for train.py
    ):
        with pytest.raises(CodeBundleError):
            sibling_imports("fake.py", source)


def test_code_files_follow_the_imports_and_name_missing_ones(tmp_path: Path):
    from pldr_llm.core.code_bundle import CodeBundleError, code_files

    (tmp_path / "modeling_pldrllm.py").write_text("from .a import X\n")
    (tmp_path / "a.py").write_text("def f():\n    from .b import Y\n")
    (tmp_path / "b.py").write_text("Y = 1\n")
    (tmp_path / "unused.py").write_text("Z = 1\n")
    # The configuration's and tokenizer's files may sit in another folder of a loaded model.
    assert set(code_files(tmp_path)) == {"modeling_pldrllm.py", "a.py", "b.py"}
    (tmp_path / "b.py").unlink()
    with pytest.raises(CodeBundleError, match="b.py is missing"):
        code_files(tmp_path)


@pytest.mark.slow
def test_auto_classes_reproduce_golden_logits(
    golden_export: Path, golden_model, golden_expected, hf
):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert isinstance(AutoConfig.from_pretrained(golden_export), hf.PldrllmConfig)
    model = AutoModelForCausalLM.from_pretrained(golden_export)
    assert isinstance(model, hf.PldrllmForCausalLM)
    ids = golden_expected["input_ids"]
    with torch.no_grad():
        # Without a mask and with mask inference off: the original's semantics, padded row included.
        logits = model(ids, infer_padding_mask=False).logits
        torch.testing.assert_close(logits, golden_expected["logits"], atol=1e-5, rtol=1e-4)
        # Default: pad ids (0) are padding with per-row semantics -> each row equals its lone run.
        batched = model(ids).logits
        for row in range(ids.shape[0]):
            real = int((ids[row] != 0).sum())
            lone = golden_model(ids[row : row + 1, :real]).logits[0]
            torch.testing.assert_close(batched[row, :real], lone, atol=1e-5, rtol=1e-4)
        # Loss: transformers' shifted causal-LM loss.
        labels = ids.clone()
        labels[labels == 0] = -100
        out = model(ids, labels=labels)
        manual = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        torch.testing.assert_close(out.loss, manual)


@pytest.mark.slow
def test_folder_reads_back_without_transformers_and_v510G_exports(
    golden_export, golden_model, tmp_path, hf
):
    from transformers import AutoModelForCausalLM

    from pldr_llm import predefined_G_model
    from pldr_llm.bundle import load_bundle

    core, tok = load_bundle(golden_export, require_tokenizer=False)
    assert tok is None and core.config == golden_model.config
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(core(ids).logits, golden_model(ids).logits, atol=0, rtol=0)
    # A v510G model (predefined G_LM buffers, no metric learner) exports and reloads too.
    config = golden_model.config
    g_list = [
        torch.randn(1, config.num_heads, config.depth, config.depth)
        for _ in range(config.num_layers)
    ]
    g_model = predefined_G_model(golden_model, g_list).eval()
    hf.export_hf(g_model, None, tmp_path / "g")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    assert loaded.config.version == "v510G"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, g_model(ids).logits, atol=0, rtol=0)


def test_missing_weights_are_an_error(golden_export: Path, tmp_path: Path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    shutil.copytree(golden_export, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["final_layer.bias"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PLDRError, match="final_layer.bias"):
        AutoModelForCausalLM.from_pretrained(broken)


# ---------------------------------------------------------------------------- generate()


@pytest.mark.slow
@pytest.mark.parametrize("kv,g", MODES)
def test_generate_matches_native_and_golden(
    kv, g, golden_export: Path, golden_model, golden_expected, hf
):
    from transformers import AutoModelForCausalLM

    prompt = golden_expected["prompt_ids"].reshape(1, -1)
    expected = golden_expected[f"{_mode_key(kv, g)}.ids"].reshape(1, -1)
    native = _native_greedy(golden_model, prompt, 8, enable_kvcache=kv, enable_Gcache=g)
    assert torch.equal(native, expected)
    for model in (
        hf.PldrllmForCausalLM.from_core(golden_model),
        AutoModelForCausalLM.from_pretrained(golden_export),
    ):
        out = hf_greedy(model, prompt, 8, enable_kvcache=kv, enable_Gcache=g)
        assert torch.equal(out, expected)


def test_generate_with_custom_G_init(golden_model, golden_expected, hf):
    config = golden_model.config
    eye = torch.eye(config.depth).expand(1, config.num_heads, -1, -1)
    g_init = [(torch.zeros_like(eye), eye) for _ in range(config.num_layers)]
    prompt = golden_expected["prompt_ids"].reshape(1, -1)
    model = hf.PldrllmForCausalLM.from_core(golden_model)
    out = hf_greedy(model, prompt, 8, enable_kvcache=True, enable_Gcache=False, G_init=g_init)
    assert torch.equal(out[0], golden_expected["gen_identityG.ids"])


@pytest.mark.slow
def test_transformers_loop_takes_a_G_init_per_row(golden_model, hf):
    """transformers' own loop (here: scores asked for) accepts one G_init row per batch row
    (``prepare_g_init(..., rows=B)``); each row decodes as it does alone with its own G."""
    config = golden_model.config
    torch.manual_seed(5)
    shape = (config.num_heads, config.depth, config.depth)
    g_rows = [
        torch.stack([torch.eye(config.depth).expand(shape), torch.randn(shape)])
        for _ in range(config.num_layers)
    ]
    prompts = torch.tensor([[5, 17, 42, 99], [11, 12, 13, 14]])
    model = hf.PldrllmForCausalLM.from_core(golden_model)
    out = hf_greedy(
        model,
        prompts,
        6,
        enable_kvcache=True,
        enable_Gcache=False,
        G_init=g_rows,
        output_scores=True,
        return_dict_in_generate=True,
    )
    for row in range(2):
        g_row = [g[row] for g in g_rows]
        alone = _native_greedy(
            golden_model, prompts[row], 6, enable_kvcache=True, enable_Gcache=False, G_init=g_row
        )
        assert torch.equal(out.sequences[row], alone), row
    assert not torch.equal(out.sequences[0], out.sequences[1])  # the rows' G differ
    three = [torch.cat([g, g[:1]]) for g in g_rows]  # 3 rows of G for 2 prompts
    with pytest.raises(PLDRError, match="needs \\[1 or 2, "):
        model.generate(
            prompts,
            max_new_tokens=2,
            G_init=three,
            output_scores=True,
            return_dict_in_generate=True,
        )
    with pytest.raises(PLDRError, match="needs \\[1, "):  # the native loop: one G per layer
        model.generate(prompts, max_new_tokens=2, G_init=g_rows)


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("kv,g", MODES)
def test_batched_generate_with_padding_matches_lone_native_runs(kv, g, golden_model, hf):
    prompts = [[5, 17, 42, 99, 3, 7], [11, 12], [200, 201, 202, 9]]
    ids, mask = _left_padded(prompts)
    model = hf.PldrllmForCausalLM.from_core(golden_model)
    out = hf_greedy(model, ids, 6, attention_mask=mask, enable_kvcache=kv, enable_Gcache=g)
    for row, prompt in enumerate(prompts):
        lone = _native_greedy(
            golden_model, torch.tensor(prompt), 6, enable_kvcache=kv, enable_Gcache=g
        )
        assert out[row, ids.shape[1] - len(prompt) :].tolist() == lone.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kv,g", MODES)
def test_sampling_draws_the_native_ids(kv, g, golden_model, hf):
    prompts = [[5, 17, 42, 99], [11, 12]]
    ids, mask = _left_padded(prompts)
    model = hf.PldrllmForCausalLM.from_core(golden_model)
    settings = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}
    torch.manual_seed(11)
    native = generate(
        golden_model, ids, 8, attention_mask=mask, enable_kvcache=kv, enable_Gcache=g, **settings
    )
    torch.manual_seed(11)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=True,
        enable_kvcache=kv,
        enable_Gcache=g,
        **settings,
    )
    assert torch.equal(out, native[:, : out.shape[1]])
    torch.manual_seed(12)
    other = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, **settings)
    assert not torch.equal(other, out)  # the seed matters: it really samples


def test_static_cache_generate_reaches_the_native_loop(golden_model, golden_expected, hf):
    """transformers' static-cache recipe runs on the native loop; transformers' own loop (asked
    for scores) gives the same ids, so both paths agree."""
    prompt = golden_expected["prompt_ids"].reshape(1, -1)
    model = hf.PldrllmForCausalLM.from_core(golden_model)
    native = _native_greedy(golden_model, prompt, 8)
    routed = hf_greedy(model, prompt, 8, cache_implementation="static")
    assert torch.equal(routed, native)
    own = hf_greedy(
        model,
        prompt,
        8,
        return_dict_in_generate=True,
        output_scores=True,
        output_attentions=False,  # not a native-loop argument: transformers' own loop
    )
    assert torch.equal(own.sequences, native) and len(own.scores) == 8


@pytest.mark.slow
def test_converted_bundle_generates_native_ids(tmp_path: Path, tokenizer_path: Path):
    """``pldr-llm convert --to hf`` of a pldr-llm folder; the export then generates as native."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pldr_llm.bundle import load_bundle
    from pldr_llm.cli import main
    from pldr_llm.tokenizer import load_tokenizer

    own = tmp_path / "own"
    paper_vocab_model(3).save(own)
    load_tokenizer(tokenizer_path).save(own)
    out = tmp_path / "hf"
    assert main(["convert", "--model", str(own), "--out", str(out), "--to", "hf"]) == 0
    native_model, native_tok = load_bundle(str(own))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "The quick brown fox"
    prompt = tokenizer(text, return_tensors="pt")["input_ids"]
    assert prompt[0].tolist() == native_tok.prompt_ids(text)
    for kv, g in MODES:
        native = _native_greedy(native_model, prompt, 6, enable_kvcache=kv, enable_Gcache=g)
        out_ids = hf_greedy(model, prompt, 6, enable_kvcache=kv, enable_Gcache=g)
        assert torch.equal(out_ids, native), (kv, g)


_REMOTE_SCRIPT = r"""
import json, sys
sys.modules["pldr_llm"] = None  # as if the package were not installed
import torch
from transformers import AutoModelForCausalLM
folder, prompt, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
result = {"module": type(model).__module__}
for kv in (True, False):
    for g in (True, False):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                             enable_kvcache=kv, enable_Gcache=g, eos_token_id=None)
        result[f"gen_kv{int(kv)}_g{int(g)}"] = out[0].tolist()
model.save_pretrained(sys.argv[4])  # saved again from the loaded copy: its files travel on
print(json.dumps(result))
"""


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package(
    golden_export: Path, golden_expected, tmp_path: Path
):
    prompt = golden_expected["prompt_ids"].tolist()
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    resaved = str(tmp_path / "resaved")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _REMOTE_SCRIPT,
            str(golden_export),
            json.dumps(prompt),
            "8",
            resaved,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules")
    for kv, g in MODES:
        key = _mode_key(kv, g)
        assert result[key] == golden_expected[f"{key}.ids"].tolist(), key
    # The copy saved again carries the same model code, byte for byte (the tokenizer's file
    # travels with the tokenizer, which this script did not load).
    core = Path(pldr_llm.core.__file__).parent
    carried = {p.name for p in golden_export.glob("*.py")} - {"tokenization_pldrllm.py"}
    assert {p.name for p in Path(resaved).glob("*.py")} == carried
    for name in carried:
        assert (Path(resaved) / name).read_text() == (core / name).read_text(), name


def test_core_follows_the_wrapper_without_side_effects(hf):
    """``model.core`` is a plain accessor; mode, attention and children reach it when they change."""
    core = paper_vocab_model(3)
    model = hf.PldrllmForCausalLM.from_core(core)
    assert model.core is core and not core.training
    model.train()
    assert core.training and core.decoder.training
    model.eval()
    assert not core.training
    model.set_attn_implementation("eager")
    assert core.attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    assert core.attn_implementation == "sdpa"
    replacement = PLDRModel(core.config).decoder
    model.decoder = replacement
    assert core.decoder is replacement
    core.training = True  # reading the accessor changes nothing
    assert model.core.training and not model.training


def test_input_embeddings_are_set_on_the_core_and_must_be_an_embedding(hf):
    """``set_input_embeddings`` (transformers' resizing) replaces the core's embedding too; a
    module of another kind is refused in one line instead of failing in the next forward."""
    core = paper_vocab_model(1)
    model = hf.PldrllmForCausalLM.from_core(core)
    embedding = torch.nn.Embedding(core.config.input_vocab_size, core.config.d_model)
    model.set_input_embeddings(embedding)
    assert model.get_input_embeddings() is embedding and core.decoder.embedding is embedding
    with pytest.raises(PLDRError, match="must be a torch.nn.Embedding"):
        model.set_input_embeddings(torch.nn.Linear(2, 2))
    assert core.decoder.embedding is embedding
