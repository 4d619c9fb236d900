"""The streaming on-disk cache (spin_diffusion.cache): RowStore reads, and the latent / pair cache builders."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from spin_diffusion import cache as C  # noqa: E402
from spin_diffusion import data as D  # noqa: E402
from spin_diffusion import (
    encoding,  # noqa: E402
    presets,  # noqa: E402
)
from spin_diffusion.config import DataConfig  # noqa: E402
from spin_diffusion.errors import SpinDiffusionError  # noqa: E402

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
CAPTIONS = ["a red square", "a green square", "a blue square", "a yellow square", "a cyan square", "a pink square"]
KW = dict(resolution=16, model_id="tiny:0")


pytestmark = pytest.mark.usefixtures("one_thread")


def _img(i: int) -> Image.Image:
    return Image.new("RGB", (20, 12), COLORS[i % len(COLORS)])


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    _img(i).save(buf, format="PNG")
    return buf.getvalue()


def _imagefolder(root: Path, captions: list[str]) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, caption in enumerate(captions):
        _img(i).save(root / "imgs" / f"{i}.png")
        rows.append({"file_name": f"imgs/{i}.png", "text": caption})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _load(path, **kw) -> D.CaptionedImages:
    return D.load_captioned_images(DataConfig(path=str(path), **kw))


def _count_encodes(monkeypatch) -> dict[str, int]:
    """Counts encoder calls, and the images / prompts they received."""
    calls = {"images": 0, "prompts": 0, "num_images": 0, "texts": []}
    real_images, real_prompts = encoding.encode_images, encoding.encode_prompts

    def images(c, x, **kw):
        calls["images"] += 1
        calls["num_images"] += len(x)
        return real_images(c, x, **kw)

    def prompts(c, p, **kw):
        calls["prompts"] += 1
        calls["texts"] += list(p)
        return real_prompts(c, p, **kw)

    monkeypatch.setattr(encoding, "encode_images", images)
    monkeypatch.setattr(encoding, "encode_prompts", prompts)
    return calls


def _mtimes(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(cache_dir.glob("*.safetensors"))}


# ---------------------------------------------------------------------------------------------------------------
# RowStore


def _write_store(tmp_path: Path, dense: torch.Tensor, shard_size: int, dtype: torch.dtype) -> list[Path]:
    paths = []
    for s, lo in enumerate(range(0, len(dense), shard_size)):
        path = tmp_path / f"t-{s:05d}.safetensors"
        other = torch.arange(3.0)  # another tensor first in the file: offsets must come from the header
        C.write_shard(path, {"a_other": other, "x": dense[lo : lo + shard_size].to(dtype)}, {"key": "k"})
        paths.append(path)
    return paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rowstore_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(23, 3, 4, generator=g)
    expected = dense.to(dtype).float()
    store = C.RowStore.open(_write_store(tmp_path, dense, 5, dtype), "x", key="k")
    assert len(store) == 23 and store.shape == (23, 3, 4) and store.shape[1:] == dense.shape[1:]
    assert store.storage_dtype == dtype and store.dtype == torch.float32
    for _ in range(5):
        idx = torch.randint(0, 23, (17,), generator=g)  # random order, with duplicates
        got = store[idx]
        assert got.dtype == torch.float32
        assert torch.equal(got, expected[idx])
    assert torch.equal(store[[4, 5, 6, 22, 0, 0]], expected[[4, 5, 6, 22, 0, 0]])
    assert torch.equal(store[7], expected[7]) and torch.equal(store[-1], expected[-1])
    assert torch.equal(store[3:19:2], expected[3:19:2]) and torch.equal(store[:], expected)
    assert store[torch.tensor([], dtype=torch.long)].shape == (0, 3, 4)
    with pytest.raises(IndexError):
        store[torch.tensor([23])]
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone[idx], expected[idx])
    assert len(pickle.dumps(store)) < 2000  # paths and offsets, not data


def test_rowstore_index_map_and_errors(tmp_path):
    unique = torch.randn(4, 2)
    paths = _write_store(tmp_path, unique, 3, torch.float32)
    index_map = torch.tensor([2, 0, 2, 3, 1, 1, 0])
    store = C.RowStore.open(paths, "x", index_map=index_map)
    assert store.shape == (7, 2) and store.num_stored == 4
    idx = torch.tensor([6, 0, 3, 3, 5])
    assert torch.equal(store[idx], unique[index_map[idx]])
    with pytest.raises(ValueError, match="key"):
        C.RowStore.open(paths, "x", key="other")
    with pytest.raises(ValueError, match="no tensor"):
        C.RowStore.open(paths, "y")
    with pytest.raises(ValueError, match="outside"):
        C.RowStore.open(paths, "x", index_map=torch.tensor([4]))
    paths[1].write_bytes(paths[1].read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        C.RowStore.open(paths, "x")


def test_rowstore_take_is_a_lazy_view_that_composes_with_the_index_map(tmp_path):
    unique = torch.randn(4, 2)
    store = C.RowStore.open(
        _write_store(tmp_path, unique, 3, torch.float32), "x", index_map=torch.tensor([2, 0, 3, 1])
    )
    rows = torch.tensor([3, 3, -1, 0, 2])  # row 2 of the view is absent
    view = store.take(rows)
    assert view.shape == (5, 2) and view.num_stored == 4
    assert torch.equal(view[[0, 1, 3, 4]], store[[3, 3, 0, 2]])
    assert torch.equal(view.take(torch.tensor([4, 0]))[:], store[[2, 3]])  # a view of a view
    with pytest.raises(IndexError, match="row 2 of this RowStore was not stored"):
        view[2]
    with pytest.raises(ValueError, match=r"rows must lie in \[-1, 4\)"):
        store.take(torch.tensor([4]))
    assert torch.equal(pickle.loads(pickle.dumps(view))[[0, 4]], store[[3, 2]])


def test_config_validates_cache_fields():
    with pytest.raises(SpinDiffusionError, match="cache_shard_size"):
        DataConfig(cache_shard_size=0)


# ---------------------------------------------------------------------------------------------------------------
# Latent cache (real tiny model)


def test_latent_cache_built_once_matches_direct_encoding(tmp_path, tiny, monkeypatch):

    root = _imagefolder(tmp_path / "f", CAPTIONS[:3])
    src = _load(root)
    cache_dir = tmp_path / "cache"
    calls = _count_encodes(monkeypatch)
    kw = dict(KW, batch_size=2)
    cache = C.build_latent_cache(tiny, src, cache_dir, **kw)
    assert (calls["images"], calls["prompts"]) == (2, 2)  # 3 examples in batches of 2
    assert len(cache) == 3 and cache.captions == CAPTIONS[:3]
    assert cache.latents.shape == (3, 4, 8, 8) and cache.latents.dtype == torch.float32
    assert cache.prompt_embeds.shape == (3, 16, 8)

    pixels = torch.stack([D.image_to_tensor(src.image(i), 16) for i in range(3)])
    torch.testing.assert_close(cache.latents[:], encoding.encode_images(tiny, pixels), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cache.prompt_embeds.embeds[:], encoding.encode_prompts(tiny, CAPTIONS[:3]), atol=1e-5, rtol=1e-5
    )
    calls.update(images=0, prompts=0)

    again = C.build_latent_cache(tiny, _load(root), cache_dir, **kw)  # reused: no encoder call
    assert (calls["images"], calls["prompts"]) == (0, 0)
    assert torch.equal(again.latents[:], cache.latents[:]) and torch.equal(
        again.prompt_embeds.embeds[:], cache.prompt_embeds.embeds[:]
    )
    assert not list(cache_dir.glob("*.tmp"))

    C.build_latent_cache(tiny, _load(root), cache_dir, **{**kw, "model_id": "other"})  # other model -> rebuild
    assert calls["images"] == 2
    C.build_latent_cache(tiny, _load(root), cache_dir, **{**kw, "model_id": "other"})
    assert calls["images"] == 2


def test_latent_cache_invalidated_when_data_changes(tmp_path, tiny, monkeypatch):
    root = _imagefolder(tmp_path / "f", CAPTIONS[:3])
    cache_dir = tmp_path / "cache"
    kw = dict(KW, batch_size=4)
    first = C.build_latent_cache(tiny, _load(root), cache_dir, **kw)
    first_latents = first.latents[:]
    calls = _count_encodes(monkeypatch)
    Image.new("RGB", (20, 12), (7, 7, 7)).save(root / "imgs" / "0.png")
    second = C.build_latent_cache(tiny, _load(root), cache_dir, **kw)
    assert calls["images"] == 1
    assert not torch.equal(first_latents[0], second.latents[0])
    torch.testing.assert_close(first_latents[1:], second.latents[1:])
    C.build_latent_cache(tiny, _load(root), cache_dir, **{**kw, "resolution": 8})  # resolution is in the key
    assert calls["images"] == 2
    C.build_latent_cache(tiny, _load(root, max_samples=2), cache_dir, **kw)  # so are the rows used
    assert calls["images"] == 3


def test_latent_cache_dedups_captions(tmp_path, tiny, monkeypatch):

    captions = ["b", "a", "b", "c", "a", "b"]  # N = 6 rows, U = 3 distinct captions
    root = _imagefolder(tmp_path / "f", captions)
    calls = _count_encodes(monkeypatch)
    cache = C.build_latent_cache(tiny, _load(root), tmp_path / "cache", **KW, batch_size=8, shard_size=2)
    assert calls["texts"] == ["b", "a", "c"]  # each distinct caption once, in order of first appearance
    assert calls["num_images"] == 6
    emb = cache.prompt_embeds.embeds
    assert emb.shape == (6, 16, 8) and emb.num_stored == 3
    assert emb.index_map.tolist() == [0, 1, 0, 2, 1, 0]
    assert len(list((tmp_path / "cache").glob("latents-embeds-*.safetensors"))) == 2  # ceil(3 / 2)
    direct = encoding.encode_prompts(tiny, captions)
    torch.testing.assert_close(emb[torch.tensor([5, 3, 1, 1])], direct[[5, 3, 1, 1]], atol=1e-5, rtol=1e-5)
    meta = json.loads((tmp_path / "cache" / "latents.json").read_text())
    assert meta["num_examples"] == 6 and meta["num_unique_captions"] == 3


def test_latent_cache_resumes_only_missing_or_corrupt_shards(tmp_path, tiny, monkeypatch):
    root = _imagefolder(tmp_path / "f", CAPTIONS[:5])
    cache_dir = tmp_path / "cache"
    kw = dict(KW, batch_size=2, shard_size=2)
    full = C.build_latent_cache(tiny, _load(root), cache_dir, **kw).latents[:]
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == [
        "latents-embeds-00000.safetensors",
        "latents-embeds-00001.safetensors",
        "latents-embeds-00002.safetensors",
        "latents-images-00000.safetensors",
        "latents-images-00001.safetensors",
        "latents-images-00002.safetensors",
        "latents.json",
    ]
    calls = _count_encodes(monkeypatch)

    (cache_dir / "latents.json").unlink()  # killed before the marker was written: every shard is reused
    C.build_latent_cache(tiny, _load(root), cache_dir, **kw)
    assert (calls["images"], calls["prompts"]) == (0, 0) and (cache_dir / "latents.json").exists()

    before = _mtimes(cache_dir)
    (cache_dir / "latents-images-00001.safetensors").unlink()  # killed build: only that shard is encoded again
    (cache_dir / "latents.json").unlink()
    cache = C.build_latent_cache(tiny, _load(root), cache_dir, **kw)
    assert calls["num_images"] == 2 and calls["prompts"] == 0
    after = _mtimes(cache_dir)
    assert {k: v for k, v in after.items() if k != "latents-images-00001.safetensors"} == {
        k: v for k, v in before.items() if k != "latents-images-00001.safetensors"
    }
    torch.testing.assert_close(cache.latents[:], full)

    (cache_dir / "latents-images-00002.safetensors").write_bytes(b"truncated")  # corrupt, marker still there
    cache = C.build_latent_cache(tiny, _load(root), cache_dir, **kw)
    assert calls["num_images"] == 3 and cache.latents.shape == (5, 4, 8, 8)
    torch.testing.assert_close(cache.latents[:], full)


def test_latent_cache_stale_key_rebuilds_everything(tmp_path, tiny, monkeypatch):
    root = _imagefolder(tmp_path / "f", CAPTIONS[:5])
    cache_dir = tmp_path / "cache"
    kw = dict(KW, batch_size=8, shard_size=2)
    ref = C.build_latent_cache(tiny, _load(root), cache_dir, **kw).latents[:]
    calls = _count_encodes(monkeypatch)
    half = C.build_latent_cache(tiny, _load(root), cache_dir, **{**kw, "dtype": "fp16"})
    assert calls["num_images"] == 5 and len(calls["texts"]) == 5
    assert half.latents.storage_dtype == torch.float16 and half.latents[:].dtype == torch.float32
    torch.testing.assert_close(half.latents[:], ref, atol=1e-2, rtol=1e-2)
    C.build_latent_cache(tiny, _load(root, max_samples=3), cache_dir, **{**kw, "dtype": "bf16"})
    assert calls["num_images"] == 8
    # the longer, older build's shards are gone
    assert len(list(cache_dir.glob("latents-images-*.safetensors"))) == 2


def test_latent_cache_bad_arguments(tmp_path, tiny):
    src = _load(_imagefolder(tmp_path / "f", CAPTIONS[:3]))
    with pytest.raises(SpinDiffusionError, match="multiple of the VAE scale factor"):
        C.build_latent_cache(tiny, src, tmp_path / "c", resolution=15, batch_size=2, model_id="m")
    with pytest.raises(SpinDiffusionError, match="cache_shard_size"):
        C.build_latent_cache(tiny, src, tmp_path / "c", resolution=16, batch_size=2, model_id="m", shard_size=0)


def test_latent_cache_unreadable_image_names_file(tmp_path, tiny):
    root = _imagefolder(tmp_path / "f", CAPTIONS[:3])
    (root / "imgs" / "1.png").write_bytes(b"not a png")
    with pytest.raises(SpinDiffusionError, match="1.png"):
        C.build_latent_cache(tiny, _load(root), tmp_path / "c", **KW, batch_size=2)
    assert not (tmp_path / "c" / "latents.json").exists()


def test_pair_cache(tmp_path, tiny, monkeypatch):

    pq.write_table(
        pa.table({"caption": ["p", "q"], "jpg_0": [_png(0), _png(2)], "jpg_1": [_png(1), _png(3)], "label_0": [1, 0]}),
        tmp_path / "pairs.parquet",
    )
    pairs = D.load_preference_pairs(DataConfig(path=str(tmp_path / "pairs.parquet")))
    kw = dict(KW, batch_size=8)
    cache = C.build_pair_cache(tiny, pairs, tmp_path / "cache", **kw)
    assert len(cache) == 2 and cache.captions == ["p", "q"]
    winners = torch.stack([D.image_to_tensor(_img(i), 16) for i in (0, 3)])
    losers = torch.stack([D.image_to_tensor(_img(i), 16) for i in (1, 2)])
    torch.testing.assert_close(cache.winner_latents[:], encoding.encode_images(tiny, winners), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.loser_latents[:], encoding.encode_images(tiny, losers), atol=1e-5, rtol=1e-5)
    assert cache.prompt_embeds.shape == (2, 16, 8)
    calls = _count_encodes(monkeypatch)
    C.build_pair_cache(tiny, pairs, tmp_path / "cache", **kw)
    assert (calls["images"], calls["prompts"]) == (0, 0)


def test_augmented_cache_encodes_each_rows_draw_and_keys_on_it(tiny, tmp_path, monkeypatch):

    root = _imagefolder(tmp_path / "f", CAPTIONS[:4])
    for i in range(4):  # a white left edge: flips and crops show
        img = _img(i)
        img.paste((255, 255, 255), (0, 0, 3, 12))
        img.save(root / "imgs" / f"{i}.png")
    cache_dir = tmp_path / "cache"
    augment = D.Augment(flip=True, crop=True, seed=3)
    cache = C.build_latent_cache(tiny, _load(root), cache_dir, **KW, batch_size=4, augment=augment)
    src = _load(root)
    draws = [augment.draw(i) for i in range(4)]
    pixels = torch.stack([D.image_to_tensor(src.image(i), 16, flip=f, crop=c) for i, (f, c) in enumerate(draws)])
    torch.testing.assert_close(cache.latents[:], encoding.encode_images(tiny, pixels), atol=1e-5, rtol=1e-5)
    plain = torch.stack([D.image_to_tensor(src.image(i), 16) for i in range(4)])
    assert not torch.equal(pixels, plain)

    calls = _count_encodes(monkeypatch)
    C.build_latent_cache(tiny, _load(root), cache_dir, **KW, batch_size=4, augment=augment)
    assert calls["images"] == 0  # same draw: reused
    C.build_latent_cache(tiny, _load(root), cache_dir, **KW, batch_size=4, augment=D.Augment(flip=True, seed=4))
    assert calls["images"] == 1  # another augmentation: rebuilt
    C.build_latent_cache(tiny, _load(root), cache_dir, **KW, batch_size=4)
    assert calls["images"] == 2


def test_sdxl_time_ids_follow_the_random_crop(tmp_path):

    sdxl = presets.build_preset("tiny-sdxl")
    root = _imagefolder(tmp_path / "f", CAPTIONS[:4])  # 20 x 12 images
    augment = D.Augment(crop=True, seed=0)
    cache = C.build_latent_cache(sdxl, _load(root), tmp_path / "cache", **KW, batch_size=4, augment=augment)
    expected = [D.sdxl_time_ids((20, 12), 16, crop=augment.draw(i)[1]) for i in range(4)]
    assert cache.time_ids[:].tolist() == expected
    assert len({ids[3] for ids in expected}) > 1  # the crops differ from row to row
