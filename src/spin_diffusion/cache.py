"""The streaming on-disk cache: real latents, caption embeddings (and, via sampling, opponent samples).

Everything the trainer reads per row lives in sharded safetensors files and is read lazily through a
:class:`RowStore`: a read-only view of one named tensor split over shards of consecutive rows. A read of some
rows parses nothing but the (already parsed) shard headers and ``seek`` + ``read``s exactly those rows, so
process memory stays O(batch + model) whatever the number of prompts. No mmap is kept open: touched mmap
pages count in the resident set and would grow with N.

The cache builders (:func:`build_latent_cache`, :func:`build_pair_cache`) encode every image with the VAE and
every *distinct* caption with the text encoder once (captions are deduplicated in order of first appearance;
``prompt_embeds`` maps each row to its caption's embedding). Files in ``cache_dir`` for ``kind`` (``latents``
or ``pairs``)::

    {kind}-images-00000.safetensors   rows [0, shard_size) of the image latents (one tensor per image role)
    {kind}-embeds-00000.safetensors   rows [0, shard_size) of the unique-caption embeddings (``prompt_embeds``)
    {kind}.json                       the marker: key, shapes, captions; written last, by the main process

Each shard carries the cache key in its metadata. With several processes (accelerate), rank r encodes the
shards s with s % world_size == r; shards whose key already matches are skipped, so a killed build resumes;
the main process writes the marker after everyone finished. A marker with the current key means reuse.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image

from spin_diffusion import atomic, encoding
from spin_diffusion.data import (
    Augment,
    CaptionedImages,
    PreferencePairs,
    _digest,
    check_image_size,
    image_to_tensor,
    sdxl_time_ids,
)
from spin_diffusion.errors import SpinDiffusionError, one_line
from spin_diffusion.families import Cond

if TYPE_CHECKING:
    from spin_diffusion.models import Components

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
StoreDtype = Literal["fp32", "fp16", "bf16"]
STORE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPES: dict[str, torch.dtype] = {  # safetensors header dtype -> torch
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "U8": torch.uint8,
}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header -> (header dict, absolute byte offset where the tensor data starts).

    Raises ValueError when the file is not a readable safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER:
            raise ValueError(f"{path} has an implausible header length {size}")
        raw = f.read(size)
        if len(raw) != size:
            raise ValueError(f"{path} is truncated (header)")
        end = f.seek(0, os.SEEK_END)
    header = json.loads(raw)
    start = 8 + size
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a malformed header")
    for name, info in header.items():
        if name != "__metadata__" and start + info["data_offsets"][1] > end:
            raise ValueError(f"{path} is truncated ({name})")
    return header, start


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One (small) tensor of a safetensors file, read with plain file I/O (no mmap)."""
    header, start = read_header(path)
    info = header[name]
    begin, end = info["data_offsets"]
    out = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
    if end - begin != out.numel() * out.element_size():
        raise ValueError(f"{path}: '{name}' has {end - begin} bytes for shape {info['shape']}")
    with open(path, "rb") as f:
        f.seek(start + begin)
        f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
    return out


@dataclass(frozen=True)
class _Shard:
    path: str
    offset: int  # absolute byte offset of the shard's row 0
    rows: int


