"""report.py: HTML content (values, escaping, bold best, embedded images), grids, train logs, run collection."""

import base64
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from spin_diffusion import rundir
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.images import make_grid
from spin_diffusion.report import (
    Curve,
    ModelEntry,
    ReportData,
    collect_run,
    seed_spread,
    train_curves,
    within_spread,
    write_report,
)


def _images(n: int, size: int = 16) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (20 * i % 256, 100, 200)) for i in range(n)]


def _sample_data(tmp_path: Path) -> ReportData:
    make_grid(_images(4), ncol=2).save(tmp_path / "grid_sft.png")
    return ReportData(
        title="Demo <report>",
        summary="SPIN beats SFT on colour.\n\nFD got slightly worse & that is <b>honest</b>.",
        models=[
            ModelEntry("base", {"judge_all": 0.25, "fd": 11.0}, group="base", step=0),
            ModelEntry("sft", {"judge_all": 0.5, "fd": 10.0}, grid="grid_sft.png", group="sft", step=1),
            ModelEntry("spin iter 1", {"judge_all": 0.625, "fd": 12.5}, group="spin", step=1),
            ModelEntry("<script>alert(1)</script>", {"judge_all": 0.375, "fd": 20.0}, group="spin", step=2),
        ],
        curves=[
            Curve("spin iter 1 loss", list(range(100)), [0.69 - 0.001 * i for i in range(100)], metric="loss"),
            Curve("spin iter 1 accuracy", [0, 10, 20], [0.5, 0.6, 0.7], metric="accuracy"),
        ],
        metric_labels={"judge_all": "Judge (all)", "fd": "Fréchet distance"},
        lower_is_better={"fd"},
        sections=[("Config", "lr: 1e-5\nnote: <not a tag>")],
        baseline="base",
    )


def _cells(page: str, row_name: str) -> list[str]:
    row = next(r for r in re.findall(r"<tr>.*?</tr>", page, re.S) if row_name in r)
    return re.findall(r'<td class="num"[^>]*>(.*?)</td>', row)


def test_write_report_contents(tmp_path):
    path = write_report(_sample_data(tmp_path), tmp_path)
    assert path == tmp_path / "report.html"
    assert not list(tmp_path.glob("*.tmp"))
    page = path.read_text(encoding="utf-8")

    # names, labels, values, summary paragraphs and sections are there, escaped
    for text in ["sft", "spin iter 1", "Judge (all)", "Fréchet distance", "0.625", "12.5", "11"]:
        assert text in page
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Demo &lt;report&gt;" in page
    assert "<p>SPIN beats SFT on colour.</p>" in page
    assert "worse &amp; that is &lt;b&gt;honest&lt;/b&gt;." in page
    assert "&lt;not a tag&gt;" in page and "<pre>" in page

    # best per column: judge_all is higher-better (0.625), fd is lower-better (10)
    assert _cells(page, "spin iter 1")[0].startswith("<strong>0.625</strong>")
    assert _cells(page, '<td class="name">sft')[1].startswith("<strong>10</strong>")
    assert page.count("<strong>") == 2
    # deltas against the baseline, coloured by direction; none on the baseline row itself
    assert '<span class="delta up">(+0.375)</span>' in _cells(page, "spin iter 1")[0]
    assert '<span class="delta up">(-1)</span>' in _cells(page, '<td class="name">sft')[1]
    assert '<span class="delta down">(+1.5)</span>' in _cells(page, "spin iter 1")[1]
    assert "delta" not in "".join(_cells(page, "baseline"))

    # two plots + one grid, all embedded and decodable
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    assert "http://" not in page and "https://" not in page  # no external assets


def test_bold_respects_direction_when_order_flips(tmp_path):
    models = [ModelEntry("a", {"m": 1.0}), ModelEntry("b", {"m": 2.0})]
    hi = write_report(ReportData("t", "", models), tmp_path, filename="hi.html").read_text()
    lo = write_report(ReportData("t", "", models, lower_is_better={"m"}), tmp_path, filename="lo.html").read_text()
    assert "<strong>2</strong>" in hi and "<strong>1</strong>" not in hi
    assert "<strong>1</strong>" in lo and "<strong>2</strong>" not in lo


def test_minimal_report_without_grids_or_curves(tmp_path):
    data = ReportData("Bare", "", [ModelEntry("only", {"x": 1.5}), ModelEntry("none", {})])
    page = write_report(data, tmp_path / "new" / "dir").read_text()
    assert "only" in page and "1.5" in page
    assert "Samples" not in page and "Summary" not in page
    assert page.count("data:image/png;base64,") == 1  # just the metric plot
    # no metrics at all, missing grid file: still renders, with a visible warning
    data = ReportData("Empty", "Nothing yet.", [ModelEntry("m", {}, grid="missing.png")])
    page = write_report(data, tmp_path).read_text()
    assert "grid image not found" in page and "data:image" not in page


