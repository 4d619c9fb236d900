"""Turn downloaded Pick-a-Pic v2 parquet shards into a dataset the trainer reads (`spin-diffusion prepare pickapic`).

One job: stream the shards (only the needed columns, a few rows at a time: memory holds a batch of rows and a page of
each input column, and does not grow with the number or size of the shards; only the set of unique captions grows),
drop ties and bad rows, copy the kept JPEG bytes unchanged (each checked to decode) and write

* ``out/train-00000.parquet``, ... : ``text`` + ``image`` (``keep="winners"``, the preferred image; the trainer's
  default data.caption_column / data.image_column) or ``text`` + ``winner`` + ``loser`` (``keep="pairs"``, the
  Diffusion-DPO defaults data.winner_column / data.loser_column);
* ``out/skipped.jsonl``: one ``{"shard", "row", "reason"}`` line per corrupt row or unreadable shard;
* ``out/prepare.json``: the summary, the options and the inputs (written last: a folder without it is unfinished).

Every row ends in exactly one of: corrupt (checked in this order: caption, label, then - for rows that are not
dropped as ties or same-image pairs - the kept images), tie dropped, same images dropped (pairs only), kept.
So ``pairs_read == corrupt_rows + kept_rows + (ties if drop_ties) + (same_images if keep == "pairs")``. A shard
that fails part-way is counted in ``shards_unreadable``; the rows read from it before the failure are kept.

A wrong input (a missing path, a shard without a needed column, a non-empty ``out``) is a SpinDiffusionError before
anything is written; if the run stops later (``on_bad_example="error"``, Ctrl-C) the files it wrote are removed.
The library prints nothing; it returns a :class:`PrepareSummary`.
"""

from __future__ import annotations

import array
import glob
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spin_diffusion import atomic
from spin_diffusion.errors import SpinDiffusionError, one_line

KEEP_MODES = ("winners", "pairs")
BAD_EXAMPLE_POLICIES = ("skip", "error")
NEEDED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")  # label_0 == 1 -> jpg_0 preferred; 0.5 = tie
OPTIONAL_COLUMNS = ("are_different",)  # False: jpg_0 and jpg_1 are the same image
LABELS = (0.0, 0.5, 1.0)
DEFAULT_ROWS_PER_SHARD = 10_000

READ_BATCH_ROWS = 32  # rows decoded from a shard at a time (Pick-a-Pic rows hold ~2 x 150-400 KB of JPEG)
READ_BUFFER_BYTES = 1 << 20  # read column chunks through a 1 MiB buffer (and no pre-buffering of row groups)
WRITE_GROUP_ROWS = 100  # rows per output row group ...
WRITE_GROUP_BYTES = 64 << 20  # ... or fewer, once the buffered images reach this size
WRITE_PAGE_ROWS = 8  # rows written per step; a page closes after the step that passes 1 MiB
OUTPUT_PATTERN = "train-{:05d}.parquet"
SKIPPED_FILE = "skipped.jsonl"
SUMMARY_FILE = "prepare.json"

Keep = Literal["winners", "pairs"]
BadExamplePolicy = Literal["skip", "error"]


