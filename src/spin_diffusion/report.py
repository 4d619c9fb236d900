"""A self-contained HTML report: metric table, plots and sample grids in one file that can be moved or emailed.

Pattern from nanochat's ``report.py``: stages write their own results (``iter_*/eval.json``,
``iter_*/train/train_log.jsonl``); this module only reads those files and stitches them together.
It never loads a model. Everything is embedded (inline CSS, base64 PNGs), so the page needs no network.

    data = collect_run(Path("runs/spin"))        # or build a ReportData by hand (the demo does)
    write_report(data, Path("runs/spin"))        # -> runs/spin/report.html
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import mimetypes
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont

from spin_diffusion.errors import SpinDiffusionError

# Metric keys that read "lower is better" when collect_run is not told otherwise (Fréchet distances, losses).
LOWER_IS_BETTER_HINTS = ("fd", "fid", "kid", "loss")
# Keys of a train_log.jsonl record that are coordinates or bookkeeping, not curves.
_NOT_CURVES = frozenset({"step", "epoch", "time", "wall_time", "timestamp"})
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
    step: int = 0  # x position in the plots (iteration number or compute units)
    notes: str = ""
    captions: list[str] = field(default_factory=list)  # prompts of the grid cells, listed under the grid

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEntry:
        d = dict(d)
        d["metrics"] = {str(k): float(v) for k, v in d.get("metrics", {}).items()}
        d["captions"] = [str(c) for c in d.get("captions", [])]
        return cls(**d)


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
        )


# ---------------------------------------------------------------------------------------------------------------
# Image grids


def make_grid(
    images: Sequence[Image.Image],
    *,
    ncol: int = 8,
    captions: Sequence[str] | None = None,
    scale: int = 2,
    pad: int = 2,
) -> Image.Image:
    """Tile images into one RGB grid on a white background, optionally with a caption under each cell.

    Every image is resized to the first image's size times ``scale`` (nearest neighbour, so small demo images
    stay crisp). With ``cols = min(ncol, n)`` and ``rows = ceil(n / ncol)`` the result is
    ``cols * w * scale + (cols + 1) * pad`` wide and ``rows * (h * scale + caption_h) + (rows + 1) * pad`` high,
    where ``caption_h`` is 0 without captions and a few text lines (at most 3, wrapped to the cell width) with.
    """
    if not images:
        raise SpinDiffusionError("make_grid got no images; pass at least one PIL image")
    if ncol < 1 or scale < 1 or pad < 0:
        raise SpinDiffusionError(f"make_grid needs ncol >= 1, scale >= 1, pad >= 0; got {ncol}, {scale}, {pad}")
    if captions is not None and len(captions) != len(images):
        raise SpinDiffusionError(f"make_grid got {len(images)} images but {len(captions)} captions; pass one each")
    n = len(images)
    cols, rows = min(ncol, n), math.ceil(n / ncol)
    cw, ch = images[0].width * scale, images[0].height * scale

    # 1. Caption layout: every cell of the grid reserves the same number of text lines.
    font = ImageFont.load_default(size=max(9, min(14, cw // 8)))
    wrapped = [_wrap(c, font, cw - 2) for c in captions] if captions is not None else []
    line_h = font.getbbox("Ag")[3] + 2
    cap_h = (max(len(w) for w in wrapped) * line_h + 4) if wrapped else 0

    # 2. Paste cells and draw captions.
    grid = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * (ch + cap_h) + (rows + 1) * pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        x, y = pad + c * (cw + pad), pad + r * (ch + cap_h + pad)
        grid.paste(img.convert("RGB").resize((cw, ch), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x + 1, y + ch + 2 + j * line_h), line, fill=(40, 40, 40), font=font)
    return grid


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to ``width`` pixels; overlong words are split; the last kept line ends in '…' if cut."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:  # split a word that cannot fit on any line
            k = len(word)
            while k > 1 and font.getlength(word[:k]) > width:
                k -= 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:k])
            word = word[k:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "…"]
    return lines or [""]


# ---------------------------------------------------------------------------------------------------------------
# Reading a run directory


def read_train_log(path: Path, *, prefix: str = "") -> list[Curve]:
    """One Curve per numeric key of a ``train_log.jsonl`` (one JSON object per line, each with ``"step"``).

    Curves are named ``f"{prefix} {key}"`` (or just ``key``) and keep ``metric=key``; they appear in order of
    first appearance, sorted by step. A step logged twice (a resumed run appends again from its last checkpoint)
    keeps the later value. Records without a numeric ``step`` are skipped, as is a truncated last line (a run
    killed mid-write); any other unparsable line is an error.
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
            if key in _NOT_CURVES or not _is_number(value):
                continue
            series.setdefault(key, {})[int(step)] = float(value)
    return [
        Curve(
            name=f"{prefix} {key}".strip(),
            steps=sorted(points),
            values=[points[s] for s in sorted(points)],
            metric=key,
        )
        for key, points in series.items()
    ]


