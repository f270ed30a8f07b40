"""The authors' transformers format (``PldrllmConfig``, ``model_type: "pldrllm"``): folders built
here key by key as their implementation writes them (learned G; custom_G_type identity, random,
external with ``decoder.past_G_values``; reference and rotate-half RoPE; biases off; rope_theta
500000) load through the CLI, ``load_bundle``, transformers and the lm-eval ``pldrllm`` model, and
all four decode the same greedy ids as the native model built from the same weights."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pldr_llm import PLDRConfig, PLDRModel, generate, load_bundle, predefined_G_model
from pldr_llm.core.errors import PLDRError
from pldr_llm.core.rope import RotaryEmbedding
from support import PAPER_TOKENIZER_MODEL, paper_vocab_model

PROMPT = "Once upon a time"
NEW = 6

# name -> (PLDRConfig switches, custom_G_type)
VARIANTS = {
    "learned": ({}, None),
    "identity": ({}, "identity"),
    "random": ({}, "random"),
    "external": ({"reference_rope": False, "rope_theta": 500000.0}, "external"),
    "rotate_half": ({"reference_rope": False}, None),
    "theta_500k": ({"rope_theta": 500000.0}, None),
    "no_biases": (
        {"attention_bias": False, "glu_bias": False, "final_bias": False, "layer_norm_eps": 1e-5},
        None,
    ),
    "linear_scaling": (
        {"reference_rope": False, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        None,
    ),
}


def _learned_model(seed: int, **switches) -> PLDRModel:
    """A seeded tiny model whose embedding fits the paper tokenizer (32000 pieces)."""
    model = paper_vocab_model(seed, **switches)
    with torch.no_grad():  # nonzero biases, so that dropping them would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model


def _predefined_G(kind: str, model: PLDRModel) -> torch.Tensor:
    """past_G_values [L, 3, 1, H, dk, dk] as the authors' implementation holds them."""
    cfg = model.config
    shape = (cfg.num_layers, 1, cfg.num_heads, cfg.depth, cfg.depth)
    if kind == "identity":
        g = torch.eye(cfg.depth).expand(shape).clone()
    elif kind == "random":
        g = torch.randn(shape)
    else:  # external: an already learned G_LM, here inferred by the learned model
        from pldr_llm.core.variants import infer_G

        g = torch.stack([entry.G_LM for entry in infer_G(model)])
    zeros = torch.zeros_like(g)
    return torch.stack([zeros, zeros, g], dim=1)


def write_authors_folder(
    folder: Path,
    model: PLDRModel,
    tokenizer_dir: Path,
    custom_G_type: str | None = None,
    past_G: torch.Tensor | None = None,
    add_bos_token: bool = False,
) -> None:
    """A folder as the authors' transformers implementation saves it (their key names)."""
    folder.mkdir(parents=True)
    cfg = model.config
    config = {
        "architectures": ["PldrllmForCausalLM"],
        "model_type": "pldrllm",
        "vocab_size": cfg.input_vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.dff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "head_dim": cfg.depth,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "tie_word_embeddings": False,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "attention_bias": cfg.attention_bias,
        "glu_bias": cfg.glu_bias,
        "final_bias": cfg.final_bias,
        "reference_rope": cfg.reference_rope,
        "attention_dropout": 0.0,
        "num_reslayerA": cfg.num_reslayerA,
        "num_denseA": cfg.num_denseA,
        "A_dff": cfg.A_dff,
        "custom_G_type": custom_G_type,
        "cache_first_G": False,
        "output_pldr_attentions": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "transformers_version": "4.56.0",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if custom_G_type is not None:
        # No metric learner and no power-law weights in a predefined-G model.
        learner = (".plgatt_layer.", ".reslayerAs.", ".mha1.layernorm1.")
        state = {k: v for k, v in state.items() if not any(p in k for p in learner)}
        state["decoder.past_G_values"] = past_G.contiguous()
        state["decoder.past_G_values_status"] = torch.ones(cfg.num_layers, dtype=torch.bool)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tokenizer_dir / PAPER_TOKENIZER_MODEL, folder / "tokenizer.model")
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": "[START]",
        "eos_token": "[END]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, paper_tokenizer_dir: Path) -> dict[str, tuple[Path, PLDRModel]]:
    """Every variant's folder with the native model built from the same weights."""
    root = tmp_path_factory.mktemp("authors")
    out = {}
    for seed, (name, (switches, custom)) in enumerate(VARIANTS.items()):
        learned = _learned_model(seed, **switches)
        past_G = _predefined_G(custom, learned) if custom else None
        write_authors_folder(root / name, learned, paper_tokenizer_dir, custom, past_G)
        native = learned
        if custom is not None:
            native = predefined_G_model(learned, [g for g in past_G[:, 2]]).eval()
        out[name] = (root / name, native)
    return out


