"""The optimized paths (chunked loss, compiled layers, captured prefill) vs eager (CPU, float32).

Chunked loss = masked cross-entropy of the full logits (value and gradients); the captured
prefill = ``model.forward``; compiled layers = eager layers. GPU-only checks (CUDA graphs, Inductor) are
marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pldr_llm import PLDRError, masked_cross_entropy
from pldr_llm.core.cache import PLDRCache
from pldr_llm.core.compile import compile_decoder_layers, uncompile_decoder_layers
from pldr_llm.core.losses import linear_cross_entropy
from pldr_llm.generation.captured import CapturedForward

ATOL, RTOL = 1e-5, 1e-4


def close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def random_ids(shape, vocab, seed, low=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, shape, generator=generator)


# ---------------------------------------------------------------------------- chunked loss
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy_matches_full_logits(chunk_rows, with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    targets = random_ids((3, 7), 50, seed=1, low=0)
    targets[0, :3] = 0  # padding targets are left out of the mean
    expected = masked_cross_entropy(F.linear(hidden, weight, bias), targets)
    grads_expected = torch.autograd.grad(
        expected, [t for t in (hidden, weight, bias) if t is not None]
    )
    loss = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss, [t for t in (hidden, weight, bias) if t is not None])
    close(loss, expected)
    for got, want in zip(grads, grads_expected):
        close(got, want)


def test_linear_cross_entropy_under_bf16_autocast():
    """Under autocast the matmul runs in bf16 like final_layer would: same loss, same grads
    within bf16 rounding."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 9, 32, requires_grad=True)
    head = torch.nn.Linear(32, 64)
    targets = random_ids((4, 9), 64, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = masked_cross_entropy(head(hidden), targets)
        loss = linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk_rows=8)
    want = torch.autograd.grad(expected, [hidden, head.weight, head.bias])
    got = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
    close(loss, expected, atol=1e-3, rtol=1e-3)
    for g, w in zip(got, want):
        close(g.float(), w.float(), atol=2e-3, rtol=2e-2)