def test_unknown_baseline_is_an_error(tmp_path):
    with pytest.raises(SpinDiffusionError, match="baseline"):
        write_report(ReportData("t", "", [ModelEntry("a", {})], baseline="b"), tmp_path)


def test_report_data_json_round_trip(tmp_path):
    data = _sample_data(tmp_path)
    again = ReportData.from_dict(json.loads(json.dumps(data.to_dict())))
    assert again == data


def test_spread_over_seeds_is_shown_and_small_differences_are_flagged(tmp_path):
    """Several seeds: mean ± spread with the per-seed values, error bars, and a delta within the spread marked ≈."""
    base = ModelEntry.over_seeds(
        "base", [{"acc": 0.30, "fd": 2.0}, {"acc": 0.34, "fd": 2.2}, {"acc": 0.32, "fd": 2.1}]
    )
    sft = ModelEntry.over_seeds("sft", [{"acc": 0.50, "fd": 2.0}, {"acc": 0.54, "fd": 2.4}, {"acc": 0.52, "fd": 1.7}])
    assert base.metrics["acc"] == pytest.approx(0.32) and base.spread["acc"] == pytest.approx(0.02)
    assert sft.per_seed["fd"] == [2.0, 2.4, 1.7]
    data = ReportData("t", "", [base, sft], baseline="base", lower_is_better={"fd"}, spread_label="sd over 3 seeds")
    page = write_report(data, tmp_path).read_text()
    acc, fd = _cells(page, '<td class="name">sft')
    assert "0.52" in acc and "± 0.02" in acc and '<span class="delta up">(+0.2)</span>' in acc  # resolved
    assert "± 0.3512" in fd and "(-0.0667 ≈)" in fd and "delta same" in fd  # within the spread
    assert "2, 2.4, 1.7" in fd  # per-seed values
    assert "sd over 3 seeds" in page
    assert ReportData.from_dict(json.loads(json.dumps(data.to_dict()))) == data
    # one seed: no spread, nothing flagged
    one = ModelEntry.over_seeds("x", [{"acc": 0.5}])
    assert one.spread == {} and one.per_seed == {}
    assert seed_spread([1.0]) == 0.0 and not within_spread(0.5, 0.5)
    assert within_spread(0.5, 0.6, 0.1, 0.05) and not within_spread(0.5, 0.7, 0.1, 0.05)


def test_make_grid_dimensions():
    grid = make_grid(_images(10, size=16), ncol=4, scale=2, pad=2)
    assert grid.mode == "RGB"
    assert grid.size == (4 * 32 + 5 * 2, 3 * 32 + 4 * 2)
    assert make_grid(_images(3, size=8), ncol=8, scale=1, pad=0).size == (24, 8)
    # cell content is the upscaled image
    assert grid.getpixel((2, 2)) == _images(1)[0].getpixel((0, 0))
    with pytest.raises(SpinDiffusionError):
        make_grid([])


def test_read_train_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [
        {"step": 10, "loss": 0.69, "accuracy": 0.5, "lr": 1e-5, "objective": "spin_approx"},
        {"step": 20, "loss": 0.6, "accuracy": 0.75, "margin": 0.1, "lr": 2e-5},
        {"event": "checkpoint"},
        {"step": 20, "loss": 0.5},  # resumed from step 10: the re-logged step 20 wins
    ]
    log.write_text("\n".join(json.dumps(r) for r in records) + '\n\n{"step": 30, "lo')  # truncated last line
    curves = {c.metric: c for c in train_curves(log, prefix="iter 1")}
    assert list(curves) == ["loss", "accuracy", "lr", "margin"]
    assert curves["loss"].name == "iter 1 loss"
    assert curves["loss"].steps == [10, 20] and curves["loss"].values == [0.69, 0.5]
    assert curves["margin"].steps == [20] and curves["margin"].values == [0.1]
    assert train_curves(log)[0].name == "loss"

    log.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 2}\n')
    with pytest.raises(SpinDiffusionError, match=":2"):
        rundir.read_train_log(log)
    with pytest.raises(SpinDiffusionError, match="does not exist"):
        rundir.read_train_log(tmp_path / "nope.jsonl")