class RowStore:
    """A lazy, read-only ``[N, *row_shape]`` tensor stored across sharded safetensors files.

    ``store[i]`` (int), ``store[a:b]`` (slice), ``store[[...]]`` / ``store[LongTensor]`` (any order,
    duplicates allowed) read just those rows and return a float32 CPU tensor. With ``index_map`` ([N] long),
    logical row i is stored row ``index_map[i]`` (the deduplicated caption embeddings), or absent when that is -1
    (reading it raises IndexError; the opponent's samples of prompts that training does not visit). Pickles as
    paths and
    offsets only, so it can travel into DataLoader workers.
    """

    def __init__(
        self,
        shards: Sequence[_Shard],
        row_shape: Sequence[int],
        storage_dtype: torch.dtype,
        index_map: torch.Tensor | None = None,
    ) -> None:
        self._shards = tuple(shards)
        self._starts = [0]
        for s in self._shards:
            self._starts.append(self._starts[-1] + s.rows)
        self.row_shape = torch.Size(row_shape)
        self.storage_dtype = storage_dtype
        self._row_bytes = self.row_shape.numel() * torch.empty((), dtype=storage_dtype).element_size()
        if index_map is not None:
            index_map = torch.as_tensor(index_map, dtype=torch.long).reshape(-1)
            if len(index_map) and (int(index_map.min()) < -1 or int(index_map.max()) >= self.num_stored):
                raise ValueError(f"index_map points outside the {self.num_stored} stored rows")
        self.index_map = index_map

    @classmethod
    def open(
        cls, paths: Sequence[str | Path], name: str, *, index_map: torch.Tensor | None = None, key: str | None = None
    ) -> RowStore:
        """The tensor `name` stored row-wise across `paths` (in order). Parses each header once; with `key`,
        every shard's metadata must carry that cache key. Raises ValueError on a missing, unreadable or
        inconsistent shard."""
        shards, row_shape, dtype = [], None, None
        for path in paths:
            header, start = read_header(path)
            if key is not None and (header.get("__metadata__") or {}).get("key") != key:
                raise ValueError(f"{path} belongs to another cache (key mismatch)")
            if name not in header:
                raise ValueError(f"{path} has no tensor '{name}'")
            info = header[name]
            shape, this_dtype = info["shape"], _ST_DTYPES.get(info["dtype"])
            if this_dtype not in STORE_DTYPES.values() or not shape:
                raise ValueError(f"{path}: '{name}' is {info['dtype']}{shape}, not a float tensor of rows")
            if row_shape is None:
                row_shape, dtype = shape[1:], this_dtype
            elif shape[1:] != row_shape or this_dtype != dtype:
                raise ValueError(f"{path}: '{name}' is {info['dtype']}{shape}, unlike the other shards")
            shards.append(_Shard(str(path), start + info["data_offsets"][0], shape[0]))
        if row_shape is None:
            raise ValueError(f"no shards for '{name}'")
        return cls(shards, row_shape, dtype, index_map)

    @property
    def num_stored(self) -> int:
        return self._starts[-1]

    def __len__(self) -> int:
        return len(self.index_map) if self.index_map is not None else self.num_stored

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.row_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what reads return

    def __repr__(self) -> str:
        return (
            f"RowStore(shape={tuple(self.shape)}, storage={self.storage_dtype}, shards={len(self._shards)}, "
            f"dedup={self.index_map is not None})"
        )

    def take(self, rows: torch.Tensor) -> RowStore:
        """A lazy view whose row i is this store's row ``rows[i]`` (-1: absent, reading it raises IndexError); reads
        nothing. E.g. one opponent sample per distinct caption, seen by every row of that caption."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if len(rows) and (int(rows.min()) < -1 or int(rows.max()) >= len(self)):
            raise ValueError(f"take: rows must lie in [-1, {len(self)})")
        if self.index_map is not None:
            rows = torch.where(rows < 0, rows, self.index_map[rows.clamp(min=0)])
        return RowStore(self._shards, self.row_shape, self.storage_dtype, index_map=rows)

    def __getitem__(self, idx: int | slice | Sequence[int] | torch.Tensor) -> torch.Tensor:
        n = len(self)
        if isinstance(idx, slice):
            rows = torch.arange(*idx.indices(n), dtype=torch.long)
        else:
            rows = torch.as_tensor(idx, dtype=torch.long)
            if rows.dim() > 1:
                raise IndexError("RowStore takes an int, a slice or a 1-D index")
            rows = torch.where(rows < 0, rows + n, rows)
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
                raise IndexError(f"index out of range for a RowStore of {n} rows")
        flat = rows.reshape(-1)
        if self.index_map is not None:
            logical, flat = flat, self.index_map[flat]
            if flat.numel() and int(flat.min()) < 0:  # -1: a row that was never stored (e.g. a prompt not generated)
                raise IndexError(f"row {int(logical[flat < 0][0])} of this RowStore was not stored")
        unique, inverse = torch.unique(flat, return_inverse=True)  # sorted: contiguous runs coalesce
        out = self._read_sorted(unique.tolist())[inverse].float()
        return out.reshape(*rows.shape, *self.row_shape)

    def _read_sorted(self, rows: list[int]) -> torch.Tensor:
        """Stored rows (sorted, distinct) -> [len(rows), *row_shape] in the storage dtype."""
        out = torch.empty((len(rows), *self.row_shape), dtype=self.storage_dtype)
        raw = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        rb, i = self._row_bytes, 0
        while i < len(rows):
            shard_no = bisect.bisect_right(self._starts, rows[i]) - 1
            shard, first = self._shards[shard_no], self._starts[shard_no]
            end = self._starts[shard_no + 1]
            with open(shard.path, "rb") as f:
                while i < len(rows) and rows[i] < end:  # every requested row in this shard, in runs
                    j = i + 1
                    while j < len(rows) and rows[j] == rows[j - 1] + 1 and rows[j] < end:
                        j += 1
                    f.seek(shard.offset + (rows[i] - first) * rb)
                    want = (j - i) * rb
                    if f.readinto(raw[i * rb : j * rb]) != want:
                        raise SpinDiffusionError(f"{shard.path} is truncated; delete it and rerun to rebuild")
                    i = j
        return out


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one shard atomically (``x.tmp`` then ``os.replace``)."""
    from safetensors.torch import save_file

    with atomic.path(path, per_process=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj, indent=None)


