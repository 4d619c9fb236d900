"""Score two exported models on the same prompts and noise with `spin_diffusion.evaluate`: the second model's
win rate against the first, per scorer.

    python examples/evaluate_two_exports.py BASE_OR_EXPORT OTHER_EXPORT --out eval_two
    python examples/evaluate_two_exports.py demo_py/seed_0/spin/iter_01/model demo_py/seed_0/spin/iter_03/model

The models are diffusers pipeline folders (e.g. a run's iter_k/model) or Hub ids. Without --prompts it scores the
demo world's held-out test captions with the demo's exact judge (shapes_judge); with --prompts (a .txt, .csv,
.jsonl or .parquet prompt file) pass --scorer pickscore (or hpsv2, imagereward, aesthetic, clip).
Writes eval.json, table.md, report.html and a grid per model to --out; prints the table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import spin_diffusion as sd


def main(argv: list[str] | None = None) -> sd.EvalResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="the model that win rates are computed against")
    parser.add_argument("other", help="the model compared with it")
    parser.add_argument("--out", type=Path, default=Path("eval_two"))
    parser.add_argument("--prompts", type=Path, default=None, help="prompt file (default: the demo's test scenes)")
    parser.add_argument("--scorer", action="append", default=None, help="repeatable (default: shapes_judge)")
    parser.add_argument("--num-prompts", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    args = parser.parse_args(argv)

    prompts = args.prompts
    if prompts is None:
        args.out.mkdir(parents=True, exist_ok=True)
        prompts = args.out / "prompts.txt"
        prompts.write_text("\n".join(sd.demo_prompts("test")) + "\n")
    result = sd.evaluate(
        [args.baseline, args.other],
        prompts,
        scorers=args.scorer or ["shapes_judge"],
        out_dir=args.out,
        num_prompts=args.num_prompts,
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
    )
    print(result.table)
    print(json.dumps({"baseline": result.baseline, "metrics": result.metrics}))
    return result


if __name__ == "__main__":
    try:
        main()
    except sd.SpinDiffusionError as err:  # bad input: one line, exit status 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