@pytest.fixture(scope="module")
def tok(paper_tokenizer_dir: Path):
    from pldr_llm.tokenizer import load_tokenizer

    return load_tokenizer(paper_tokenizer_dir / PAPER_TOKENIZER_MODEL)


def _greedy(model: PLDRModel, prompt: list[int]) -> list[int]:
    return generate(model, torch.tensor(prompt), max_new_tokens=NEW, top_k=1).tolist()


# ---------------------------------------------------------------------------- configuration


def test_config_reads_every_authors_key():
    data = {
        "model_type": "pldrllm",
        "vocab_size": 500,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "head_dim": 12,
        "hidden_act": "silu",
        "max_position_embeddings": 96,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "attention_bias": False,
        "glu_bias": False,
        "final_bias": False,
        "reference_rope": False,
        "num_reslayerA": 3,
        "num_denseA": 1,
        "A_dff": 20,
        "custom_G_type": "random",
        "cache_first_G": True,
    }
    config = PLDRConfig.from_hf_dict(data)
    assert config == PLDRConfig(
        num_layers=3,
        d_model=48,
        num_heads=4,
        dff=80,
        A_dff=20,
        num_reslayerA=3,
        num_denseA=1,
        input_vocab_size=500,
        max_seq_len=96,
        version="v510G",
        rope_theta=500000.0,
        reference_rope=False,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        attention_bias=False,
        glu_bias=False,
        final_bias=False,
        layer_norm_eps=1e-5,
        cache_first_G=True,
    )
    written = config.to_hf_dict()
    assert {k: written[k] for k in data if k != "model_type" and k != "custom_G_type"} == {
        k: v for k, v in data.items() if k != "model_type" and k != "custom_G_type"
    }
    assert written["custom_G_type"] == "external"  # G_LM travels in the weights
    assert PLDRConfig.from_hf_dict(written) == config
    # Today's defaults are the original's fixed choices.
    assert PLDRConfig.from_hf_dict({**data, "custom_G_type": None}).version == "v510"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"custom_G_type": "learned"}, "custom_G_type must be null or one of"),
        ({"head_dim": 16}, "head_dim=16 differs"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"rope_scaling": {"rope_type": "linear"}}, "needs a positive 'factor'"),
        ({"reference_rope": True}, "applies only with reference_rope=false"),
        ({"hidden_act": "gelu_new"}, "unsupported activation"),
    ],
)
def test_bad_configs_are_one_line_errors(change, message):
    data = {
        "model_type": "pldrllm",
        "vocab_size": 500,
        "hidden_size": 48,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 64,
        "A_dff": 8,
        "reference_rope": False,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        **change,
    }
    with pytest.raises(PLDRError, match=message) as info:
        PLDRConfig.from_hf_dict(data)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- rotary embedding


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_rotate_half_matches_transformers_llama_rotation(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    dim, theta = 16, 500000.0
    kwargs = dict(hidden_size=32, num_attention_heads=2, head_dim=dim, max_position_embeddings=64)
    if int(transformers.__version__.split(".")[0]) >= 5:
        llama = transformers.LlamaConfig(
            **kwargs,
            rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": theta},
        )
    else:
        llama = transformers.LlamaConfig(**kwargs, rope_theta=theta, rope_scaling=scaling)
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 10, 2, dim).unbind(0)  # [B, L, H, dk]
    positions = torch.tensor(
        [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [7, 8, 20, 33, 40, 41, 50, 60, 61, 63]]
    )
    cos, sin = LlamaRotaryEmbedding(llama)(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    rope = RotaryEmbedding(dim, 64, theta, interleaved=False, scaling=scaling)
    torch.testing.assert_close(rope(q, positions), want_q, atol=0, rtol=0)
    torch.testing.assert_close(rope(k, positions), want_k, atol=0, rtol=0)
    # The reference (interleaved) rotation is a different function of the same inputs.
    assert not torch.allclose(RotaryEmbedding(dim, 64, theta)(q, positions), want_q)


# ---------------------------------------------------------------------------- loading


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_load_bundle_equals_the_native_model(folders, name):
    folder, native = folders[name]
    model, tok = load_bundle(folder)
    assert model.config == native.config
    assert model.config.version == ("v510G" if VARIANTS[name][1] else "v510")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, native(ids).logits, atol=0, rtol=0)
    if VARIANTS[name][1] is not None:
        for g, ref in zip(model.predefined_G(), native.predefined_G()):
            torch.testing.assert_close(g, ref, atol=0, rtol=0)
    assert tok is not None and tok.vocab_size == 32000


