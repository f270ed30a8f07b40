"""Every cache mode through the one decoding loop (issue 11): ``DecodeEngine(record_deductive=True)``
and the deductive cache-mode comparison (``cache_mode_runs``) built on it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import pldr_llm
from pldr_llm import PLDRConfig, PLDRError, PLDRModel
from pldr_llm.deductive import CACHE_MODES, cache_mode_runs, deductive_outputs
from pldr_llm.generation import DecodeEngine, DeductiveRecord, SamplingParams
from reference_decoding import reference_generate
from support import TINY_HPDICT

#: (KV-cache, G-cache) per mode, named like the golden data
MODES = {
    "kv1_g1": (True, True),
    "kv1_g0": (True, False),
    "kv0_g1": (False, True),
    "kv0_g0": (False, False),
}
PROMPT = [5, 17, 42, 8, 99, 3, 250]
STEPS = 6
NAMES = ("A", "A_LM", "A_P", "G_LM")
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=STEPS, stop_at_eos=False)


def tiny(**extra) -> PLDRModel:
    """The tiny test model (TINY_HPDICT, seed 0) with config switches."""
    config = PLDRConfig.from_hpdict(TINY_HPDICT)
    torch.manual_seed(0)
    return PLDRModel(PLDRConfig(**{**config.__dict__, **extra})).eval()


def walk(model: PLDRModel, mode: str, prompt=PROMPT, params=GREEDY):
    """One greedy decode of ``prompt`` in ``mode``: (generated ids, records of the slot)."""
    kv, g = MODES[mode]
    engine = DecodeEngine(model, 1, enable_kvcache=kv, enable_Gcache=g, record_deductive=True)
    slot = engine.add(prompt, params)
    for _ in range(params.max_new_tokens):
        engine.step()
    return engine.generated(slot), engine.deductive


def same(a, b, names=NAMES) -> None:
    """Per layer: the named tensors present in both are bitwise equal."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in names:
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx is not None and ty is not None, name
            assert torch.equal(tx, ty), name


@pytest.mark.slow
def test_every_cache_mode_runs_through_the_loop(tiny_model) -> None:
    uncached = reference_generate(tiny_model, PROMPT, STEPS, kv=False, g=False, top_k=1)
    for mode in CACHE_MODES:
        ids, records = walk(tiny_model, mode)
        # On the tiny model caching changes no greedy token: every mode's ids are the uncached
        # ones of the plain model.forward loop (tests/reference_decoding.py).
        assert ids == uncached, mode
        assert all(isinstance(r, DeductiveRecord) for r in records)
        assert [r.stage for r in records] == ["prefill"] + ["step"] * STEPS
        assert all(set(r.outputs) == {0} for r in records)
        prompt = records[0].outputs[0]
        # The prompt pass is model.forward's on the prompt, in every mode.
        with torch.no_grad():
            direct = tiny_model(torch.tensor([PROMPT]), output_deductive=True).deductive
        same(prompt, direct)
        for k, record in enumerate(records[1:]):
            layers = record.outputs[0]
            assert all(d.G_LM.shape == (1, 4, 16, 16) for d in layers)
            if mode == "kv1_g1":
                # KV- and G-cache: the prompt's A, A_LM, A_P and G_LM are reused exactly.
                same(layers, prompt)
            elif mode == "kv1_g0":
                # KV-cache only: the cached A, and the power law recomputed from it by the
                # same arithmetic (batch of 1 both times): bitwise the prompt's.
                same(layers, prompt)
            elif mode == "kv0_g1":
                # G-cache only: no metric learner runs (A absent), the prompt's G-cache is used.
                assert all(d.A is None for d in layers)
                same(layers, prompt, ("A_LM", "A_P", "G_LM"))
            else:
                # No cache: model.forward on the grown sequence, and G_LM moves with it.
                grown = torch.tensor([PROMPT + ids[: k + 1]])
                with torch.no_grad():
                    want = tiny_model(grown, output_deductive=True).deductive
                same(layers, want)
                assert not torch.equal(layers[0].G_LM, prompt[0].G_LM)


