"""Generation: batched rows equal lone runs, sampling options, clear errors."""

from __future__ import annotations

import pytest
import torch

from pldr_llm import PLDRError, generate, generate_details
from pldr_llm.generation import top_p_filter

PROMPTS = [[5, 17, 22, 9, 41, 7], [12, 3], [250, 31, 8, 99]]
MODES = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize(("kv", "g"), MODES)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_batched_rows_equal_lone_runs(tiny_model, kv, g, implementation):
    tiny_model.attn_implementation = implementation
    alone = [
        generate(
            tiny_model,
            torch.tensor(p),
            10,
            top_k=1,
            enable_kvcache=kv,
            enable_Gcache=g,
            stop_at_eos=False,
        ).tolist()
        for p in PROMPTS
    ]
    batched = generate(
        tiny_model, PROMPTS, 10, top_k=1, enable_kvcache=kv, enable_Gcache=g, stop_at_eos=False
    )
    assert batched == alone


def test_padded_logits_equal_lone_logits(tiny_model):
    """Left padding is kept out of A, keys and positions: logits equal the lone run's."""
    prompt = torch.tensor([[7, 8, 9, 10]])
    padded = torch.tensor([[0, 0, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = tiny_model(prompt, output_deductive=True)
        batch = tiny_model(padded, attention_mask=mask, output_deductive=True)
    torch.testing.assert_close(batch.logits[:, 2:], alone.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch.deductive[0].A, alone.deductive[0].A, atol=1e-5, rtol=1e-4)
    # without the mask (the original's semantics) padding does enter A
    with torch.no_grad():
        unmasked = tiny_model(padded, output_deductive=True)
    assert not torch.allclose(unmasked.deductive[0].A, alone.deductive[0].A, atol=1e-3)


def test_stop_at_eos_per_row(tiny_model):
    # make end-of-text (3) the greedy choice after token 5 only
    with torch.no_grad():
        tiny_model.final_layer.bias.zero_()
    first = generate(tiny_model, [[5, 6]], 1, top_k=1, stop_at_eos=False)[0][-1]
    out = generate(tiny_model, [[5, 6], [9, 10, 11]], 6, top_k=1, eos_id=first)
    assert out[0] == [5, 6, first]  # stopped right after its end-of-text
    assert len(out[1]) == 3 + 6 or out[1][-1] == first


def test_tensor_batch_keeps_rank_and_pads_finished_rows(tiny_model):
    prompt = torch.tensor([[4, 5, 6], [7, 8, 9]])
    out = generate(tiny_model, prompt, 4, top_k=1, stop_at_eos=False)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], prompt)
    single = generate(tiny_model, torch.tensor([4, 5, 6]), 4, top_k=1, stop_at_eos=False)
    assert single.dim() == 1 and torch.equal(single, out[0])


def test_seeded_sampling_is_reproducible(tiny_model):
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate(
            tiny_model,
            [4, 5, 6],
            12,
            temperature=0.9,
            top_p=0.95,
            top_k=40,
            generator=gen,
            stop_at_eos=False,
        ).tolist()

    assert run(1) == run(1)
    assert run(1) != run(2) or run(1) != run(3)


def test_streamer_and_stopping_criteria(tiny_model):
    seen = []
    out = generate_details(
        tiny_model,
        [4, 5, 6],
        8,
        top_k=1,
        stop_at_eos=False,
        streamer=lambda ids: seen.append(ids.tolist()),
        stopping_criteria=lambda row, new: len(new) >= 3,
    )
    assert len(out.new_ids[0]) == 3
    assert [s[0] for s in seen] == out.new_ids[0]


def test_empty_prompt_starts_from_end_of_text(tiny_model):
    out = generate(tiny_model, torch.tensor([], dtype=torch.long), 3, top_k=1, stop_at_eos=False)
    assert out[0].item() == 3 and out.numel() == 4


def test_top_p_keeps_at_least_one():
    logits = torch.tensor([[5.0, 1.0, 0.5]])
    assert top_p_filter(logits, 0.01).tolist() == [[5.0, -1e10, -1e10]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.2}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": -2}, "max_new_tokens"),
    ],
)
def test_bad_sampling_arguments(tiny_model, kwargs, message):
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(PLDRError, match=message):
        generate(tiny_model, [4, 5], **args)


def test_bad_inputs(tiny_model):
    with pytest.raises(PLDRError, match="outside the vocabulary"):
        generate(tiny_model, [4, 300], 2)
    with pytest.raises(PLDRError, match="outside the vocabulary"):
        tiny_model(torch.tensor([[-1, 4]]))
    too_long = list(range(4, 4 + tiny_model.config.max_seq_len + 1))
    with pytest.raises(PLDRError, match="max_seq_len"):
        generate(tiny_model, [t % 290 + 4 for t in too_long], 1)
    with pytest.raises(PLDRError, match="max_seq_len"):
        generate(tiny_model, [4, 5], tiny_model.config.max_seq_len)
    with pytest.raises(PLDRError, match="G_init has 1 layers"):
        generate(tiny_model, [4, 5], 2, G_init=[torch.eye(16).expand(4, 16, 16)])
