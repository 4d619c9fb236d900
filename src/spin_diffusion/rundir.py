"""The run directory: its layout (``iter_dir``), and reading back what the phases wrote into it.

``self_play`` writes a run dir (tree in docs/DESIGN.md); ``report`` and ``demo.runner`` read it through this
module, so the folder names and file formats are spelled in one place. It also holds the one eval.json schema,
written by ``model_eval`` for an iteration of a run and for ``spin-diffusion evaluate`` alike:

    {
      "prompts": ["a red circle on the left", ...],   # image i of every model used prompt i and seed i
      "sampler": {"seed": 99, "num_steps": 20, "guidance_scale": 3.0},
      "baseline": "iter_00",                           # the model win rates are against, or null
      "models": [
        {
          "name": "iter_01",
          "metrics": {"shapes_judge": 0.41, "shapes_judge_median": 0.0, "shapes_judge_win_rate": 0.55, "fd": 12.3},
          "scores": {"shapes_judge": [1.0, 0.0, ...]},  # per prompt, in prompt order
          "grid": "grid.png",                           # relative to the eval.json folder, or null
          "grid_size": 32                               # the grid shows prompts[:grid_size], row by row
        }
      ]
    }

``metrics`` is flat: ``<scorer>`` is the mean, ``<scorer>_median`` the median, ``<scorer>_win_rate`` the win
rate against ``baseline`` (ties count half; absent for the baseline itself), and ``fd`` the Fréchet distance
to the reference images (lower is better). A metric that could not be computed is ``null``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spin_diffusion import atomic
from spin_diffusion.errors import SpinDiffusionError

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
EVAL_FILE = "eval.json"
TRAIN_LOG = Path("train") / "train_log.jsonl"  # relative to an iter dir
_ITER = re.compile(r"iter_(\d+)")


def iter_dir(run_dir: str | Path, k: int) -> Path:
    """``run_dir/iter_XX``: everything of θ_k (its model, its samples, its evaluation)."""
    return Path(run_dir) / f"iter_{k:02d}"


def iterations(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``iter_XX`` folder of ``run_dir`` as ``(k, path)``, by k."""
    found = ((m, p) for p in Path(run_dir).iterdir() if p.is_dir() and (m := _ITER.fullmatch(p.name)))
    return sorted((int(m.group(1)), p) for m, p in found)


# ---------------------------------------------------------------------------------------------------------------
# eval.json


@dataclass
class ModelEval:
    """One model's evaluation: flat metrics, per-prompt scores and its sample grid (see the module docstring)."""

    name: str
    metrics: dict[str, float | None]
    scores: dict[str, list[float]] = field(default_factory=dict)
    grid: str | None = None
    grid_size: int = 0


@dataclass
class EvalFile:
    """The content of one eval.json: models evaluated on the same prompts with the same seeds."""

    prompts: list[str]
    models: list[ModelEval]
    sampler: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None

    def model(self, name: str | None = None) -> ModelEval:
        """The model called ``name``; without a name, the only model of the file."""
        if name is None and len(self.models) == 1:
            return self.models[0]
        for m in self.models:
            if m.name == name:
                return m
        raise SpinDiffusionError(f"eval.json has no model {name!r}; it holds {[m.name for m in self.models]}")


def write_eval(path: str | Path, ev: EvalFile) -> Path:
    """Write ``ev`` as eval.json atomically; non-finite metrics become null."""
    record = asdict(ev)
    for m in record["models"]:
        m["metrics"] = {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in m["metrics"].items()}
    return atomic.write_json(path, {k: record[k] for k in ("prompts", "sampler", "baseline", "models")})


def read_eval(path: str | Path) -> EvalFile:
    """Read an eval.json written by ``write_eval``; a malformed file raises SpinDiffusionError naming the fix."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpinDiffusionError(f"{path} does not exist; run the evaluation first") from None
    except json.JSONDecodeError as e:
        raise SpinDiffusionError(f"{path} is not valid JSON ({e.msg}); re-run the evaluation") from e
    if not isinstance(record, dict) or not isinstance(record.get("models"), list):
        raise SpinDiffusionError(
            f"{path} has no 'models' list (an eval.json from an older version?); re-run evaluation"
        )
    models = []
    for m in record["models"]:
        if not isinstance(m, dict) or not isinstance(m.get("metrics"), dict):
            raise SpinDiffusionError(f"{path}: a model has no 'metrics' object; re-run evaluation")
        for key, value in m["metrics"].items():
            if value is not None and not _is_number(value):
                raise SpinDiffusionError(f"{path}: metric {key!r} is {value!r}, not a number; fix the scorer output")
        models.append(
            ModelEval(
                name=str(m.get("name", "")),
                metrics={k: (None if v is None else float(v)) for k, v in m["metrics"].items()},
                scores={str(k): [float(x) for x in v] for k, v in m.get("scores", {}).items()},
                grid=m["grid"] if isinstance(m.get("grid"), str) and m["grid"] else None,
                grid_size=int(m.get("grid_size", 0)),
            )
        )
    return EvalFile(
        prompts=[str(p) for p in record.get("prompts", [])],
        models=models,
        sampler=dict(record.get("sampler") or {}),
        baseline=record.get("baseline"),
    )


# ---------------------------------------------------------------------------------------------------------------
# train_log.jsonl

_NOT_CURVES = frozenset({"step", "epoch", "time", "wall_time", "timestamp"})  # coordinates or bookkeeping


def read_train_log(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every numeric key of a ``train_log.jsonl`` (one JSON object per line, each with ``"step"``) as
    ``key -> (steps, values)``, keys in order of first appearance, sorted by step.

    A step logged twice (a resumed run appends again from its last checkpoint) keeps the later value. Records
    without a numeric ``step`` are skipped, as is a truncated last line (a run killed mid-write); any other
    unparsable line is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise SpinDiffusionError(f"training log {path} does not exist; pass the train_log.jsonl of a training run")
    lines = path.read_text(encoding="utf-8").splitlines()
    series: dict[str, dict[int, float]] = {}  # key -> step -> value
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break
            raise SpinDiffusionError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or delete that line") from e
        step = record.get("step") if isinstance(record, dict) else None
        if not _is_number(step):
            continue
        for key, value in record.items():
            if key not in _NOT_CURVES and _is_number(value):
                series.setdefault(key, {})[int(step)] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in series.items()}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
