"""A self-contained HTML report: metric table, plots and sample grids in one file that can be moved or emailed.

Pattern from nanochat's ``report.py``: stages write their own results (``iter_*/eval.json``,
``iter_*/train/train_log.jsonl``, read through ``rundir``); this module stitches them together. It never loads
a model. The page comes from ``templates/report.html.j2`` (jinja2, autoescaped) with everything embedded
(inline CSS, base64 PNGs), so it needs no network.

    data = collect_run(Path("runs/spin"))        # or build a ReportData by hand (the demo does)
    write_report(data, Path("runs/spin"))        # -> runs/spin/report.html
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
import mimetypes
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from spin_diffusion import atomic, rundir
from spin_diffusion.errors import SpinDiffusionError

# Metric keys that read "lower is better" when collect_run is not told otherwise (Fréchet distances, losses).
LOWER_IS_BETTER_HINTS = ("fd", "fid", "kid", "loss")
# Training-curve panels come in this order; any other logged metric follows, in order of first appearance.
_CURVE_ORDER = ("loss", "accuracy", "margin")


# ---------------------------------------------------------------------------------------------------------------
# Data model


@dataclass
class ModelEntry:
    """One evaluated model: a row of the metric table, a point in the metric plots, and its sample grid."""

    name: str  # e.g. "base", "sft", "spin iter 1"
    metrics: dict[str, float]  # metric key -> value, e.g. {"judge_all": 0.42, "fd": 12.3}
    grid: str | None = None  # PNG (or JPEG) grid; relative to the report dir, or absolute
    group: str = ""  # models of one group are joined by a line in the metric-vs-step plot
    step: int = 0  # x position in the metric plots, in the units of ReportData.x_label
    notes: str = ""
    captions: list[str] = field(default_factory=list)  # prompts of the grid cells, listed under the grid
    # Several seeds: `metrics` holds the mean over seeds, `spread` the seed-to-seed spread (`seed_spread`) and
    # `per_seed` the values behind them. Empty for a single run.
    spread: dict[str, float] = field(default_factory=dict)
    per_seed: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEntry:
        d = dict(d)
        d["metrics"] = {str(k): float(v) for k, v in d.get("metrics", {}).items()}
        d["captions"] = [str(c) for c in d.get("captions", [])]
        d["spread"] = {str(k): float(v) for k, v in d.get("spread", {}).items()}
        d["per_seed"] = {str(k): [float(x) for x in v] for k, v in d.get("per_seed", {}).items()}
        return cls(**d)

    @classmethod
    def over_seeds(cls, name: str, runs: list[dict[str, float]], **kwargs: Any) -> ModelEntry:
        """One entry for the same model trained with several seeds: mean, spread and per-seed values of every
        metric that all `runs` have."""
        if not runs:
            raise ValueError("over_seeds needs at least one run")
        keys = [k for k in runs[0] if all(k in r for r in runs)]
        per_seed = {k: [float(r[k]) for r in runs] for k in keys}
        metrics = {k: sum(v) / len(v) for k, v in per_seed.items()}
        spread = {k: seed_spread(v) for k, v in per_seed.items()} if len(runs) > 1 else {}
        return cls(name=name, metrics=metrics, spread=spread, per_seed=per_seed if len(runs) > 1 else {}, **kwargs)


def seed_spread(values: list[float]) -> float:
    """The seed-to-seed spread the report shows as ±: the sample standard deviation (n - 1); 0 for one value."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def within_spread(a: float, b: float, spread_a: float = 0.0, spread_b: float = 0.0) -> bool:
    """True when |a - b| is no larger than the larger of the two seed-to-seed spreads (and some spread was
    measured): a difference the report flags as not resolved by the seeds run."""
    spread = max(spread_a, spread_b)
    return spread > 0 and abs(a - b) <= spread