def shard_key(path: Path) -> str | None:
    """The cache key in a shard's metadata; None for a missing or unreadable file."""
    try:
        return (read_header(path)[0].get("__metadata__") or {}).get("key")
    except (OSError, ValueError):
        return None


def _bad_rows(paths: Sequence[Path]) -> dict[int, str]:
    """Rows that an image shard recorded as bad (skipped), with their reasons, from the shard headers."""
    bad: dict[int, str] = {}
    for path in paths:
        meta = read_header(path)[0].get("__metadata__") or {}
        bad.update({int(row): reason for row, reason in json.loads(meta.get("bad", "{}")).items()})
    return bad


@dataclass(frozen=True)
class BadExamples:
    """What to do with an image that cannot be used (unreadable, or shorter side < `min_side` pixels).

    "error" stops at the first one with its one-line reason; "skip" leaves it out, lists it, and refuses the
    data when more than `max_fraction` of the rows are bad (then something systematic is wrong: a column, a
    path prefix), so a run never trains on far fewer rows than its user thinks."""

    on_bad: Literal["error", "skip"] = "error"
    min_side: int = 0
    max_fraction: float = 1.0


def dedup(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Unique captions in order of first appearance, and the [N] map row -> unique caption."""
    unique = list(dict.fromkeys(captions))
    pos = {text: i for i, text in enumerate(unique)}
    return unique, torch.tensor([pos[text] for text in captions], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# The latent + embedding cache


@dataclass
class LatentCache:
    """Encoded (image, caption) data, ready for the denoiser; rows are read from disk on demand."""

    latents: RowStore  # [N, C, h, w], VAE latents * scaling_factor (pixels in [-1, 1] without VAE)
    prompt_embeds: Cond  # of RowStores: embeds [N, L, D] (+ pooled [N, P]), row i = captions[i]'s (stored once per
    # distinct caption)
    captions: list[str]
    skipped: dict[int, str] = field(default_factory=dict)  # source row -> why it was left out (on_bad_example=skip)
    time_ids: RowStore | None = None  # [N, 6] SDXL micro-conditioning of each image; None for other families

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class PairCache:
    """Encoded preference pairs."""

    winner_latents: RowStore  # [N, C, h, w]
    loser_latents: RowStore  # [N, C, h, w]
    prompt_embeds: Cond  # of RowStores, as LatentCache's
    captions: list[str]
    skipped: dict[int, str] = field(default_factory=dict)  # source row -> why it was left out (on_bad_example=skip)
    winner_time_ids: RowStore | None = None  # [N, 6] SDXL only
    loser_time_ids: RowStore | None = None

    def __len__(self) -> int:
        return len(self.captions)


def _paths(cache_dir: Path, kind: str, part: str, count: int) -> list[Path]:
    return [cache_dir / f"{kind}-{part}-{s:05d}.safetensors" for s in range(count)]


def _num_shards(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


def _open_stores(
    cache_dir: Path,
    kind: str,
    names: Sequence[str],
    n: int,
    index_map: torch.Tensor,
    num_unique: int,
    shard_size: int,
    key: str,
    kept: torch.Tensor | None = None,
) -> dict[str, RowStore]:
    """The stores of a finished cache; with `kept` ([M] row indices) they show only those rows, in that order."""
    image_paths = _paths(cache_dir, kind, "images", _num_shards(n, shard_size))
    stored = read_header(image_paths[0])[0] if image_paths else {}
    names = [*names, *(f"{name}_time_ids" for name in names if f"{name}_time_ids" in stored)]  # SDXL
    stores = {name: RowStore.open(image_paths, name, key=key, index_map=kept) for name in names}
    embed_paths = _paths(cache_dir, kind, "embeds", _num_shards(num_unique, shard_size))
    rows_map = index_map if kept is None else index_map[kept]
    embeds = [name for name in Cond.STORED.values() if name in read_header(embed_paths[0])[0]]
    for name in embeds:
        stores[name] = RowStore.open(embed_paths, name, index_map=rows_map, key=key)
    if any(s.num_stored != n for name, s in stores.items() if name not in embeds):
        raise ValueError("row count differs from the data")
    if any(stores[name].num_stored != num_unique for name in embeds):
        raise ValueError("caption count differs from the data")
    return stores


def _kept_rows(bad: dict[int, str], n: int, policy: BadExamples, what: str) -> torch.Tensor | None:
    """Row indices to train on (None: all of them); refuses data with too many bad rows."""
    if not bad:
        return None
    if len(bad) > policy.max_fraction * n or len(bad) == n:
        first = bad[min(bad)]
        raise SpinDiffusionError(
            f"{len(bad)} of {n} rows of {what} are unusable (more than data.max_bad_fraction="
            f"{policy.max_fraction}); first: {first}"
        )
    return torch.tensor([i for i in range(n) if i not in bad], dtype=torch.long)


def _encode_shards(
    paths: list[Path],
    n: int,
    shard_size: int,
    key: str,
    rank: int,
    world_size: int,
    encode: Callable[[range], tuple[dict[str, torch.Tensor], dict[str, str]]],
    bar: Any,
) -> None:
    """Write the shards s % world_size == rank of `paths` whose key does not match; `encode(rows)` -> (tensors,
    extra metadata)."""
    for s in range(rank, len(paths), world_size):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        if shard_key(paths[s]) == key:
            bar.update(hi - lo)
            continue
        tensors, extra = encode(range(lo, hi))
        write_shard(paths[s], tensors, {"key": key, "rows": f"{lo}:{hi}", **extra})


def _cached_encode(
    c: Components,
    kind: str,
    captions: list[str],
    image_fns: dict[str, Callable[[int], Image.Image]],
    fingerprint: str,
    cache_dir: Path,
    *,
    resolution: int,
    batch_size: int,
    model_id: str,
    dtype: StoreDtype,
    shard_size: int,
    desc: str,
    where: Callable[[int], str],
    bad_policy: BadExamples,
    augment: Augment,
) -> tuple[dict[str, RowStore], dict[int, str]]:
    """Build or reuse the cache; returns its stores (bad rows left out) and the bad rows with their reasons."""
    from spin_diffusion import distributed

    _check_encode_settings(c, resolution=resolution, batch_size=batch_size, dtype=dtype, shard_size=shard_size)
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / f"{kind}.json"
    n = len(captions)
    unique, index_map = dedup(captions)
    key = _cache_key(kind, fingerprint, resolution, model_id, dtype, shard_size, bad_policy, augment)
    state = distributed.state()
    image_paths = _paths(cache_dir, kind, "images", _num_shards(n, shard_size))

    def finished() -> tuple[dict[str, RowStore], dict[int, str]]:
        bad = _bad_rows(image_paths)
        kept = _kept_rows(bad, n, bad_policy, desc.removeprefix("encoding "))
        return _open_stores(cache_dir, kind, list(image_fns), n, index_map, len(unique), shard_size, key, kept), bad

    def reuse() -> tuple[dict[str, RowStore], dict[int, str]] | None:
        try:
            if json.loads(meta_path.read_text()).get("key") != key:
                return None
            return finished()
        except SpinDiffusionError:
            raise
        except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt, never trusted
            if meta_path.exists():
                logger.info("cache %s is unusable (%s); rebuilding", cache_dir, one_line(err))
            return None

    reused = reuse()
    state.wait_for_everyone()  # every rank decided before anyone writes, so they all take the same branch
    if reused is not None:
        logger.info("reusing the %s cache in %s", kind, cache_dir)
        return reused

    from tqdm.auto import tqdm

    if state.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # a stale marker must never vouch for the shards written now
    state.wait_for_everyone()
    store_dtype = STORE_DTYPES[dtype]
    rank, world = state.process_index, state.num_processes

    time_ids = c.family.uses_time_ids  # SDXL: each image's original size and crop (stored in float32)

    def pixels_of(fn: Callable[[int], Image.Image], i: int, bad: dict[int, str]) -> tuple[torch.Tensor, list[float]]:
        """Row i's image as [3, R, R] and its SDXL time ids; a bad one raises ("error") or is recorded and replaced
        by zeros ("skip")."""
        try:
            img = check_image_size(fn(i), bad_policy.min_side, where(i))
            flip, crop = augment.draw(i)
            pixels = image_to_tensor(img, resolution, flip=flip, crop=crop)
            return pixels, sdxl_time_ids(img.size, resolution, crop=crop)
        except SpinDiffusionError as err:
            if bad_policy.on_bad == "error":
                raise
            bad[i] = str(err)
            return torch.zeros(3, resolution, resolution), [0.0] * 6

    def encode_images(rows: range) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        out: dict[str, list[torch.Tensor]] = {name: [] for name in image_fns}
        out.update({f"{name}_time_ids": [] for name in image_fns if time_ids})
        bad: dict[int, str] = {}
        for start in range(rows.start, rows.stop, batch_size):
            batch = range(start, min(rows.stop, start + batch_size))
            for name, fn in image_fns.items():
                pixels, ids = zip(*(pixels_of(fn, i, bad) for i in batch), strict=True)
                out[name].append(encoding.encode_images(c, torch.stack(pixels)).detach().to("cpu", store_dtype))
                if time_ids:
                    out[f"{name}_time_ids"].append(torch.tensor(ids, dtype=torch.float32))
            bar.update(len(batch))
        return {name: torch.cat(parts) for name, parts in out.items()}, {"bad": json.dumps(bad)}

    def encode_captions(rows: range) -> dict[str, torch.Tensor]:
        parts = []
        for start in range(rows.start, rows.stop, batch_size):
            texts = unique[start : min(rows.stop, start + batch_size)]
            parts.append(
                encoding.encode(c, texts, batch_size=len(texts)).map(lambda x: x.detach().to("cpu", store_dtype))
            )
        return Cond.cat(parts).tensors(), {}

    embed_paths = _paths(cache_dir, kind, "embeds", _num_shards(len(unique), shard_size))
    todo = sum(min(shard_size, n - s * shard_size) for s in range(rank, len(image_paths), world))
    with torch.no_grad(), tqdm(total=todo, desc=desc, unit="ex", disable=None) as bar:
        _encode_shards(image_paths, n, shard_size, key, rank, world, encode_images, bar)
        _encode_shards(embed_paths, len(unique), shard_size, key, rank, world, encode_captions, _NoBar())
    state.wait_for_everyone()
    if state.is_main_process:
        for part, paths in (("images", image_paths), ("embeds", embed_paths)):  # shards of a longer, older build
            for old in cache_dir.glob(f"{kind}-{part}-*.safetensors"):
                if old not in paths:
                    old.unlink(missing_ok=True)
        (cache_dir / f"{kind}.safetensors").unlink(missing_ok=True)  # the single-file cache of version 1
        stores, bad = finished()
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "kind": kind,
            "data_fingerprint": fingerprint,
            "resolution": resolution,
            "model_id": model_id,
            "dtype": dtype,
            "shard_size": shard_size,
            "num_examples": n,
            "num_unique_captions": len(unique),
            "shapes": {name: list(s.shape) for name, s in stores.items()},
            "num_skipped": len(bad),
            "captions": captions,
        }
        _write_json_atomic(meta_path, meta)  # last: the marker that vouches for every shard above
    state.wait_for_everyone()
    return finished()


def _check_encode_settings(c: Components, *, resolution: int, batch_size: int, dtype: str, shard_size: int) -> None:
    if batch_size < 1:
        raise SpinDiffusionError(f"data.encode_batch_size must be >= 1, got {batch_size}")
    if shard_size < 1:
        raise SpinDiffusionError(f"data.cache_shard_size must be >= 1, got {shard_size}")
    if dtype not in STORE_DTYPES:
        raise SpinDiffusionError(f"data.cache_dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if resolution < 1 or resolution % getattr(c, "vae_scale_factor", 1):
        raise SpinDiffusionError(
            f"resolution {resolution} must be a positive multiple of the VAE scale factor "
            f"{getattr(c, 'vae_scale_factor', 1)}; set data.resolution"
        )


def _cache_key(
    kind: str,
    fingerprint: str,
    resolution: int,
    model_id: str,
    dtype: str,
    shard_size: int,
    bad_policy: BadExamples,
    augment: Augment,
) -> str:
    """What the cache's content depends on, hashed; every shard carries it, and a change rebuilds the cache."""
    identity = {
        "version": CACHE_VERSION,
        "kind": kind,
        "data": fingerprint,
        "resolution": resolution,
        "model": model_id,
        "dtype": dtype,
        "shard_size": shard_size,
        "on_bad": bad_policy.on_bad,
        "min_side": bad_policy.min_side,
    }
    if augment.active:  # (without augmentation the key is the one caches had before it existed)
        identity["augment"] = dataclasses.asdict(augment)
    return _digest(identity)


class _NoBar:
    def update(self, _: int) -> None:
        pass


def build_latent_cache(
    c: Components,
    images: CaptionedImages,
    cache_dir: Path,
    *,
    resolution: int,
    batch_size: int,
    model_id: str,
    dtype: StoreDtype = "fp32",
    shard_size: int = 1024,
    bad_examples: BadExamples | None = None,
    augment: Augment | None = None,
) -> LatentCache:
    """Encode every image (VAE) and distinct caption (text encoder) once into ``cache_dir``; reuse it while
    (data fingerprint, resolution, ``model_id``, ``dtype``, ``shard_size``, ``augment``) match, rebuild otherwise.
    ``augment`` (data.random_flip / data.random_crop) is drawn per row, once, when the row is encoded.
    ``model_id`` must identify the VAE + text encoder.

    Files: ``latents-images-*.safetensors`` (``latents``), ``latents-embeds-*.safetensors`` (``prompt_embeds``
    of the distinct captions) and ``latents.json`` (written last). Under accelerate, call it from every
    process: each encodes its share of the shards."""
    stores, bad = _cached_encode(
        c,
        "latents",
        images.captions,
        {"latents": images.image},
        images.fingerprint(),
        cache_dir,
        resolution=resolution,
        batch_size=batch_size,
        model_id=model_id,
        dtype=dtype,
        shard_size=shard_size,
        desc=f"encoding {images.name}",
        where=images.where,
        bad_policy=bad_examples or BadExamples(),
        augment=augment or Augment(),
    )
    captions = [text for i, text in enumerate(images.captions) if i not in bad]
    return LatentCache(
        latents=stores["latents"],
        prompt_embeds=Cond.from_tensors(stores),
        captions=captions,
        skipped=bad,
        time_ids=stores.get("latents_time_ids"),
    )


def build_pair_cache(
    c: Components,
    pairs: PreferencePairs,
    cache_dir: Path,
    *,
    resolution: int,
    batch_size: int,
    model_id: str,
    dtype: StoreDtype = "fp32",
    shard_size: int = 1024,
    bad_examples: BadExamples | None = None,
    augment: Augment | None = None,
) -> PairCache:
    """:func:`build_latent_cache` for preference pairs: ``pairs-images-*.safetensors`` (``winner_latents``,
    ``loser_latents``), ``pairs-embeds-*.safetensors`` + ``pairs.json``."""
    stores, bad = _cached_encode(
        c,
        "pairs",
        pairs.captions,
        {"winner_latents": pairs.winner, "loser_latents": pairs.loser},
        pairs.fingerprint(),
        cache_dir,
        resolution=resolution,
        batch_size=batch_size,
        model_id=model_id,
        dtype=dtype,
        shard_size=shard_size,
        desc=f"encoding {pairs.name}",
        where=pairs.where,
        bad_policy=bad_examples or BadExamples(),
        augment=augment or Augment(),
    )
    return PairCache(
        winner_latents=stores["winner_latents"],
        loser_latents=stores["loser_latents"],
        prompt_embeds=Cond.from_tensors(stores),
        captions=[text for i, text in enumerate(pairs.captions) if i not in bad],
        skipped=bad,
        winner_time_ids=stores.get("winner_latents_time_ids"),
        loser_time_ids=stores.get("loser_latents_time_ids"),
    )
