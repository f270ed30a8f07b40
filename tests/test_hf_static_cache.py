"""transformers' own decoding loop on static buffers (pldr_llm.core.hf_static_cache): every step's
logits and the generated ids equal those of the concatenating cache (the CPU, float32), the
fallbacks, and on a GPU the captured (fused and op-by-op) step against the eager path in bf16."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pldr_llm import PLDRConfig, PLDRModel  # noqa: E402
from pldr_llm.core import hf_static_cache as hs  # noqa: E402
from pldr_llm.core.cache import PLDRCache  # noqa: E402
from pldr_llm.core.hf_static_cache import StaticDecodeCache, StaticDecodeSettings  # noqa: E402
from pldr_llm.core.modeling_pldrllm import PldrllmForCausalLM  # noqa: E402
from support import paper_vocab_model  # noqa: E402

#: float32 on the CPU: the static step sums the attention over masked slots too (their weight is
#: exactly 0) and in another kernel, so the logits agree to rounding, not bit for bit.
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return PldrllmForCausalLM.from_core(paper_vocab_model(3))


@pytest.fixture()
def static_steps(monkeypatch):
    """Counts the one-token calls that ran on static buffers."""
    calls = []
    real = hs.StaticDecoder.step

    def counted(self, ids):
        calls.append(ids.shape)
        return real(self, ids)

    monkeypatch.setattr(hs.StaticDecoder, "step", counted)
    return calls


def _transformers_loop(model, prompt, static: bool | None, seed: int | None = None, **options):
    """``generate`` forced onto transformers' loop (``output_attentions`` is no native-loop
    argument), every step's raw logits kept; ``static``: ``model.static_decode.enabled``."""
    model.static_decode = StaticDecodeSettings(enabled=static)
    if seed is not None:
        torch.manual_seed(seed)
    try:
        return model.generate(
            prompt, return_dict_in_generate=True, output_logits=True, output_attentions=False,
            eos_token_id=None, **options,
        )  # fmt: skip
    finally:
        model.static_decode = StaticDecodeSettings()