def collect_run(run_dir: Path, *, lower_is_better: set[str] | None = None) -> ReportData:
    """Build ReportData from a self-play run dir (layout in docs/DESIGN.md).

    Reads ``iter_*/eval.json`` (``{"metrics": {name: float | null}, "grid": "grid.png", "captions": [...]}``;
    ``grid`` is relative to that iter dir; ``prompts`` stands in for ``captions``; a null metric is left out), ``iter_*/train/train_log.jsonl``, ``config.yaml`` and ``state.json``.
    Models are named ``"iter k"`` with ``step = k``; ``iter 0`` (the base model) is the baseline. Metric keys in
    ``lower_is_better`` (default: inferred from LOWER_IS_BETTER_HINTS, e.g. ``fd``) count smaller as better.
    Iterations still in progress (no eval.json yet) contribute only their training curves.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SpinDiffusionError(f"run directory {run_dir} does not exist; pass the run_dir of a self-play run")
    iters = sorted(
        (int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := re.fullmatch(r"iter_(\d+)", p.name))
    )

    # 1. The resolved config names the objective, which becomes the plot group.
    sections: list[tuple[str, str]] = []
    group = "self-play"
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        text = config_path.read_text(encoding="utf-8")
        sections.append(("Resolved config (config.yaml)", text))
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpinDiffusionError(f"{config_path} is not valid YAML ({e}); fix or delete it") from e
        if isinstance(cfg, dict) and isinstance(cfg.get("loss"), dict) and cfg["loss"].get("objective"):
            group = str(cfg["loss"]["objective"])
    state_path = run_dir / "state.json"
    if state_path.is_file():
        sections.append(("Run state (state.json)", state_path.read_text(encoding="utf-8")))

    # 2. One model per evaluated iteration; training curves from every iteration that trained.
    models: list[ModelEntry] = []
    curves: list[Curve] = []
    for k, it_dir in iters:
        log = it_dir / "train" / "train_log.jsonl"
        if log.is_file():
            curves.extend(read_train_log(log, prefix=f"iter {k}"))
        eval_path = it_dir / "eval.json"
        if eval_path.is_file():
            models.append(_read_eval(eval_path, name=f"iter {k}", group=group, step=k))
    if not models:
        raise SpinDiffusionError(f"no iter_*/eval.json under {run_dir}; run evaluation before building a report")

    # 3. A factual summary: first vs last iteration and the best iteration, per metric.
    keys = _metric_keys(models)
    lower = set(lower_is_better) if lower_is_better is not None else {k for k in keys if _looks_lower_better(k)}
    baseline = "iter 0" if any(m.name == "iter 0" for m in models) else None
    return ReportData(
        title=f"SPIN-Diffusion run: {run_dir.resolve().name}",
        summary=_run_summary(models, keys, lower, group),
        models=models,
        curves=curves,
        metric_labels={k: f"{k} ({'lower' if k in lower else 'higher'} is better)" for k in keys},
        lower_is_better=lower,
        sections=sections,
        baseline=baseline,
    )


def _read_eval(path: Path, *, name: str, group: str, step: int) -> ModelEntry:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpinDiffusionError(f"{path} is not valid JSON ({e.msg}); re-run evaluation for this iteration") from e
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise SpinDiffusionError(f"{path} has no 'metrics' object; re-run evaluation for this iteration")
    metrics = {}
    for key, value in record["metrics"].items():
        if value is None:  # a scorer that had nothing to compare against (e.g. a win rate with no baseline)
            continue
        if not _is_number(value):
            raise SpinDiffusionError(f"{path}: metric {key!r} is {value!r}, not a number; fix the scorer output")
        metrics[key] = float(value)
    grid = record.get("grid")
    captions = record.get("captions", record.get("prompts"))
    return ModelEntry(
        name=name,
        metrics=metrics,
        grid=str((path.parent / grid).resolve()) if isinstance(grid, str) and grid else None,
        group=group,
        step=step,
        notes=record["notes"] if isinstance(record.get("notes"), str) else "",
        captions=[str(c) for c in captions] if isinstance(captions, list) else [],
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
    A grid file that does not exist is shown as a visible warning in the page rather than failing the report.
    """
    out_dir = Path(out_dir)
    if data.baseline is not None and not any(m.name == data.baseline for m in data.models):
        raise SpinDiffusionError(
            f"report baseline {data.baseline!r} is not one of the models {[m.name for m in data.models]}; "
            "set baseline to a model name or None"
        )
    keys = _metric_keys(data.models)
    label = {k: data.metric_labels.get(k, k) for k in keys}

    # 1. Build the body in page order; a part with no data is left out.
    nav: list[str] = []
    body: list[str] = []

    def section(anchor: str, heading: str, content: str) -> None:
        nav.append(f'<a href="#{anchor}">{_e(heading)}</a>')
        body.append(f'<section id="{anchor}"><h2>{_e(heading)}</h2>\n{content}</section>')

    if data.summary.strip():
        paragraphs = [p for p in re.split(r"\n\s*\n", data.summary.strip()) if p.strip()]
        section("summary", "Summary", "\n".join(f"<p>{_e(' '.join(p.split()))}</p>" for p in paragraphs))
    if data.models:
        section("metrics", "Metrics", _metric_table(data, keys, label))
    plots = []
    if keys and data.models:
        png = _plot_metrics(data.models, keys, label, data.lower_is_better)
        plots.append(_img(png, "Metrics vs step, one line per group", "plot"))
    if data.curves:
        plots.append(_img(_plot_curves(data.curves), "Training curves", "plot"))
    if plots:
        section("plots", "Plots", "\n".join(plots))
    grids = [_grid_block(m, out_dir) for m in data.models if m.grid or m.captions]
    if grids:
        section("samples", "Samples", "\n".join(grids))
    for i, (heading, text) in enumerate(data.sections):
        section(f"section-{i}", heading, f"<pre>{_e(text)}</pre>")

    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = _PAGE.format(title=_e(data.title), generated=generated, css=_CSS, nav=" · ".join(nav), body="\n".join(body))

    # 2. Atomic write: a reader never sees half a report.
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _metric_table(data: ReportData, keys: list[str], label: dict[str, str]) -> str:
    base = next((m for m in data.models if m.name == data.baseline), None)
    best = {k: _best_value([m.metrics.get(k) for m in data.models], k in data.lower_is_better) for k in keys}
    with_notes = any(m.notes for m in data.models)
    head = ["<th>model</th>"]
    for k in keys:
        lower = k in data.lower_is_better
        arrow = "↓" if lower else "↑"
        hint = f"{'lower' if lower else 'higher'} is better"
        key_line = f'<br><span class="key">{_e(k)}</span>' if label[k] != k else ""
        head.append(f'<th title="{_e(hint)}">{_e(label[k])} <span class="dir">{arrow}</span>{key_line}</th>')
    if with_notes:
        head.append("<th>notes</th>")
    rows = []
    for m in data.models:
        is_base = base is not None and m is base
        tag = ' <span class="tag">baseline</span>' if is_base else ""
        cells = [f'<td class="name">{_e(m.name)}{tag}</td>']
        for k in keys:
            v = m.metrics.get(k)
            if v is None:
                cells.append('<td class="num missing">–</td>')
                continue
            text = _e(_fmt(v))
            if best[k] is not None and v == best[k]:
                text = f"<strong>{text}</strong>"
            if base is not None and not is_base and _finite(base.metrics.get(k)) and math.isfinite(v):
                d = v - base.metrics[k]
                better = -d if k in data.lower_is_better else d
                cls = "up" if better > 0 else "down" if better < 0 else "same"
                text += f' <span class="delta {cls}">({_e(f"{d:+.3g}")})</span>'
            cells.append(f'<td class="num">{text}</td>')
        if with_notes:
            cells.append(f'<td class="notes">{_e(m.notes)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    caption = "Best value per column in bold (↑ higher is better, ↓ lower is better)."
    if base is not None:
        caption += f" Deltas in parentheses are against {_e(base.name)}; green = better, red = worse."
    return (
        f'<table class="metrics"><thead><tr>{"".join(head)}</tr></thead>\n<tbody>\n'
        + "\n".join(rows)
        + f'\n</tbody></table>\n<p class="note">{caption}</p>'
    )


def _grid_block(m: ModelEntry, out_dir: Path) -> str:
    parts = [f"<h3>{_e(m.name)}</h3>"]
    if m.grid:
        path = Path(m.grid) if Path(m.grid).is_absolute() else out_dir / m.grid
        if path.is_file():
            mime = mimetypes.guess_type(path.name)[0] or "image/png"
            parts.append(_img(path.read_bytes(), f"samples of {m.name}", "grid", mime=mime))
        else:
            parts.append(f'<p class="warn">grid image not found: {_e(str(path))}</p>')
    if m.captions:
        items = "".join(f"<li>{_e(c)}</li>" for c in m.captions)
        parts.append(
            f"<details><summary>{len(m.captions)} prompts, in grid order (row by row)</summary><ol>{items}</ol></details>"
        )
    return '<div class="model">' + "\n".join(parts) + "</div>"


def _img(png: bytes, alt: str, cls: str, *, mime: str = "image/png") -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:{mime};base64,{b64}">'


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)


