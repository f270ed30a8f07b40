"""The sampling stage's logit processing (penalties, logit_bias, min_new_tokens, stop ids) and
log-probabilities, against the plain eager loop of tests/reference_decoding.py.

The reference writes each rule out token by token over the model's logits (a growing cache, or
the full sequence re-run); the engine applies them as [B, V] tensor operations inside its step.
The penalties and biases here are exactly representable in float32 (0.5, 0.75, 3.0, ...), so
both compute the same float32 numbers and the ids must be equal. Log-probabilities: the engine
attends over a static, masked cache, so its logits agree with the reference's to ~1e-6 (float32
sums in another order); 1e-5 on log-softmax values of O(1-10) is a few ulps of slack.
"""

from __future__ import annotations

import pytest
import torch

from pldr_llm import PLDRError, generate_details
from pldr_llm.core import fused
from pldr_llm.generation import DecodeEngine, SamplingParams
from reference_decoding import reference_generate

PROMPTS = [[5, 9, 44, 12, 7, 44, 3, 250, 9], [17, 1, 23], [6, 81, 81, 9, 2, 81]]
PROCESSING = {
    "repetition_penalty": 1.5,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.75,
    "logit_bias": {7: 3.0, 44: -100.0, 120: 2.5},
}
SAMPLING = [{"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9}, {"temperature": 1.2}]


def _reference(model, prompt, steps, **options):
    return reference_generate(model, prompt, steps, seed=11, **options)


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "top-p", "plain"])
@pytest.mark.parametrize(
    "kv", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["kv", "full-sequence"]
)
def test_penalties_and_bias_equal_the_eager_reference(tiny_model, sampling, kv):
    steps = 12
    want = [
        _reference(tiny_model, p, steps, kv=kv, g=kv, stop_at_eos=False, **sampling, **PROCESSING)
        for p in PROMPTS
    ]
    out = generate_details(
        tiny_model, PROMPTS, steps, enable_kvcache=kv, enable_Gcache=kv, seed=11,
        stop_at_eos=False, **sampling, **PROCESSING,
    )  # fmt: skip
    assert out.new_ids == want
    plain = generate_details(tiny_model, PROMPTS, steps, seed=11, stop_at_eos=False, **sampling)
    assert plain.new_ids != want  # the processing changed what was generated
    assert all(44 not in ids for ids in want)  # a -100 bias removes a token


def _first_greedy_token(model, prompt):
    return generate_details(model, [prompt], 1, temperature=0).new_ids[0][0]


def test_min_new_tokens_masks_stop_ids_until_reached(tiny_model):
    prompt = PROMPTS[0]
    stop = _first_greedy_token(tiny_model, prompt)  # greedy would stop at once on this id
    options = {"temperature": 0.0, "stop_token_ids": (stop,), "stop_at_eos": True}
    assert generate_details(tiny_model, [prompt], 10, **options).new_ids == [[stop]]
    want = _reference(tiny_model, prompt, 10, min_new_tokens=4, **options)
    out = generate_details(tiny_model, [prompt], 10, min_new_tokens=4, **options)
    assert out.new_ids == [want]
    assert len(want) >= 4 and stop not in want[:4]
    # end-of-text is masked too while the row stops there
    eos = tiny_model.config.eos_id
    forced_eos = {"temperature": 0.0, "logit_bias": {eos: 100.0}}
    assert generate_details(tiny_model, [prompt], 10, **forced_eos).new_ids == [[eos]]
    out = generate_details(tiny_model, [prompt], 10, min_new_tokens=3, **forced_eos)
    assert out.new_ids == [_reference(tiny_model, prompt, 10, min_new_tokens=3, **forced_eos)]
    assert len(out.new_ids[0]) == 4 and out.new_ids[0][-1] == eos


def test_a_processed_row_leaves_its_batch_neighbours_alone(tiny_model):
    engine = DecodeEngine(tiny_model, 3, 32, cuda_graph=False)
    plain = SamplingParams(temperature=0.8, seed=3, max_new_tokens=10, stop_at_eos=False)
    processed = SamplingParams(
        temperature=0.0, max_new_tokens=10, stop_at_eos=False, repetition_penalty=2.0,
        logit_bias=((7, 3.0),), frequency_penalty=1.0,
    )  # fmt: skip
    variants = []
    step_fn = engine.graphs.step_fn
    engine.graphs.step_fn = lambda v: (variants.append(v.processed), step_fn(v))[1]
    slots = engine.add_many(PROMPTS, [plain, processed, plain])
    while engine.active_slots:
        engine.step()
    got = engine.generated_many(slots)
    alone = generate_details(tiny_model, PROMPTS, 10, temperature=0.8, seed=3, stop_at_eos=False)
    assert got[0] == alone.new_ids[0] and got[2] == alone.new_ids[2]
    assert got[1] == _reference(
        tiny_model, PROMPTS[1], 10, temperature=0.0, stop_at_eos=False,
        repetition_penalty=2.0, logit_bias={7: 3.0}, frequency_penalty=1.0,
    )  # fmt: skip
    assert variants and all(variants)
    # the slot reused by a plain row: the processed step is no longer run, and its stale
    # state does not leak into the new row
    for slot in slots:
        engine.release(slot)
    variants.clear()
    slot = engine.add(PROMPTS[1], plain)
    while engine.active_slots:
        engine.step()
    assert not any(variants)
    again = generate_details(tiny_model, [PROMPTS[1]], 10, temperature=0.8, seed=3)
    assert engine.generated(slot) == again.new_ids[0][: len(engine.generated(slot))]


