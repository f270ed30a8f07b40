"""Scoring speed of the native lm-eval model ``pldrllm``: batched vs one request at a time.

Builds a local multiple-choice task (synthetic questions, 4 choices each), turns it into the
loglikelihood requests lm-eval makes of such a task ("Question: ...\nAnswer:", " " + choice), and
times:

* ``one-at-a-time``: the approach of the original's harness fork, one forward pass per request;
* ``pldrllm bs=B``: :class:`pldr_llm.eval.lm_eval_model.PLDRLLMEvalModel`, batched; with
  ``--cuda-graph on,off`` once per setting: ``on`` pads chunks to repeated [batch, width] shapes
  and replays a captured forward per shape (the default on CUDA), ``off`` runs the eager forward
  on chunks padded to their longest input. A run's seconds include its captures; with
  ``--repeats N`` the best run is kept, and later runs replay the graphs the first captured;
* ``hf bs=1`` (``--hf``): lm-eval's own ``hf`` model on the ``convert --to hf`` export.

Every method's loglikelihoods are checked against the one-at-a-time ones before timing counts.
Prints a table and writes JSON.

    python benchmarks/lm_eval_speed.py --docs 200 --batch-sizes 8,32 --json out.json
    python benchmarks/lm_eval_speed.py --docs 500 --batch-sizes 16,64 --cuda-graph on,off \
        --repeats 3 --json captured.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = (
    REPO / "tests/data/paper/tokenizer/refinedweb-tokenizer-model-pldrllm-kvg-cache-paper.model"
)
WORDS = (
    "the a of to and in is was that for on with as by at from it this be are an which or have "
    "not they his had but her one were all we there can their been has more if will who would "
    "what about when out up so into some time only new other them could than then these two may "
    "first any like over such our after most made also did many before must through years where "
    "much your way well down should because each just those people how too little state good"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=100, help="questions in the task (4 choices each)")
    p.add_argument("--batch-sizes", default="8,32", help="comma-separated pldrllm batch sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="SentencePiece .model file")
    p.add_argument(
        "--model", default=None, help="a model folder (default: a random model, see --d-model)"
    )
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--hf", action="store_true", help="also time lm-eval's hf model (batch size 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method (best is kept)")
    p.add_argument(
        "--cuda-graph",
        default="auto",
        help="comma-separated pldrllm cuda_graph settings to time: on, off, auto (its default)",
    )
    p.add_argument(
        "--width-multiple",
        type=int,
        default=None,
        help="pldrllm width_multiple (default: 64 with cuda_graph, else 1)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def make_docs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def phrase(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {
            "question": phrase(8, 40).capitalize() + "?",
            "choices": [phrase(1, 8) for _ in range(4)],
            "label": rng.randrange(4),
        }
        for _ in range(n)
    ]


def requests_of(docs: list[dict]) -> list:
    from lm_eval.api.instance import Instance

    out = []
    for d in docs:
        context = f"Question: {d['question']}\nAnswer:"
        for choice in d["choices"]:
            out.append(Instance("loglikelihood", {}, (context, " " + choice), len(out)))
    return out


def one_at_a_time(lm, requests: list) -> list[float]:
    """The original harness fork's way: one forward pass over context + continuation per request."""
    scores = []
    for request in requests:
        context, cont = request.args
        whole = lm.tok_encode(context + cont)
        ctx = lm.tok_encode(context)
        cont_ids = whole[len(ctx) :]
        ids = torch.tensor([ctx + cont_ids[:-1]], device=lm.device)
        target = torch.tensor(cont_ids, device=lm.device)
        with torch.inference_mode():
            logprobs = torch.log_softmax(lm.model(ids).logits[0].float(), dim=-1)
        start = len(ctx) - 1
        picked = logprobs[start : start + len(cont_ids)].gather(1, target[:, None])
        scores.append(float(picked.sum()))
    return scores