def test_linear_cross_entropy_without_grad_mode():
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 8), torch.randn(20, 8, requires_grad=True)
    targets = random_ids((5,), 20, seed=3)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, targets, chunk_rows=2)
    close(loss, masked_cross_entropy(F.linear(hidden, weight), targets).detach())
    with pytest.raises(PLDRError, match="do not match"):
        linear_cross_entropy(hidden, weight, None, targets[:4])


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["none", "pad_ids", "attention_mask"])
def test_forward_labels_loss_matches_model_logits(tiny_model, padding):
    """``forward(..., labels=)`` (the trainer's chunked loss) = the loss of the full logits."""
    model = tiny_model.train()
    vocab = model.config.input_vocab_size
    ids = random_ids((3, 12), vocab, seed=4)
    mask = None
    if padding == "pad_ids":
        ids[1, :4] = 0  # the original's semantics: id 0 keys masked
    if padding == "attention_mask":
        mask = torch.ones_like(ids)
        mask[2, :5] = 0
    inputs, targets = ids[:, :-1], ids[:, 1:]
    in_mask = mask[:, :-1] if mask is not None else None
    expected = masked_cross_entropy(model(inputs, attention_mask=in_mask).logits, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(expected, params, allow_unused=True)
    out = model(inputs, attention_mask=in_mask, labels=targets)
    loss = out.loss
    got = torch.autograd.grad(loss, params, allow_unused=True)
    close(loss, expected)
    full = model(inputs, attention_mask=in_mask).logits
    hits = ((full.argmax(-1) == targets) & (targets != 0)).sum()
    assert out.correct.item() == hits.item()
    assert out.logits.shape[1] == 1  # only the last position's logits are computed
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            close(g, w, atol=1e-5, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("key_padding", [False, True])
def test_forward_without_host_reads_matches_checked_forward(tiny_model, key_padding):
    """``check_ids=False`` + a ``key_padding`` hint (what the trainer passes) computes what the
    checked forward computes: the hint only replaces the host read that finds padding."""
    model = tiny_model.train()
    ids = random_ids((2, 10), model.config.input_vocab_size, seed=17)
    if key_padding:
        ids[1, 2:4] = 0
    targets = ids[:, 1:].clone()
    targets[0, -2:] = 0  # padding targets are still left out
    expected = masked_cross_entropy(model(ids[:, :-1]).logits, targets)
    want = torch.autograd.grad(expected, list(model.parameters()))
    out = model(ids[:, :-1], labels=targets, key_padding=key_padding, check_ids=False)
    got = torch.autograd.grad(out.loss, list(model.parameters()))
    close(out.loss, expected)
    for g, w in zip(got, want):
        close(g, w, atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------------------- captured prefill
def test_captured_forward_matches_forward(tiny_model):
    model = tiny_model
    ids = random_ids((2, 10), model.config.input_vocab_size, seed=11)
    captured = CapturedForward(model, 2, 10)
    out = captured(ids)
    with torch.no_grad():
        expected = model(ids, logits_to_keep=1)
    close(out.logits, expected.logits)
    for got, want in zip(out.cache.kv, expected.cache.kv):
        close(got.key, want.key)
        close(got.value, want.value)
    for got, want in zip(out.cache.g, expected.cache.g):
        close(got.G_LM, want.G_LM)
    ids[0, 0] = 0
    with pytest.raises(PLDRError, match="padding"):
        captured(ids)
    with pytest.raises(PLDRError, match="padded=True"):
        captured(ids, torch.ones_like(ids))


def right_padded(vocab, lengths, width, seed):
    """Ids [len(lengths), width] (pad id 0 after each row's length) and their mask."""
    ids = random_ids((len(lengths), width), vocab, seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.slow
@pytest.mark.parametrize("causal_metric", [False, True])
@pytest.mark.parametrize("with_g", [False, True])
def test_captured_forward_with_mask_matches_forward(causal_metric, with_g):
    """padded=True computes what model(ids, attention_mask=mask, cache=G) does, for rows of
    several lengths: hidden states, logits, KV, positions. The same kernels run in the same
    order on the CPU (the forward builds the same bias when any row has padding), so the
    values are equal, not just close."""
    from pldr_llm import PLDRConfig, PLDRModel
    from support import TINY_HPDICT

    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig.from_hpdict(TINY_HPDICT, causal_metric=causal_metric)).eval()
    ids, mask = right_padded(model.config.input_vocab_size, [12, 7, 1], 12, seed=21)
    g = None
    if with_g:  # a G-cache of another input, the way lm-eval's gcache_file passes one
        with torch.no_grad():
            g = model(random_ids((1, 9), model.config.input_vocab_size, seed=22)).cache.g
    captured = CapturedForward(model, 3, 12, padded=True, g=g, output_hidden_states=True)
    out = captured(ids, mask)
    with torch.no_grad():
        expected = model(
            ids,
            attention_mask=mask,
            cache=PLDRCache(g=g) if with_g else None,
            output_hidden_states=True,
            logits_to_keep=1,
        )
    assert torch.equal(out.hidden_states, expected.hidden_states)
    assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out.cache.next_position, torch.tensor([12, 7, 1]))
    assert torch.equal(out.cache.key_valid, mask.bool())
    for got, want in zip(out.cache.kv, expected.cache.kv):
        assert torch.equal(got.key, want.key)
    # The static buffers are refilled each call: a second mask gives that mask's forward.
    ids2, mask2 = right_padded(model.config.input_vocab_size, [3, 12, 5], 12, seed=23)
    out2 = captured(ids2, mask2)
    with torch.no_grad():
        cache = PLDRCache(g=g) if with_g else None
        expected2 = model(ids2, attention_mask=mask2, cache=cache, output_hidden_states=True)
    assert torch.equal(out2.hidden_states, expected2.hidden_states)


@pytest.mark.slow
def test_captured_forward_without_padding_rows_matches_causal_forward(tiny_model):
    """Every row full: the forward takes SDPA's causal flag, the captured one the explicit
    bias. Masked scores get -1e9 either way (exp underflows to exactly 0 in float32), so the
    only difference is the kernels' summation order: float32 rounding (ATOL 1e-5)."""
    model = tiny_model
    ids = random_ids((2, 10), model.config.input_vocab_size, seed=24)
    captured = CapturedForward(model, 2, 10, padded=True, output_hidden_states=True)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True)
    close(captured(ids).hidden_states, expected.hidden_states)
    close(captured(ids, torch.ones_like(ids)).hidden_states, expected.hidden_states)
    with pytest.raises(PLDRError, match="attention_mask shape"):
        captured(ids, torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(PLDRError, match="shape"):
        captured(ids[:, :9])
    with pytest.raises(PLDRError, match="CUDA"):
        CapturedForward(model.cpu(), 2, 10, cuda_graph=True)


@pytest.mark.slow
def test_captured_padded_forward_has_no_host_sync(tiny_model):
    """The padded captured forward traces as ONE graph (fullgraph: a host read such as .item(),
    bool(tensor) or a data-dependent shape would break it), where ``model.forward`` with an
    attention_mask does not (it checks the ids and asks whether every key is a token)."""
    model = tiny_model
    ids, mask = right_padded(model.config.input_vocab_size, [8, 5], 8, seed=25)
    captured = CapturedForward(model, 2, 8, padded=True, output_hidden_states=True)
    captured(ids, mask)  # fills the static buffers
    torch._dynamo.reset()
    try:
        traced = torch.compile(captured._forward, backend="aot_eager", fullgraph=True)
        _, hidden, *_ = traced()
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, output_hidden_states=True)
        close(hidden, expected.hidden_states)
        whole = torch.compile(model, backend="aot_eager", fullgraph=True)
        with pytest.raises(Exception, match="(?i)graph break|data-dependent|item|bool"):
            with torch.no_grad():
                whole(ids, attention_mask=mask)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------- compilation
@pytest.mark.slow
def test_compiled_layers_trace_whole_and_match(tiny_model):
    """Each layer traces as ONE graph (no host sync inside), with the eager values/gradients.

    ``aot_eager`` runs dynamo + AOTAutograd without code generation: fast on the CPU."""
    model = tiny_model.train()
    ids = random_ids((2, 9), model.config.input_vocab_size, seed=12)
    expected = masked_cross_entropy(model(ids[:, :-1]).logits, ids[:, 1:])
    want = torch.autograd.grad(expected, list(model.parameters()))
    torch._dynamo.reset()
    compile_decoder_layers(model, backend="aot_eager", fullgraph=True)
    try:
        loss = masked_cross_entropy(model(ids[:, :-1]).logits, ids[:, 1:])
        got = torch.autograd.grad(loss, list(model.parameters()))
        assert "decoder.dec_layers.0.mha1.wq.weight" in model.state_dict()
        assert all("forward" in vars(layer) for layer in model.decoder.dec_layers)
    finally:
        uncompile_decoder_layers(model)
    assert not any("forward" in vars(layer) for layer in model.decoder.dec_layers)
    close(loss, expected)
    for g, w in zip(got, want):
        close(g, w, atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------------------- GPU
def cuda_model(tiny_model):
    torch.set_float32_matmul_precision("highest")
    return tiny_model.cuda()


@pytest.mark.gpu
def test_cuda_captured_forward_and_compiled_loss(tiny_model):
    model = cuda_model(tiny_model)
    ids = random_ids((2, 16), model.config.input_vocab_size, seed=15).cuda()
    with torch.no_grad():
        expected = model(ids, logits_to_keep=1).logits
    close(CapturedForward(model, 2, 16)(ids).logits, expected, atol=1e-4, rtol=1e-3)
    hidden = torch.randn(64, 64, device="cuda", requires_grad=True)
    weight = torch.randn(300, 64, device="cuda", requires_grad=True)
    targets = random_ids((64,), 300, seed=16, low=0).cuda()
    plain = masked_cross_entropy(F.linear(hidden, weight), targets)
    fused = linear_cross_entropy(hidden, weight, None, targets, chunk_rows=16, compile_chunks=True)
    close(fused, plain, atol=1e-4, rtol=1e-4)
    close(
        torch.autograd.grad(fused, weight)[0],
        torch.autograd.grad(plain, weight)[0],
        atol=1e-4,
        rtol=1e-3,
    )


@pytest.mark.gpu
def test_cuda_padded_captured_forward_replays_each_mask(tiny_model):
    """The padded forward in a real CUDA graph (lm-eval's captured scoring; the lm-eval tests
    themselves need lm_eval installed): each replay computes the forward of the mask and ids
    copied in, with and without a fixed G-cache. Tolerance as the unpadded GPU test above: the
    same kernels, but cuBLAS may pick other algorithms inside a capture."""
    model = cuda_model(tiny_model)
    vocab = model.config.input_vocab_size
    with torch.no_grad():
        g = model(random_ids((1, 9), vocab, seed=26).cuda()).cache.g
    for fixed in (None, g):
        captured = CapturedForward(model, 3, 12, padded=True, g=fixed, output_hidden_states=True)
        assert captured.use_graph
        for lengths, seed in (([12, 7, 1], 27), ([3, 12, 5], 28), ([12, 12, 12], 29)):
            ids, mask = right_padded(vocab, lengths, 12, seed=seed)
            ids, mask = ids.cuda(), mask.cuda()
            out = captured(ids, mask)
            with torch.no_grad():
                expected = model(
                    ids,
                    attention_mask=mask,
                    cache=PLDRCache(g=fixed) if fixed is not None else None,
                    output_hidden_states=True,
                )
            keep = mask.bool()  # padded positions hold values nobody reads
            close(out.hidden_states[keep], expected.hidden_states[keep], atol=1e-4, rtol=1e-3)
            assert torch.equal(out.cache.next_position.cpu(), torch.tensor(lengths))