@pytest.mark.slow
def test_logprobs_are_the_processed_log_softmax(tiny_model):
    steps, n = 8, 5
    options = {"temperature": 0.9, "top_k": 30, "stop_at_eos": False, **PROCESSING}
    for host_loop in (False, True):
        out = generate_details(
            tiny_model, PROMPTS[:2], steps, seed=11, logprobs=n,
            streamer=(lambda ids: None) if host_loop else None, **options,
        )  # fmt: skip
        for row, prompt in enumerate(PROMPTS[:2]):
            ids, chosen, dist = _reference(
                tiny_model, prompt, steps, return_logprobs=True, **options
            )
            assert out.new_ids[row] == ids
            torch.testing.assert_close(torch.tensor(out.logprobs[row]), torch.tensor(chosen),
                                       atol=1e-5, rtol=0)  # fmt: skip
            for position, top in enumerate(out.top_logprobs[row]):
                assert len(top) == n
                values = [v for _, v in top]
                assert values == sorted(values, reverse=True)
                want = dist[position].topk(n).values
                torch.testing.assert_close(torch.tensor(values), want, atol=1e-5, rtol=0)
                # each id's value is its value in the reference distribution
                got = dist[position][torch.tensor([i for i, _ in top])]
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # chosen log-probabilities only (logprobs=0): no alternatives
    out = generate_details(tiny_model, [PROMPTS[0]], 4, temperature=0.0, logprobs=0)
    assert len(out.logprobs[0]) == 4 and out.top_logprobs == [[[]] * 4]
    assert generate_details(tiny_model, [PROMPTS[0]], 4).logprobs is None


def test_step_outputs_carry_top_logprobs_per_slot(tiny_model):
    engine = DecodeEngine(tiny_model, 2, 32, cuda_graph=False)
    asks = SamplingParams(temperature=0.0, max_new_tokens=6, stop_at_eos=False, logprobs=3)
    quiet = SamplingParams(temperature=0.0, max_new_tokens=6, stop_at_eos=False)
    first, second = engine.add_many(PROMPTS[:2], [asks, quiet])
    outputs = [engine.step(), *engine.step_many(2), *engine.step_many(3)]
    assert [len(o.slots) for o in outputs] == [2] * 6
    ids, chosen, dist = _reference(tiny_model, PROMPTS[0], 6, temperature=0.0,
                                   stop_at_eos=False, return_logprobs=True)  # fmt: skip
    assert [o.token_ids[0] for o in outputs] == ids
    for position, out in enumerate(outputs):
        assert out.top_logprobs is not None and out.top_logprobs[1] == []
        top = out.top_logprobs[0]
        assert top[0][0] == ids[position]  # greedy: the best alternative is the token
        assert out.logprobs[0] == pytest.approx(chosen[position], abs=1e-5)
        assert [v for _, v in top] == pytest.approx(dist[position].topk(3).values.tolist(),
                                                    abs=1e-5)  # fmt: skip
    assert (
        engine.generated(second)
        == generate_details(
            tiny_model, [PROMPTS[1]], 6, temperature=0.0, stop_at_eos=False
        ).new_ids[0]
    )
    assert first != second


@pytest.mark.slow
@pytest.mark.skipif(
    not fused.available(torch.device("cpu")), reason="needs Triton's CPU interpreter"
)
def test_fused_step_processes_like_the_op_by_op_step():
    from test_fused_decode import model_of

    model = model_of(3)
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=10, repetition_penalty=1.5,
                       frequency_penalty=0.5, logit_bias=((7, 3.0), (44, -100.0))),
        SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_new_tokens=10,
                       presence_penalty=0.75, min_new_tokens=6, stop_token_ids=(9,)),
        SamplingParams(temperature=0.0, max_new_tokens=10),
    ]  # fmt: skip
    results = {}
    for fused_step in (False, True):
        engine = DecodeEngine(model, 3, 32, cuda_graph=False, fused=fused_step)
        slots = engine.add_many(PROMPTS, params)
        while engine.active_slots:
            engine.step()
        results[fused_step] = engine.generated_many(slots)
    assert results[True] == results[False]
    assert results[True][0] == _reference(
        model, PROMPTS[0], 10, temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5,
        logit_bias={7: 3.0, 44: -100.0},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0"),
        ("repetition_penalty", float("nan"), "repetition_penalty must be a finite number > 0"),
        ("presence_penalty", 2.5, r"presence_penalty must be in \[-2, 2\]"),
        ("frequency_penalty", True, r"frequency_penalty must be in \[-2, 2\]"),
        ("logit_bias", ((5, 101.0),), r"logit_bias of token 5 must be in \[-100, 100\]"),
        ("logit_bias", ((-1, 1.0),), "logit_bias token id must be an integer >= 0"),
        ("logit_bias", ((5, 1.0), (5, 2.0)), "logit_bias names token 5 twice"),
        ("logit_bias", ((5,),), r"logit_bias must hold \(token id, bias\) pairs"),
        ("min_new_tokens", 65, r"min_new_tokens \(65\) exceeds max_new_tokens \(64\)"),
        ("min_new_tokens", -1, "min_new_tokens must be an integer >= 0"),
        ("logprobs", 21, "logprobs must be at most 20"),
        ("stop_token_ids", tuple(range(17)), "at most 16 stop_token_ids"),
        ("stop_at_eos", 1, "stop_at_eos must be True or False"),
    ],
)
def test_sampling_params_refuse_bad_fields(field, value, message):
    with pytest.raises(PLDRError, match=message):
        SamplingParams(**{field: value}).validate()


