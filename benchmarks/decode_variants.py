"""Batch-1 greedy decoding on the GPU: DecodeEngine compile options against the eager ids.

    python benchmarks/decode_variants.py --json decode_variants.json

110M configuration in float32 (no TF32), 32-token prompt, 256 new tokens, KV + G cache. For each
variant it prints tokens/s (prefill included, capture/compile excluded) and whether the ids equal
the eager loop's (``pldr_llm.generate(..., cuda_graph=False)``), then writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pldr_llm import PLDRConfig, PLDRModel, generate
from pldr_llm.generation import DecodeEngine, SamplingParams

VARIANTS = {  # name: (torch.compile options, coordinate-descent tuning, steps per graph)
    "compile (default)": ({}, False, 1),
    "compile + coordinate-descent tuning": ({}, True, 1),
    "compile max-autotune-no-cudagraphs + coordinate-descent": (
        {"mode": "max-autotune-no-cudagraphs"},
        True,
        1,
    ),
    "coordinate-descent + 4 steps per graph": ({}, True, 4),
    "coordinate-descent + 8 steps per graph": ({}, True, 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="decode_variants.json")
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_variants needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = PLDRModel(PLDRConfig()).cuda().eval()
    prompt = torch.randint(4, 32000, (1, 32), device="cuda")
    reference = generate(model, prompt, args.new, top_k=1, stop_at_eos=False, cuda_graph=False)
    params = SamplingParams(top_k=1, max_new_tokens=args.new, stop_at_eos=False)
    rows = []
    for name in args.variants.split(","):
        options, coordinate_descent, steps_per_graph = VARIANTS[name]
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = coordinate_descent
        torch._dynamo.reset()
        start = time.perf_counter()
        engine = DecodeEngine(
            model, 1, 32 + args.new, compile=options or True, steps_per_graph=steps_per_graph
        )

        def run(engine: DecodeEngine = engine) -> torch.Tensor:
            slot = engine.add(prompt[0].tolist(), params)
            engine.advance(args.new - 1)
            new = engine.generated(slot)
            engine.release(slot)
            return torch.cat((prompt, torch.tensor([new], device=prompt.device)), dim=1)

        run()  # warm-up: compiles and captures
        build_s = time.perf_counter() - start
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            ids = run()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best = min(times)
        row = {
            "variant": name,
            "tokens_per_s": args.new / best,
            "ms_per_token": 1000 * best / args.new,
            "build_s": build_s,
            "ids_equal_eager": bool(torch.equal(ids, reference)),
        }
        rows.append(row)
        print(
            f"{name:<58} {row['tokens_per_s']:>8.0f} tok/s  {row['ms_per_token']:.3f} ms/token  "
            f"ids=eager: {row['ids_equal_eager']}  (build {build_s:.0f} s)",
            flush=True,
        )
        with open(args.json, "w") as handle:
            json.dump(
                {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
