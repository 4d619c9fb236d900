"""Hub ids, resolved offline through a cache laid out as huggingface_hub lays it out (tests/_hub_cache.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from _hub_cache import add_to_cache
from spin_diffusion import card, hub, models, presets
from spin_diffusion.config import DataConfig, load_config
from spin_diffusion.data import load_captioned_images
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.export import save_pipeline
from spin_diffusion.scorers._common import component, has_files, parse_path_spec

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two tiny pipelines: seed 0 saved as the fp16 *variant* (file names only), seed 1 saved plainly."""
    root = tmp_path_factory.mktemp("exports")
    c0, c1 = presets.build_preset("tiny", seed=0), presets.build_preset("tiny", seed=1)
    c0.family.pipeline(c0).save_pretrained(root / "variant", variant="fp16")
    (root / "variant" / "README.md").write_text("---\nlicense: openrail\n---\n# tiny\n")
    save_pipeline(c1, root / "plain")
    return {"variant": root / "variant", "plain": root / "plain", "c0": c0, "c1": c1}


def test_a_hub_id_loads_its_revision_and_variant_from_the_cache(hub_cache, exports):
    main = add_to_cache(hub_cache, "org/tiny", exports["variant"])
    v2 = add_to_cache(hub_cache, "org/tiny", exports["plain"], revision="v2")
    assert any(p.name == "diffusion_pytorch_model.fp16.safetensors" for p in main.rglob("*"))

    fp16 = models.load_components("org/tiny", variant="fp16")
    assert fp16.source == main and _same(fp16.denoiser, exports["c0"].denoiser)
    assert _same(fp16.text_encoder, exports["c0"].text_encoder) and _same(fp16.vae, exports["c0"].vae)
    plain = models.load_components("org/tiny", revision="v2")
    assert plain.source == v2 and _same(plain.denoiser, exports["c1"].denoiser)
    assert hub.hub_id_of(main) == "org/tiny" and hub.hub_id_of(exports["plain"]) is None


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("org/missing", {}, "model org/missing is not in the Hugging Face cache .* `hf download org/missing`"),
        ("org/tiny", {"revision": "v9"}, "model org/tiny at revision v9 .* `hf download org/tiny --revision v9`"),
        ("./no/such/folder", {}, r"model folder not found: no/such/folder \(give a local diffusers pipeline folder"),
    ],
)
def test_what_cannot_be_resolved_is_one_line(hub_cache, exports, name, kwargs, expected):
    add_to_cache(hub_cache, "org/tiny", exports["plain"])
    with pytest.raises(SpinDiffusionError, match=expected) as info:
        models.load_components(name, **kwargs)
    assert "\n" not in str(info.value)
    assert ("HF_HUB_OFFLINE=1" in str(info.value)) == (not name.startswith("."))


def test_a_revision_of_a_local_folder_is_refused(exports):
    with pytest.raises(SpinDiffusionError, match="model.revision .* is a local folder"):
        hub.resolve_pipeline(exports["plain"], revision="v2")
    with pytest.raises(SpinDiffusionError, match="select files of model.path"):
        load_config(None, ["model.variant=fp16"])