def test_bad_processing_options_are_refused_by_every_entry(tiny_model):
    with pytest.raises(PLDRError, match="logit_bias token id must be an integer"):
        generate_details(tiny_model, [PROMPTS[0]], 3, logit_bias={"a": 1})
    with pytest.raises(PLDRError, match="outside the vocabulary|vocabulary"):
        generate_details(tiny_model, [PROMPTS[0]], 3, logit_bias={5000: 1.0})
    with pytest.raises(PLDRError, match="presence_penalty"):
        generate_details(tiny_model, [PROMPTS[0]], 0, presence_penalty=-3.0)  # checked at n=0
    engine = DecodeEngine(tiny_model, 1, 16, cuda_graph=False)
    with pytest.raises(PLDRError, match="frequency_penalty"):
        engine.add(PROMPTS[1], SamplingParams(frequency_penalty=9.0, max_new_tokens=3))
    assert engine.free_slots == 1


@pytest.mark.gpu
@pytest.mark.parametrize("sampling", SAMPLING[:2], ids=["greedy", "top-p"])
def test_captured_processed_step_equals_the_eager_loop(tiny_model, sampling):
    """On a GPU: the processed step inside the captured graph (and the fused step it runs with)
    gives the eager (uncaptured) loop's ids and log-probabilities (greedy: the CPU's ids too)."""
    torch.set_float32_matmul_precision("highest")
    options = {
        "seed": 3, "stop_at_eos": False, "logprobs": 4, "min_new_tokens": 5,
        "stop_token_ids": (9,), **sampling, **PROCESSING,
    }  # fmt: skip
    cpu = generate_details(tiny_model, PROMPTS, 20, **options)
    model = tiny_model.cuda()
    try:
        eager = generate_details(model, PROMPTS, 20, cuda_graph=False, **options)
        graph = generate_details(model, PROMPTS, 20, **options)
        assert graph.new_ids == eager.new_ids
        if sampling.get("temperature") == 0.0:
            # Greedy: the CPU's ids too. A sampled row draws at the CDF of its filtered
            # probabilities, whose float32 sums differ between devices in the last bits: a draw
            # that falls within that rounding of a boundary picks the neighbour, so sampled ids
            # are compared on one device (captured vs eager), where the arithmetic is the same.
            assert graph.new_ids == cpu.new_ids
        for got, want in zip(graph.logprobs, eager.logprobs):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
        assert [[[i for i, _ in t] for t in row] for row in graph.top_logprobs] == [
            [[i for i, _ in t] for t in row] for row in eager.top_logprobs
        ]
        # without logprobs the fused bookkeeping kernel runs after the processing
        plain = {k: v for k, v in options.items() if k != "logprobs"}
        assert generate_details(model, PROMPTS, 20, **plain).new_ids == eager.new_ids
    finally:
        tiny_model.cpu()


def test_to_device_holds_the_values_of_torch_tensor() -> None:
    """The admission's host-to-device copies: the values and dtype ``torch.tensor`` gives."""
    from pldr_llm.core.processing import to_device

    for values, dtype in (([[1, 2], [3, 4]], None), ([0.5, 2.0], None), ([7, 9], torch.long)):
        got = to_device(values, torch.device("cpu"), dtype)
        want = torch.tensor(values, dtype=dtype)
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.gpu
def test_to_device_does_not_wait_for_the_queued_work() -> None:
    """On a GPU the copy is queued behind the work already there (no host sync, which
    ``torch.tensor(values, device="cuda")`` makes) and still reads the right values."""
    from pldr_llm.core.processing import to_device

    device = torch.device("cuda")
    busy = torch.randn(2048, 2048, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):  # work queued on the stream while the copies are made
            busy = busy @ busy / 64
        copies = [to_device(list(range(i, i + 5)), device, torch.long) for i in range(10)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [c.tolist() for c in copies] == [list(range(i, i + 5)) for i in range(10)]