@pytest.mark.slow
def test_causal_metric_kv_cache_continues_the_running_sum() -> None:
    """With ``causal_metric`` and KV on / G off, each step's A continues the cached running sum
    of q^T q: ids equal model.forward's KV loop, deductive outputs the uncached ones."""
    model = tiny(causal_metric=True)
    want = reference_generate(model, PROMPT, STEPS, kv=True, g=False, top_k=1)
    ids, records = walk(model, "kv1_g0")
    assert ids == want == reference_generate(model, PROMPT, STEPS, kv=False, g=False, top_k=1)
    _, reference = walk(model, "kv0_g0")
    layers = model.decoder.dec_layers
    for record, uncached in zip(records[1:], reference[1:]):
        for layer, got, ref in zip(layers, record.outputs[0], uncached.outputs[0]):
            # A sums q^T q one position at a time here, in blocks (cumsum) there, then LayerNorm
            # and two residual GLU units: float32 rounding, tens of ulps of values ~1.
            torch.testing.assert_close(got.A, ref.A, atol=3e-5, rtol=3e-5)
            torch.testing.assert_close(got.A_LM, ref.A_LM, atol=3e-5, rtol=3e-5)
            # The power law amplifies that rounding: A_P = A_LM ** pw moves by
            # |pw| A_P dA_LM / A_LM to first order (A_LM can be ~1e-9), and G_LM = a A_P + ba by
            # |a| @ dA_P. Twice that, plus a few ulps of the pow and the matmul, bounds the gap.
            p = layer.mha1.plgatt_layer
            pw, a = p.pwlst.detach().double().abs(), p.alst.detach().double().abs()
            lm, ap = ref.A_LM.double(), ref.A_P.double().abs()
            d_lm = (got.A_LM.double() - lm).abs()
            d_ap = (got.A_P.double() - ref.A_P.double()).abs()
            bound_ap = 2 * pw * ap * d_lm / lm + 1e-6 * ap * (1 + pw * lm.log().abs())
            assert bool((d_ap <= bound_ap).all())
            d_g = (got.G_LM.double() - ref.G_LM.double()).abs()
            assert bool((d_g <= 2 * a @ d_ap + 1e-6 * (a @ ap) + 1e-7).all())


@pytest.mark.slow
def test_predefined_g_model_every_mode() -> None:
    """v510G (no metric learner): every mode, including KV on / G off, decodes model.forward's
    ids and reports the predefined G_LM (A, A_LM, A_P absent)."""
    model = tiny(version="v510G")
    for mode, (kv, g) in MODES.items():
        ids, records = walk(model, mode)
        assert ids == reference_generate(model, PROMPT, STEPS, kv=kv, g=g, top_k=1), mode
        for record in records:
            for layer, d in zip(model.decoder.dec_layers, record.outputs[0]):
                assert d.A is None and d.A_LM is None and d.A_P is None
                assert torch.equal(d.G_LM, layer.mha1.predefined_G_LM)


@pytest.mark.slow
@pytest.mark.parametrize("mode", CACHE_MODES)
def test_blocks_record_each_reported_token_once(tiny_model, mode) -> None:
    """step_many (one block of steps): a slot that finishes inside the block is recorded for the
    step that reports its last token only, and the records equal step-by-step ones."""
    kv, g = MODES[mode]
    short = SamplingParams(temperature=0.0, max_new_tokens=2, stop_at_eos=False)

    def run(block: bool):
        engine = DecodeEngine(
            tiny_model, 2, enable_kvcache=kv, enable_Gcache=g, record_deductive=True
        )
        engine.add_many([PROMPT, [7, 8, 9]], [GREEDY, short])
        outputs = engine.step_many(STEPS) if block else [engine.step() for _ in range(STEPS)]
        return outputs, engine.deductive

    stepped, by_step = run(block=False)
    blocked, by_block = run(block=True)
    assert [o.token_ids for o in blocked] == [o.token_ids for o in stepped]
    assert [sorted(r.outputs) for r in by_block] == [[0, 1], [0, 1], [0, 1]] + [[0]] * 4
    for a, b in zip(by_block, by_step, strict=True):
        assert sorted(a.outputs) == sorted(b.outputs)
        for slot in a.outputs:
            same(a.outputs[slot], b.outputs[slot], ("G_LM",))