def timed(fn, repeats: int, device: str) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pldr_llm import PLDRConfig, PLDRModel
    from pldr_llm.eval.lm_eval_model import PLDRLLMEvalModel
    from pldr_llm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.model:
        pretrained = args.model
        description = args.model
    else:
        torch.manual_seed(0)
        config = PLDRConfig(
            num_layers=args.layers,
            d_model=args.d_model,
            num_heads=max(1, args.d_model // 64),
            dff=int(args.d_model * 8 / 3),
            A_dff=170,
            num_reslayerA=8,
            num_denseA=2,
            input_vocab_size=tokenizer.vocab_size,
            max_seq_len=256,
        )
        pretrained = PLDRModel(config).eval()
        description = (
            f"random PLDR-LLM, {args.layers} layers, d_model {args.d_model}, "
            f"vocab {config.input_vocab_size}"
        )
    docs = make_docs(args.docs)
    requests = requests_of(docs)
    rows = []

    base = PLDRLLMEvalModel(
        pretrained=pretrained, tokenizer=tokenizer, device=args.device, batch_size=1
    )
    seconds, reference = timed(lambda: one_at_a_time(base, requests), args.repeats, args.device)
    rows.append(
        {
            "method": "one-at-a-time (original harness fork)",
            "batch_size": 1,
            "seconds": seconds,
            "max_abs_diff": 0.0,
        }
    )
    assert isinstance(reference, list)

    graph_settings = {"on": True, "off": False, "auto": None}
    settings = [s.strip() for s in args.cuda_graph.split(",") if s.strip()]
    if not settings or any(s not in graph_settings for s in settings):
        raise SystemExit(f"--cuda-graph takes on, off or auto, got {args.cuda_graph!r}")
    for size in [int(s) for s in args.batch_sizes.split(",") if s.strip()]:
        for setting in settings:
            lm = PLDRLLMEvalModel(
                pretrained=base.model,
                tokenizer=tokenizer,
                device=args.device,
                batch_size=size,
                cuda_graph=graph_settings[setting],
                width_multiple=args.width_multiple,
            )
            seconds, result = timed(
                lambda lm=lm: lm.loglikelihood(requests, disable_tqdm=True),
                args.repeats,
                args.device,
            )
            diff = max(abs(a - b[0]) for a, b in zip(reference, result))
            label = "captured" if lm.cuda_graph else "eager"
            rows.append(
                {
                    "method": f"pldrllm (native, batched, {label})",
                    "batch_size": size,
                    "seconds": seconds,
                    "max_abs_diff": diff,
                    "cuda_graph": lm.cuda_graph,
                    "width_multiple": lm.width_multiple,
                    "shapes": len(lm.shape_uses),
                    "captured_shapes": len(lm.captured_shapes),
                }
            )

    if args.hf:
        from lm_eval.models.huggingface import HFLM

        from pldr_llm.hf import export_hf

        folder = Path(tempfile.mkdtemp(prefix="pldr_bench_hf_"))
        export_hf(base.model, tokenizer, folder)
        hf = HFLM(
            pretrained=str(folder),
            device=args.device,
            batch_size=1,
            dtype="float32",
            backend="causal",
        )
        seconds, result = timed(
            lambda: hf.loglikelihood(requests, disable_tqdm=True), args.repeats, args.device
        )
        diff = max(abs(a - b[0]) for a, b in zip(reference, result))
        rows.append(
            {
                "method": "lm-eval hf (convert --to hf export)",
                "batch_size": 1,
                "seconds": seconds,
                "max_abs_diff": diff,
            }
        )

    base_rate = len(requests) / rows[0]["seconds"]
    for row in rows:
        row["requests"] = len(requests)
        row["requests_per_s"] = len(requests) / row["seconds"]
        row["speedup"] = row["requests_per_s"] / base_rate

    device_name = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    print(
        f"model: {description}; device: {args.device} ({device_name}); "
        f"task: {args.docs} questions x 4 choices"
    )
    header = (
        f"{'method':40} {'batch':>5} {'requests':>8} {'seconds':>8} {'req/s':>8} "
        f"{'speedup':>7} {'max|dLL|':>9} {'shapes':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:40} {r['batch_size']:>5} {r['requests']:>8} {r['seconds']:>8.2f} "
            f"{r['requests_per_s']:>8.1f} {r['speedup']:>6.1f}x {r['max_abs_diff']:>9.1e} "
            f"{r.get('shapes', ''):>6}"
        )
    if args.json:
        out = {
            "model": description,
            "device": args.device,
            "device_name": device_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "docs": args.docs,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