@dataclass
class Curve:
    """One logged training quantity of one run: ``values[i]`` was logged at optimizer step ``steps[i]``."""

    name: str  # e.g. "iter 1 loss"
    steps: list[int]
    values: list[float]
    metric: str = "loss"  # curves with the same metric share a plot panel

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Curve:
        return cls(
            name=d["name"],
            steps=[int(s) for s in d["steps"]],
            values=[float(v) for v in d["values"]],
            metric=d.get("metric", "loss"),
        )


@dataclass
class ReportData:
    """Everything the report shows. JSON round-trips through ``to_dict`` / ``from_dict``."""

    title: str
    summary: str  # plain text; blank lines separate paragraphs
    models: list[ModelEntry]
    curves: list[Curve] = field(default_factory=list)
    metric_labels: dict[str, str] = field(default_factory=dict)  # metric key -> human label
    lower_is_better: set[str] = field(default_factory=set)  # metric keys where smaller wins; all others: larger
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, preformatted text)
    baseline: str | None = None  # model name that deltas are computed against
    x_label: str = "iteration"  # what ModelEntry.step counts (the x axis of the metric plots)
    spread_label: str = "standard deviation over seeds"  # what ± means, for models with ModelEntry.spread

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "summary": self.summary,
            "models": [m.to_dict() for m in self.models],
            "curves": [c.to_dict() for c in self.curves],
            "metric_labels": dict(self.metric_labels),
            "lower_is_better": sorted(self.lower_is_better),
            "sections": [[h, t] for h, t in self.sections],
            "baseline": self.baseline,
            "x_label": self.x_label,
            "spread_label": self.spread_label,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReportData:
        return cls(
            title=d["title"],
            summary=d.get("summary", ""),
            models=[ModelEntry.from_dict(m) for m in d.get("models", [])],
            curves=[Curve.from_dict(c) for c in d.get("curves", [])],
            metric_labels=dict(d.get("metric_labels", {})),
            lower_is_better=set(d.get("lower_is_better", [])),
            sections=[(str(h), str(t)) for h, t in d.get("sections", [])],
            baseline=d.get("baseline"),
            x_label=d.get("x_label", "iteration"),
            spread_label=d.get("spread_label", "standard deviation over seeds"),
        )


# ---------------------------------------------------------------------------------------------------------------
# Reading a run directory


def train_curves(path: Path, *, prefix: str = "") -> list[Curve]:
    """One Curve per numeric key of a ``train_log.jsonl`` (``rundir.read_train_log``), named ``f"{prefix} {key}"``
    (or just ``key``), with ``metric=key``, in order of first appearance."""
    return [
        Curve(name=f"{prefix} {key}".strip(), steps=steps, values=values, metric=key)
        for key, (steps, values) in rundir.read_train_log(path).items()
    ]


