"""lm-evaluation-harness: the native ``pldrllm`` model, lm-eval's ``hf`` model, the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")  # lm-eval itself needs it

from pldr_llm import PLDRModel  # noqa: E402
from pldr_llm.core.errors import PLDRError  # noqa: E402
from support import LM_EVAL_TASK_YAML as TASK_YAML
from support import PAPER_TOKENIZER_MODEL, paper_vocab_model

TASK = "pldr_local_mc"

# A small multiple-choice set: contexts and continuations of different lengths, multi-token and
# single-token choices, and an empty context (scored after the end-of-text id).
ROWS = [
    {
        "question": "The sky on a clear day is",
        "choices": [" blue", " made of cheese", " green"],
        "label": 0,
    },
    {"question": "Two plus two equals", "choices": [" four", " five"], "label": 0},
    {
        "question": "Water boils at",
        "choices": [" 100 degrees", " 10 degrees", " minus five"],
        "label": 0,
    },
    {"question": "Cats like to", "choices": [" sleep", " fly to the moon and back"], "label": 0},
    {"question": "", "choices": [" a", " b"], "label": 1},
    {"question": "Answer with one letter:", "choices": [" A", " B", " C", " D"], "label": 2},
]


@pytest.fixture(scope="module")
def tokenizer_path(paper_tokenizer_dir: Path) -> Path:
    return paper_tokenizer_dir / PAPER_TOKENIZER_MODEL


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path: Path):
    """A seeded random model (vocab 32000), its pldr-llm folder, its HF export and the task."""
    from pldr_llm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    model = paper_vocab_model(5)
    tok = load_tokenizer(tokenizer_path)
    own = root / "own"
    model.save(own)
    tok.save(own)
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return {"model": model, "tokenizer": tok, "own": own, "tasks": tasks, "root": root}


@pytest.fixture(scope="module")
def hf_export(setup) -> Path:
    pytest.importorskip("transformers")
    from pldr_llm.hf import export_hf

    out = setup["root"] / "hf"
    export_hf(setup["model"], setup["tokenizer"], out)
    return out


def _eval_model(setup, **kwargs):
    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    kwargs.setdefault("pretrained", setup["model"])
    kwargs.setdefault("tokenizer", setup["tokenizer"])
    return PLDRLLMEvalModel(device="cpu", **kwargs)


def _run_task(model, setup, **kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )


def _loglikelihoods(result: dict) -> list[list[float]]:
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def _native_logprob(model: PLDRModel, context: list[int], cont: list[int]) -> float:
    """The sum of log-probabilities of ``cont`` after ``context``: one lone forward pass."""
    ids = torch.tensor([context + cont[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(context) - 1, len(context) - 1 + len(cont))
    return float(sum(logprobs[p, t] for p, t in zip(positions, cont)))


def _encode_pair(tok, context: str, cont: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: encode the whole text, the context's ids are the context's share."""
    if not context:
        return [tok.eos_id], tok.encode(cont, add_eos=False)
    whole = tok.encode(context + cont, add_eos=False)
    ctx = tok.encode(context, add_eos=False)
    return ctx, whole[len(ctx) :]


def test_registered_next_to_lm_eval_models():
    from lm_eval.api.registry import get_model

    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    assert get_model("pldrllm") is PLDRLLMEvalModel
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models are still found


def test_zeroshot_group_lists_the_paper_tasks():
    import yaml

    from pldr_llm.eval import TASKS_DIR, ZEROSHOT_GROUP, ZEROSHOT_TASKS

    config = yaml.safe_load((TASKS_DIR / f"{ZEROSHOT_GROUP}.yaml").read_text())
    assert config["group"] == ZEROSHOT_GROUP and tuple(config["task"]) == ZEROSHOT_TASKS
    # That lm-eval resolves the group into its tasks is shown by the offline CLI test below.