def _fake_run(run_dir: Path) -> None:
    (run_dir / "config.yaml").parent.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\nloss:\n  objective: spin_exact\n  beta: 5000.0\n")
    (run_dir / "state.json").write_text(json.dumps({"completed": ["eval:0", "generate:0", "train:1", "eval:1"]}))
    scores = {0: {"judge_all": 0.4, "fd": 20.0}, 1: {"judge_all": 0.6, "fd": 15.0}, 2: {"judge_all": 0.5, "fd": None}}
    for k, metrics in scores.items():
        it = run_dir / f"iter_{k:02d}"
        it.mkdir()
        make_grid(_images(2)).save(it / "grid.png")
        model = rundir.ModelEval(f"iter_{k:02d}", metrics, grid="grid.png", grid_size=2)
        rundir.write_eval(it / "eval.json", rundir.EvalFile(prompts=["a", "b", "c"], models=[model]))
        if k:
            (it / "train").mkdir()
            lines = [json.dumps({"step": s, "loss": 0.7 - s / 100, "accuracy": 0.5 + s / 100}) for s in (1, 2, 3)]
            (it / "train" / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "iter_03" / "train").mkdir(parents=True)  # still training: curves but no eval yet
    (run_dir / "iter_03" / "train" / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')


def test_collect_run(tmp_path):
    run_dir = tmp_path / "run"
    _fake_run(run_dir)
    data = collect_run(run_dir)
    assert [m.name for m in data.models] == ["iter 0", "iter 1", "iter 2"]
    assert [m.step for m in data.models] == [0, 1, 2]
    assert {m.group for m in data.models} == {"spin_exact"}
    assert data.models[1].metrics == {"judge_all": 0.6, "fd": 15.0}
    assert data.models[2].metrics == {"judge_all": 0.5}
    assert all(Path(m.grid).is_file() for m in data.models)
    assert data.models[0].captions == ["a", "b"]
    assert data.baseline == "iter 0"
    assert data.lower_is_better == {"fd"}
    assert sorted(c.name for c in data.curves) == [
        "iter 1 accuracy",
        "iter 1 loss",
        "iter 2 accuracy",
        "iter 2 loss",
        "iter 3 loss",
    ]
    assert [h for h, _ in data.sections] == ["Resolved config (config.yaml)", "Run state (state.json)"]
    assert "objective: spin_exact" in data.sections[0][1]
    assert "judge_all: iter 0 0.4 → iter 2 0.5 (better); best 0.6 at iter 1." in data.summary

    page = write_report(data, tmp_path / "elsewhere").read_text()  # absolute grid paths survive a move
    assert page.count("data:image/png;base64,") == 2 + 3
    assert "<strong>0.6</strong>" in page and "<strong>15</strong>" in page


def test_collect_run_errors(tmp_path):
    with pytest.raises(SpinDiffusionError, match="does not exist"):
        collect_run(tmp_path / "missing")
    (tmp_path / "iter_00").mkdir()
    with pytest.raises(SpinDiffusionError, match="eval.json"):
        collect_run(tmp_path)
    (tmp_path / "iter_00" / "eval.json").write_text(json.dumps({"metrics": {"judge": 1.0}, "grid": "grid.png"}))
    with pytest.raises(SpinDiffusionError, match="no 'models' list"):
        collect_run(tmp_path)
    (tmp_path / "iter_00" / "eval.json").write_text(json.dumps({"models": [{"metrics": {"judge": "high"}}]}))
    with pytest.raises(SpinDiffusionError, match="not a number"):
        collect_run(tmp_path)
    (tmp_path / "iter_00" / "eval.json").write_text(
        json.dumps(
            {
                "models": [{"name": "iter_00", "metrics": {"judge": 1, "win_rate": None}, "grid_size": 1}],
                "prompts": ["p", "q"],
            }
        )
    )
    data = collect_run(tmp_path)
    assert data.models[0].metrics == {"judge": 1.0} and data.models[0].captions == ["p"]
    assert data.models[0].grid is None and data.curves == [] and data.sections == []
    assert "nothing to compare" in data.summary
    assert "judge" in write_report(data, tmp_path).read_text()


def test_guard_and_hinge_metrics_become_curves(tmp_path: Path):
    """loss.loser_guard and loss.dpop_lambda log `loser_guard_lambda` and `dpop_term`; the report draws every numeric
    key of a train log, so both get a curve."""
    log = tmp_path / "train_log.jsonl"
    rows = [
        {"step": s, "loss": 0.7 - s / 100, "loser_guard_lambda": 0.5 + s / 100, "dpop_term": -s / 10} for s in (1, 2)
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = {c.metric: c for c in train_curves(log, prefix="spin iter 1")}
    assert curves["loser_guard_lambda"].values == [0.51, 0.52] and curves["dpop_term"].steps == [1, 2]
    assert curves["dpop_term"].name == "spin iter 1 dpop_term"
