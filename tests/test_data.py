"""Data sources, preference pairs, prompt files and image preprocessing (spin_diffusion.data)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from spin_diffusion import data as D  # noqa: E402
from spin_diffusion.config import DataConfig  # noqa: E402
from spin_diffusion.errors import SpinDiffusionError  # noqa: E402

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square"]


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    """load_dataset("parquet"/"arrow") converts files into the datasets cache: keep it out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")


def _img(i: int, size: tuple[int, int] = (20, 12)) -> Image.Image:
    return Image.new("RGB", size, COLORS[i % len(COLORS)])


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    _img(i).save(buf, format="PNG")
    return buf.getvalue()


def _assert_color(img: Image.Image, i: int) -> None:
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == COLORS[i]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _imagefolder(root: Path, n: int = 3, *, caption_key: str = "text", fmt: str = "jsonl") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "imgs").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        _img(i).save(root / "imgs" / f"{i}.png")
        rows.append({"file_name": f"imgs/{i}.png", caption_key: CAPTIONS[i]})
    if fmt == "jsonl":
        _write_jsonl(root / "metadata.jsonl", rows)
    else:
        with open(root / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file_name", caption_key])
            w.writeheader()
            w.writerows(rows)
    return root


def _image_dataset(n: int = 3) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [_img(i) for i in range(n)], "text": CAPTIONS[:n]}, features=features)


def _load(path, **kw) -> D.CaptionedImages:
    return D.load_captioned_images(DataConfig(path=str(path), **kw))


def _check(src: D.CaptionedImages, n: int = 3) -> None:
    assert len(src) == n
    assert [src.caption(i) for i in range(n)] == CAPTIONS[:n]
    for i in range(n):
        _assert_color(src.image(i), i)


# ---------------------------------------------------------------------------------------------------------------
# Sources


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder(tmp_path, fmt):
    root = _imagefolder(tmp_path / "folder", fmt=fmt)
    src = _load(root)
    _check(src)
    assert src.fingerprint() == _load(root).fingerprint()


@pytest.mark.parametrize("key", ["caption", "prompt"])
def test_caption_column_fallback(tmp_path, key):
    _check(_load(_imagefolder(tmp_path / "f", caption_key=key)))


def test_caption_column_from_config(tmp_path):
    _check(_load(_imagefolder(tmp_path / "f", caption_key="alt"), caption_column="alt"))


def test_max_samples(tmp_path):
    _check(_load(_imagefolder(tmp_path / "f"), max_samples=2), n=2)


def test_saved_dataset_and_datasetdict(tmp_path):
    _image_dataset().save_to_disk(str(tmp_path / "hf"))
    src = _load(tmp_path / "hf")
    _check(src)
    assert src.fingerprint() == _load(tmp_path / "hf").fingerprint()
    datasets.DatasetDict({"train": _image_dataset(), "test": _image_dataset(1)}).save_to_disk(str(tmp_path / "dd"))
    _check(_load(tmp_path / "dd"))


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_image_feature_file_dir_and_glob(tmp_path, streaming):
    (tmp_path / "pq").mkdir()
    _image_dataset().to_parquet(str(tmp_path / "pq" / "train.parquet"))
    _check(_load(tmp_path / "pq" / "train.parquet", streaming=streaming))
    _check(_load(tmp_path / "pq", streaming=streaming))
    _check(_load(tmp_path / "pq" / "*.parquet", streaming=streaming))


def test_a_hub_layout_folder_reads_data_split(tmp_path):
    for split, rows in (("train", [0, 1]), ("validation", [2]), ("validation_unique", [1])):
        table = pa.table({"image": [_png(i) for i in rows], "text": [CAPTIONS[i] for i in rows]})
        (tmp_path / "data").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    assert _load(tmp_path).captions == CAPTIONS[:2]
    assert _load(tmp_path, split="validation", streaming=True).captions == [CAPTIONS[2]]