def _plot_metrics(models: list[ModelEntry], keys: list[str], label: dict[str, str], lower: set[str]) -> bytes:
    """One panel per metric: value vs ``step``, one line (with markers) per group."""
    from matplotlib.ticker import MaxNLocator

    groups = list(dict.fromkeys(m.group for m in models))
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys, strict=False):
        for gi, g in enumerate(groups):
            pts = sorted((m.step, m.metrics[key]) for m in models if m.group == g and _finite(m.metrics.get(key)))
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", color=f"C{gi}", label=g or "models")
        ax.set_title(f"{label[key]} {'↓' if key in lower else '↑'}", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
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


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


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


_CSS = """
:root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bg-alt: #f7f8fa; --up: #067647; --down: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 60px; }
h1 { font-size: 26px; margin: 0 0 2px; }
h2 { font-size: 19px; margin: 34px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 8px; }
nav { font-size: 13px; margin: 6px 0 0; color: var(--muted); }
nav a { color: #175cd3; text-decoration: none; }
.meta, .note { color: var(--muted); font-size: 13px; }
.warn { color: var(--down); font-weight: 600; }
table.metrics { border-collapse: collapse; font-size: 14px; margin: 4px 0; }
table.metrics th, table.metrics td { padding: 6px 12px; border-bottom: 1px solid var(--line); }
table.metrics th { background: var(--bg-alt); text-align: right; font-weight: 600; vertical-align: bottom; }
table.metrics th:first-child, td.name, td.notes { text-align: left; }
table.metrics tbody tr:hover { background: var(--bg-alt); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.missing { color: var(--muted); }
td.notes { color: var(--muted); font-size: 13px; }
.key { font: 11px ui-monospace, SFMono-Regular, Menlo, monospace; color: var(--muted); font-weight: 400; }
.dir { color: var(--muted); }
.tag { font-size: 11px; color: var(--muted); border: 1px solid var(--line); border-radius: 4px; padding: 0 4px; }
.delta { font-size: 12px; }
.delta.up { color: var(--up); } .delta.down { color: var(--down); } .delta.same { color: var(--muted); }
img.plot { display: block; max-width: 100%; height: auto; margin: 10px 0 18px; }
img.grid { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); }
details { font-size: 13px; margin: 6px 0; } summary { cursor: pointer; color: var(--muted); }
pre { background: var(--bg-alt); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
  font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, monospace; overflow-x: auto; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
<h1>{title}</h1>
<p class="meta">Generated {generated}</p>
<nav>{nav}</nav>
{body}
</main>
</body>
</html>
"""
