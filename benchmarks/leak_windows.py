"""Causal-leak audit averaged over consecutive windows of a text (issue 14's figures).

    python benchmarks/leak_windows.py --model runs/tiny --text val.txt --windows 8 [--json out.json]
    python benchmarks/leak_windows.py --model runs/tiny --text default   # tiny's validation docs

Encodes the text with the model's tokenizer, cuts it into ``--windows`` consecutive windows of
``max_seq_len`` tokens (``--length``), runs :func:`pldr_llm.deductive.leak_audit` on each with
the prompt prefix at ``--prefix`` (default: half a window) and prints the mean of every overall
figure and of the per-layer relative G_LM RMSEs. ``pldr-llm inspect --leak`` audits one window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pldr_llm.bundle import load_bundle
from pldr_llm.deductive import leak_audit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--prefix", type=int, default=None)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tokenizer = load_bundle(args.model, device=args.device)
    if args.text == "default":  # the validation documents of the tiny preset
        from pldr_llm.data import default_corpus
        from pldr_llm.presets import load_preset

        data = load_preset("tiny")["data"]  # validation: the val_offset documents after training's
        start = data["train_interval"][1]
        text = "\n\n".join(default_corpus()[start : start + data["val_offset"]])
    else:
        text = Path(args.text).read_text(encoding="utf-8")
    ids = list(tokenizer.encode(text))
    length = args.length or model.config.max_seq_len
    prefix = args.prefix or length // 2
    audits = []
    for w in range(args.windows):
        window = ids[w * length : (w + 1) * length]
        if len(window) < length:
            break
        audits.append(leak_audit(model, window, prompt_len=prefix, block=args.block))
    if not audits:
        raise SystemExit(f"the text has fewer than {length} tokens")
    overall = {k: float(np.mean([a.overall[k] for a in audits])) for k in audits[0].overall}
    layers = [
        {
            "layer": i,
            "g_rmse_causal_relative": float(
                np.mean([a.layers[i].g_rmse_causal_relative for a in audits])
            ),
            "g_rmse_prompt_relative": float(
                np.mean([a.layers[i].g_rmse_prompt_relative for a in audits])
            ),
        }
        for i in range(len(audits[0].layers))
    ]
    by_position = {
        name: np.mean([getattr(a, name) for a in audits], axis=0).tolist()
        for name in ("loss_full", "loss_causal", "loss_generation")
    }
    print(f"{args.model}: {len(audits)} windows of {length} tokens, prompt {prefix}")
    for key, value in overall.items():
        print(f"  {key:<32}{value:>+10.4f}")
    for layer in layers:
        print(
            f"  layer {layer['layer']}: G_LM relative RMSE causal "
            f"{layer['g_rmse_causal_relative']:.4f}, prompt {layer['g_rmse_prompt_relative']:.4f}"
        )
    if args.json:
        result = {
            "model": args.model,
            "text": args.text,
            "windows": len(audits),
            "length": length,
            "prompt_len": prefix,
            "overall": overall,
            "layers": layers,
            "by_position": by_position,
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