def test_streaming_reads_row_groups_in_place_and_keeps_the_fingerprint(tmp_path):
    n = 12
    table = pa.table({"image": [_png(i) for i in range(n)], "text": [f"caption {i}" for i in range(n)]})
    pq.write_table(table.slice(0, 7), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(table.slice(7), tmp_path / "b.parquet", row_group_size=2)
    streamed, converted = _load(tmp_path, streaming=True), _load(tmp_path)
    assert streamed.captions == converted.captions == [f"caption {i}" for i in range(n)]
    for i in range(n):
        _assert_color(streamed.image(i), i % len(COLORS))
        group, cells = streamed._table._loaded["image"]
        assert len(cells) <= 3  # one row group of one column in memory, never a whole file
    assert streamed.fingerprint() == converted.fingerprint()  # the latent cache outlives switching the reader


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_bytes_dict_and_path_columns(tmp_path, streaming):
    for i in range(3):
        _img(i).save(tmp_path / f"{i}.png")
    table = pa.table(
        {
            "raw": [_png(i) for i in range(3)],
            "as_dict": [{"bytes": _png(i), "path": None} for i in range(3)],
            "as_path": [f"{i}.png" for i in range(3)],
            "text": CAPTIONS[:3],
        }
    )
    pq.write_table(table, tmp_path / "x.parquet")
    for column in ("raw", "as_dict", "as_path"):
        _check(_load(tmp_path / "x.parquet", image_column=column, streaming=streaming))


def test_arrow_file(tmp_path):
    _image_dataset().save_to_disk(str(tmp_path / "hf"))
    arrow = next((tmp_path / "hf").glob("*.arrow"))
    _check(_load(arrow))


def test_builtin_shapes():
    cfg = DataConfig(builtin="shapes", num_builtin=6)
    src = D.load_captioned_images(cfg)
    assert len(src) == 6 and all(src.caption(i) for i in range(6))
    assert src.image(0).mode == "RGB" and src.image(0).size == (32, 32)
    assert src.fingerprint() == D.load_captioned_images(cfg).fingerprint()
    assert src.fingerprint() != D.load_captioned_images(cfg, seed=1).fingerprint()
    short = D.load_captioned_images(DataConfig(builtin="shapes", num_builtin=6, max_samples=4))
    assert short.captions == src.captions[:4]


def test_rgba_is_composited_on_white(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(root / "a.png")
    _write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png", "text": "nothing"}])
    assert _load(root).image(0).getpixel((0, 0)) == (255, 255, 255)


def test_fingerprint_changes_with_data(tmp_path):
    root = _imagefolder(tmp_path / "f")
    before = _load(root).fingerprint()
    Image.new("RGB", (30, 30), (1, 2, 3)).save(root / "imgs" / "1.png")
    assert _load(root).fingerprint() != before
    after_image = _load(root).fingerprint()
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] = "something else"
    _write_jsonl(root / "metadata.jsonl", rows)
    assert _load(root).fingerprint() != after_image


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _raises(match: str):
    return pytest.raises(SpinDiffusionError, match=match)


def test_error_missing_path(tmp_path):
    with _raises("does_not_exist"):
        _load(tmp_path / "does_not_exist")
    with _raises("matches no files"):
        _load(tmp_path / "*.parquet")
    with _raises("data.path"):
        D.load_captioned_images(DataConfig())


def test_error_no_metadata(tmp_path):
    (tmp_path / "f").mkdir()
    _img(0).save(tmp_path / "f" / "a.png")
    with _raises("metadata.jsonl"):
        _load(tmp_path / "f")


def test_error_empty_metadata(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "metadata.jsonl").write_text("\n")
    with _raises("empty"):
        _load(tmp_path / "f")


def test_error_empty_dataset(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [], "text": []}, features=features).save_to_disk(str(tmp_path / "hf"))
    with _raises("empty"):
        _load(tmp_path / "hf")


def test_error_missing_caption_names_line(tmp_path):
    root = _imagefolder(tmp_path / "f")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    del rows[1]["text"]
    _write_jsonl(root / "metadata.jsonl", rows)
    with _raises(r"line 2 of .*metadata\.jsonl has no caption"):
        _load(root)


def test_error_empty_caption_names_line(tmp_path):
    root = _imagefolder(tmp_path / "f", fmt="csv")
    text = (root / "metadata.csv").read_text().replace(CAPTIONS[2], " ")
    (root / "metadata.csv").write_text(text)
    with _raises(r"line 4 of .*metadata\.csv has an empty caption"):
        _load(root)


def test_error_empty_caption_in_dataset_names_row(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [_png(0), _png(1)], "text": ["ok", ""]})
    ds.to_parquet(str(tmp_path / "x.parquet"))
    with _raises("row 1 of .*x.parquet has an empty caption"):
        _load(tmp_path / "x.parquet")


def test_error_missing_file_name_names_line(tmp_path):
    root = _imagefolder(tmp_path / "f")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    del rows[2]["file_name"]
    _write_jsonl(root / "metadata.jsonl", rows)
    with _raises("line 3 of .*file_name"):
        _load(root)