def collect_run(run_dir: Path, *, lower_is_better: set[str] | None = None) -> ReportData:
    """Build ReportData from a self-play run dir (layout in docs/DESIGN.md).

    Reads ``iter_*/eval.json`` (schema in ``rundir``; a null metric is left out), ``iter_*/train/train_log.jsonl``,
    ``config.yaml`` and ``state.json``.
    Models are named ``"iter k"`` with ``step = k``; ``iter 0`` (the base model) is the baseline. Metric keys in
    ``lower_is_better`` (default: inferred from LOWER_IS_BETTER_HINTS, e.g. ``fd``) count smaller as better.
    Iterations still in progress (no eval.json yet) contribute only their training curves.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SpinDiffusionError(f"run directory {run_dir} does not exist; pass the run_dir of a self-play run")
    iters = rundir.iterations(run_dir)

    # 1. The resolved config names the objective, which becomes the plot group.
    sections: list[tuple[str, str]] = []
    group = "self-play"
    config_path = run_dir / rundir.CONFIG_FILE
    if config_path.is_file():
        text = config_path.read_text(encoding="utf-8")
        sections.append(("Resolved config (config.yaml)", text))
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpinDiffusionError(f"{config_path} is not valid YAML ({e}); fix or delete it") from e
        if isinstance(cfg, dict) and isinstance(cfg.get("loss"), dict) and cfg["loss"].get("objective"):
            group = str(cfg["loss"]["objective"])
    state_path = run_dir / rundir.STATE_FILE
    data_line = ""
    if state_path.is_file():
        state_text = state_path.read_text(encoding="utf-8")
        sections.append(("Run state (state.json)", state_text))
        data = (json.loads(state_text).get("info") or {}).get("data")
        if data:  # never let a run look as if it trained on every row when it skipped some
            data_line = f" Trained on {data['used']} of {data['examples']} examples"
            data_line += (
                f"; {data['skipped']} skipped as unusable (listed in skipped.jsonl)." if data["skipped"] else "."
            )

    # 2. One model per evaluated iteration; training curves from every iteration that trained.
    models: list[ModelEntry] = []
    curves: list[Curve] = []
    for k, it_dir in iters:
        log = it_dir / rundir.TRAIN_LOG
        if log.is_file():
            curves.extend(train_curves(log, prefix=f"iter {k}"))
        eval_path = it_dir / rundir.EVAL_FILE
        if eval_path.is_file():
            models.append(model_entry(eval_path, name=f"iter {k}", group=group, step=k))
    if not models:
        raise SpinDiffusionError(f"no iter_*/eval.json under {run_dir}; run evaluation before building a report")

    # 3. A factual summary: first vs last iteration and the best iteration, per metric.
    keys = _metric_keys(models)
    lower = set(lower_is_better) if lower_is_better is not None else {k for k in keys if _looks_lower_better(k)}
    baseline = "iter 0" if any(m.name == "iter 0" for m in models) else None
    return ReportData(
        title=f"SPIN-Diffusion run: {run_dir.resolve().name}",
        summary=_run_summary(models, keys, lower, group) + data_line,
        models=models,
        curves=curves,
        metric_labels={k: f"{k} ({'lower' if k in lower else 'higher'} is better)" for k in keys},
        lower_is_better=lower,
        sections=sections,
        baseline=baseline,
    )


def model_entry(eval_path: Path, *, name: str, group: str, step: int, model: str | None = None) -> ModelEntry:
    """A ModelEntry from one model of an eval.json (the only one unless ``model`` names it): its non-null
    metrics, its grid as an absolute path, and the prompts the grid shows."""
    ev = rundir.read_eval(eval_path)
    m = ev.model(model)
    return ModelEntry(
        name=name,
        metrics={k: v for k, v in m.metrics.items() if v is not None},
        grid=str((Path(eval_path).parent / m.grid).resolve()) if m.grid else None,
        group=group,
        step=step,
        captions=ev.prompts[: m.grid_size],
    )


def _looks_lower_better(key: str) -> bool:
    parts = key.lower().split("_")
    return any(h in (parts[0], parts[-1]) for h in LOWER_IS_BETTER_HINTS)


def _run_summary(models: list[ModelEntry], keys: list[str], lower: set[str], group: str) -> str:
    first, last = models[0], models[-1]
    names = first.name if len(models) == 1 else f"{first.name} to {last.name}"
    paragraphs = [f"Objective: {group}. {len(models)} model(s) evaluated ({names})."]
    if len(models) == 1:
        paragraphs.append("Only one model has been evaluated, so there is nothing to compare yet.")
        return "\n\n".join(paragraphs)
    lines = []
    for key in keys:
        a, b = first.metrics.get(key), last.metrics.get(key)
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        sign = -1 if key in lower else 1
        verdict = "better" if sign * (b - a) > 0 else "worse" if sign * (b - a) < 0 else "unchanged"
        best = _best_value([m.metrics.get(key) for m in models], key in lower)
        best_names = ", ".join(m.name for m in models if m.metrics.get(key) == best)
        lines.append(
            f"{key}: {first.name} {_fmt(a)} → {last.name} {_fmt(b)} ({verdict}); best {_fmt(best)} at {best_names}."
        )
    paragraphs.extend(lines or ["No metric was scored for both the first and the last model."])
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------------------------------------------------------
# Writing the HTML


def write_report(data: ReportData, out_dir: Path, *, filename: str = "report.html") -> Path:
    """Render ``data`` to ``out_dir/filename`` (atomically) and return that path.

    The page holds: title, summary paragraphs, the metric table (best value per column in bold, deltas vs the
    baseline), metric-vs-step and training-curve plots, one image grid per model, then the extra sections.
    A relative ``ModelEntry.grid`` is relative to ``out_dir``. A grid file that does not exist is shown as a
    visible warning in the page rather than failing the report.
    """
    out_dir = Path(out_dir)
    if data.baseline is not None and not any(m.name == data.baseline for m in data.models):
        raise SpinDiffusionError(
            f"report baseline {data.baseline!r} is not one of the models {[m.name for m in data.models]}; "
            "set baseline to a model name or None"
        )
    keys = _metric_keys(data.models)
    label = {k: data.metric_labels.get(k, k) for k in keys}
    plots = []
    if keys and data.models:
        png = _plot_metrics(data.models, keys, label, data.lower_is_better, data.x_label)
        plots.append({"alt": "Metrics vs step, one line per group", "src": _data_uri(png)})
    if data.curves:
        plots.append({"alt": "Training curves", "src": _data_uri(_plot_curves(data.curves))})
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", data.summary.strip()) if p.strip()]
    grids = [_grid(m, out_dir) for m in data.models if m.grid or m.captions]
    parts = [
        ("summary", "Summary", paragraphs),
        ("metrics", "Metrics", data.models),
        ("plots", "Plots", plots),
        ("samples", "Samples", grids),
    ]
    nav = [(anchor, heading) for anchor, heading, content in parts if content]
    nav += [(f"section-{i}", heading) for i, (heading, _) in enumerate(data.sections)]
    page = _template().render(
        title=data.title,
        generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        nav=nav,
        paragraphs=paragraphs,
        table=_metric_table(data, keys, label) if data.models else None,
        plots=plots,
        grids=grids,
        sections=data.sections,
    )
    return atomic.write_text(out_dir / filename, page)


def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("spin_diffusion", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2")


def _metric_table(data: ReportData, keys: list[str], label: dict[str, str]) -> dict[str, Any]:
    """The metric table as plain values for the template: header cells, then one row per model."""
    base = next((m for m in data.models if m.name == data.baseline), None)
    best = {k: _best_value([m.metrics.get(k) for m in data.models], k in data.lower_is_better) for k in keys}
    header = [
        {"label": label[k], "key": k if label[k] != k else None, "lower": k in data.lower_is_better} for k in keys
    ]
    rows = []
    for m in data.models:
        is_base = base is not None and m is base
        cells = []
        for k in keys:
            v = m.metrics.get(k)
            spread = m.spread.get(k)
            cell: dict[str, Any] = {
                "text": None if v is None else _fmt(v),
                "spread": None if spread is None else _fmt(spread),
                "per_seed": ", ".join(_fmt(x) for x in m.per_seed.get(k, [])) or None,
                "best": v is not None and v == best[k],
                "delta": None,
                "delta_class": None,
                "within_spread": False,
            }
            if (
                v is not None
                and base is not None
                and not is_base
                and _finite(base.metrics.get(k))
                and math.isfinite(v)
            ):
                d = v - base.metrics[k]
                better = -d if k in data.lower_is_better else d
                cell["delta"] = f"{d:+.3g}"
                cell["delta_class"] = "up" if better > 0 else "down" if better < 0 else "same"
                if within_spread(v, base.metrics[k], spread or 0.0, base.spread.get(k, 0.0)):
                    cell["delta_class"], cell["within_spread"] = "same", True
            cells.append(cell)
        rows.append({"name": m.name, "is_baseline": is_base, "cells": cells, "notes": m.notes})
    return {
        "header": header,
        "rows": rows,
        "with_notes": any(m.notes for m in data.models),
        "baseline": base.name if base is not None else None,
        "with_spread": any(m.spread for m in data.models),
        "spread_label": data.spread_label,
    }


def _grid(m: ModelEntry, out_dir: Path) -> dict[str, Any]:
    """One model's sample grid for the template: an embedded image, or the path that was not found."""
    grid: dict[str, Any] = {"name": m.name, "captions": m.captions, "src": None, "missing": None}
    if m.grid:
        path = Path(m.grid) if Path(m.grid).is_absolute() else out_dir / m.grid
        if path.is_file():
            grid["src"] = _data_uri(path.read_bytes(), mimetypes.guess_type(path.name)[0] or "image/png")
        else:
            grid["missing"] = str(path)
    return grid


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)


