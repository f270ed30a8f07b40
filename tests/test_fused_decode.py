"""The fused decoding step (pldr_llm.core.fused) against the op-by-op step it replaces.

Each kernel is checked against the torch operations of the model it stands for, then the whole
loop: the ids of a fused engine equal those of the op-by-op engine (greedy, seeded top-p, a
mixed-length batch, stop ids, teacher forcing). Without a GPU the kernels run in Triton's CPU
interpreter (conftest sets ``TRITON_INTERPRET``); the GPU tests run the compiled kernels on the
110M configuration in fp32 and bf16.

Tolerances: the rotation, the cache writes and the bookkeeping are exact; LayerNorm statistics,
``q G_LM`` and the attention sums add in another order than torch's kernels, so fp32 results
agree to a few float32 ulps of the values involved (1e-5 absolute on O(1) activations).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.core import fused
from pldr_llm.core.cache import StaticLayerKV
from pldr_llm.core.plga import MASK_VALUE
from support import TINY_HPDICT

pytestmark = pytest.mark.skipif(
    not fused.available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="needs Triton (a CUDA GPU, or Triton's CPU interpreter)",
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_of(seed: int = 0, device: torch.device = DEVICE, **overrides) -> PLDRModel:
    torch.manual_seed(seed)
    model = PLDRModel(PLDRConfig.from_hpdict({**TINY_HPDICT, **overrides})).to(device).eval()
    with torch.no_grad():  # LayerNorms away from their identity init, so their use shows
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_add_norm_embed_norm_and_silu_mul_match_the_model_ops():
    model = model_of()
    layer = model.decoder.dec_layers[0]
    x, y = torch.randn(3, 64, device=DEVICE), torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        assert torch.allclose(
            fused.add_norm(x, y, layer.layernorm1), layer.layernorm1(x + y), atol=1e-5
        )
        gate_up = torch.randn(3, 2 * 96, device=DEVICE) * 4
        gate, up = gate_up.chunk(2, dim=-1)
        assert torch.allclose(fused.silu_mul(gate_up), F.silu(gate) * up, atol=1e-6)
        ids = torch.tensor([5, 0, 299], device=DEVICE)
        decoder = model.decoder
        expected = decoder.layernorm1(decoder.embedding(ids) * decoder.embedding_scale)
        assert torch.allclose(fused.embed_norm(model, ids), expected, atol=1e-5)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_kv_rotates_like_the_model_and_writes_the_cache_in_place(interleaved):
    model = model_of(reference_rope=interleaved)
    config, rotary = model.config, model.decoder.dec_layers[0].mha1.rotary
    batch, heads, depth, slots = 3, config.num_heads, config.depth, 16
    qkv = torch.randn(batch, 3 * config.d_model, device=DEVICE)
    positions = torch.tensor([0, 7, 40], device=DEVICE)
    write_index = torch.tensor([2, 9, 15], device=DEVICE)
    kv = StaticLayerKV(
        torch.zeros(batch, heads, slots, depth, device=DEVICE),
        torch.zeros(batch, heads, slots, depth, device=DEVICE),
        write_index,
    )
    ids = torch.tensor([4, config.pad_id, 9], device=DEVICE)
    bias = torch.full((batch, slots), MASK_VALUE, device=DEVICE)
    queries = fused.rope_kv(model, qkv, positions, kv, ids, bias, True)

    heads_view = qkv.view(batch, 1, 3 * heads, depth)
    rotated = rotary.rotate(heads_view[:, :, : 2 * heads], rotary.rotation(positions[:, None]))
    expected_q, expected_k = rotated[:, 0].chunk(2, dim=1)
    assert torch.equal(queries, expected_q)  # the same roundings: bit for bit
    for row in range(batch):
        slot = int(write_index[row])
        assert torch.equal(kv.key[row, :, slot], expected_k[row])
        assert torch.equal(kv.value[row, :, slot], heads_view[row, 0, 2 * heads :])
        written = torch.zeros(slots, dtype=torch.bool, device=DEVICE)
        written[slot] = True
        assert (kv.key[row, :, ~written] == 0).all()  # nothing else written
    # the first layer unmasks the written slot, unless the token is the pad id
    assert bias[0, 2] == 0 and bias[2, 15] == 0 and bias[1, 9] == MASK_VALUE
    assert (bias == 0).sum() == 2
    before = bias.clone()
    fused.rope_kv(model, qkv, positions, kv, ids, bias, False)
    assert torch.equal(bias, before)  # later layers leave the bias alone


@pytest.mark.slow
def test_attend_matches_sdpa_over_the_written_keys():
    torch.manual_seed(1)
    batch, heads, depth, slots = 3, 4, 16, 80  # 80 slots: two key blocks
    keys = torch.randn(batch, heads, slots, depth, device=DEVICE)
    values = torch.randn(batch, heads, slots, depth, device=DEVICE)
    write_index = torch.tensor([0, 63, 70], device=DEVICE)
    kv = StaticLayerKV(keys, values, write_index)
    queries = torch.randn(batch, heads, depth, device=DEVICE)
    g_lm = torch.randn(batch, heads, depth, depth, device=DEVICE) / depth**0.5
    bias = torch.full((batch, slots), MASK_VALUE, device=DEVICE)
    for row, last in enumerate(write_index.tolist()):
        bias[row, : last + 1] = 0.0
    bias[1, 5] = MASK_VALUE  # a masked (pad) key inside the written span
    # stale keys past the write index are huge: they must not leak through
    keys[:, :, 72:] = 1e4
    out = fused.attend(queries, g_lm, kv, bias)
    transformed = queries[:, :, None] @ g_lm
    expected = F.scaled_dot_product_attention(
        transformed, keys, values, attn_mask=bias[:, None, None, :]
    )
    assert torch.allclose(out, expected.reshape(batch, heads * depth), atol=1e-5)
    # a G_LM shared by every row (batch 1 in its first dimension)
    out_shared = fused.attend(queries, g_lm[:1], kv, bias)
    expected_shared = F.scaled_dot_product_attention(
        queries[:, :, None] @ g_lm[:1], keys, values, attn_mask=bias[:, None, None, :]
    )
    assert torch.allclose(out_shared, expected_shared.reshape(batch, -1), atol=1e-5)


def test_greedy_advance_takes_the_first_maximum_across_blocks():
    vocab = 2 * fused.ARGMAX_BLOCK + 7
    logits = torch.randn(2, vocab, device=DEVICE)
    logits[0, [fused.ARGMAX_BLOCK + 3, 2 * fused.ARGMAX_BLOCK + 1]] = 50.0  # tie in two blocks
    logits[1, [10, 11]] = 60.0  # tie inside one block
    ids = torch.tensor([7, 8], device=DEVICE)
    active = torch.tensor([True, True], device=DEVICE)
    done = torch.tensor([False, False], device=DEVICE)
    counters = torch.tensor([[5, 9], [5, 9], [1, 1]], device=DEVICE)
    history = torch.zeros(2, 8, dtype=torch.long, device=DEVICE)
    report = torch.zeros(3, 2, device=DEVICE)
    stop_ids = torch.tensor([[11, -1], [-1, -1]], device=DEVICE)
    max_new = torch.tensor([10, 2], device=DEVICE)
    fused.advance(None, logits, ids, active, done, counters, history, report, stop_ids, max_new)
    assert ids.tolist() == [fused.ARGMAX_BLOCK + 3, 10] == logits.argmax(-1).tolist()
    assert report[:2].tolist() == [[7.0, 8.0], [0.0, 0.0]]
    assert history[:, 1].tolist() == ids.tolist()
    assert counters.tolist() == [[6, 10], [6, 10], [2, 2]]
    assert done.tolist() == [False, True]  # row 1 reached max_new_tokens
    # a finished row does not advance; its pending token is reported as its last
    fused.advance(torch.tensor([11, 3], device=DEVICE), None, ids, active, done, counters,
                  history, report, stop_ids, max_new)  # fmt: skip
    assert ids.tolist() == [11, 10] and counters[:, 1].tolist() == [10, 10, 2]
    assert report[:2, 1].tolist() == [10.0, 1.0]
    assert done.tolist() == [True, True]  # row 0 drew its stop id


def _engine_ids(model, fused_step, prompts, params, forced=None):
    from pldr_llm.generation import DecodeEngine

    length = max(map(len, prompts)) + max(p.max_new_tokens for p in params)
    engine = DecodeEngine(model, len(prompts), length, cuda_graph=False, fused=fused_step)
    assert engine.fused is fused_step
    slots = engine.add_many(prompts, params, forced_ids=forced)
    out = {s: [] for s in slots}
    while engine.active_slots:
        step = engine.step()
        for s, t in zip(step.slots, step.token_ids):
            out[s].append(t)
    return [out[s] for s in slots]


PROMPTS = [[5, 9, 44, 12, 7, 100, 3, 250], [17, 0, 23], [6, 81, 81, 9, 2]]


@pytest.mark.slow
def test_fused_engine_generates_the_op_by_op_ids():
    from pldr_llm.generation import SamplingParams

    model = model_of(3)
    cases = [
        [SamplingParams(top_k=1, max_new_tokens=20, stop_at_eos=False)] * 3,
        [SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_new_tokens=20)] * 3,
        [
            SamplingParams(top_k=1, max_new_tokens=7),
            SamplingParams(temperature=1.2, seed=1, max_new_tokens=20, stop_token_ids=(7, 9)),
            SamplingParams(temperature=0.7, top_k=20, seed=2, max_new_tokens=12),
        ],
    ]
    for params in cases:
        for prompts in (PROMPTS[:1], PROMPTS):
            expected = _engine_ids(model, False, prompts, params[: len(prompts)])
            assert _engine_ids(model, True, prompts, params[: len(prompts)]) == expected
            assert max(len(e) for e in expected) > 5
    # teacher forcing (scoring): the forced ids come out, then the rows continue on their own
    params = [SamplingParams(top_k=1, max_new_tokens=9, stop_at_eos=False)] * 2
    forced = [[4, 5, 6], [7]]
    expected = _engine_ids(model, False, PROMPTS[:2], params, forced)
    assert _engine_ids(model, True, PROMPTS[:2], params, forced) == expected
    assert expected[0][:3] == [4, 5, 6] and expected[1][0] == 7


@pytest.mark.parametrize(
    "variant",
    [
        {"version": "v510G"},
        {"reference_rope": False, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"attention_bias": False, "glu_bias": False, "final_bias": False, "cache_first_G": True},
    ],
    ids=["v510G", "half-rotation-scaled", "no-biases-cache-first-G"],
)
@pytest.mark.slow
def test_fused_engine_matches_the_op_by_op_step_for_each_variant(variant):
    from pldr_llm.generation import SamplingParams

    model = model_of(4, **variant)
    params = [SamplingParams(top_k=1, max_new_tokens=12, stop_at_eos=False)] * 2
    expected = _engine_ids(model, False, PROMPTS[:2], params)
    assert _engine_ids(model, True, PROMPTS[:2], params) == expected


def test_warm_up_runs_the_decode_of_an_unloaded_model(monkeypatch):
    from pldr_llm.core.generate import batch_bucket, span_bucket
    from pldr_llm.generation import DecodeEngine, SamplingParams
    from pldr_llm.generation.warm import _decode_once, warm_up_in_background

    seen, lengths, rows = [], [], []
    add_many = DecodeEngine.add_many

    def spy(self, prompts, params):
        seen.extend(params)
        lengths.extend(len(p) for p in prompts)
        rows.append((self.max_batch, self.max_len))
        return add_many(self, prompts, params)

    monkeypatch.setattr(DecodeEngine, "add_many", spy)
    model = model_of()
    top_p = SamplingParams(temperature=0.7, top_p=0.9)
    _decode_once(model.config, torch.float32, DEVICE, [5, 3, 5], 40, top_p)  # raises if it breaks
    # the generation's filters (their kernels are what is loaded), with a seed of its own: a
    # drawn one would take a number from the CPU generator the main thread is using
    assert {(p.temperature, p.top_k, p.top_p, p.seed) for p in seen} == {(0.7, 0, 0.9, 0)}
    # the first generation's prefill, shape for shape: its prompts' lengths (unequal lengths
    # take the masked path), in the engine generate makes for three rows of 40 tokens
    # (on CUDA twice: the fused kernels' compile pass, then the decode)
    passes = 2 if DEVICE.type == "cuda" else 1
    assert lengths == [5, 3, 5] * passes
    assert rows == [(batch_bucket(3), span_bucket(model.config, 40))] * passes
    assert rows[0][0] == 4
    assert warm_up_in_background(model.config, None, torch.device("cpu")) is None


def test_warm_up_model_lies_wholly_on_the_device():
    from pldr_llm.generation.warm import _stand_in_model

    # "meta" stands for the GPU here: a tensor the construction leaves on the CPU (the rotary
    # tables are computed there on purpose) would fail the warm-up's prefill on a GPU
    model = _stand_in_model(model_of().config, torch.bfloat16, torch.device("meta"))
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.bfloat16}


@pytest.mark.slow
def test_warm_up_imports_no_compiler_stack():
    # The warm-up runs beside the weights' loading: an import of torch._dynamo in it (which a
    # model built on "meta" triggers, through normal_'s meta kernel) took ~4.5 s on the GPU host
    # with the interpreter and import locks held, and the loading waited for it.
    script = (
        "import sys, torch\n"
        "import pldr_llm.generation\n"
        "from pldr_llm.core.config import PLDRConfig\n"
        "from pldr_llm.generation.warm import _decode_once\n"
        "before = set(sys.modules)\n"
        "config = PLDRConfig(num_layers=2, d_model=64, num_heads=4, dff=170, A_dff=24,\n"
        "                    input_vocab_size=512, num_reslayerA=2, num_denseA=2, max_seq_len=64)\n"
        "_decode_once(config, torch.float32, torch.device('cpu'), [5, 5], 40)\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(('torch._dynamo', "
        "'sympy'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_fused_engine_refuses_what_it_cannot_run():
    from pldr_llm import PLDRError
    from pldr_llm.generation import DecodeEngine

    model = model_of(activation="gelu")
    assert "activation" in fused.supports(model)
    with pytest.raises(PLDRError, match="fused decoding cannot run here: activation"):
        DecodeEngine(model, 1, 16, cuda_graph=False, fused=True)
    with pytest.raises(PLDRError, match="KV-cache and the G-cache"):
        DecodeEngine(model_of(), 1, 16, cuda_graph=False, fused=True, enable_Gcache=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_on_the_110m_model(dtype):
    """The compiled kernels on the 110M model: one step's hidden state against the op-by-op
    layers on the same caches, and (fp32) the captured fused loop's greedy and seeded top-p ids
    against the op-by-op loop's, batch 1 and a mixed batch.

    bf16 compares hidden states only: its 8-bit mantissa makes a different summation order in
    one attention or LayerNorm move a value by an ulp (0.4%), and over many tokens that can
    flip a near-tie of the arg-max, as it can between any two bf16 kernels."""
    import pldr_llm
    from pldr_llm.generation import DecodeEngine, SamplingParams

    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig()).to("cuda", dtype).eval()
    prompts = [torch.randint(4, 32000, (n,)).tolist() for n in (32, 7, 19)]
    engine = DecodeEngine(model, 3, 128, cuda_graph=False, fused=True)
    engine.add_many(prompts, [SamplingParams(top_k=1, max_new_tokens=8)] * 3)
    ids, positions = engine.buffers.ids.view(-1).clone(), engine.buffers.counters[0].clone()
    bias = engine.buffers.key_bias.clone()
    kv_copy = [
        StaticLayerKV(k.key.clone(), k.value.clone(), k.write_index) for k in engine.buffers.kv
    ]
    with torch.inference_mode():
        hidden = fused.decode_hidden(
            model, engine.packed, ids, positions, bias, engine.buffers.kv, engine.buffers.g
        )
        bias_ref = engine.buffers.key_bias.clone()
        bias_ref.scatter_(1, engine.buffers.write_index[:, None], 0.0)  # no prompt ends in a pad id
        assert torch.equal(bias, bias_ref)
        expected, *_ = model.run_layers(
            ids[:, None], positions[:, None], bias_ref[:, None, None, :], False,
            kv=kv_copy, g=engine.buffers.g, packed=engine.packed,
        )  # fmt: skip

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for mine, theirs in zip(engine.buffers.kv, kv_copy):  # the written keys and values
        assert relative(mine.key, theirs.key) < bound and relative(mine.value, theirs.value) < bound
    assert relative(hidden, expected[:, 0]) < bound, relative(hidden, expected[:, 0])
    if dtype == torch.bfloat16:
        return
    from pldr_llm.generation.warm import _decode_once

    cpu_rng = torch.get_rng_state()
    _decode_once(model.config, dtype, torch.device("cuda"), [20, 18, 20], 64)  # the CLI's warm-up
    # it runs beside the main thread's loading, whose model initialization draws on the CPU
    # generator: the warm-up must not move it
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    for batch in (prompts[:1], prompts):
        greedy = [SamplingParams(top_k=1, max_new_tokens=128, stop_at_eos=False)] * len(batch)
        captured = pldr_llm.generate(model, batch, 128, top_k=1, stop_at_eos=False)
        assert [c[len(p) :] for c, p in zip(captured, batch)] == _engine_ids(
            model, False, batch, greedy
        )
        # sampling is as sensitive as arithmetic allows (a nucleus boundary among thousands of
        # near-equal probabilities of a random model): the captured and uncaptured loops run
        # the same kernels, so their ids agree exactly
        options = {"top_p": 0.9, "seed": 3, "stop_at_eos": False}
        assert pldr_llm.generate(model, batch, 128, **options) == pldr_llm.generate(
            model, batch, 128, cuda_graph=False, **options
        )
    from pldr_llm.core.engine_cache import cached_engines

    engines = cached_engines(model)
    assert engines and all(e.fused for e in engines.values())


def test_a_failed_warm_up_reports_its_reason():
    from pldr_llm.generation.warm import WarmUp

    def fails() -> None:
        raise RuntimeError("Expected all tensors to be on the same device\nsecond line")

    thread = WarmUp(fails)
    thread.start()
    thread.join()
    assert thread.error == "Expected all tensors to be on the same device"


@pytest.mark.slow
def test_the_cpu_loop_never_imports_triton():
    # Importing Triton costs ~0.1-0.4 s; the CPU's op-by-op step has no use for it (and the
    # CLI's main thread on a GPU leaves it to the warm-up thread).
    script = (
        "import sys, torch, pldr_llm\n"
        "from pldr_llm import PLDRConfig, PLDRModel\n"
        "config = PLDRConfig(num_layers=1, d_model=64, num_heads=4, dff=170, A_dff=24,\n"
        "                    input_vocab_size=512, num_reslayerA=1, num_denseA=1, max_seq_len=64)\n"
        "model = PLDRModel(config).eval()\n"
        "out = pldr_llm.generate(model, [5, 6, 7], 4, top_k=1, stop_at_eos=False)\n"
        "print(len(out), 'triton' in sys.modules)\n"  # prompt + 4 new ids, flat
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7", "False"]


def _launched_tokens(engine, prompts, params, k: int) -> list[list[int]]:
    """Each prompt's tokens decoded in launched blocks of ``k`` steps to the end."""
    slots = engine.add_many(prompts, params)
    tokens: dict[int, list[int]] = {s: [] for s in slots}
    while engine.active_slots:
        engine.launch(k)
        block = engine.collect_block()
        for slot, ids in zip(block.slots, block.token_ids):
            tokens[slot] += ids
    return [tokens[s] for s in slots]