def test_the_switches_change_the_model(folders):
    """Each switch is a different function: the folder read with the defaults would not match."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    defaults = {"rope_theta": 10000.0, "reference_rope": True, "rope_scaling": None}
    for name in ("rotate_half", "theta_500k", "linear_scaling", "external"):
        folder, native = folders[name]
        data = json.loads((folder / "config.json").read_text())
        plain = PLDRModel(PLDRConfig.from_hf_dict({**data, **defaults})).eval()
        plain.load_state_dict(native.state_dict())
        with torch.no_grad():
            assert not torch.allclose(plain(ids).logits, native(ids).logits, atol=1e-4), name
    # Biases off: the folder has none of them (and strict loading accepted it).
    state = load_file(str(folders["no_biases"][0] / "model.safetensors"))
    for part in (".wq.", ".wk.", ".wv.", ".dense.", ".gluw1.", ".gluw3.", "final_layer."):
        assert not any(part in k and k.endswith(".bias") for k in state), part
        assert any(part in k for k in state), part


@pytest.mark.slow
def test_every_entry_point_decodes_the_same_greedy_ids(folders, tok):
    """CLI, load_bundle, transformers generate() and lm-eval pldrllm agree with the native model."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import pldr_llm.hf  # noqa: F401  (registers the Auto classes)

    prompt = tok.prompt_ids(PROMPT)
    for name, (folder, native) in folders.items():
        expected = _greedy(native, prompt)
        assert len(expected) > len(prompt)

        bundled, _ = load_bundle(folder)
        assert _greedy(bundled, prompt) == expected, name

        hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert hf_model.config.version == native.config.version
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
        assert out[0].tolist() == expected, name

        if name in ("learned", "identity", "external", "no_biases"):
            _check_cli(folder, tok, expected, name)
            _check_lm_eval(folder, tok, prompt, expected, name)