def _returned_cache(output):
    """The cache ``generate`` returned (``past_key_values`` before transformers 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("g", [True, False], ids=["G", "noG"])
@pytest.mark.parametrize("batch", [1, 2])
def test_static_loop_equals_the_concatenating_cache(model, static_steps, sampled, g, batch):
    prompts = [[5, 17, 42, 99, 3, 7], [11, 12, 0, 200]][:batch]  # a pad id inside a prompt
    ids, mask = _left_padded(prompts)
    options = dict(attention_mask=mask, max_new_tokens=12, enable_Gcache=g)
    if sampled:
        options.update(do_sample=True, temperature=0.9, top_p=0.95, output_scores=True)
    else:
        options.update(do_sample=False)
    seed = 7 if sampled else None
    want = _transformers_loop(model, ids, False, seed, **options)
    assert not static_steps
    got = _transformers_loop(model, ids, True, seed, **options)
    assert len(static_steps) == 11  # every pass after the prompt's
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == len(want.logits) == 12
    for mine, theirs in zip(got.logits, want.logits):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    # The returned cache is the concatenating one again, equal to the other loop's.
    cache, other = _returned_cache(got), _returned_cache(want)
    assert isinstance(cache, StaticDecodeCache) and cache.decoder is None
    assert cache.seq_len == other.seq_len and torch.equal(cache.key_valid, other.key_valid)
    for mine, theirs in zip(cache.kv, other.kv):
        torch.testing.assert_close(mine.key, theirs.key, atol=ATOL, rtol=0)
        torch.testing.assert_close(mine.value, theirs.value, atol=ATOL, rtol=0)
    if sampled:  # the seed matters: it really samples
        again = _transformers_loop(model, ids, True, 8, **options)
        assert not torch.equal(again.sequences, got.sequences)


def test_the_static_decoder_is_reused_and_g_init_kept(model, static_steps):
    """A second call of the same shape finds the model's idle decoder (its graph, on CUDA);
    a G_init without the G-cache is the G of every step."""
    config = model.core.config
    eye = torch.eye(config.depth).expand(1, config.num_heads, -1, -1)
    g_init = [(torch.zeros_like(eye), 0.5 * eye) for _ in range(config.num_layers)]
    prompt = torch.tensor([[5, 6, 7, 8]])
    options = dict(max_new_tokens=6, do_sample=False, enable_Gcache=False, G_init=g_init)
    want = _transformers_loop(model, prompt, False, **options)
    first = _transformers_loop(model, prompt, True, **options)
    idle = dict(model.core.__dict__["_pldr_hf_static_decoders"])
    second = _transformers_loop(model, prompt, True, **options)
    assert dict(model.core.__dict__["_pldr_hf_static_decoders"]) == idle  # the same decoder
    assert torch.equal(first.sequences, want.sequences)
    assert torch.equal(second.sequences, want.sequences)
    for mine, theirs in zip(second.logits, want.logits):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    assert len(static_steps) == 10


def _static_cache(model, cache: PLDRCache, max_length: int = 40, **settings) -> StaticDecodeCache:
    """``cache`` (a prompt pass's, with the G-cache of the steps) moved to static buffers of
    ``max_length`` positions or more."""
    spec = hs.static_spec(model.core, StaticDecodeSettings(**settings), cache, max_length)
    assert spec is not None
    return hs.start_static(model.core, spec, cache)


@pytest.mark.parametrize("mask", [False, True], ids=["pad-ids-masked", "attention-mask"])
@pytest.mark.parametrize("g", [True, False], ids=["G", "noG"])
@torch.no_grad()
def test_one_token_forwards_equal_the_concatenating_cache(model, mask, g):
    """``forward`` step by step, a pad id among the new tokens: without an attention mask a
    pad id's key is masked (the original's rule), with one it is a token."""
    prompt = torch.tensor([[5, 0, 17, 42, 9], [0, 0, 8, 300, 301]])
    attention = (prompt != 0).long() if mask else None
    first = model(prompt, attention_mask=attention, logits_to_keep=1, infer_padding_mask=False)
    dynamic = first.cache if g else first.cache.drop_g()
    static = _static_cache(model, dynamic, enabled=True)
    for token in ([7, 0], [0, 12], [13, 14], [0, 0], [15, 16]):
        step = torch.tensor(token)[:, None]
        want = model(step, cache=dynamic)
        got = model(step, cache=static)
        assert got.cache is static and static.decoder is not None  # no fallback
        torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
        dynamic = want.cache if g else want.cache.drop_g()
    # Two tokens at once, or hidden states: the concatenating cache, in place.
    two = torch.tensor([[21, 22], [23, 24]])
    want = model(two, cache=dynamic, output_hidden_states=True)
    got = model(two, cache=static, output_hidden_states=True)
    assert static.decoder is None and static.seq_len == dynamic.seq_len
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_fused_static_step_equals_the_concatenating_cache(model):
    """The fused kernels (Triton's interpreter on the CPU) on the static buffers, a pad id
    among the new tokens, with and without an attention mask."""
    from pldr_llm.core import fused

    if not fused.available(model.core.device):
        pytest.skip("needs Triton (a CUDA GPU, or Triton's CPU interpreter)")
    for attention in (None, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])):
        prompt = torch.tensor([[5, 0, 17, 42], [0, 8, 300, 301]])
        first = model(prompt, attention_mask=attention, logits_to_keep=1)
        dynamic = first.cache
        static = _static_cache(model, dynamic, enabled=True, fused=True)
        assert static.decoder is not None and static.decoder.packed is not None
        for token in ([7, 0], [0, 12], [13, 14]):
            step = torch.tensor(token)[:, None]
            want = model(step, cache=dynamic)
            got = model(step, cache=static)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
            dynamic = want.cache


@torch.no_grad()
def test_captured_step_restores_what_its_warm_up_advanced(model, monkeypatch):
    """The capture's warm-up runs the step for real: the positions, write index and key bias
    it advanced are restored, and each replay's logits are copied out (the graph rewrites its
    output). On the CPU, with a stand-in for the CUDA graph that runs the step at replay."""

    class Replayed:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            self.out.copy_(self.fn())

    def capture(fn, warmup=3):
        for _ in range(warmup + 1):  # warm-up, then the capture (which CUDA does not run)
            out = fn()
        return Replayed(fn, out), out

    monkeypatch.setattr(hs, "capture_graph", capture)
    prompt = torch.tensor([[5, 0, 17, 42, 9]])
    dynamic = model(prompt, logits_to_keep=1).cache
    spec = hs.static_spec(model.core, StaticDecodeSettings(enabled=True), dynamic, 40)
    spec = dataclasses.replace(spec, graph=True)
    static = hs.start_static(model.core, spec, dynamic)
    outputs = []
    for token in (7, 0, 13, 14):
        step = torch.tensor([[token]])
        want = model(step, cache=dynamic)
        got = model(step, cache=static)
        torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
        outputs.append(got.logits)
        dynamic = want.cache
    assert static.decoder is not None and static.decoder.graph is not None
    assert outputs[0].data_ptr() != outputs[1].data_ptr()  # copies, not the graph's output
    # 5 + 4 slots written; the prompt's pad id (inferred padding) has no rotary position
    assert static.decoder.write_index.tolist() == [9] and static.decoder.position.tolist() == [8]


def test_no_static_buffers_where_they_cannot_serve(model, static_steps):
    """Not on the CPU by default, not with gradients, not without the KV-cache."""
    prompt = torch.tensor([[5, 6, 7, 8]])
    model.generate(prompt, max_new_tokens=3, do_sample=False, output_scores=True,
                   return_dict_in_generate=True)  # fmt: skip
    _transformers_loop(model, prompt, True, max_new_tokens=3, enable_kvcache=False)
    assert not static_steps
    first = model(prompt, logits_to_keep=1)
    with torch.enable_grad():
        spec = hs.static_spec(model.core, StaticDecodeSettings(enabled=True), first.cache, 40)
    assert spec is None


# ---------------------------------------------------------------------------- GPU


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (captured step)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_captured_static_step_on_the_110m_model(dtype):
    """The 110M model on CUDA: every step's logits of the captured static step (the fused
    kernels, and op by op) against the eager concatenating path on the same tokens (teacher
    forced, so one rounding cannot change the later inputs), and fp32 greedy ids of
    transformers' loop equal to the concatenating cache's.

    Bound: relative error (norm of the difference over the norm) < 2e-2 in bf16, 1e-4 in fp32.
    bf16 keeps 8 mantissa bits (one ulp is 0.4%): the paths sum the attention and the
    LayerNorms in other orders (the fused kernels; SDPA over masked slots instead of no mask),
    so each of the five layers can move a value by an ulp, and the logits by about 1% -- the
    bound tests/test_fused_decode.py uses for the fused step's hidden state. A wrong key, mask
    or position moves them by order 1."""
    torch.manual_seed(0)
    core = PLDRModel(PLDRConfig()).to("cuda", dtype).eval()
    model = PldrllmForCausalLM.from_core(core)
    prompt = torch.randint(4, 32000, (2, 32), device="cuda")
    tokens = torch.randint(4, 32000, (40, 2), device="cuda")
    tokens[5, 0] = 0  # a pad id among the new tokens
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-4
    with torch.no_grad():
        for fused_step in (True, False):
            first = model(prompt, logits_to_keep=1)
            dynamic = first.cache
            static = _static_cache(model, dynamic, 128, fused=fused_step)
            assert static.decoder is not None and static.decoder.spec.graph
            assert (static.decoder.packed is not None) == fused_step
            for token in tokens:
                want = model(token[:, None], cache=dynamic)
                got = model(token[:, None], cache=static)
                assert static.decoder is not None  # every step on the captured step
                error = _relative(got.logits, want.logits)
                assert error < bound, (fused_step, error)
                dynamic = want.cache
    if dtype == torch.bfloat16:
        return  # bf16 greedy can flip a near-tie over many tokens (see above)
    options = dict(max_new_tokens=64, do_sample=False, eos_token_id=None, output_scores=True,
                   return_dict_in_generate=True, output_attentions=False)  # fmt: skip
    model.static_decode = StaticDecodeSettings(enabled=False)
    want_ids = model.generate(prompt[:1], **options).sequences
    model.static_decode = StaticDecodeSettings()
    got_ids = model.generate(prompt[:1], **options).sequences
    assert torch.equal(got_ids, want_ids)