def test_record_deductive_refusals(tiny_model) -> None:
    with pytest.raises(PLDRError, match="record_deductive"):
        DecodeEngine(tiny_model, 1, record_deductive=True, cuda_graph=True)
    with pytest.raises(PLDRError, match="record_deductive"):
        DecodeEngine(tiny_model, 1, record_deductive=True, compile=True)
    engine = DecodeEngine(tiny_model, 1, record_deductive=True)
    g_init = [(None, torch.eye(16).expand(1, 4, 16, 16))] * 2
    with pytest.raises(PLDRError, match="G_init"):
        engine.add(PROMPT, GREEDY, g_init=g_init)
    assert engine.free_slots == 1 and engine.deductive == []
    # A causal metric with KV on / G off continues A per token: a fixed G_init has no place.
    causal = DecodeEngine(tiny(causal_metric=True), 1, enable_Gcache=False)
    with pytest.raises(PLDRError, match="G_init"):
        causal.add(PROMPT, GREEDY, g_init=g_init)
    # Without the KV-cache a G_init is what the pass uses: it is recorded as such.
    engine = DecodeEngine(tiny_model, 1, enable_kvcache=False, record_deductive=True)
    engine.add(PROMPT, GREEDY, g_init=g_init)
    engine.step()
    assert all(torch.equal(d.G_LM, g_init[0][1]) for d in engine.deductive[1].outputs[0])


@pytest.mark.slow
def test_cache_mode_runs_is_the_loop(tiny_model, monkeypatch) -> None:
    """cache_mode_runs builds one recording engine per mode and nothing else walks the modes."""
    made = []
    original = DecodeEngine.__init__

    def spy(self, model, max_batch, max_len=None, **kwargs):
        made.append((kwargs.get("enable_kvcache"), kwargs.get("enable_Gcache")))
        assert kwargs.get("record_deductive") is True
        original(self, model, max_batch, max_len, **kwargs)

    monkeypatch.setattr(DecodeEngine, "__init__", spy)
    runs = cache_mode_runs(tiny_model, PROMPT, steps=3)
    assert sorted(made) == sorted(MODES.values())
    ids = reference_generate(tiny_model, PROMPT, 3, kv=False, g=False, top_k=1)
    assert runs.continuation == ids
    for mode in CACHE_MODES:
        assert len(runs.steps[mode]) == 3
    # The reference step is model.forward on the grown sequence.
    direct = deductive_outputs(tiny_model, PROMPT + ids[:2])
    for got, want in zip(runs.steps["kv0_g0"][1], direct):
        assert all(torch.equal(got[n], want[n]) for n in NAMES)

    # Structure: the module calls the model only in deductive_outputs (one uncached pass);
    # no code in the package walks the cache modes by dropping caches between model calls.
    from pldr_llm.deductive import runs as runs_module

    tree = ast.parse(inspect.getsource(runs_module))
    callers = {
        fn.name
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        for call in ast.walk(fn)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "model"
    }
    assert callers == {"deductive_outputs"}
    package = Path(pldr_llm.__file__).parent
    for path in package.rglob("*.py"):
        if path.name != "cache.py":
            text = path.read_text()
            assert ".drop_g(" not in text and ".drop_kv(" not in text, path


@pytest.mark.gpu
def test_cache_mode_runs_on_cuda_matches_the_cpu(tiny_model) -> None:
    """On CUDA the recording loop runs eagerly (no graph): same continuation, and the cached
    modes still reuse the prompt's tensors exactly."""
    torch.set_float32_matmul_precision("highest")
    cpu = cache_mode_runs(tiny_model, PROMPT, steps=4)
    gpu = cache_mode_runs(tiny_model.cuda(), PROMPT, steps=4)
    assert gpu.continuation == cpu.continuation
    for step in gpu.steps["kv1_g1"]:
        for got, want in zip(step, gpu.prompt):
            assert all(torch.equal(got[n], want[n]) for n in NAMES)
    for got, want in zip(gpu.steps["kv0_g0"][-1], cpu.steps["kv0_g0"][-1]):
        # Different kernels (cuBLAS vs CPU BLAS) in float32, amplified by the power law.
        torch.testing.assert_close(got["A"], want["A"], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_causal_metric_kv_g_off_cuda_graph_equals_eager() -> None:
    """The running-sum update of a causal metric (KV on, G off) is captured with the step: the
    CUDA-graph loop gives the eager loop's ids, which are model.forward's KV loop's."""
    torch.set_float32_matmul_precision("highest")
    model = tiny(causal_metric=True)
    want = reference_generate(model, PROMPT, 20, kv=True, g=False, top_k=1)  # on the CPU
    model.cuda()
    params = SamplingParams(temperature=0.0, max_new_tokens=20, stop_at_eos=False)
    for graph in (False, True):
        engine = DecodeEngine(model, 2, enable_Gcache=False, cuda_graph=graph)
        slot = engine.add(PROMPT, params)
        while engine.active_slots:
            engine.step()
        assert engine.generated(slot) == want, graph
