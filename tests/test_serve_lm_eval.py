"""lm-eval's ``local-completions`` model against ``pldr-llm serve``: the same loglikelihoods as
the native ``pldrllm`` model (``pldr-llm eval``) on a small local multiple-choice task.

``local-completions`` sends each request's context + continuation as token ids with ``echo``,
``max_tokens: 1`` and ``logprobs: 1``, and sums the prompt logprobs of the continuation; its
tokenizer (``tokenizer_backend=huggingface``) is the model's own, loaded offline from a
``pldr-llm convert --to hf``-style export of the served model.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models (the eval extra: lm-eval[api])
pytest.importorskip("transformers")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_support import MODEL_ID, build_bundle, live_server  # noqa: E402
from support import LM_EVAL_TASK_YAML as TASK_YAML  # noqa: E402

TASK = "pldr_serve_mc"
ROWS = [
    {"question": "The sky on a clear day is", "choices": [" blue", " made of cheese"], "label": 0},
    {"question": "Two plus two equals", "choices": [" four", " five", " 4"], "label": 0},
    {"question": "Cats like to", "choices": [" sleep", " fly to the moon and back"], "label": 0},
    {"question": "", "choices": [" a", " b"], "label": 1},
]
GEN_TASK = "pldr_serve_gen"
# Five stop strings (more than OpenAI's four; lm-eval adds the EOS text too).
GEN_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: " x"
generation_kwargs:
  until: ["\\n\\n", "Question:", "</s>", "<|im_end|>", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from pldr_llm.bundle import load_bundle
    from pldr_llm.hf import export_hf

    root = tmp_path_factory.mktemp("serve_lm_eval")
    folder = build_bundle(root)
    model, tokenizer = load_bundle(str(folder))
    export_hf(model, tokenizer, root / "hf")  # its tokenizer is lm-eval's (offline)
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    (tasks / f"{GEN_TASK}.yaml").write_text(GEN_YAML.format(task=GEN_TASK, data=data))
    return {"folder": folder, "model": model, "tokenizer": tokenizer, "root": root}


def _run(model, setup: dict, task: str = TASK, **kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        tasks=[task],
        task_manager=TaskManager(include_path=str(setup["root"] / "tasks"), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )


def _answers(result: dict) -> list[list[tuple[float, bool]]]:
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    return [[(float(r[0][0]), bool(r[0][1])) for r in s["resps"]] for s in samples]


def _served_args(url: str, setup: dict) -> dict:
    """lm-eval's local-completions against the server at ``url``, with the model's own
    tokenizer (the transformers export's, loaded offline)."""
    return {
        "model": MODEL_ID,
        "base_url": f"{url}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(setup["root"] / "hf"),
        "trust_remote_code": True,
        "max_length": 96,
        "max_retries": 1,
    }


@pytest.mark.slow
def test_local_completions_scores_like_the_native_model(setup: dict) -> None:
    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    native_model = PLDRLLMEvalModel(
        pretrained=setup["model"], tokenizer=setup["tokenizer"], device="cpu", batch_size=4
    )
    native = _answers(_run(native_model, setup))
    with live_server(setup["folder"], max_batch=4) as (url, _):
        args = _served_args(url, setup)
        served = _answers(_run("local-completions", setup, model_args=args))
    assert len(served) == len(native) == len(ROWS)
    for mine, theirs in zip(native, served):
        assert len(mine) == len(theirs)
        for (logprob, greedy), (served_logprob, served_greedy) in zip(mine, theirs):
            # One float32 pass over the same ids on each side (the native one batched and
            # padded, masked per row): only summation order differs.
            assert served_logprob == pytest.approx(logprob, abs=1e-4)
            assert served_greedy == greedy


@pytest.mark.slow
def test_local_completions_generates_like_the_native_model(setup: dict) -> None:
    """generate_until through the server (greedy, five stop strings) gives the native texts."""
    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel

    def texts(result: dict) -> list[str]:
        samples = sorted(result["samples"][GEN_TASK], key=lambda s: s["doc_id"])
        return [s["resps"][0][0] for s in samples]

    native_model = PLDRLLMEvalModel(
        pretrained=setup["model"], tokenizer=setup["tokenizer"], device="cpu", batch_size=2
    )
    native = texts(_run(native_model, setup, GEN_TASK))
    with live_server(setup["folder"], max_batch=4) as (url, _):
        args = _served_args(url, setup)
        served = texts(_run("local-completions", setup, GEN_TASK, model_args=args))
    assert len(native) == len(ROWS) and any(native)
    assert served == native