@pytest.mark.slow
@pytest.mark.parametrize("fused_step,logprobs", [(False, True), (True, False)])
def test_blocks_of_fewer_rows_give_the_ids_of_all_rows(fused_step, logprobs):
    """An engine of 24 slots with 3 in use launches blocks of its first 8 rows only (views of
    its buffers): greedy, seeded top-p and penalties give the same ids as an engine of 3 slots,
    op by op (with logprobs) and fused (without: the bookkeeping kernel, which addresses the
    views' rows by their stride, not their count; the GPU test covers both)."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    model = model_of(3)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    params = [
        SamplingParams(top_k=1, max_new_tokens=6, stop_at_eos=False),
        SamplingParams(top_p=0.9, seed=4, max_new_tokens=5, stop_at_eos=False,
                       presence_penalty=0.5, logit_bias=((7, -100.0),)),
        SamplingParams(temperature=0.8, seed=5, max_new_tokens=7, stop_at_eos=False),
    ]  # fmt: skip
    options = {"cuda_graph": False, "fused": fused_step, "output_logprobs": logprobs}
    wide = DecodeEngine(model, 24, 24, **options)
    assert wide.graphs.rows_for([0, 1, 2]) == 8 and wide.graphs.rows_for([0, 17]) is None
    assert wide.graphs.row_counts() == [8, 16, None]
    narrow = DecodeEngine(model, 3, 24, **options)
    assert narrow.graphs.rows_for([0, 1, 2]) is None
    assert _launched_tokens(wide, prompts, params, 3) == _launched_tokens(
        narrow, prompts, params, 3
    )


@pytest.mark.gpu
def test_captured_blocks_of_fewer_rows_give_the_ids_of_all_rows():
    """On a GPU, the captured graphs of blocks of 8 rows of an engine of 40 slots (fp32, fused,
    with and without logprobs) give the ids of an engine of 3 slots."""
    from pldr_llm.generation import DecodeEngine, SamplingParams

    model = model_of(3)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    params = [
        SamplingParams(top_k=1, max_new_tokens=20, stop_at_eos=False),
        SamplingParams(top_p=0.9, seed=4, max_new_tokens=17, stop_at_eos=False,
                       frequency_penalty=0.5),
        SamplingParams(temperature=0.8, seed=5, max_new_tokens=23, stop_at_eos=False),
    ]  # fmt: skip
    for logprobs in (False, True):
        wide = DecodeEngine(model, 40, 64, output_logprobs=logprobs)
        narrow = DecodeEngine(model, 3, 64, output_logprobs=logprobs)
        assert wide.use_graph and wide.graphs.rows_for([0, 1, 2]) == 8
        assert _launched_tokens(wide, prompts, params, 4) == _launched_tokens(
            narrow, prompts, params, 4
        )


@pytest.mark.parametrize("with_rows", [False, True], ids=["all-rows", "rows"])
def test_penalize_kernel_equals_the_op_by_op_processing_bit_for_bit(with_rows):
    """The penalties and logit_bias in one kernel compute the op-by-op processing's float32
    numbers exactly (correctly rounded division, no fused multiply-add): random logits, counts,
    prompt ids, biases and factors that are not exactly representable, both logits dtypes."""
    from pldr_llm.core.processing import RowProcessing
    from pldr_llm.core.sampling import SamplingParams

    gen = torch.Generator().manual_seed(3)
    batch, vocab = 5, 2500  # more than two kernel blocks, the last one partial
    state = RowProcessing(batch, vocab, 2, torch.device("cpu"))
    params = [
        SamplingParams(repetition_penalty=1.0 + 0.37 * r, presence_penalty=0.3 * r - 0.4,
                       frequency_penalty=0.11 * r, logit_bias=((r, 1.7), (vocab - 1 - r, -3.3)))
        for r in range(batch)
    ]  # fmt: skip
    prompts = [torch.randint(0, vocab, (20,), generator=gen).tolist() for _ in range(batch)]
    state.set_rows(torch.arange(batch), params, prompts, [[] for _ in range(batch)])
    state.counts.copy_(torch.randint(0, 3, (batch, vocab), generator=gen).float())
    rows = torch.tensor([4, 0, 2]) if with_rows else None
    n = 3 if with_rows else batch
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(n, vocab, generator=gen) * 4).to(dtype)
        want = state.apply(logits, torch.zeros(n, dtype=torch.long), rows=rows)  # op by op
        factors = (state.repetition, state.presence, state.frequency)
        got = fused.penalize(
            logits.to(DEVICE), state.counts.to(DEVICE), state.in_prompt.to(DEVICE),
            state.bias.to(DEVICE), tuple(f.to(DEVICE) for f in factors),
            rows.to(DEVICE) if rows is not None else None,
        )  # fmt: skip
        assert got.dtype == torch.float32 and torch.equal(got.cpu(), want)