def test_scorer_paths_take_hub_ids(hub_cache, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    snapshot = add_to_cache(hub_cache, "org/clip", folder)
    root, parts = parse_path_spec("clip", "org/clip", ("model", "processor"), hint="a CLIP folder")
    assert root == snapshot and parts == {}
    _, parts = parse_path_spec("clip", "model=org/clip", ("model", "processor"), hint="a CLIP folder")
    assert component("clip", None, parts, "model", found=has_files("config.json"), what="a CLIP folder") == snapshot
    with pytest.raises(SpinDiffusionError, match="clip weights org/nothing is not in the Hugging Face cache"):
        parse_path_spec("clip", "org/nothing", ("model",), hint="a CLIP folder")


def test_the_card_names_the_hub_id_and_no_local_path(hub_cache, exports, tmp_path):
    snapshot = add_to_cache(hub_cache, "org/tiny", exports["variant"])
    info = card.card_info(load_config(None, ["model.path=org/tiny"]), iteration=1, steps=4, data_size=16)
    assert (info.base_model, info.hub_base_model, info.license) == ("org/tiny", "org/tiny", "openrail")
    info = card.card_info(load_config(None, [f"model.path={snapshot}"]), iteration=1, steps=4, data_size=16)
    assert info.hub_base_model == "org/tiny" and str(hub_cache) not in card.render_card(info)
    # an exported model trained further: the card names the folder, not its path, and carries its base's id over
    export = tmp_path / "runs" / "sft" / "model"
    save_pipeline(exports["c0"], export, card=info)
    info = card.card_info(load_config(None, [f"model.path={export}"]), iteration=1, steps=4, data_size=16)
    text = card.render_card(info)
    assert info.base_model == "a local model (model), fine-tuned from org/tiny" and str(tmp_path) not in text
    assert card.read_metadata_text(text)["base_model"] == "org/tiny"


@pytest.mark.heavy
def test_the_cli_trains_from_a_hub_id(hub_cache, exports, tmp_path):
    """A real CLI process: the Hub id and variant resolve from HF_HUB_CACHE, and the export's card names the id."""
    add_to_cache(hub_cache, "org/tiny", exports["variant"])
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    sets = ["model.path=org/tiny", "model.variant=fp16", "num_iterations=1", "eval.enabled=false"]
    args = [sys.executable, "-m", "spin_diffusion.cli", "spin", "-c", str(TINY), "-o", str(run_dir)]
    out = subprocess.run(
        [*args, *(x for s in sets for x in ("--set", s))], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = (run_dir / "iter_01" / "model" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "org/tiny" and meta["license"] == "openrail"
    assert str(tmp_path) not in text
    trained = models.load_components(run_dir / "iter_01" / "model")
    assert _same(trained.text_encoder, exports["c0"].text_encoder)  # the frozen parts are the Hub model's


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def _color(i: int) -> tuple[int, int, int]:
    return (i * 20 % 256, 255 - i * 20 % 256, 7 * i % 256)


def _shard(path: Path, rows: range) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": [_png(_color(i)) for i in rows], "text": [f"caption {i}" for i in rows]})
    pq.write_table(table, path, row_group_size=3)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_dataset_id_reads_its_split_from_the_cache(hub_cache, tmp_path, streaming):
    repo = tmp_path / "repo"
    _shard(repo / "data" / "train-00000-of-00002.parquet", range(0, 5))
    _shard(repo / "data" / "train-00001-of-00002.parquet", range(5, 10))
    _shard(repo / "data" / "validation-00000-of-00001.parquet", range(100, 103))
    _shard(repo / "data" / "validation_unique-00000-of-00001.parquet", range(200, 201))
    add_to_cache(hub_cache, "org/captioned", repo, repo_type="dataset")

    train = load_captioned_images(DataConfig(path="org/captioned", streaming=streaming))
    assert train.captions == [f"caption {i}" for i in range(10)]
    assert [train.image(i).getpixel((3, 3)) for i in (0, 4, 7, 9)] == [_color(i) for i in (0, 4, 7, 9)]
    val = load_captioned_images(DataConfig(path="org/captioned", split="validation", streaming=streaming))
    assert val.captions == ["caption 100", "caption 101", "caption 102"]
    with pytest.raises(SpinDiffusionError, match="no parquet files of split 'test'"):
        load_captioned_images(DataConfig(path="org/captioned", split="test", streaming=streaming))
    with pytest.raises(SpinDiffusionError, match="`hf download org/none --repo-type dataset`"):
        load_captioned_images(DataConfig(path="org/none", streaming=streaming))


def test_a_processor_id_fetches_only_its_small_files(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("allow_patterns")))
        return real(repo_id, **kwargs)

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    add_to_cache(hub_cache, "org/clip", folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    _, parts = parse_path_spec("pickscore", "model=org/clip,processor=org/clip", ("model", "processor"), hint="x")
    for key in ("model", "processor"):
        component("pickscore", None, parts, key, found=has_files("config.json"), what="a folder")
    assert asked[0] == ("org/clip", None)  # the model: the whole repository
    assert "*.json" in asked[1][1] and not any("safetensors" in p or "bin" in p for p in asked[1][1])


def test_evaluate_renders_a_hub_id_beside_a_folder(hub_cache, exports, tmp_path):
    """The same weights by Hub id and by folder render the same images."""
    from spin_diffusion import rundir
    from spin_diffusion.model_eval import evaluate_models

    add_to_cache(hub_cache, "org/tiny", exports["plain"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\n")
    out = tmp_path / "eval"
    kwargs = dict(scorers=[], scorer_paths={}, baseline=0, out_dir=out, num_prompts=None, num_steps=2)
    evaluate_models(["org/tiny", exports["plain"]], prompts, **kwargs, guidance_scale=1.0, batch_size=2, seed=0)
    by_id, by_folder = rundir.read_eval(out / "eval.json").models
    assert (by_id.name, by_folder.name) == ("tiny", "plain")
    grids = [np.asarray(Image.open(out / m.grid)) for m in (by_id, by_folder)]
    assert grids[0].std() > 0 and np.array_equal(grids[0], grids[1])