def _check_cli(folder: Path, tok, expected: list[int], name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pldr_llm", "generate", "--model", str(folder), "--prompt", PROMPT]
        + ["--top-k", "1", "--max-new-tokens", str(NEW)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == tok.decode(expected) + "\n", name


def _check_lm_eval(folder: Path, tok, prompt: list[int], expected: list[int], name: str) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    lm = PLDRLLMEvalModel(pretrained=str(folder), device="cpu")
    gen_kwargs = {"until": ["\n\n\n"], "max_gen_toks": NEW, "do_sample": False}
    (text,) = lm.generate_until([Instance("generate_until", {}, (PROMPT, gen_kwargs), 0)])
    # the continuation as it reads after the prompt (its leading space kept)
    after = tok.decode(list(expected))[len(tok.decode(list(prompt))) :]
    assert text == after.split("\n\n\n")[0], name


def test_tokenizer_config_add_bos_token_is_respected(tmp_path, paper_tokenizer_dir, tok):
    model = _learned_model(11)
    write_authors_folder(tmp_path / "bos", model, paper_tokenizer_dir, add_bos_token=True)
    _, loaded_tok = load_bundle(tmp_path / "bos")
    assert loaded_tok.prompt_ids(PROMPT) == [2] + tok.encode(PROMPT, add_eos=False)
    # Folders without the flag (and the original's bundles) keep the original's prompts.
    write_authors_folder(tmp_path / "plain", model, paper_tokenizer_dir)
    _, plain_tok = load_bundle(tmp_path / "plain")
    assert plain_tok.prompt_ids(PROMPT) == tok.encode(PROMPT, add_eos=False)


def test_bad_past_G_values_is_a_one_line_error(tmp_path, paper_tokenizer_dir):
    model = _learned_model(12)
    past_G = _predefined_G("identity", model)[:, :, :, :1]  # one head too few
    write_authors_folder(tmp_path / "bad", model, paper_tokenizer_dir, "identity", past_G)
    with pytest.raises(PLDRError, match="past_G_values has shape") as info:
        load_bundle(tmp_path / "bad")
    assert "\n" not in str(info.value)


def test_cache_first_G_reuses_the_first_rows_G():
    from pldr_llm.core.cache import GCacheEntry

    model = _learned_model(13, cache_first_G=True)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        out = model(ids, output_deductive=True)
        for entry, deductive in zip(out.cache.g, out.deductive):
            assert entry.G_LM.shape[0] == 1
            torch.testing.assert_close(entry.G_LM[0], deductive.G_LM[0], atol=0, rtol=0)
            assert not torch.allclose(deductive.G_LM[0], deductive.G_LM[1])
        # The next step attends with row 0's G in both rows, not with each row's own.
        step = torch.tensor([[13], [13]])
        first = model(step, cache=out.cache).logits
        own_g = [GCacheEntry(d.A_LM, d.G_LM, d.A_P) for d in out.deductive]
        own = model(step, cache=type(out.cache)(kv=out.cache.kv, g=own_g)).logits
        torch.testing.assert_close(first[0], own[0], atol=1e-6, rtol=0)
        assert not torch.allclose(first[1], own[1], atol=1e-4)


# ---------------------------------------------------------------------------- export


@pytest.mark.slow
def test_convert_to_hf_writes_the_authors_format(folders, tmp_path):
    pytest.importorskip("transformers")
    for name in ("external", "no_biases", "linear_scaling"):
        folder, native = folders[name]
        out = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "pldr_llm", "convert", "--model", str(folder)]
            + ["--out", str(out), "--to", "hf"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        written = json.loads((out / "config.json").read_text())
        original = json.loads((folder / "config.json").read_text())
        keys = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
            "head_dim hidden_act max_position_embeddings layer_norm_eps pad_token_id "
            "bos_token_id eos_token_id rope_theta rope_scaling attention_bias glu_bias "
            "final_bias reference_rope num_reslayerA num_denseA A_dff"
        ).split()
        assert {k: written[k] for k in keys} == {k: original[k] for k in keys}, name
        assert "d_model" not in written and "version" not in written
        assert (written["custom_G_type"] is None) == (name != "external")
        state = load_file(str(out / "model.safetensors"))
        if name == "external":
            torch.testing.assert_close(
                state["decoder.past_G_values"],
                load_file(str(folder / "model.safetensors"))["decoder.past_G_values"],
                atol=0,
                rtol=0,
            )
            assert not any("predefined_G_LM" in k for k in state)
        model, _ = load_bundle(out)
        ids = torch.tensor([[4, 5, 6]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, native(ids).logits, atol=0, rtol=0)


def test_older_exports_still_load(folders, tmp_path):
    """Exports before this format: PLDRConfig names in config.json, per-layer G buffers."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import pldr_llm.hf  # noqa: F401

    _, native = folders["identity"]
    old = tmp_path / "old"
    old.mkdir()
    cfg = native.config
    legacy = {k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads", "dff", "A_dff")}
    legacy.update(
        num_reslayerA=cfg.num_reslayerA,
        num_denseA=cfg.num_denseA,
        input_vocab_size=cfg.input_vocab_size,
        max_seq_len=cfg.max_seq_len,
        activation="silu",
        version="v510G",
        model_type="pldrllm",
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=None,
        architectures=["PldrllmForCausalLM"],
    )
    (old / "config.json").write_text(json.dumps(legacy))
    state = {k: v.contiguous() for k, v in native.state_dict().items()}
    save_file(state, str(old / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.tensor([[4, 5, 6, 7]])
    core, _ = load_bundle(old, require_tokenizer=False)
    hf_model = AutoModelForCausalLM.from_pretrained(old)
    with torch.no_grad():
        want = native(ids).logits
        torch.testing.assert_close(core(ids).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(hf_model(ids).logits, want, atol=0, rtol=0)


# ---------------------------------------------------------------------------- registration


@pytest.mark.slow
def test_import_pldr_llm_leaves_the_import_system_alone():
    code = (
        "import sys; before = list(sys.meta_path); import pldr_llm; "
        "assert sys.meta_path == before, sys.meta_path; import transformers; "
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
        "assert 'pldrllm' not in CONFIG_MAPPING; import pldr_llm.hf; "
        "assert 'pldrllm' in CONFIG_MAPPING; print('ok')"
    )
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_registration_steps_aside_for_a_builtin_pldrllm(monkeypatch, caplog):
    pytest.importorskip("transformers")
    from transformers.models.auto import configuration_auto, modeling_auto

    import pldr_llm.hf as hf

    monkeypatch.setitem(configuration_auto.CONFIG_MAPPING_NAMES, "pldrllm", "PldrllmConfig")
    monkeypatch.setitem(
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "pldrllm", "PldrllmForCausalLM"
    )
    monkeypatch.setattr(hf, "_REGISTERED", None)
    with caplog.at_level(logging.INFO, logger="pldr_llm.hf"):
        used = hf.register()
    assert used == "transformers.PldrllmForCausalLM"
    lines = [r.getMessage() for r in caplog.records if r.name == "pldr_llm.hf"]
    assert len(lines) == 1 and "ships model type 'pldrllm'" in lines[0]
    assert "PldrllmForCausalLM" in lines[0]


# ---------------------------------------------------------------------------- fast paths

SWITCHED = {
    "reference_rope": False,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "glu_bias": False,
    "final_bias": False,
}


def _eager_greedy(model: PLDRModel, prompt: torch.Tensor, steps: int):
    from pldr_llm import generate_details

    model.attn_implementation = "eager"  # the original's arithmetic
    try:
        return generate_details(
            model, prompt, steps, top_k=1, output_logits=True, stop_at_eos=False
        )
    finally:
        model.attn_implementation = "sdpa"


def test_decoding_loop_and_loss_with_the_switches():
    from pldr_llm import generate_details, masked_cross_entropy

    model = _learned_model(21, **SWITCHED)
    prompt = torch.randint(4, 32000, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = _eager_greedy(model, prompt, 12)
    got_ids = generate_details(model, prompt, 12, top_k=1, stop_at_eos=False).ids
    assert torch.equal(got_ids, expected.ids)
    # The chunked training loss (forward with labels) handles an LM head without bias.
    model.train()
    batch = torch.randint(4, 32000, (2, 9), generator=torch.Generator().manual_seed(2))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    want = masked_cross_entropy(model(inputs).logits, targets)
    got = model(inputs, labels=targets).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    weight = model.final_layer.weight
    torch.testing.assert_close(
        torch.autograd.grad(got, weight)[0],
        torch.autograd.grad(want, weight)[0],
        atol=1e-5,
        rtol=1e-3,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_decoder_with_the_switches_matches_eager(compiled):
    """GPU: CUDA-graph (and Inductor) decoding of a rotate-half, bias-free model = eager ids."""
    from pldr_llm import generate_details

    model = _learned_model(22, **SWITCHED).cuda()
    prompt = torch.randint(4, 32000, (3, 6), generator=torch.Generator().manual_seed(3)).cuda()
    expected = _eager_greedy(model, prompt, 20)
    out = generate_details(
        model,
        prompt,
        20,
        top_k=1,
        stop_at_eos=False,
        output_logits=True,
        cuda_graph=True,
        compile=compiled,
    )
    assert torch.equal(out.ids, expected.ids)
    torch.testing.assert_close(out.step_logits, expected.step_logits, atol=1e-4, rtol=1e-3)


def test_transformers_needs_the_predefined_G_values(folders, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    import pldr_llm.hf  # noqa: F401

    folder, _ = folders["random"]
    broken = tmp_path / "no_past_G"
    shutil.copytree(folder, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["decoder.past_G_values"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PLDRError, match="needs its G_LM tensors") as info:
        AutoModelForCausalLM.from_pretrained(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(PLDRError, match="missing keys"):
        load_bundle(broken)


def test_lm_eval_prefix_follows_add_bos_token(tmp_path, paper_tokenizer_dir):
    pytest.importorskip("lm_eval")
    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    model = _learned_model(14)
    write_authors_folder(tmp_path / "bos", model, paper_tokenizer_dir, add_bos_token=True)
    write_authors_folder(tmp_path / "plain", model, paper_tokenizer_dir)
    assert PLDRLLMEvalModel(pretrained=str(tmp_path / "bos"), device="cpu").prefix_token_id == 2
    assert PLDRLLMEvalModel(pretrained=str(tmp_path / "plain"), device="cpu").prefix_token_id == 3