@pytest.mark.parametrize("options", [{}, {"cuda_graph": True}], ids=["eager", "captured"])
def test_native_model_scores_like_lone_forward_passes(setup, options):
    """Batched loglikelihood == the native sum of log-probabilities, request by request; also
    through the captured forward (run without a graph on the CPU) on bucketed shapes."""
    from lm_eval.api.instance import Instance

    lm = _eval_model(setup, batch_size=3, **options)
    tok, model = setup["tokenizer"], setup["model"]
    pairs = [(r["question"], c) for r in ROWS for c in r["choices"]]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(results) == len(pairs)
    for (context, cont), (logprob, greedy) in zip(pairs, results):
        ctx_ids, cont_ids = _encode_pair(tok, context, cont)
        assert logprob == pytest.approx(_native_logprob(model, ctx_ids, cont_ids), abs=1e-4)
        assert isinstance(greedy, bool)
    if options:  # every chunk is [3, 64] (max_seq_len 64): captured from its second use on
        assert set(lm.shape_uses) == {(3, 64)} and lm.captured_shapes == [(3, 64)]


@pytest.mark.slow
def test_hf_and_pldrllm_agree_on_the_local_task(setup, hf_export: Path):
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it
    native = _run_task(_eval_model(setup, batch_size=4), setup)
    from_folder = _run_task(
        _eval_model(setup, pretrained=str(hf_export), tokenizer=None, batch_size=2), setup
    )
    args = f"pretrained={hf_export},device=cpu,dtype=float32,backend=causal"
    hf_one = _run_task("hf", setup, model_args=args, batch_size=1)
    hf_batched = _run_task("hf", setup, model_args=args, batch_size=4)
    reference = _loglikelihoods(native)
    for other in (from_folder, hf_one, hf_batched):
        got = _loglikelihoods(other)
        assert len(got) == len(reference)
        for mine, theirs in zip(reference, got):
            assert theirs == pytest.approx(mine, abs=1e-4)
        assert other["results"][TASK]["acc,none"] == native["results"][TASK]["acc,none"]


def test_cached_scoring_equals_stepwise_decoding(setup):
    """score_mode=cached gives each continuation token the probability generation gives it."""
    from lm_eval.api.instance import Instance

    from pldr_llm.core.cache import PLDRCache

    tok, model = setup["tokenizer"], setup["model"]
    pairs = [
        ("Water boils at", " 100 degrees"),
        ("Cats like to", " fly to the moon"),
        ("Hi", " there"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for kv, g in [(True, True), (True, False), (False, True), (False, False)]:
        lm = _eval_model(setup, batch_size=3, score_mode="cached", kvcache=kv, gcache=g)
        results = lm.loglikelihood(requests, disable_tqdm=True)
        for (context, cont), (logprob, _) in zip(pairs, results):
            ctx, cont_ids = _encode_pair(tok, context, cont)
            with torch.no_grad():
                out = model(torch.tensor([ctx]))
                total = float(torch.log_softmax(out.logits[0, -1], -1)[cont_ids[0]])
                seq, g_cache = list(ctx), out.cache.g
                kv_cache = out.cache if kv else None
                for prev, nxt in zip(cont_ids[:-1], cont_ids[1:]):
                    seq.append(prev)
                    if kv_cache is not None:
                        step = model(
                            torch.tensor([[prev]]), cache=kv_cache.with_g(g_cache if g else None)
                        )
                        kv_cache = step.cache
                    else:
                        cache = PLDRCache(g=g_cache) if g else None
                        step = model(torch.tensor([seq]), cache=cache)
                    total += float(torch.log_softmax(step.logits[0, -1], -1)[nxt])
            assert logprob == pytest.approx(total, abs=1e-4), (kv, g, context)


def test_gcache_file_replaces_the_g_cache(setup, tmp_path: Path):
    from lm_eval.api.instance import Instance

    from pldr_llm.core.cache import PLDRCache
    from pldr_llm.gfile import save_g_file

    config, model, tok = setup["model"].config, setup["model"], setup["tokenizer"]
    eye = torch.eye(config.depth).expand(1, config.num_heads, -1, -1).contiguous()
    pairs = [(torch.zeros_like(eye), eye.clone()) for _ in range(config.num_layers)]
    path = tmp_path / "identity_g.safetensors"
    save_g_file(path, pairs)
    lm = _eval_model(setup, gcache_file=str(path))
    ((logprob, _),) = lm.loglikelihood(
        [Instance("loglikelihood", {}, ("Two plus two", " equals four"), 0)], disable_tqdm=True
    )
    ctx, cont = _encode_pair(tok, "Two plus two", " equals four")
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont[:-1]]), cache=PLDRCache.from_g_list(pairs)).logits[
            0
        ]
    logprobs = torch.log_softmax(logits, -1)
    expected = float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert logprob != pytest.approx(_native_logprob(model, ctx, cont), abs=1e-3)


