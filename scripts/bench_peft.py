"""Full fine-tuning vs LoRA vs the head alone on a ViT-S/16-sized model (random init), on this machine's
CPU, side by side in one run: trainable parameters, optimizer state, peak memory of a training step and
step time, each as a ratio to full fine-tuning (finetune/bench/adapters.py measures them).

    python scripts/bench_peft.py                          # vit_small_patch16_224, batch 8, 224 px, LoRA r=8
    python scripts/bench_peft.py --batch 1 --target attn   # LoRA on the attention layers alone
    python scripts/bench_peft.py --model test_vit --size 160 --steps 2    # a seconds-long smoke run

Goals: LoRA's trainable parameters <= 2 % of full, its peak memory <= 0.6 of full, its step <= 1.0 of full.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from finetune.bench.adapters import run_all, table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224", help="a timm model name (random init)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one untimed)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA's r")
    ap.add_argument("--target", default="", help="peft.target for LoRA (default: every Linear of the blocks)")
    args = ap.parse_args()
    rows = run_all(args.model, args.batch, args.size, args.steps, args.rank, args.target)
    print(f"{args.model}, batch {args.batch}, {args.size} px, AdamW, LoRA r={args.rank}"
          f"{f' on {args.target}' if args.target else ''}; ratios to full:")
    print(table(rows))
    lora, full = (next(r for r in rows if r["mode"] == m) for m in ("lora", "full"))
    goals = [("trainable params <= 2 % of full", lora["trainable"] / full["trainable"] <= 0.02),
             ("peak memory <= 0.6 of full", lora["memory_bytes"] / full["memory_bytes"] <= 0.6),
             ("step time <= 1.0 of full", lora["step_s"] / full["step_s"] <= 1.0)]
    for goal, met in goals:
        print(f"LoRA {goal}: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
