"""Training data: (image, caption) sources, preference pairs and prompt files.

Sources (``DataConfig.path``), detected in this order:

* a ``datasets`` folder written by ``save_to_disk`` (``dataset_info.json`` / ``state.json`` /
  ``dataset_dict.json``; a DatasetDict uses its ``train`` split);
* an image folder with ``metadata.jsonl`` or ``metadata.csv`` whose rows name a ``file_name`` (relative to
  the folder) and a caption;
* parquet / arrow file(s): one file, a folder of ``*.parquet`` / ``*.arrow`` or a glob (in a folder laid out as
  the Hub lays datasets out, the files of ``DataConfig.split``);
* a Hub dataset id (``yuvalkirstain/pickapic_v2``): the parquet files of ``DataConfig.split``, downloaded into
  (or, offline, read from) the Hugging Face cache.

The image column may be an ``Image()`` feature, a ``{"bytes", "path"}`` dict, raw bytes or a file path.
Parquet is read through ``datasets`` (converted once to its memory-mapped arrow cache) or, with
``DataConfig.streaming``, in place row group by row group (no copy; shards larger than memory).

``DataConfig.builtin == "shapes"`` is the procedural demo world instead of a path.

Captions are read and checked when the source is loaded; images are decoded only when asked for, so an
unreadable file surfaces as a :class:`SpinDiffusionError` naming it when ``image(i)`` is called (the cache
builder in spin_diffusion.cache calls it for every example once).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from spin_diffusion import hub
from spin_diffusion.config import DataConfig
from spin_diffusion.errors import SpinDiffusionError, one_line

CAPTION_FALLBACKS = ("text", "caption", "prompt")  # tried after DataConfig.caption_column, in this order
PROMPT_COLUMNS = ("prompt", "caption", "text")  # load_prompts: first one present wins
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGEFOLDER_COLUMN = "file_name"
PICKAPIC_COLUMNS = ("jpg_0", "jpg_1", "label_0")  # label_0 == 1 -> jpg_0 preferred; 0.5 = tie (dropped)

_DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


# ---------------------------------------------------------------------------------------------------------------
# Images


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are composited on white (not black, which is what convert('RGB') gives)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open_image(src: Path | bytes, where: str) -> Image.Image:
    if isinstance(src, Path) and not src.is_file():
        raise SpinDiffusionError(f"image file not found: {src} ({where}); restore the file or fix the reference")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))  # camera photos: apply the EXIF orientation
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        what = str(src) if isinstance(src, Path) else "bytes"
        raise SpinDiffusionError(
            f"cannot read image {what} ({where}): {one_line(err)}; replace the file or remove its row"
        ) from err


def _decode_cell(value: Any, base_dir: Path | None, where: str) -> Image.Image:
    """A table cell -> RGB image. Cells: PIL image, {"bytes", "path"} dict, bytes, or a path string."""

    def from_path(p: str | os.PathLike) -> Image.Image:
        path = Path(p).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return _open_image(path, where)

    if isinstance(value, Image.Image):
        return _to_rgb(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return _open_image(bytes(value["bytes"]), where)
        if value.get("path"):
            return from_path(value["path"])
        raise SpinDiffusionError(f"{where} has an empty image (no bytes and no path); fill it in or remove the row")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open_image(bytes(value), where)
    if isinstance(value, (str, os.PathLike)):
        if not str(value).strip():
            raise SpinDiffusionError(f"{where} has an empty image path; fill it in or remove the row")
        return from_path(value)
    if value is None:
        raise SpinDiffusionError(f"{where} has no image; fill it in or remove the row")
    raise SpinDiffusionError(
        f"{where} holds a {type(value).__name__}, not an image; expected an Image feature, bytes or a file path"
    )


@dataclass(frozen=True)
class Augment:
    """The anchors' augmentations of a real image (``data.random_flip``, ``data.random_crop``), drawn once per row
    from ``(seed, row)``: the cache encodes each row once, and at the paper's scale a run visits a row about once,
    so one draw per row has the distribution of one draw per visit. Every image of a row (a DPO pair's winner and
    loser) gets the same draw, as Diffusion-DPO flips and crops the two together."""

    flip: bool = False
    crop: bool = False
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.flip or self.crop

    def draw(self, row: int) -> tuple[bool, tuple[float, float] | None]:
        """(mirror the image?, the crop's (top, left) as fractions of the slack; None = center crop)."""
        if not self.active:
            return False, None
        u = np.random.default_rng([self.seed, row]).random(3)
        return bool(self.flip and u[0] < 0.5), ((float(u[1]), float(u[2])) if self.crop else None)


def _resized(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to ``resolution``."""
    w, h = size
    if min(w, h) == resolution:
        return w, h
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def _crop_offsets(resized: tuple[int, int], resolution: int, crop: tuple[float, float] | None) -> tuple[int, int]:
    """(top, left) of the R x R crop in the resized (and, when flipped, mirrored) image: centered, or at fractions
    ``crop`` of the slack (uniform over the whole pixels of it, as torchvision's RandomCrop draws)."""
    w, h = resized
    if crop is None:
        return int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    return min(int(crop[0] * (h - resolution + 1)), h - resolution), min(
        int(crop[1] * (w - resolution + 1)), w - resolution
    )


def sdxl_time_ids(size: tuple[int, int], resolution: int, *, crop: tuple[float, float] | None = None) -> list[float]:
    """SDXL's micro-conditioning of an image of ``size`` (w, h) prepared by :func:`image_to_tensor` with the same
    ``crop``: original (h, w), the crop's top-left (y, x) in resized pixels, target (R, R) — as diffusers' SDXL
    training scripts record it (after a flip, in the mirrored image, as they do)."""
    w, h = size
    top, left = _crop_offsets(_resized(size, resolution), resolution, crop)
    return [float(h), float(w), float(top), float(left), float(resolution), float(resolution)]


def image_to_tensor(
    img: Image.Image, resolution: int, *, flip: bool = False, crop: tuple[float, float] | None = None
) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (bicubic, antialiased), mirror it if ``flip``, crop ``R x R``
    (centered, or at fractions ``crop`` of the slack: :class:`Augment`) -> ``[3, R, R]`` in [-1, 1]."""
    if resolution < 1:
        raise SpinDiffusionError(f"resolution must be >= 1, got {resolution}")
    img = _to_rgb(img) if img.mode != "RGB" else img
    size = _resized(img.size, resolution)
    if size != img.size:
        img = img.resize(size, resample=Image.Resampling.BICUBIC)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = _crop_offsets(size, resolution, crop)
    if size != (resolution, resolution):
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.array(img, dtype=np.uint8)  # [H, W, 3], a copy (writable)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Tables: rows of one source with lazily decoded image cells


def _stat(path: Path, where: str) -> list[Any]:
    try:
        st = path.stat()
    except OSError:
        raise SpinDiffusionError(
            f"image file not found: {path} ({where}); restore the file or fix the reference"
        ) from None
    return [str(path), st.st_size, st.st_mtime_ns]


class _Table:
    name: str
    columns: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def where(self, row: int) -> str:
        raise NotImplementedError

    def values(self, column: str) -> list[Any]:
        """Every value of a (small, non-image) column, eagerly."""
        raise NotImplementedError

    def image(self, column: str, row: int) -> Image.Image:
        raise NotImplementedError

    def check_images_present(self, column: str, rows: Sequence[int]) -> None:
        """Cheap eager check that image references exist (metadata files only)."""

    def identity(self, cells: Sequence[tuple[str, int]]) -> Any:
        """JSON-able identity of the source data behind these image cells."""
        raise NotImplementedError


class _MetadataTable(_Table):
    """An image folder: rows of metadata.jsonl / metadata.csv; image cells are file names relative to `root`."""

    def __init__(self, meta_path: Path) -> None:
        self.root = meta_path.parent
        self.meta_path = meta_path
        self.name = str(meta_path)
        self.rows: list[dict[str, Any]] = []
        self.lines: list[int] = []
        columns: dict[str, None] = {}
        if meta_path.suffix.lower() == ".jsonl":
            with open(meta_path, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SpinDiffusionError(
                            f"{meta_path}: line {lineno} is not valid JSON ({err.msg}); write one JSON object per line"
                        ) from None
                    if not isinstance(obj, dict):
                        raise SpinDiffusionError(
                            f"{meta_path}: line {lineno} is not a JSON object; write one object per line, "
                            'e.g. {"file_name": "0.png", "text": "a red circle"}'
                        )
                    self.rows.append(obj)
                    self.lines.append(lineno)
                    columns.update(dict.fromkeys(obj))
        else:
            with open(meta_path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                columns.update(dict.fromkeys(c for c in reader.fieldnames or [] if c))
                for row in reader:
                    self.rows.append({k: v for k, v in row.items() if k is not None})
                    self.lines.append(reader.line_num)
        self.columns = list(columns)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, row: int) -> str:
        return f"line {self.lines[row]} of {self.meta_path}"

    def values(self, column: str) -> list[Any]:
        return [row.get(column) for row in self.rows]

    def _ref(self, column: str, row: int) -> str:
        value = self.rows[row].get(column)
        if value is None or not str(value).strip():
            raise SpinDiffusionError(
                f"{self.where(row)} has no '{column}'; give every row the image file name (relative to {self.root})"
            )
        return str(value)

    def check_images_present(self, column: str, rows: Sequence[int]) -> None:
        for r in rows:
            path = self.root / self._ref(column, r)
            if not path.is_file():
                raise SpinDiffusionError(
                    f"image file not found: {path} ({self.where(r)}); restore the file or fix the reference"
                )

    def image(self, column: str, row: int) -> Image.Image:
        return _decode_cell(self._ref(column, row), self.root, self.where(row))

    def identity(self, cells: Sequence[tuple[str, int]]) -> Any:
        files = {}
        for column, row in cells:
            ref = self._ref(column, row)
            if ref not in files:
                files[ref] = _stat(self.root / ref, self.where(row))[1:]
        return {"kind": "imagefolder", "root": str(self.root.resolve()), "files": sorted(files.items())}


class _DatasetTable(_Table):
    """A `datasets.Dataset` (from save_to_disk, parquet or arrow); `files` are the source files on disk."""

    def __init__(self, ds: Any, name: str, base_dir: Path, files: list[Path]) -> None:
        self.ds = ds
        self.name = name
        self.base_dir = base_dir
        self.files = files
        self.columns = list(ds.column_names)
        self._image_views: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.ds)

    def where(self, row: int) -> str:
        return f"row {row} of {self.name}"

    def values(self, column: str) -> list[Any]:
        table = self.ds.select_columns([column]).with_format("arrow")[:]
        return table.column(column).to_pylist()

    def image(self, column: str, row: int) -> Image.Image:
        view = self._image_views.get(column)
        if view is None:
            import datasets

            view = self.ds.select_columns([column])
            if isinstance(view.features[column], datasets.Image):
                view = view.cast_column(column, datasets.Image(decode=False))  # decode here: errors name the row
            self._image_views[column] = view
        return _decode_cell(view[row][column], self.base_dir, f"{self.where(row)}, column '{column}'")

    def identity(self, cells: Sequence[tuple[str, int]]) -> Any:
        return {"kind": "datasets", "files": [_stat(f, self.name) for f in self.files]}


class _ParquetTable(_Table):
    """Parquet files read in place, row group by row group (``data.streaming``): nothing is converted to an arrow
    cache, and at most one row group of one image column is in memory. Rows are numbered across the files in order.
    """

    def __init__(self, files: list[Path], name: str, base_dir: Path) -> None:
        import pyarrow.parquet as pq

        self.files, self.name, self.base_dir = files, name, base_dir
        self._starts: list[int] = []  # first row of each (file, row group), in order
        self._groups: list[tuple[int, int]] = []
        total, self.columns = 0, []
        for i, f in enumerate(files):
            try:
                pf = pq.ParquetFile(f)
                meta, names = pf.metadata, pf.schema_arrow.names
            except Exception as err:  # noqa: BLE001 - any reader failure is a bad input file
                raise SpinDiffusionError(f"cannot read parquet file {f}: {one_line(err)}; check the file") from err
            if i == 0:
                self.columns = names
            elif names != self.columns:
                raise SpinDiffusionError(
                    f"{f} has columns {', '.join(names)}, but {files[0]} has {', '.join(self.columns)}; "
                    "give files of one dataset"
                )
            for g in range(meta.num_row_groups):
                self._starts.append(total)
                self._groups.append((i, g))
                total += meta.row_group(g).num_rows
        self._len = total
        self._loaded: dict[str, tuple[int, list[Any]]] = {}  # column -> (group index, its cells)

    def __len__(self) -> int:
        return self._len

    def where(self, row: int) -> str:
        return f"row {row} of {self.name}"

    def values(self, column: str) -> list[Any]:
        import pyarrow.parquet as pq

        return [v for f in self.files for v in pq.read_table(f, columns=[column]).column(column).to_pylist()]

    def image(self, column: str, row: int) -> Image.Image:
        import bisect

        import pyarrow.parquet as pq

        group = bisect.bisect_right(self._starts, row) - 1
        if self._loaded.get(column, (-1, None))[0] != group:
            file, g = self._groups[group]
            cells = pq.ParquetFile(self.files[file]).read_row_group(g, columns=[column]).column(column).to_pylist()
            self._loaded[column] = (group, cells)
        cell = self._loaded[column][1][row - self._starts[group]]
        return _decode_cell(cell, self.base_dir, f"{self.where(row)}, column '{column}'")

    def identity(self, cells: Sequence[tuple[str, int]]) -> Any:
        return {"kind": "datasets", "files": [_stat(f, self.name) for f in self.files]}


class _MemoryTable(_Table):
    """In-memory rows (the built-in demo world)."""

    def __init__(self, name: str, data: dict[str, list[Any]], identity: dict[str, Any]) -> None:
        self.name = name
        self.data = data
        self.columns = list(data)
        self._identity = identity

    def __len__(self) -> int:
        return len(next(iter(self.data.values()))) if self.data else 0

    def where(self, row: int) -> str:
        return f"example {row} of {self.name}"

    def values(self, column: str) -> list[Any]:
        return list(self.data[column])

    def image(self, column: str, row: int) -> Image.Image:
        return _decode_cell(self.data[column][row], None, self.where(row))

    def identity(self, cells: Sequence[tuple[str, int]]) -> Any:
        h = hashlib.sha256()
        for column, row in cells:
            img = self.image(column, row)
            h.update(f"{img.size}".encode())
            h.update(img.tobytes())
        return {"kind": "memory", **self._identity, "pixels": h.hexdigest()}


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _dataset_table(kind: str, files: list[Path], name: str, base_dir: Path, streaming: bool = False) -> _Table:
    if streaming and kind == "parquet":
        return _ParquetTable(files, name, base_dir)
    if streaming:
        raise SpinDiffusionError(f"data.streaming reads parquet files; {name} holds {kind} files (set it false)")
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad input file
        raise SpinDiffusionError(f"cannot read {kind} data {name}: {one_line(err)}; check the file(s)") from err
    return _DatasetTable(ds, name, base_dir, files)


def _saved_dataset_table(path: Path, split: str) -> _DatasetTable:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001
        raise SpinDiffusionError(
            f"cannot load the `datasets` folder {path}: {one_line(err)}; re-save it with save_to_disk"
        ) from err
    name = str(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split not in ds:
            raise SpinDiffusionError(
                f"the `datasets` folder {path} has no '{split}' split (splits: {', '.join(splits)}); "
                "set data.split to one of them"
            )
        ds, name = ds[split], f"{path} (split '{split}')"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return _DatasetTable(ds, name, path, files)


def _split_files(files: list[Path], directory: Path, split: str) -> list[Path]:
    """The files of one split in the Hub's layouts: data/<split>-00000-of-00010.parquet or <split>/*.parquet."""
    pattern = re.compile(rf"(^|/){re.escape(split)}([-_.]\d|[-.]|/)")
    return [f for f in files if pattern.search(f.relative_to(directory).as_posix())]


def _table_files_in(directory: Path, split: str = "train") -> list[Path]:
    """Parquet (else arrow) files in a folder; in nested layouts (data/train-*.parquet) those of ``split``."""
    for suffix in _TABLE_SUFFIXES:
        files = sorted(directory.glob(f"*{suffix}"))
        if not files:
            files = sorted(directory.rglob(f"*{suffix}"))
            files = _split_files(files, directory, split) or files
        if files:
            return files
    return []


def _open_table(cfg: DataConfig) -> _Table:
    if cfg.path is None:
        raise SpinDiffusionError(
            "no training data: set data.path (an image folder, a `datasets` folder or parquet/arrow files) "
            "or data.builtin: shapes"
        )
    text = os.path.expanduser(cfg.path)
    if _is_glob(text) and not Path(text).exists():
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise SpinDiffusionError(f"data.path {cfg.path} matches no files; fix the pattern")
        kinds = {_TABLE_SUFFIXES.get(f.suffix.lower()) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise SpinDiffusionError(f"data.path {cfg.path} must match only .parquet or only .arrow files")
        return _dataset_table(kinds.pop(), files, cfg.path, files[0].parent, cfg.streaming)
    path = Path(text)
    if not path.exists() and hub.is_hub_id(cfg.path):
        return _hub_table(cfg)
    if not path.exists():
        raise SpinDiffusionError(
            f"data.path not found: {path}; point it at an image folder, a `datasets` folder or parquet/arrow files"
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in _TABLE_SUFFIXES:
            return _dataset_table(_TABLE_SUFFIXES[suffix], [path], str(path), path.parent, cfg.streaming)
        if path.name in METADATA_FILES or suffix in (".jsonl", ".csv"):
            return _MetadataTable(path)
        raise SpinDiffusionError(
            f"data.path {path} is not a folder, .parquet, .arrow, .jsonl or .csv file; point it at your data"
        )
    if any((path / m).is_file() for m in _DATASETS_MARKERS):
        return _saved_dataset_table(path, cfg.split)
    for meta in METADATA_FILES:
        if (path / meta).is_file():
            return _MetadataTable(path / meta)
    files = _table_files_in(path, cfg.split)
    if files:
        kind = _TABLE_SUFFIXES[files[0].suffix.lower()]
        return _dataset_table(kind, files, str(path), path, cfg.streaming)
    raise SpinDiffusionError(
        f"no metadata.jsonl or metadata.csv in the image folder {path}; add one with a 'file_name' and a 'text' "
        "column per image (or point data.path at a `datasets` folder or parquet files)"
    )


def _hub_table(cfg: DataConfig) -> _Table:
    """A Hub dataset id: the parquet files of ``cfg.split`` (only those are downloaded), through the Hugging Face
    cache; read with ``datasets`` (memory-mapped arrow) or, with ``cfg.streaming``, in place row group by row group."""
    assert cfg.path is not None
    split = cfg.split
    patterns = [f"*{split}-*.parquet", f"*{split}_*.parquet", f"*{split}.parquet", f"*{split}/*.parquet"]
    folder = hub.resolve_repo(cfg.path, what="dataset", repo_type="dataset", allow_patterns=[*patterns, "*.md"])
    files = _split_files(sorted(folder.rglob("*.parquet")), folder, split)
    if not files:
        found = sorted({f.relative_to(folder).as_posix() for f in folder.rglob("*.parquet")})
        raise SpinDiffusionError(
            f"the dataset {cfg.path} has no parquet files of split '{split}' (found: {', '.join(found) or 'none'}); "
            "set data.split"
        )
    return _dataset_table("parquet", files, f"{cfg.path} (split '{split}')", folder, cfg.streaming)


def _check_max_samples(cfg: DataConfig) -> None:
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise SpinDiffusionError(f"data.max_samples must be >= 1 or null, got {cfg.max_samples}")


def _check_not_empty(table: _Table, rows: Sequence[int], what: str = "rows") -> None:
    if len(table) == 0:
        raise SpinDiffusionError(f"the dataset {table.name} is empty (0 rows); add examples or fix data.path")
    if not rows:
        raise SpinDiffusionError(f"the dataset {table.name} has no usable {what}; add examples or fix data.path")


def _column(table: _Table, preferred: str, fallbacks: Sequence[str], what: str, fix: str) -> str:
    tried = list(dict.fromkeys([preferred, *fallbacks]))
    for col in tried:
        if col in table.columns:
            return col
    raise SpinDiffusionError(
        f"no {what} column in {table.name}: tried {', '.join(tried)}; available columns: "
        f"{', '.join(table.columns) or '(none)'}; {fix}"
    )


AUTO_SKIP_ROWS = 10_000  # data.on_bad_example "auto": error below this many rows, skip from it on
SAMPLE_CHECK_ROWS = 16  # images decoded before any work starts (half the first rows, half spread over the rest)


def check_image_size(img: Image.Image, min_side: int, where: str) -> Image.Image:
    """`img`, or a SpinDiffusionError when its shorter side is below `min_side` pixels (data.min_image_side)."""
    if min(img.size) < min_side:
        raise SpinDiffusionError(
            f"{where}: the image is {img.size[0]}x{img.size[1]} px, smaller than data.min_image_side={min_side}; "
            "replace it, remove the row, or set data.on_bad_example=skip"
        )
    return img


def check_sample(source: CaptionedImages | PreferencePairs, *, policy: str, min_side: int) -> None:
    """Decode a sample of images before any expensive work. With policy "error" the first bad one stops the run;
    with "skip" only a sample in which nothing is readable does (a wrong column or path prefix, not dirt)."""
    n = len(source)
    half = SAMPLE_CHECK_ROWS // 2
    rows = sorted(set(range(min(n, half))) | {int(i) for i in np.linspace(0, n - 1, num=min(n, half))})
    readers = [source.winner, source.loser] if isinstance(source, PreferencePairs) else [source.image]
    errors = []
    for i in rows:
        for read in readers:
            try:
                check_image_size(read(i), min_side, source.where(i))
            except SpinDiffusionError as err:
                if policy == "error":
                    raise
                errors.append(str(err))
    if errors and len(errors) == len(rows) * len(readers):
        raise SpinDiffusionError(f"none of the {len(errors)} sampled images can be used; first: {errors[0]}")


def bad_example_policy(cfg: DataConfig, num_rows: int) -> str:
    """ "error" or "skip" for a source of `num_rows` rows (see DataConfig.on_bad_example)."""
    if cfg.on_bad_example != "auto":
        return cfg.on_bad_example
    return "skip" if num_rows >= AUTO_SKIP_ROWS else "error"


def _read_captions(
    table: _Table, column: str, rows: Sequence[int], skipped: list[dict[str, str]] | None = None
) -> list[str]:
    """Captions of `rows`, stripped; a list-valued cell (several captions per image) contributes its first one.
    A missing or empty caption raises, or with `skipped` given is appended there ({"where", "reason"}) and its
    row removed from `rows` (which must then be a list)."""
    values = table.values(column)
    captions, kept = [], []
    for r in rows:
        value = values[r]
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        text = "" if value is None else str(value).strip()
        if not text:
            reason = f"{table.where(r)} has {'no' if value is None else 'an empty'} caption ('{column}')"
            if skipped is None:
                raise SpinDiffusionError(f"{reason}; write one or remove the row")
            skipped.append({"where": table.where(r), "reason": reason})
            continue
        captions.append(text)
        kept.append(r)
    if skipped is not None:
        rows[:] = kept  # type: ignore[index]
    return captions


def _present_rows(table: _Table, column: str, rows: list[int], skipped: list[dict[str, str]] | None) -> list[int]:
    """`rows` whose image reference exists; a missing one raises, or is listed in `skipped` and left out."""
    if skipped is None:
        table.check_images_present(column, rows)
        return rows
    kept = []
    for r in rows:
        try:
            table.check_images_present(column, [r])
            kept.append(r)
        except SpinDiffusionError as err:
            skipped.append({"where": table.where(r), "reason": str(err)})
    return kept


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# (image, caption) sources


@dataclass(eq=False)
class CaptionedImages:
    """An (image, caption) source. Captions are in memory (checked at load); images are decoded on demand."""

    name: str
    captions: list[str]
    _table: _Table = field(repr=False)
    _column: str = field(repr=False)
    _rows: list[int] = field(repr=False)
    skipped: list[dict[str, str]] = field(default_factory=list)  # rows left out at load (on_bad_example=skip)

    def __len__(self) -> int:
        return len(self._rows)

    def caption(self, i: int) -> str:
        return self.captions[i]

    def image(self, i: int) -> Image.Image:
        """RGB image of example `i`; unreadable -> SpinDiffusionError naming the file/row."""
        return self._table.image(self._column, self._rows[i])

    def where(self, i: int) -> str:
        """Where example `i` comes from (file line or table row), for messages."""
        return self._table.where(self._rows[i])

    def fingerprint(self) -> str:
        """Stable hash of the data: source files (paths, sizes, mtimes) or pixels, the rows used and captions."""
        cells = [(self._column, r) for r in self._rows]
        return _digest(
            {
                "type": "captioned_images",
                "source": self._table.identity(cells),
                "column": self._column,
                "rows": self._rows,
                "captions": self.captions,
            }
        )


def _builtin_images(cfg: DataConfig, seed: int) -> CaptionedImages:
    if cfg.builtin != "shapes":
        raise SpinDiffusionError(f"unknown data.builtin {cfg.builtin!r}; the built-in dataset is 'shapes'")
    if cfg.num_builtin < 1:
        raise SpinDiffusionError(f"data.num_builtin must be >= 1, got {cfg.num_builtin}")
    from spin_diffusion.world import make_examples

    n = cfg.num_builtin if cfg.max_samples is None else min(cfg.num_builtin, cfg.max_samples)
    examples = make_examples(n, seed=seed)  # a shorter list is a prefix of a longer one
    name = f"builtin:shapes(n={cfg.num_builtin}, seed={seed})"
    table = _MemoryTable(
        name,
        {"image": [img for img, _ in examples], "text": [cap for _, cap in examples]},
        {"builtin": "shapes", "n": n, "seed": seed},
    )
    rows = list(range(len(table)))
    _check_not_empty(table, rows)
    return CaptionedImages(name, _read_captions(table, "text", rows), table, "image", rows)


def load_captioned_images(cfg: DataConfig, *, seed: int = 0) -> CaptionedImages:
    """The (image, caption) source described by ``cfg`` (``seed`` only affects ``builtin: shapes``)."""
    _check_max_samples(cfg)
    if cfg.builtin is not None:
        return _builtin_images(cfg, seed)
    table = _open_table(cfg)
    rows = list(range(len(table)))[: cfg.max_samples]
    _check_not_empty(table, rows)
    if isinstance(table, _MetadataTable):
        if IMAGEFOLDER_COLUMN not in table.columns:
            raise SpinDiffusionError(
                f"{table.name} has no '{IMAGEFOLDER_COLUMN}' column (columns: {', '.join(table.columns)}); "
                "add the image file name of every row"
            )
        image_column = IMAGEFOLDER_COLUMN
    else:
        image_column = _column(table, cfg.image_column, (), "image", "set data.image_column")
    caption_column = _column(table, cfg.caption_column, CAPTION_FALLBACKS, "caption", "set data.caption_column")
    skipped: list[dict[str, str]] | None = [] if bad_example_policy(cfg, len(rows)) == "skip" else None
    rows = _present_rows(table, image_column, rows, skipped)
    captions = _read_captions(table, caption_column, rows, skipped)
    _check_not_empty(table, rows, "usable rows")
    return CaptionedImages(table.name, captions, table, image_column, rows, skipped or [])


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs (Diffusion-DPO)


@dataclass(eq=False)
class PreferencePairs:
    """(caption, winner image, loser image) triples; images are decoded on demand."""

    name: str
    captions: list[str]
    _table: _Table = field(repr=False)
    _rows: list[int] = field(repr=False)
    _columns: tuple[str, str] = field(repr=False)  # (first, second) image columns
    _swapped: list[bool] = field(repr=False)  # True: the second column holds the winner in that row
    skipped: list[dict[str, str]] = field(default_factory=list)  # rows left out at load (none today)

    def __len__(self) -> int:
        return len(self._rows)

    def caption(self, i: int) -> str:
        return self.captions[i]

    def _cols(self, i: int) -> tuple[str, str]:
        first, second = self._columns
        return (second, first) if self._swapped[i] else (first, second)

    def winner(self, i: int) -> Image.Image:
        return self._table.image(self._cols(i)[0], self._rows[i])

    def loser(self, i: int) -> Image.Image:
        return self._table.image(self._cols(i)[1], self._rows[i])

    def where(self, i: int) -> str:
        return self._table.where(self._rows[i])

    def fingerprint(self) -> str:
        cells = []
        for i, r in enumerate(self._rows):
            w, lo = self._cols(i)
            cells += [(w, r), (lo, r)]
        return _digest(
            {
                "type": "preference_pairs",
                "source": self._table.identity(cells),
                "columns": list(self._columns),
                "rows": self._rows,
                "swapped": self._swapped,
                "captions": self.captions,
            }
        )


def load_preference_pairs(cfg: DataConfig) -> PreferencePairs:
    """Caption + winner + loser per row: columns ``cfg.winner_column`` / ``cfg.loser_column`` (file names in an
    image folder), or the Pick-a-Pic layout (``jpg_0``, ``jpg_1``, ``label_0``; ties ``label_0 == 0.5`` dropped)."""
    _check_max_samples(cfg)
    if cfg.builtin is not None:
        raise SpinDiffusionError("preference pairs need data.path (the built-in shapes world has no pairs)")
    table = _open_table(cfg)
    columns = table.columns
    if cfg.winner_column in columns and cfg.loser_column in columns:
        pair_columns = (cfg.winner_column, cfg.loser_column)
        rows = list(range(len(table)))
        swapped = [False] * len(rows)
    elif all(c in columns for c in PICKAPIC_COLUMNS):
        pair_columns = ("jpg_0", "jpg_1")
        rows, swapped = [], []
        for r, label in enumerate(table.values("label_0")):
            try:
                label = float(label)
            except (TypeError, ValueError):
                raise SpinDiffusionError(
                    f"{table.where(r)} has label_0={label!r}; Pick-a-Pic labels must be 0, 0.5 or 1"
                ) from None
            if label == 0.5:
                continue  # tie: no preference
            rows.append(r)
            swapped.append(label < 0.5)  # label_0 == 0 -> jpg_1 wins
    else:
        raise SpinDiffusionError(
            f"no preference columns in {table.name}: expected '{cfg.winner_column}' and '{cfg.loser_column}' "
            f"(data.winner_column / data.loser_column) or Pick-a-Pic's {', '.join(PICKAPIC_COLUMNS)}; "
            f"available columns: {', '.join(columns) or '(none)'}"
        )
    rows, swapped = rows[: cfg.max_samples], swapped[: cfg.max_samples]
    _check_not_empty(table, rows, "preference pairs (ties are dropped)")
    caption_column = _column(table, cfg.caption_column, CAPTION_FALLBACKS, "caption", "set data.caption_column")
    for col in pair_columns:
        table.check_images_present(col, rows)
    captions = _read_captions(table, caption_column, rows)
    return PreferencePairs(table.name, captions, table, rows, pair_columns, swapped)


# ---------------------------------------------------------------------------------------------------------------
# Prompt files


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from .txt (one per line; blank lines skipped) or .csv / .jsonl / .parquet (column "prompt", else
    "caption", else "text"; empty cells skipped). A glob pattern reads every file it matches, in sorted order
    (a Hub split's shards: ``pickapic_v2/data/test_unique-*.parquet``)."""
    p = Path(path).expanduser()
    if not p.exists() and _is_glob(str(p)):
        files = sorted(glob.glob(str(p)))
        if not files:
            raise SpinDiffusionError(f"prompt files not found: {p} matches nothing")
        return [prompt for f in files for prompt in load_prompts(f)]
    if not p.is_file():
        raise SpinDiffusionError(f"prompt file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        values: list[Any] = p.read_text(encoding="utf-8-sig").splitlines()
    elif suffix in (".csv", ".jsonl"):
        table = _MetadataTable(p)
        values = table.values(
            _column(table, PROMPT_COLUMNS[0], PROMPT_COLUMNS[1:], "prompt", "name the column 'prompt'")
        )
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(p).names
        except Exception as err:  # noqa: BLE001
            raise SpinDiffusionError(f"cannot read the parquet prompt file {p}: {one_line(err)}") from err
        col = next((c for c in PROMPT_COLUMNS if c in names), None)
        if col is None:
            raise SpinDiffusionError(
                f"no prompt column in {p}: tried {', '.join(PROMPT_COLUMNS)}; available columns: {', '.join(names)}"
            )
        values = pq.read_table(p, columns=[col]).column(col).to_pylist()
    else:
        raise SpinDiffusionError(f"unsupported prompt file {p}: use .txt, .csv, .jsonl or .parquet")
    prompts = [text for text in (str(v).strip() for v in values if v is not None) if text]
    if not prompts:
        raise SpinDiffusionError(f"no prompts in {p}; write at least one non-empty prompt")
    return prompts