@dataclass
class PrepareSummary:
    """What `prepare_pickapic` read, dropped and wrote."""

    out: str
    keep: str
    drop_ties: bool
    shards_read: int = 0  # shards read to the end
    shards_unreadable: int = 0  # not parquet, truncated, or failing part-way (see skipped.jsonl)
    pairs_read: int = 0  # rows read from the shards
    ties: int = 0  # label_0 == 0.5 (dropped unless drop_ties=False)
    same_images: int = 0  # are_different == false: dropped with keep="pairs", kept (and counted) with "winners"
    corrupt_rows: int = 0  # undecodable image, missing/empty caption, label not 0/0.5/1 (see skipped.jsonl)
    kept_rows: int = 0
    unique_captions: int = 0  # among the kept rows
    output_shards: int = 0
    columns: list[str] = field(default_factory=list)  # of the output shards

    @property
    def skipped_file(self) -> Path:
        return Path(self.out) / SKIPPED_FILE


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def expand_inputs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Paths and glob patterns -> shard paths (a pattern's matches sorted; duplicates dropped, order kept).
    A pattern that matches no file is a SpinDiffusionError; plain paths are checked by `prepare_pickapic`."""
    paths: list[Path] = []
    for pattern in patterns:
        text = os.path.expanduser(str(pattern))
        if _has_glob(text) and not Path(text).exists():
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise SpinDiffusionError(f"input pattern {pattern} matches no files; fix the pattern")
            paths += matches
        else:
            paths.append(Path(text))
    return list(dict.fromkeys(paths))


def _check_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    if not inputs:
        raise SpinDiffusionError("no input shards; pass the downloaded Pick-a-Pic parquet files")
    paths = list(dict.fromkeys(Path(os.path.expanduser(str(p))) for p in inputs))
    for path in paths:
        if path.is_dir():
            raise SpinDiffusionError(
                f"input {path} is a folder; pass its shards, e.g. '{path}/train-*.parquet' (a Hub download also holds "
                "test and validation shards)"
            )
        if not path.is_file():
            raise SpinDiffusionError(f"input shard not found: {path}; check the path")
    return paths


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SpinDiffusionError(f"--out {out} is a file; choose a folder that does not exist yet")
    if out.is_dir() and any(out.iterdir()):
        raise SpinDiffusionError(
            f"--out {out} exists and is not empty; choose a new folder or empty it (nothing is overwritten)"
        )


def _type_ok(column: str, typ: pa.DataType) -> bool:
    if column in ("jpg_0", "jpg_1"):
        if pa.types.is_struct(typ):  # a `datasets` Image() feature: {"bytes", "path"}
            return any(typ.field(i).name == "bytes" for i in range(typ.num_fields))
        return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_binary_view(typ)
    if column == "caption":
        return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)
    if column == "label_0":
        return pa.types.is_floating(typ) or pa.types.is_integer(typ)
    if column == "are_different":
        return pa.types.is_boolean(typ)
    return True


def _shard_columns(path: Path, schema: pa.Schema) -> list[str]:
    """The columns to read from a shard; a missing or mistyped needed column is a SpinDiffusionError."""
    names = schema.names
    missing = [c for c in NEEDED_COLUMNS if c not in names]
    if missing:
        raise SpinDiffusionError(
            f"shard {path} has no column {', '.join(missing)}: found {', '.join(names) or '(none)'}; needed "
            f"{', '.join(NEEDED_COLUMNS)} (is it a Pick-a-Pic v2 shard?)"
        )
    columns = [*NEEDED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in names)]
    for column in columns:
        typ = schema.field(column).type
        if not _type_ok(column, typ):
            raise SpinDiffusionError(
                f"shard {path}: column '{column}' has type {typ}, not what Pick-a-Pic v2 stores "
                "(caption: string, jpg_0/jpg_1: binary, label_0: float, are_different: bool); check the file"
            )
    return columns


# ---------------------------------------------------------------------------------------------------------------
# Rows


class _ShardFailed(Exception):
    """A shard could not be opened or failed part-way; `row` is the first row not read."""

    def __init__(self, row: int, err: BaseException) -> None:
        super().__init__(one_line(err))
        self.row = row


def _rows(path: Path, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index in the shard, {column: value}) for every row, READ_BATCH_ROWS rows in memory at a time."""
    try:
        pf = pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise _ShardFailed(0, err) from err
    row = 0
    with pf:
        batches = pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns, use_threads=False)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as err:
                raise _ShardFailed(row, err) from err
            values = {c: batch.column(c).to_pylist() for c in columns}
            del batch
            for i in range(len(values["caption"])):
                yield row, {c: values[c][i] for c in columns}
                row += 1