# ---------------------------------------------------------------------------- shapes that repeat
#: Bucketed, padded and captured scoring vs the unbucketed eager forward, in float32 on the CPU.
#: Padding is masked per row: padded keys get a -1e9 bias (exp underflows to exactly 0), padded
#: queries add zeros to Q^T Q, and rotary positions skip padding, so a request computes what it
#: computes alone; what may differ is the summation order of kernels whose blocking depends on
#: the width or the batch -- float32 rounding, ~1e-7 relative (these sums are at most ~100 in
#: size, so 1e-5 absolute is ~100x that). On this CPU the differences are exactly 0.
SAME = {"rel": 1e-6, "abs": 1e-5}


def _token_requests(count: int, longest: int, seed: int) -> list:
    """Tokenized loglikelihood requests of varied lengths (context 1..longest tokens, 1..6
    continuation tokens), plus single-token choices after one context (they share a row)."""
    import random

    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(4, 32000) for _ in range(n)]

    out = [(None, ids(rng.randint(1, longest)), ids(rng.randint(1, 6))) for _ in range(count)]
    shared = ids(20)
    return out + [(None, shared, ids(1)) for _ in range(4)]


def _scores(model, requests, **options) -> tuple[Any, list[tuple[float, bool]]]:
    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    options.setdefault("device", "cpu")
    lm = PLDRLLMEvalModel(pretrained=model, tokenizer=_NO_TEXT, **options)
    return lm, lm._loglikelihood_tokens(requests, disable_tqdm=True)


class _NoText:
    """A stand-in tokenizer: these tests hand the model token ids, never text."""

    eos_id = 3
    bos_id = 2


_NO_TEXT = _NoText()


def _assert_same_scores(got, want) -> None:
    assert len(got) == len(want)
    for (logprob, greedy), (ref_logprob, ref_greedy) in zip(got, want):
        assert logprob == pytest.approx(ref_logprob, **SAME)
        assert greedy == ref_greedy


