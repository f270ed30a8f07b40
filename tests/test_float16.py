"""float16 runs wherever a dtype is accepted (CPU): masks that fit it, the power law in float32.

Tolerance: float16 keeps 11 significant bits (a relative rounding of 4.9e-4 per operation); over
the tiny model's two layers (power law included) its last-position logits stay within ~0.1 of
float32's (measured 0.09 at most on these prompts). ``LOGIT_TOL`` = 0.25 leaves 2.5x headroom: a
wrong mask value (-inf turning a padded row into NaN) or an overflowing power law is off by far
more, or not finite. Greedy ids can only differ where float32's own top-2 margin is below
``2 * LOGIT_TOL`` (each logit moves by at most LOGIT_TOL); the random model has such near-ties, so
the ids are compared up to a row's first near-tie and the test asks for enough tokens before it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pldr_llm import PLDRConfig, PLDRModel
from pldr_llm.cli import main
from pldr_llm.core.generate import generate_details
from support import PAPER_TOKENIZER_MODEL, TINY_HPDICT, paper_vocab_model

LOGIT_TOL = 0.25
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [7, 8, 9], [40, 41, 42, 43, 44, 45]]


def _pair() -> tuple[PLDRModel, PLDRModel]:
    torch.manual_seed(0)
    model32 = PLDRModel(PLDRConfig.from_hpdict(TINY_HPDICT)).eval()
    model16 = PLDRModel(PLDRConfig.from_hpdict(TINY_HPDICT)).eval()
    model16.load_state_dict(model32.state_dict())
    return model32, model16.half()


@pytest.mark.slow
@pytest.mark.parametrize("caches", [(True, True), (True, False), (False, False)])
def test_float16_greedy_ids_match_float32_where_the_margin_allows(caches) -> None:
    model32, model16 = _pair()
    kv, g = caches
    options = dict(temperature=0, output_logits=True, enable_kvcache=kv, enable_Gcache=g)
    want = generate_details(model32, PROMPTS, 12, **options)
    got = generate_details(model16, PROMPTS, 12, **options)
    _assert_same_where_the_margin_allows(want, got)


@pytest.mark.gpu
def test_float16_on_cuda_fused_step_matches_float32_where_the_margin_allows() -> None:
    """On CUDA the step is the fused Triton one (its mask value comes from the dtype too)."""
    model32, model16 = _pair()
    options = dict(temperature=0, output_logits=True)
    want = generate_details(model32, PROMPTS, 12, **options)
    got = generate_details(model16.cuda(), PROMPTS, 12, **options)
    _assert_same_where_the_margin_allows(want, got)


def _assert_same_where_the_margin_allows(want, got) -> None:
    """float16's greedy ids equal float32's up to each row's first disagreement, which may only
    come where float32's top-2 margin is below 2 * LOGIT_TOL; logits stay within LOGIT_TOL."""
    assert torch.isfinite(got.step_logits).all()
    got_logits = got.step_logits.float().cpu()
    top2 = want.step_logits.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]  # [steps, B]
    compared = 0
    for row, (a, b) in enumerate(zip(want.new_ids, got.new_ids, strict=True)):
        for step, (x, y) in enumerate(zip(a, b, strict=True)):
            # Same prefix so far: the two logit rows answer the same question.
            err = (want.step_logits[step, row] - got_logits[step, row]).abs().max()
            assert err <= LOGIT_TOL, (row, step, float(err))
            if x != y:
                assert margin[step, row] < 2 * LOGIT_TOL, (row, step)
                break
            compared += 1
    assert compared >= 15  # the comparison has teeth: most tokens agree before a near-tie


@pytest.mark.slow
def test_float16_padded_prompt_stays_finite() -> None:
    """Left padding masks whole rows of keys: with -1e9 (-inf in float16) they were NaN."""
    _, model16 = _pair()
    ids = torch.tensor([[0, 0, 0, 0, 0, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        for impl in ("sdpa", "eager"):
            model16.attn_implementation = impl
            out = model16(ids, attention_mask=mask)
            assert torch.isfinite(out.logits).all(), impl


def test_mask_values_keep_float32_and_bfloat16_arithmetic() -> None:
    """The original's -1e9 stays wherever it fits; float16 gets a finite stand-in."""
    from pldr_llm.core.plga import MASK_VALUE, bias_in, mask_value

    assert mask_value(torch.float32) == mask_value(torch.bfloat16) == MASK_VALUE == -1e9
    assert mask_value(torch.float64) == MASK_VALUE
    half = mask_value(torch.float16)
    assert torch.isfinite(torch.tensor(half, dtype=torch.float16))
    assert torch.isfinite(torch.tensor(half, dtype=torch.float16) - 30000)  # score + mask
    bias = torch.tensor([0.0, MASK_VALUE])
    assert torch.equal(bias_in(bias, torch.float32), bias)
    assert bias_in(bias, torch.float16).tolist() == [0.0, half]


@pytest.fixture()
def model_dir(tmp_path: Path, paper_tokenizer_dir: Path) -> Path:
    folder = tmp_path / "model"
    paper_vocab_model(0).save(folder)  # its vocabulary fits the paper tokenizer
    shutil.copy(paper_tokenizer_dir / PAPER_TOKENIZER_MODEL, folder / "tokenizer.model")
    return folder


@pytest.mark.slow
def test_cli_generate_float16(model_dir: Path, capsys) -> None:
    args = ["generate", "--model", str(model_dir), "-p", "hello", "--max-new-tokens", "4"]
    assert main([*args, "--dtype", "float16", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err


def test_serving_engine_float16(model_dir: Path) -> None:
    """What ``serve --dtype float16`` runs: the model loaded as float16, the server's engine
    (``DecodeEngine`` with log-probabilities), rows added and stepped."""
    from pldr_llm.bundle import load_bundle
    from pldr_llm.generation import DecodeEngine, SamplingParams

    model, tokenizer = load_bundle(str(model_dir), device="cpu", dtype="float16")
    assert next(model.parameters()).dtype == torch.float16
    engine = DecodeEngine(model, 2, output_logprobs=True)
    params = SamplingParams(temperature=0.0, max_new_tokens=6, stop_at_eos=False)
    slots = [engine.add(tokenizer.encode(text), params) for text in ("hello there", "a b")]
    tokens: dict[int, list[int]] = {slot: [] for slot in slots}
    finished: set[int] = set()
    while len(finished) < len(slots):
        out = engine.step()
        assert out.logprobs is not None
        assert all(-1e4 < lp <= 0.0 for lp in out.logprobs)  # finite log-probabilities
        for slot, token, last in zip(out.slots, out.token_ids, out.finished, strict=True):
            tokens[slot].append(token)
            if last:
                finished.add(slot)
    assert all(len(t) == 6 for t in tokens.values())


@pytest.mark.slow
def test_server_answers_in_float16(tmp_path: Path) -> None:
    """``serve --dtype float16``: the server's app on a float16 model answers a completion
    with finite log-probabilities (the masks and the power law fit float16)."""
    import httpx

    from serve_support import MODEL_ID, build_bundle, live_server

    folder = build_bundle(tmp_path)
    with live_server(folder, dtype="float16") as (url, _):
        body = {"model": MODEL_ID, "prompt": "the model", "max_tokens": 5, "temperature": 0,
                "logprobs": 1}  # fmt: skip
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert reply.json()["usage"]["completion_tokens"] == 5
    assert all(-1e4 < lp <= 0.0 for lp in choice["logprobs"]["token_logprobs"])
