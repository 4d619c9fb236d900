"""`prepare_pickapic` / `spin-diffusion prepare pickapic`: Pick-a-Pic v2 shards -> training shards."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spin_diffusion import prepare as P
from spin_diffusion.errors import SpinDiffusionError

PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
    ]
)

_seed = iter(range(10_000))


def _jpeg(size: int = 24) -> bytes:
    """A small random-noise JPEG, different on every call."""
    rng = np.random.default_rng(next(_seed))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pixels(data: bytes | Image.Image) -> np.ndarray:
    img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return np.asarray(img.convert("RGB"))


def _row(caption, label_0, *, jpg_0=None, jpg_1=None, are_different=True) -> dict:
    return {
        "caption": caption,
        "label_0": label_0,
        "jpg_0": _jpeg() if jpg_0 is None else jpg_0,
        "jpg_1": _jpeg() if jpg_1 is None else jpg_1,
        "are_different": are_different,
    }


def _write_shard(path: Path, rows: list[dict], *, row_group_size: int = 2, drop: tuple[str, ...] = ()) -> Path:
    """A shard with Pick-a-Pic v2's full schema (several row groups), minus the columns in `drop`."""
    n = len(rows)
    cols = {
        "are_different": [r["are_different"] for r in rows],
        "best_image_uid": [f"uid-{i}" for i in range(n)],
        "caption": [r["caption"] for r in rows],
        "created_at": [dt.datetime(2023, 5, 1)] * n,
        "has_label": [True] * n,
        "image_0_uid": [f"a{i}" for i in range(n)],
        "image_0_url": [f"https://example.invalid/a{i}.jpg" for i in range(n)],
        "image_1_uid": [f"b{i}" for i in range(n)],
        "image_1_url": [f"https://example.invalid/b{i}.jpg" for i in range(n)],
        "jpg_0": [r["jpg_0"] for r in rows],
        "jpg_1": [r["jpg_1"] for r in rows],
        "label_0": [r["label_0"] for r in rows],
        "label_1": [None if r["label_0"] is None else 1.0 - float(r["label_0"]) for r in rows],
        "model_0": ["sdxl"] * n,
        "model_1": ["sd21"] * n,
        "ranking_id": list(range(n)),
        "user_id": [7] * n,
        "num_example_per_prompt": [1] * n,
    }
    schema = pa.schema([f for f in PICKAPIC_SCHEMA if f.name not in drop])
    table = pa.Table.from_pydict({k: v for k, v in cols.items() if k not in drop}, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    assert pq.ParquetFile(path).metadata.num_row_groups == -(-n // row_group_size)
    return path


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _read_out(out: Path) -> pa.Table:
    shards = sorted(out.glob("train-*.parquet"))
    assert shards, f"no output shards in {out}"
    return pa.concat_tables(pq.read_table(s) for s in shards)


def _skipped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def _assert_one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---------------------------------------------------------------------------------------------------------------
# Winners / pairs / ties / same images


@pytest.fixture
def two_shards(tmp_path):
    """Two shards, 3 row groups in the first: 0-wins, 1-wins, a tie, a same-image pair, a repeated caption."""
    same = _jpeg()
    rows_a = [
        _row("a red fox", 1.0),  # jpg_0 preferred
        _row("a blue whale", 0.0),  # jpg_1 preferred
        _row("a tie", 0.5),
        _row("twins", 1.0, jpg_0=same, jpg_1=same, are_different=False),
        _row("a red fox", 0.0),  # same caption again: one unique caption
    ]
    rows_b = [_row("a green frog", 1.0), _row("another tie", 0.5), _row("a yellow cab", 0.0)]
    a = _write_shard(tmp_path / "train-00000-of-00002.parquet", rows_a, row_group_size=2)
    b = _write_shard(tmp_path / "train-00001-of-00002.parquet", rows_b, row_group_size=2)
    return (a, rows_a), (b, rows_b)


def test_winners_keep_the_preferred_image_bytes_and_drop_ties(tmp_path, two_shards):
    (a, rows_a), (b, rows_b) = two_shards
    out = tmp_path / "out"
    s = P.prepare_pickapic([a, b], out)
    assert (s.shards_read, s.shards_unreadable, s.pairs_read) == (2, 0, 8)
    assert (s.ties, s.same_images, s.corrupt_rows, s.kept_rows, s.output_shards) == (2, 1, 0, 6, 1)
    assert s.unique_captions == 5  # "a red fox" twice
    table = _read_out(out)
    assert table.schema.names == ["text", "image"] == s.columns
    assert table.schema.field("image").type == pa.binary()
    expected = [
        ("a red fox", rows_a[0]["jpg_0"]),
        ("a blue whale", rows_a[1]["jpg_1"]),
        ("twins", rows_a[3]["jpg_0"]),  # same images: kept for winners (and counted)
        ("a red fox", rows_a[4]["jpg_1"]),
        ("a green frog", rows_b[0]["jpg_0"]),
        ("a yellow cab", rows_b[2]["jpg_1"]),
    ]
    assert table.column("text").to_pylist() == [t for t, _ in expected]
    assert table.column("image").to_pylist() == [img for _, img in expected]  # bytes copied, not re-encoded
    assert _skipped(out) == []
    record = json.loads((out / "prepare.json").read_text())
    assert record["summary"]["kept_rows"] == 6 and record["summary"]["ties"] == 2
    assert record["inputs"] == [str(a), str(b)] and record["shards"] == ["train-00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["prepare.json", "skipped.jsonl", "train-00000.parquet"]


def test_pairs_put_the_preferred_image_first_and_drop_same_image_pairs(tmp_path, two_shards):
    (a, rows_a), (b, rows_b) = two_shards
    s = P.prepare_pickapic([a, b], tmp_path / "out", keep="pairs")
    assert (s.pairs_read, s.ties, s.same_images, s.corrupt_rows, s.kept_rows) == (8, 2, 1, 0, 5)
    assert s.pairs_read == s.corrupt_rows + s.kept_rows + s.ties + s.same_images
    table = _read_out(tmp_path / "out")
    assert table.schema.names == ["text", "winner", "loser"]
    got = list(zip(*(table.column(c).to_pylist() for c in ("text", "winner", "loser")), strict=True))
    assert got == [
        ("a red fox", rows_a[0]["jpg_0"], rows_a[0]["jpg_1"]),
        ("a blue whale", rows_a[1]["jpg_1"], rows_a[1]["jpg_0"]),
        ("a red fox", rows_a[4]["jpg_1"], rows_a[4]["jpg_0"]),
        ("a green frog", rows_b[0]["jpg_0"], rows_b[0]["jpg_1"]),
        ("a yellow cab", rows_b[2]["jpg_1"], rows_b[2]["jpg_0"]),
    ]


def test_pairs_can_keep_ties_marked_as_such(tmp_path, two_shards):
    (a, rows_a), _ = two_shards
    s = P.prepare_pickapic([a], tmp_path / "out", keep="pairs", drop_ties=False)
    assert (s.ties, s.same_images, s.kept_rows) == (1, 1, 4)
    table = _read_out(tmp_path / "out")
    assert table.column("tie").to_pylist() == [False, False, True, False]
    tie = table.filter(pc.field("tie")).to_pylist()[0]
    assert (tie["text"], tie["winner"], tie["loser"]) == ("a tie", rows_a[2]["jpg_0"], rows_a[2]["jpg_1"])


def test_keeping_ties_with_winners_is_refused(tmp_path, two_shards):
    (a, _), _ = two_shards
    with pytest.raises(SpinDiffusionError) as excinfo:
        P.prepare_pickapic([a], tmp_path / "out", keep="winners", drop_ties=False)
    _assert_one_line_error(excinfo, "--keep pairs")
    assert not (tmp_path / "out").exists()


def test_output_is_split_into_shards_of_rows_per_shard(tmp_path):
    shard = _write_shard(tmp_path / "in.parquet", [_row(f"caption {i}", 1.0) for i in range(5)], row_group_size=3)
    s = P.prepare_pickapic([shard], tmp_path / "out", rows_per_shard=2)
    names = sorted(p.name for p in (tmp_path / "out").glob("train-*"))
    assert names == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]  # no .tmp left behind
    assert [pq.read_metadata(tmp_path / "out" / n).num_rows for n in names] == [2, 2, 1]
    assert s.output_shards == 3 and s.kept_rows == 5 and s.unique_captions == 5
    assert _read_out(tmp_path / "out").column("text").to_pylist() == [f"caption {i}" for i in range(5)]


# ---------------------------------------------------------------------------------------------------------------
# Corrupt rows


def test_undecodable_catches_truncated_and_garbage_jpegs():
    good = _jpeg(64)
    assert P.undecodable(good) is None
    for bad in (good[: len(good) // 2], good[:-8], good[:200], np.random.default_rng(0).bytes(3000)):
        assert P.undecodable(bad) is not None
    assert Image.open(io.BytesIO(good[:-8])).verify() is None  # why verify() is not used: it passes truncated files


@pytest.fixture
def dirty_shard(tmp_path):
    good = _jpeg(48)
    rows = [
        _row("fine", 1.0),
        _row("truncated winner", 1.0, jpg_0=good[: len(good) // 2]),
        _row("garbage winner", 0.0, jpg_1=b"\xff\xd8 this is not a jpeg" * 20),
        _row("", 1.0),
        _row(None, 0.0),
        _row("odd label", 0.7),
        _row("no label", None),
        _row("truncated loser", 1.0, jpg_1=good[:-10]),  # corrupt for pairs, fine for winners
        _row("tie with garbage", 0.5, jpg_0=b"garbage"),  # a dropped tie: its images are never checked
        _row("also fine", 0.0),
    ]
    return _write_shard(tmp_path / "dirty.parquet", rows, row_group_size=3)


def test_corrupt_rows_are_skipped_into_skipped_jsonl(tmp_path, dirty_shard):
    out = tmp_path / "out"
    s = P.prepare_pickapic([dirty_shard], out)
    assert (s.pairs_read, s.ties, s.corrupt_rows, s.kept_rows) == (10, 1, 6, 3)
    assert _read_out(out).column("text").to_pylist() == ["fine", "truncated loser", "also fine"]
    skipped = _skipped(out)
    assert [r["row"] for r in skipped] == [1, 2, 3, 4, 5, 6]
    assert all(r["shard"] == str(dirty_shard) for r in skipped)
    reasons = [r["reason"] for r in skipped]
    assert reasons[0].startswith("jpg_0 cannot be decoded") and "truncated" in reasons[0]
    assert reasons[1].startswith("jpg_1 cannot be decoded")
    assert reasons[2:] == [
        "an empty caption",
        "no caption",
        "label_0=0.7, not 0, 0.5 or 1",
        "label_0=None, not 0, 0.5 or 1",
    ]


def test_pairs_check_the_loser_too(tmp_path, dirty_shard):
    s = P.prepare_pickapic([dirty_shard], tmp_path / "out", keep="pairs")
    assert (s.corrupt_rows, s.kept_rows) == (7, 2)
    last = _skipped(tmp_path / "out")[-1]
    assert (last["shard"], last["row"]) == (str(dirty_shard), 7)
    assert last["reason"].startswith("jpg_1 cannot be decoded")  # the loser of row 7 (label_0 == 1)


def test_corrupt_row_under_error_stops_with_one_line_and_leaves_nothing(tmp_path, dirty_shard):
    before = _files(tmp_path)
    with pytest.raises(SpinDiffusionError) as excinfo:
        P.prepare_pickapic([dirty_shard], tmp_path / "out", on_bad_example="error")
    _assert_one_line_error(excinfo, str(dirty_shard), "row 1", "jpg_0 cannot be decoded", "--on-bad-example skip")
    assert _files(tmp_path) == before  # the folder it created and the shard it started are removed


# ---------------------------------------------------------------------------------------------------------------
# Wrong inputs, unreadable shards, the output folder


def test_missing_column_is_an_error_listing_the_columns_found(tmp_path):
    good = _write_shard(tmp_path / "good.parquet", [_row("x", 1.0)])
    bad = _write_shard(tmp_path / "bad.parquet", [_row("x", 1.0)], drop=("jpg_1", "label_0", "label_1"))
    with pytest.raises(SpinDiffusionError) as excinfo:
        P.prepare_pickapic([good, bad], tmp_path / "out")
    msg = _assert_one_line_error(excinfo, str(bad), "jpg_1, label_0", "found are_different, best_image_uid, caption")
    assert "needed caption, jpg_0, jpg_1, label_0" in msg
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_are_different_is_optional(tmp_path):
    shard = _write_shard(tmp_path / "s.parquet", [_row("x", 1.0), _row("y", 0.0)], drop=("are_different",))
    s = P.prepare_pickapic([shard], tmp_path / "out", keep="pairs")
    assert (s.kept_rows, s.same_images) == (2, 0)


def test_images_stored_as_datasets_image_structs_are_read(tmp_path):
    rows = [_row("x", 1.0), _row("y", 0.0)]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "caption": [r["caption"] for r in rows],
            "jpg_0": pa.array([{"bytes": r["jpg_0"], "path": None} for r in rows], image),
            "jpg_1": pa.array([{"bytes": r["jpg_1"], "path": None} for r in rows], image),
            "label_0": [r["label_0"] for r in rows],
        }
    )
    pq.write_table(table, tmp_path / "s.parquet")
    P.prepare_pickapic([tmp_path / "s.parquet"], tmp_path / "out")
    assert _read_out(tmp_path / "out").column("image").to_pylist() == [rows[0]["jpg_0"], rows[1]["jpg_1"]]


def test_unreadable_shards_are_counted_and_skipped(tmp_path):
    good = _write_shard(tmp_path / "good.parquet", [_row("fine", 1.0), _row("fine too", 0.0)])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet" * 100)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    s = P.prepare_pickapic([garbage, good, truncated], tmp_path / "out")
    assert (s.shards_read, s.shards_unreadable, s.pairs_read, s.kept_rows) == (1, 2, 2, 2)
    skipped = _skipped(tmp_path / "out")
    assert [(r["shard"], r["row"]) for r in skipped] == [(str(garbage), None), (str(truncated), None)]
    assert all(r["reason"].startswith("unreadable shard") for r in skipped)


def test_unreadable_shard_under_error_is_one_line(tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 nope")
    with pytest.raises(SpinDiffusionError) as excinfo:
        P.prepare_pickapic([garbage], tmp_path / "out", on_bad_example="error")
    _assert_one_line_error(excinfo, str(garbage), "cannot be read as parquet")
    assert not (tmp_path / "out").exists()


def test_a_shard_failing_part_way_keeps_the_rows_before_it(tmp_path, monkeypatch):
    """A valid footer but a destroyed page header in the second row group."""
    monkeypatch.setattr(P, "READ_BATCH_ROWS", 2)  # one row group per batch
    shard = _write_shard(tmp_path / "s.parquet", [_row(f"c{i}", 1.0) for i in range(4)], row_group_size=2)
    meta = pq.read_metadata(shard)
    rg1 = meta.row_group(1)
    offset = min(rg1.column(i).data_page_offset for i in range(rg1.num_columns))
    data = bytearray(shard.read_bytes())
    data[offset : offset + 64] = b"\x00\xff" * 32
    shard.write_bytes(bytes(data))
    s = P.prepare_pickapic([shard], tmp_path / "out")
    assert (s.shards_read, s.shards_unreadable, s.pairs_read, s.kept_rows) == (0, 1, 2, 2)
    (record,) = _skipped(tmp_path / "out")
    assert record["row"] == 2 and record["reason"].startswith("unreadable shard from this row on")


def test_missing_input_and_folder_input_are_one_line(tmp_path):
    with pytest.raises(SpinDiffusionError) as excinfo:
        P.prepare_pickapic([tmp_path / "nope.parquet"], tmp_path / "out")
    _assert_one_line_error(excinfo, "not found", "nope.parquet")
    with pytest.raises(SpinDiffusionError) as excinfo:
        P.prepare_pickapic([tmp_path], tmp_path / "out")
    _assert_one_line_error(excinfo, "is a folder", "train-*.parquet")
    with pytest.raises(SpinDiffusionError) as excinfo:
        P.expand_inputs([str(tmp_path / "*.parquet")])
    _assert_one_line_error(excinfo, "matches no files")
    assert not (tmp_path / "out").exists()


def test_expand_inputs_sorts_globs_and_drops_duplicates(tmp_path):
    for name in ("b.parquet", "a.parquet", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert P.expand_inputs([str(tmp_path / "b.parquet"), str(tmp_path / "*.parquet")]) == [
        tmp_path / "b.parquet",
        tmp_path / "a.parquet",
    ]


def test_non_empty_out_is_refused_and_nothing_is_written_outside_out(tmp_path, two_shards):
    (a, _), _ = two_shards
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me.txt").write_text("precious")
    before = {p: p.read_bytes() for p in _files(tmp_path) if p.is_file()}
    with pytest.raises(SpinDiffusionError) as excinfo:
        P.prepare_pickapic([a], out)
    _assert_one_line_error(excinfo, "not empty")
    assert {p: p.read_bytes() for p in _files(tmp_path) if p.is_file()} == before

    fresh = tmp_path / "fresh" / "nested"
    before_paths = _files(tmp_path)
    P.prepare_pickapic([a], fresh)
    new = _files(tmp_path) - before_paths
    assert new and all(p == fresh.parent or p == fresh or fresh in p.parents for p in new)
    assert {p: p.read_bytes() for p in _files(tmp_path) if p in before} == before
    (tmp_path / "empty").mkdir()
    assert P.prepare_pickapic([a], tmp_path / "empty").kept_rows == 4  # an existing empty folder is fine


# ---------------------------------------------------------------------------------------------------------------
# End to end: the trainer's loaders read the output


@pytest.fixture
def _datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")


@pytest.mark.usefixtures("_datasets_cache_in_tmp")
def test_the_trainer_loads_the_output(tmp_path, two_shards):
    from spin_diffusion.config import DataConfig
    from spin_diffusion.data import load_captioned_images, load_preference_pairs

    (a, rows_a), (b, rows_b) = two_shards
    P.prepare_pickapic([a, b], tmp_path / "winners", rows_per_shard=4)
    images = load_captioned_images(DataConfig(path=str(tmp_path / "winners")))
    assert images.captions == ["a red fox", "a blue whale", "twins", "a red fox", "a green frog", "a yellow cab"]
    sources = [rows_a[0]["jpg_0"], rows_a[1]["jpg_1"], rows_a[3]["jpg_0"], rows_a[4]["jpg_1"], rows_b[0]["jpg_0"]]
    for i, src in enumerate(sources):
        assert np.array_equal(_pixels(images.image(i)), _pixels(src))

    P.prepare_pickapic([a, b], tmp_path / "pairs", keep="pairs")
    pairs = load_preference_pairs(DataConfig(path=str(tmp_path / "pairs")))
    assert pairs.captions == ["a red fox", "a blue whale", "a red fox", "a green frog", "a yellow cab"]
    expected = [rows_a[0], rows_a[1], rows_a[4], rows_b[0], rows_b[2]]
    for i, row in enumerate(expected):
        win, lose = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        assert np.array_equal(_pixels(pairs.winner(i)), _pixels(row[win]))
        assert np.array_equal(_pixels(pairs.loser(i)), _pixels(row[lose]))


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_prints_the_counts(tmp_path, two_shards, capsys):
    from spin_diffusion.cli import main

    out = tmp_path / "out"
    assert main(["prepare", "pickapic", "--input", str(tmp_path / "train-*.parquet"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for line in ("pairs read: 8", "ties: 2 (dropped)", "unique captions: 5", "kept rows: 6", str(out)):
        assert line in text, (line, text)
    assert f"corrupt rows: 0 (see {out / 'skipped.jsonl'})" in text
    assert len(list(out.glob("train-*.parquet"))) == 1


def test_cli_missing_column_exits_2_with_one_error_line(tmp_path, capsys):
    from spin_diffusion.cli import main

    bad = _write_shard(tmp_path / "bad.parquet", [_row("x", 1.0)], drop=("caption",))
    assert main(["prepare", "pickapic", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "found are_different" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["prepare"], ["prepare", "pickapic"]])
def test_cli_help(command, capsys):
    from spin_diffusion.cli import main

    assert main([*command, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out