def test_bucketed_padded_scoring_equals_unbucketed():
    """Widths rounded up to multiples and a short last chunk filled with rows: the same
    loglikelihoods as chunks padded only to their longest input, on a few shapes."""
    model = paper_vocab_model(5, max_seq_len=128)
    requests = _token_requests(23, 110, seed=1)
    _, reference = _scores(model, requests, batch_size=5, width_multiple=1)
    for multiple in (16, 64):
        lm, got = _scores(model, requests, batch_size=5, width_multiple=multiple)
        _assert_same_scores(got, reference)
        widths = {width for rows, width in lm.shape_uses}
        assert {rows for rows, _ in lm.shape_uses} == {5}  # the last chunk (2 rows) was filled
        assert all(w % multiple == 0 or w == 128 for w in widths)
        assert len(widths) <= -(-128 // multiple)
        assert not lm.captured_shapes  # cuda_graph is off on the CPU by default


def test_captured_scoring_equals_eager_forward(monkeypatch):
    """cuda_graph=true (on the CPU: the captured forward's code without a graph) gives the
    eager forward's loglikelihoods; a shape is captured on its second use, and at most
    MAX_CAPTURED are kept (the oldest goes first)."""
    from pldr_llm.eval import full_scoring

    model = paper_vocab_model(5, max_seq_len=128)
    requests = _token_requests(40, 120, seed=2)
    _, eager = _scores(model, requests, batch_size=3, width_multiple=32, cuda_graph=False)
    lm, captured = _scores(model, requests, batch_size=3, width_multiple=32, cuda_graph=True)
    _assert_same_scores(captured, eager)
    repeated = [shape for shape, uses in lm.shape_uses.items() if uses > 1]
    assert repeated and set(lm.captured_shapes) == set(repeated)
    monkeypatch.setattr(full_scoring, "MAX_CAPTURED", 1)
    lm, bounded = _scores(model, requests, batch_size=3, width_multiple=32, cuda_graph=True)
    _assert_same_scores(bounded, eager)
    # Longest first: the last shape captured is the narrowest repeated one.
    assert lm.captured_shapes == [min(repeated, key=lambda shape: shape[1])]


def test_gcache_file_scoring_captured_equals_eager(tmp_path: Path):
    """A G-cache file's G-cache reaches the captured forward too: captured == eager with the
    file, and both differ from scoring without it."""
    from pldr_llm.gfile import save_g_file

    model = paper_vocab_model(5, max_seq_len=128)
    config = model.config
    eye = torch.eye(config.depth).expand(1, config.num_heads, -1, -1).contiguous()
    path = tmp_path / "identity_g.safetensors"
    save_g_file(path, [(torch.zeros_like(eye), eye.clone()) for _ in range(config.num_layers)])
    requests = _token_requests(12, 60, seed=3)
    common = {"batch_size": 2, "width_multiple": 64, "gcache_file": str(path)}
    _, eager = _scores(model, requests, cuda_graph=False, **common)
    lm, captured = _scores(model, requests, cuda_graph=True, **common)
    assert lm.captured_shapes
    _assert_same_scores(captured, eager)
    _, without = _scores(model, requests, batch_size=2)
    # A random model is nearly uniform (log-probabilities near -log 32000), so another G moves
    # them little -- but every one by far more than rounding (SAME).
    changes = [abs(a[0] - b[0]) for a, b in zip(captured, without)]
    assert min(changes) > 1e-4 and max(changes) > 1e-2


def test_width_multiple_and_cuda_graph_arguments_are_checked():
    model = paper_vocab_model(5, max_seq_len=128)
    with pytest.raises(PLDRError, match="width_multiple"):
        _scores(model, [], width_multiple=0)
    with pytest.raises(PLDRError, match="cuda_graph"):
        _scores(model, [], cuda_graph="sometimes")
    lm, _ = _scores(model, [])
    assert (lm.cuda_graph, lm.width_multiple) == (False, 1)  # the CPU: eager, unbucketed
    lm, _ = _scores(model, [], cuda_graph="true")
    assert lm.width_multiple == 64


@pytest.mark.gpu
def test_cuda_captured_scoring_equals_eager():
    """On CUDA, fp32: the graph-replayed forward's loglikelihoods equal the eager forward's on
    the same shapes (float32 rounding of different kernels: SAME, loosened to 1e-4 absolute)."""
    torch.set_float32_matmul_precision("highest")
    model = paper_vocab_model(5, max_seq_len=128).cuda()
    requests = _token_requests(60, 120, seed=4)
    common = {"batch_size": 4, "device": "cuda"}
    _, eager = _scores(model, requests, cuda_graph=False, width_multiple=64, **common)
    lm, captured = _scores(model, requests, **common)  # cuda_graph: on by default on CUDA
    assert lm.cuda_graph and lm.width_multiple == 64
    assert lm.captured_shapes and all(f.use_graph for f in lm.full_scorer.captured.values())
    assert len(captured) == len(eager)
    for (logprob, _), (ref, _) in zip(captured, eager):
        assert logprob == pytest.approx(ref, rel=1e-6, abs=1e-4)


@pytest.mark.gpu
def test_cuda_captured_shapes_stay_few():
    """Requests of every length from 1 to ~250 tokens use at most max_seq_len / 64 shapes, all
    of batch_size rows; a second run replays the same captured forwards (no new capture)."""
    model = paper_vocab_model(5, max_seq_len=256).cuda()
    requests = _token_requests(150, 250, seed=5)
    from pldr_llm.eval.full_scoring import MAX_CAPTURED
    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    lm = PLDRLLMEvalModel(pretrained=model, tokenizer=_NO_TEXT, device="cuda", batch_size=8)
    first = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(lm.shape_uses) <= 256 // 64 and {rows for rows, _ in lm.shape_uses} == {8}
    assert 0 < len(lm.captured_shapes) <= MAX_CAPTURED
    forwards = dict(lm.full_scorer.captured)  # every shape fits (at most 4 widths): none is evicted
    second = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert lm.full_scorer.captured == forwards  # the same objects: replayed, not captured again
    assert [a for a, _ in second] == pytest.approx([a for a, _ in first], rel=1e-6, abs=1e-5)


def test_loglikelihood_rolling_sums_windows(setup):
    from lm_eval.api.instance import Instance

    model, tok = setup["model"], setup["tokenizer"]
    short = "A short text to score."
    long = " ".join(["many words make a longer text"] * 20)  # > max_seq_len tokens: several windows
    lm = _eval_model(setup, batch_size=4)
    scores = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([short, long])],
        disable_tqdm=True,
    )
    ids = tok.encode(short, add_eos=False)
    assert scores[0] == pytest.approx(_native_logprob(model, [tok.eos_id], ids), abs=1e-4)
    assert len(tok.encode(long, add_eos=False)) > model.config.max_seq_len
    one_by_one = _eval_model(setup, batch_size=1).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (long,), 0)], disable_tqdm=True
    )
    assert scores[1] == pytest.approx(one_by_one[0], abs=1e-3)


