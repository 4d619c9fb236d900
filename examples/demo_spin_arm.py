"""The demo's SPIN arm from Python: the config `spin-diffusion demo` trains, run with `spin_diffusion.spin`.

    python examples/demo_spin_arm.py --out demo_py                                   # the demo's budget, minutes
    python examples/demo_spin_arm.py --out demo_py --scale 0.05 --iterations 1 --set sample.num_steps=2  # seconds

Running it again on the same --out continues the run (finished iterations are skipped). Prints the run's summary,
then one JSON line: {"run_dir": ..., "exports": {iteration: pipeline folder}}. Score the exports with
examples/evaluate_two_exports.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import spin_diffusion as sd


def main(argv: list[str] | None = None) -> sd.RunResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_py"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the steps per iteration")
    parser.add_argument("--iterations", type=int, default=None, help="self-play iterations (default: the demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value (repeatable)")
    args = parser.parse_args(argv)

    cfg = sd.demo_configs(args.out, seed=args.seed, scale=args.scale)["spin"]  # also writes the fine-tuning data
    overrides = [*([f"num_iterations={args.iterations}"] if args.iterations else []), *args.overrides]
    cfg = sd.load_config(cfg, overrides)  # the same rules as the CLI's --set
    print(
        f"SPIN from {cfg.model.path}: {cfg.num_iterations} iterations of {cfg.train.max_steps} steps, "
        f"β={cfg.loss.beta}, lr={cfg.train.learning_rate}, loser guard μ={cfg.loss.loser_guard}"
    )
    result = sd.spin(cfg, resume=Path(cfg.run_dir, "config.yaml").exists(), progress=False)
    print(result.summary())
    print(json.dumps({"run_dir": str(result.run_dir), "exports": {k: str(p) for k, p in result.exports.items()}}))
    return result


if __name__ == "__main__":
    try:
        main()
    except sd.SpinDiffusionError as err:  # bad input: one line, exit status 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