def _label(value: Any) -> float | None:
    """label_0 as 0.0 / 0.5 / 1.0, or None when it is anything else."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        label = float(value)
    except (TypeError, ValueError):
        return None
    return label if not math.isnan(label) and label in LABELS else None


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # {"bytes", "path"}
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) and len(value) else None


def undecodable(data: bytes) -> str | None:
    """Why `data` cannot be decoded as an image (one line), or None when it can.

    `Image.verify()` is not enough: for JPEG it only reads the headers, so truncated bytes pass it. This decodes
    the whole entropy-coded stream (where truncation and garbage show up) but, for JPEG, at 1/8 scale
    (``draft``), which skips most of the pixel work."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft(None, (1, 1))
            img.load()
    except Image.UnidentifiedImageError:
        return "not an image in any format PIL reads"
    except Exception as err:  # noqa: BLE001 - any decoder failure means the trainer cannot read it either
        return f"{type(err).__name__}: {one_line(err)}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Output


class _ShardWriter:
    """Writes rows to out/train-NNNNN.parquet, `rows_per_shard` rows each, in small row groups; each shard is
    written as ``<name>.tmp`` and moved into place when full or at `close`."""

    def __init__(self, out: Path, schema: pa.Schema, rows_per_shard: int) -> None:
        self.out = out
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.written: list[Path] = []  # finished shards
        self._buffer: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._buffered_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._rows_in_shard = 0

    def add(self, row: dict[str, Any]) -> None:
        for name, value in row.items():
            self._buffer[name].append(value)
            if isinstance(value, bytes):
                self._buffered_bytes += len(value)
        buffered = len(self._buffer["text"])
        room = self.rows_per_shard - self._rows_in_shard
        if buffered >= min(WRITE_GROUP_ROWS, room) or self._buffered_bytes >= WRITE_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer["text"]:
            return
        table = pa.Table.from_batches([_record_batch(self._buffer, self.schema)])
        self._buffer = {name: [] for name in self.schema.names}
        self._buffered_bytes = 0
        if self._writer is None:
            target = self.out / OUTPUT_PATTERN.format(len(self.written))
            self._tmp = target.with_name(target.name + ".tmp")
            text_columns = [f.name for f in self.schema if pa.types.is_string(f.type)]
            self._writer = pq.ParquetWriter(
                self._tmp,
                self.schema,
                compression="zstd",
                use_dictionary=text_columns,  # never try to build a dictionary of JPEG bytes
                write_statistics=text_columns,  # nor put min/max JPEGs in the footer
                write_batch_size=WRITE_PAGE_ROWS,  # small pages: a reader holds a page of a column at a time
            )
        self._writer.write_table(table)
        self._rows_in_shard += table.num_rows
        if self._rows_in_shard >= self.rows_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._writer is not None and self._tmp is not None
        self._writer.close()
        target = self._tmp.with_name(self._tmp.name.removesuffix(".tmp"))
        os.replace(self._tmp, target)
        self.written.append(target)
        self._writer, self._tmp, self._rows_in_shard = None, None, 0

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._finish_shard()

    def abort(self) -> None:
        """Drop the shard being written (its .tmp file); finished shards are the caller's to remove."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the run is failing already; the file is removed next
                pass
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._writer, self._tmp = None, None


def _record_batch(columns: dict[str, list[Any]], schema: pa.Schema) -> pa.RecordBatch:
    """Arrow columns straight from the buffered values. Not `pa.array(list)`: the first call of that imports
    pandas (~60 MB of resident memory) and it converts element by element."""
    arrays = []
    for f in schema:
        values = columns[f.name]
        if pa.types.is_boolean(f.type):
            bits = bytearray((len(values) + 7) // 8)
            for i, v in enumerate(values):
                if v:
                    bits[i >> 3] |= 1 << (i & 7)
            buffers = [None, pa.py_buffer(bits)]
        else:  # string / binary: int32 offsets + the concatenated bytes (a buffer stays far below 2 GiB)
            data = [v.encode("utf-8") for v in values] if pa.types.is_string(f.type) else values
            offsets = array.array("i", [0])
            for v in data:
                offsets.append(offsets[-1] + len(v))
            buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
        arrays.append(pa.Array.from_buffers(f.type, len(values), buffers))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _output_schema(keep: str, drop_ties: bool) -> pa.Schema:
    if keep == "winners":
        return pa.schema([("text", pa.string()), ("image", pa.binary())])
    fields = [("text", pa.string()), ("winner", pa.binary()), ("loser", pa.binary())]
    if not drop_ties:
        fields.append(("tie", pa.bool_()))  # ties are kept as (jpg_0, jpg_1); this marks them
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------------------------
# The job


def prepare_pickapic(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    keep: Keep = "winners",
    drop_ties: bool = True,
    on_bad_example: BadExamplePolicy = "skip",
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
) -> PrepareSummary:
    """Convert Pick-a-Pic v2 parquet shards (`inputs`, in this order) into training shards in the new folder `out`.

    ``keep="winners"``: ``text`` + ``image`` (the preferred image) per pair, for SFT / SPIN.
    ``keep="pairs"``: ``text`` + ``winner`` + ``loser``, for Diffusion-DPO; pairs whose two images are the same
    (are_different == false) are dropped. Ties (label_0 == 0.5) are dropped, as Diffusion-DPO does; with
    ``drop_ties=False`` (pairs only: a tie has no preferred image) they are kept as winner=jpg_0, loser=jpg_1 with
    ``tie`` = true. ``on_bad_example="skip"`` lists corrupt rows and unreadable shards in out/skipped.jsonl;
    ``"error"`` stops at the first one with a SpinDiffusionError naming the shard and row."""
    if keep not in KEEP_MODES:
        raise SpinDiffusionError(f"keep (--keep) must be one of {', '.join(KEEP_MODES)}, got {keep!r}")
    if on_bad_example not in BAD_EXAMPLE_POLICIES:
        raise SpinDiffusionError(
            f"on_bad_example (--on-bad-example) must be one of {', '.join(BAD_EXAMPLE_POLICIES)}, "
            f"got {on_bad_example!r}"
        )
    if not drop_ties and keep != "pairs":
        raise SpinDiffusionError(
            "keeping ties (--keep-ties) needs --keep pairs: a tie has no preferred image to keep as the winner"
        )
    if rows_per_shard < 1:
        raise SpinDiffusionError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    paths = _check_inputs(inputs)
    out = Path(os.path.expanduser(str(out)))
    _check_out(out)

    # Read every footer first: a wrong input stops the run before anything is written.
    columns: dict[Path, list[str] | str] = {}  # the columns to read, or why the shard cannot be read
    for path in paths:
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as err:
            columns[path] = f"unreadable shard: {one_line(err)}"
            if on_bad_example == "error":
                raise SpinDiffusionError(
                    f"shard {path} cannot be read as parquet ({one_line(err)}); download it again, or pass "
                    "--on-bad-example skip to leave it out"
                ) from err
            continue
        columns[path] = _shard_columns(path, schema)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    schema = _output_schema(keep, drop_ties)
    summary = PrepareSummary(out=str(out), keep=keep, drop_ties=drop_ties, columns=list(schema.names))
    writer = _ShardWriter(out, schema, rows_per_shard)
    skipped_tmp = out / (SKIPPED_FILE + ".tmp")
    try:
        with skipped_tmp.open("w", encoding="utf-8") as skipped:
            _convert(paths, columns, writer, skipped, summary, keep, drop_ties, on_bad_example)
            writer.close()
        os.replace(skipped_tmp, out / SKIPPED_FILE)
        summary.output_shards = len(writer.written)
        atomic.write_json(
            out / SUMMARY_FILE,
            {
                "summary": asdict(summary),
                "options": {
                    "keep": keep,
                    "drop_ties": drop_ties,
                    "on_bad_example": on_bad_example,
                    "rows_per_shard": rows_per_shard,
                },
                "inputs": [str(p) for p in paths],
                "shards": [p.name for p in writer.written],
                "skipped": SKIPPED_FILE,
            },
        )
    except BaseException:
        writer.abort()
        for path in [*writer.written, skipped_tmp, out / SKIPPED_FILE]:
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return summary


def _convert(
    paths: list[Path],
    columns: dict[Path, list[str] | str],
    writer: _ShardWriter,
    skipped: TextIO,
    summary: PrepareSummary,
    keep: str,
    drop_ties: bool,
    on_bad_example: str,
) -> None:
    captions: set[bytes] = set()  # 16-byte digests of the kept captions: the only state that grows

    def skip(path: Path, row: int | None, reason: str) -> None:
        skipped.write(json.dumps({"shard": str(path), "row": row, "reason": reason}) + "\n")

    for path in paths:
        cols = columns[path]
        if isinstance(cols, str):
            summary.shards_unreadable += 1
            skip(path, None, cols)
            continue
        try:
            for row, record in _rows(path, cols):
                summary.pairs_read += 1
                kept = _keep_row(record, keep, drop_ties, summary)
                if isinstance(kept, str):  # corrupt
                    if on_bad_example == "error":
                        raise SpinDiffusionError(
                            f"shard {path}, row {row}: {kept}; fix or remove the row, or pass --on-bad-example skip"
                        )
                    summary.corrupt_rows += 1
                    skip(path, row, kept)
                elif kept is not None:
                    writer.add(kept)
                    summary.kept_rows += 1
                    captions.add(hashlib.blake2b(kept["text"].encode(), digest_size=16).digest())
        except _ShardFailed as err:
            if on_bad_example == "error":
                raise SpinDiffusionError(
                    f"shard {path} cannot be read from row {err.row} on ({err}); download it again, or pass "
                    "--on-bad-example skip to leave it out"
                ) from err
            summary.shards_unreadable += 1
            skip(path, err.row, f"unreadable shard from this row on: {err}")
            continue
        summary.shards_read += 1
    summary.unique_captions = len(captions)


def _keep_row(record: dict[str, Any], keep: str, drop_ties: bool, summary: PrepareSummary) -> dict | str | None:
    """The output row for a Pick-a-Pic row, a reason (str) when it is corrupt, or None when it is dropped (a tie,
    or the same image twice with keep="pairs"). Counts ties and same-image pairs in `summary`."""
    caption = record["caption"]
    if not isinstance(caption, str) or not caption.strip():
        return f"{'no' if caption is None else 'an empty'} caption"
    label = _label(record["label_0"])
    if label is None:
        return f"label_0={record['label_0']!r}, not 0, 0.5 or 1"
    tie = label == 0.5
    if tie:
        summary.ties += 1
        if drop_ties:
            return None
    same = record.get("are_different") is False
    if same and keep == "pairs":
        summary.same_images += 1
        return None
    first, second = ("jpg_0", "jpg_1") if label >= 0.5 else ("jpg_1", "jpg_0")  # preferred first
    images: dict[str, bytes] = {}
    for column in (first,) if keep == "winners" else (first, second):
        data = _image_bytes(record[column])
        if data is None:
            return f"{column} is empty"
        why = undecodable(data)
        if why is not None:
            return f"{column} cannot be decoded ({why})"
        images[column] = data
    if same:
        summary.same_images += 1
    if keep == "winners":
        return {"text": caption, "image": images[first]}
    row = {"text": caption, "winner": images[first], "loser": images[second]}
    if not drop_ties:
        row["tie"] = tie
    return row