def test_generate_until_batches_like_native_generation(setup):
    from lm_eval.api.instance import Instance

    from pldr_llm import generate

    model, tok = setup["model"], setup["tokenizer"]
    contexts = ["Once upon a time", "The answer is", "A"]
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, gen_kwargs), i) for i, c in enumerate(contexts)]
    texts = _eval_model(setup, batch_size=3).generate_until(requests, disable_tqdm=True)
    for context, text in zip(contexts, texts):
        prompt = torch.tensor(tok.prompt_ids(context))
        ids = generate(model, prompt, 6, top_k=1)
        # the continuation as it reads after the prompt: its leading space kept, as the server
        # and `pldr-llm generate` return it
        after = tok.decode(ids.tolist())[len(tok.decode(prompt.tolist())) :]
        assert text == after.split("\n\n")[0]
    # A stop string cuts the text where it first appears.
    first = texts[0]
    if len(first) > 2:
        stop = first[1:3]
        cut = _eval_model(setup).generate_until(
            [
                Instance(
                    "generate_until", {}, (contexts[0], {"until": [stop], "max_gen_toks": 6}), 0
                )
            ],
            disable_tqdm=True,
        )
        assert cut[0] == first.split(stop)[0]


def test_bad_model_arguments_are_one_line_errors(setup):
    with pytest.raises(PLDRError, match="score_mode"):
        _eval_model(setup, score_mode="fast")
    with pytest.raises(PLDRError, match="kvcache"):
        _eval_model(setup, kvcache="maybe")
    with pytest.raises(PLDRError, match="batch_size"):
        _eval_model(setup, batch_size=0)


def test_gcache_file_that_does_not_fit_names_the_file(setup, tmp_path: Path):
    from pldr_llm.gfile import save_g_file

    config = setup["model"].config
    wrong = tmp_path / "wrong_heads.safetensors"  # one head too many: checked by prepare_g_init
    save_g_file(
        wrong, [torch.eye(config.depth).expand(1, config.num_heads + 1, -1, -1)] * config.num_layers
    )
    with pytest.raises(PLDRError, match=f"^{re.escape(str(wrong))}: G_init G_LM of layer 0"):
        _eval_model(setup, gcache_file=str(wrong))


def _eval_argv(setup, *extra: str) -> list[str]:
    """``pldr-llm eval`` of the test task on the CPU, then ``extra``."""
    argv = ["eval", "--model", str(setup["own"]), "--tasks", TASK]
    return [*argv, "--include-path", str(setup["tasks"]), "--device", "cpu", *extra]


@pytest.mark.slow
def test_cli_eval_prints_the_table(setup, capsys, monkeypatch):
    from pldr_llm.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    output = setup["root"] / "results.json"
    code = main(_eval_argv(setup, "--batch-size", "4", "--output", str(output)))
    assert code == 0
    out = capsys.readouterr().out
    assert TASK in out and "acc" in out
    saved = json.loads(output.read_text())
    assert 0.0 <= saved["results"][TASK]["acc,none"] <= 1.0