def test_error_bad_json_names_line(tmp_path):
    root = _imagefolder(tmp_path / "f")
    with open(root / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    with _raises("line 4 is not valid JSON"):
        _load(root)


def test_error_unknown_caption_column_lists_columns(tmp_path):
    root = _imagefolder(tmp_path / "f", caption_key="words")
    with _raises("available columns: file_name, words.*data.caption_column"):
        _load(root, caption_column="nope")


def test_error_unknown_image_column(tmp_path):
    _image_dataset().save_to_disk(str(tmp_path / "hf"))
    with _raises("no image column.*pixels.*available columns: image, text"):
        _load(tmp_path / "hf", image_column="pixels")


def test_error_unreadable_image_is_lazy_and_names_file(tmp_path):
    root = _imagefolder(tmp_path / "f")
    (root / "imgs" / "1.png").write_bytes(b"this is not a png")
    src = _load(root)  # captions load fine; the image fails when read
    _assert_color(src.image(0), 0)
    with _raises(r"cannot read image .*1\.png"):
        src.image(1)
    (root / "imgs" / "2.png").unlink()
    with _raises(r"image file not found: .*2\.png"):
        src.image(2)


def test_error_corrupt_bytes_in_dataset_names_row(tmp_path):
    pq.write_table(pa.table({"image": [_png(0), b"garbage"], "text": ["a", "b"]}), tmp_path / "x.parquet")
    src = _load(tmp_path / "x.parquet")
    with _raises("row 1 of .*column 'image'"):
        src.image(1)


def test_error_bad_max_samples(tmp_path):
    with _raises("max_samples"):
        _load(_imagefolder(tmp_path / "f"), max_samples=0)


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs


def test_pairs_imagefolder(tmp_path):
    root = tmp_path / "pairs"
    root.mkdir()
    for i in range(4):
        _img(i).save(root / f"{i}.png")
    _write_jsonl(
        root / "metadata.jsonl",
        [{"good": "0.png", "bad": "1.png", "text": "first"}, {"good": "2.png", "bad": "3.png", "text": "second"}],
    )
    pairs = D.load_preference_pairs(DataConfig(path=str(root), winner_column="good", loser_column="bad"))
    assert len(pairs) == 2 and pairs.caption(1) == "second"
    _assert_color(pairs.winner(0), 0)
    _assert_color(pairs.loser(0), 1)
    _assert_color(pairs.winner(1), 2)
    _assert_color(pairs.loser(1), 3)
    assert isinstance(pairs.fingerprint(), str)
    with _raises("no preference columns.*available columns: good, bad, text"):
        D.load_preference_pairs(DataConfig(path=str(root)))


def test_pairs_dataset_columns(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"winner": [_img(0)], "loser": [_img(1)], "text": ["x"]},
        features=datasets.Features(
            {"winner": datasets.Image(), "loser": datasets.Image(), "text": datasets.Value("string")}
        ),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    pairs = D.load_preference_pairs(DataConfig(path=str(tmp_path / "hf")))
    _assert_color(pairs.winner(0), 0)
    _assert_color(pairs.loser(0), 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_pairs_pickapic_layout_drops_ties(tmp_path, streaming):
    table = pa.table(
        {
            "caption": ["zero wins", "tie", "one wins"],
            "jpg_0": [_png(0), _png(0), _png(2)],
            "jpg_1": [_png(1), _png(1), _png(3)],
            "label_0": [1.0, 0.5, 0.0],
        }
    )
    pq.write_table(table, tmp_path / "pickapic.parquet")
    pairs = D.load_preference_pairs(DataConfig(path=str(tmp_path / "pickapic.parquet"), streaming=streaming))
    assert pairs.captions == ["zero wins", "one wins"]
    _assert_color(pairs.winner(0), 0)
    _assert_color(pairs.loser(0), 1)
    _assert_color(pairs.winner(1), 3)  # label_0 == 0 -> jpg_1 is preferred
    _assert_color(pairs.loser(1), 2)
    assert len(D.load_preference_pairs(DataConfig(path=str(tmp_path / "pickapic.parquet"), max_samples=1))) == 1


# ---------------------------------------------------------------------------------------------------------------
# Prompt files


def test_load_prompts_all_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert D.load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    with open(tmp_path / "p.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "caption"], ["1", "a cat"], ["2", "a dog"]])
    assert D.load_prompts(tmp_path / "p.csv") == ["a cat", "a dog"]
    _write_jsonl(tmp_path / "p.jsonl", [{"text": "a cat", "prompt": "P1"}, {"prompt": "P2"}])
    assert D.load_prompts(tmp_path / "p.jsonl") == ["P1", "P2"]
    pq.write_table(pa.table({"text": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    assert D.load_prompts(str(tmp_path / "p.parquet")) == ["a cat", "a dog"]
    (tmp_path / "data").mkdir()  # a Hub split's shards, by a glob
    pq.write_table(pa.table({"caption": ["c", "d"]}), tmp_path / "data" / "test_unique-00001-of-00002.parquet")
    pq.write_table(pa.table({"caption": ["a", "b"]}), tmp_path / "data" / "test_unique-00000-of-00002.parquet")
    assert D.load_prompts(tmp_path / "data" / "test_unique-*.parquet") == ["a", "b", "c", "d"]
    with _raises("prompt files not found: .*matches nothing"):
        D.load_prompts(tmp_path / "data" / "test-*.parquet")


def test_load_prompts_errors(tmp_path):
    with _raises("prompt file not found: .*nope.txt"):
        D.load_prompts(tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with _raises("no prompts in .*blank.txt"):
        D.load_prompts(tmp_path / "blank.txt")
    _write_jsonl(tmp_path / "p.jsonl", [{"words": "a cat"}])
    with _raises("no prompt column .*available columns: words"):
        D.load_prompts(tmp_path / "p.jsonl")
    pq.write_table(pa.table({"words": ["a"]}), tmp_path / "p.parquet")
    with _raises("no prompt column .*words"):
        D.load_prompts(tmp_path / "p.parquet")
    (tmp_path / "p.yaml").write_text("a")
    with _raises("unsupported prompt file"):
        D.load_prompts(tmp_path / "p.yaml")


# ---------------------------------------------------------------------------------------------------------------
# image_to_tensor


def test_image_to_tensor_resize_and_center_crop():
    img = Image.new("RGB", (60, 20), (0, 0, 0))  # wide: black | white (x in 15..45) | black
    img.paste((255, 255, 255), (15, 0, 45, 20))
    t = D.image_to_tensor(img, 10)
    assert t.shape == (3, 10, 10) and t.dtype == torch.float32
    assert torch.allclose(t, torch.ones_like(t), atol=1e-6)  # only the (white) center survives the crop
    t = D.image_to_tensor(Image.new("L", (5, 9), 0), 16)  # grayscale, upscaled, tall
    assert t.shape == (3, 16, 16) and t.min() == -1.0 and t.max() == -1.0
    t = D.image_to_tensor(_img(0, (16, 16)), 16)
    assert t[0].eq(1).all() and t[1:].eq(-1).all()


def _gradient(w: int, h: int) -> Image.Image:
    """Every pixel distinct: red = x, green = y."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w)[None, :]
    arr[..., 1] = np.arange(h)[:, None]
    return Image.fromarray(arr)


def test_flip_mirrors_and_crops_follow_their_fractions_and_time_ids():
    img = _gradient(40, 16)  # resolution 16: no resize, a 24-pixel horizontal slack
    red = lambda t: ((t[0] + 1) * 127.5).round()  # noqa: E731 - the x coordinate each pixel came from
    center = D.image_to_tensor(img, 16)
    assert red(center)[0].tolist() == list(range(12, 28))
    assert red(D.image_to_tensor(img, 16, flip=True))[0].tolist() == list(range(27, 11, -1))
    left = D.image_to_tensor(img, 16, crop=(0.0, 0.0))
    right = D.image_to_tensor(img, 16, crop=(0.0, 0.999))
    assert red(left)[0, 0].item() == 0 and red(right)[0, -1].item() == 39  # the whole slack is reachable
    flipped_crop = D.image_to_tensor(img, 16, flip=True, crop=(0.0, 0.25))
    left_px = int(0.25 * 25)  # left offset in the mirrored image
    assert red(flipped_crop)[0].tolist() == [39 - (left_px + j) for j in range(16)]
    assert D.sdxl_time_ids(img.size, 16, crop=(0.0, 0.25)) == [16.0, 40.0, 0.0, float(left_px), 16.0, 16.0]
    assert D.sdxl_time_ids(img.size, 16) == [16.0, 40.0, 0.0, 12.0, 16.0, 16.0]


def test_augment_draws_once_per_row_from_the_seed():
    assert D.Augment().draw(3) == (False, None) and not D.Augment().active
    flips = [D.Augment(flip=True, seed=0).draw(r)[0] for r in range(400)]
    assert 150 < sum(flips) < 250  # p = 1/2
    assert [D.Augment(flip=True, seed=0).draw(r) for r in range(5)] == [D.Augment(flip=True).draw(r) for r in range(5)]
    assert flips != [D.Augment(flip=True, seed=1).draw(r)[0] for r in range(400)]
    crops = {D.Augment(crop=True).draw(r)[1] for r in range(50)}
    assert len(crops) == 50 and all(0 <= a < 1 and 0 <= b < 1 for a, b in crops)
    assert all(not D.Augment(crop=True).draw(r)[0] for r in range(50))  # no flip unless asked