def _plot_metrics(
    models: list[ModelEntry], keys: list[str], label: dict[str, str], lower: set[str], x_label: str
) -> bytes:
    """One panel per metric: value vs ``step``, one line (with markers) per group."""
    from matplotlib.ticker import MaxNLocator

    groups = list(dict.fromkeys(m.group for m in models))
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys, strict=False):
        for gi, g in enumerate(groups):
            pts = sorted(
                (m.step, m.metrics[key], m.spread.get(key, 0.0))
                for m in models
                if m.group == g and _finite(m.metrics.get(key))
            )
            if pts:
                xs, ys, err = zip(*pts, strict=True)
                if any(err):  # error bars: the seed-to-seed spread
                    ax.errorbar(xs, ys, yerr=err, marker="o", color=f"C{gi}", label=g or "models", capsize=3)
                else:
                    ax.plot(xs, ys, marker="o", color=f"C{gi}", label=g or "models")
        ax.set_title(f"{label[key]} {'↓' if key in lower else '↑'}", fontsize=10)
        ax.set_xlabel(x_label, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    if len(groups) > 1 or groups[0]:
        axes[0].legend(fontsize=8)
    return _png(fig)


def _plot_curves(curves: list[Curve]) -> bytes:
    """One panel per logged metric (loss, accuracy, margin, then the rest), one line per curve."""
    metrics = list(dict.fromkeys(c.metric for c in curves))
    metrics = [m for m in _CURVE_ORDER if m in metrics] + [m for m in metrics if m not in _CURVE_ORDER]
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics, strict=False):
        for ci, c in enumerate(x for x in curves if x.metric == metric):
            color = f"C{ci % 10}"
            if len(c.values) > 50:  # noisy per-step values: faint raw line plus a moving average
                ax.plot(c.steps, c.values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(c.steps, _moving_average(c.values, max(5, len(c.values) // 25)), color=color, label=c.name)
            else:
                ax.plot(c.steps, c.values, color=color, marker="." if len(c.values) < 20 else None, label=c.name)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    return _png(fig)


def _figure(n: int):
    from matplotlib.figure import Figure

    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), dpi=100, layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (shorter at the start), same length as ``values``."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _fmt(v: float) -> str:
    """4 significant digits; integers above 10^4 in full rather than in exponent form."""
    if math.isfinite(v) and 1e4 <= abs(v) < 1e15:
        return f"{v:.0f}"
    return f"{v:.4g}"


def _metric_keys(models: list[ModelEntry]) -> list[str]:
    return list(dict.fromkeys(k for m in models for k in m.metrics))


def _best_value(values: list[float | None], lower: bool) -> float | None:
    finite = [v for v in values if _finite(v)]
    if len(finite) < 2:  # nothing to compare
        return None
    return min(finite) if lower else max(finite)