def test_cli_eval_no_cuda_graph_reaches_the_model(setup, monkeypatch):
    """--no-cuda-graph turns the model's cuda_graph off; without it the model picks (None)."""
    from pldr_llm.cli import main
    from pldr_llm.eval import lm_eval_model

    seen = []

    def record(self, **kwargs):
        seen.append(kwargs["cuda_graph"])
        raise PLDRError("stop here")

    monkeypatch.setattr(lm_eval_model.PLDRLLMEvalModel, "__init__", record)
    base = _eval_argv(setup)
    assert main(base) == 2
    assert main([*base, "--no-cuda-graph"]) == 2
    assert seen == [None, False]


@pytest.mark.slow
def test_cli_eval_offline_download_fails_clearly(setup, tmp_path: Path):
    """The paper's group resolves to lm-eval's tasks; their datasets need the Hub: one line."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_DATASETS_CACHE=str(tmp_path / "datasets"),
    )
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pldr_llm",
            "eval",
            "--model",
            str(setup["own"]),
            "--tasks",
            "pldrllm_zeroshot",
            "--limit",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pldr-llm: error:") and "Hugging Face Hub" in last, last
    assert "pldrllm_zeroshot" in last and "ai2_arc" in last  # the group's first task, arc_easy


def _scored_samples(path: Path) -> list[list[float]]:
    records = sorted(
        (json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    return [[float(r[0][0]) for r in s["resps"]] for s in records]


@pytest.mark.slow
def test_cli_eval_log_samples_writes_lm_evals_records(setup, tmp_path: Path, monkeypatch, capsys):
    from pldr_llm.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    output = tmp_path / "results.json"
    argv = _eval_argv(setup, "--batch-size", "4", "--output", str(output), "--log-samples")
    assert main(argv) == 0
    samples = tmp_path / f"results_samples_{TASK}.jsonl"
    lines = samples.read_text().splitlines()
    assert len(lines) == len(ROWS)
    first = json.loads(lines[0])
    assert {"doc_id", "doc", "arguments", "resps", "filtered_resps", "acc"} <= set(first)
    # the records hold the model's scores: those of a direct lm-eval run of the same model
    want = _loglikelihoods(_run_task(_eval_model(setup), setup))
    for got_row, want_row in zip(_scored_samples(samples), want):
        assert got_row == pytest.approx(want_row, abs=1e-5)
    capsys.readouterr()
    assert main(argv) == 2  # the sample file exists: not overwritten without --force
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert main(argv[:-3] + ["--log-samples"]) == 2  # no --output: nowhere to write
    assert "--log-samples needs --output" in capsys.readouterr().err


def test_device_in_model_args_wins_over_lm_evals_default(setup):
    """lm-eval passes its own device (``cuda:0`` unless told) and batch size next to
    ``--model_args``; those named in the model arguments are used."""
    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    lm = PLDRLLMEvalModel.create_from_arg_string(
        f"pretrained={setup['own']},device=cpu,batch_size=3",
        {"batch_size": 8, "max_batch_size": None, "device": "cuda:0"},
    )
    assert lm.device == torch.device("cpu") and lm.batch_size == 3
    lm = PLDRLLMEvalModel.create_from_arg_obj(
        {"pretrained": str(setup["own"])}, {"batch_size": 5, "device": "cpu"}
    )
    assert lm.device == torch.device("cpu") and lm.batch_size == 5


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_pldrllm(setup, tmp_path: Path):
    """``python -m pldr_llm.eval`` is lm-eval's command line with ``pldrllm`` registered (the
    shell path: lm-eval 0.4's ``lm_eval`` reads no plugins), ``device=`` in the model args."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pldr_llm.eval",
            "run",
            "--model",
            "pldrllm",
            "--model_args",
            f"pretrained={setup['own']},device=cpu,batch_size=4",
            "--tasks",
            TASK,
            "--include_path",
            str(setup["tasks"]),
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in proc.stdout and "acc" in proc.stdout
    assert "\r" not in proc.stderr  # no progress bars into a redirected stderr
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1
    assert 0.0 <= json.loads(results[0].read_text())["results"][TASK]["acc,none"] <= 1.0
