"""The demo world: captions round-trip, the judge is exact on renders, the dataset is seeded and balanced,
and the Fréchet distance behaves like a distance."""

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from spin_diffusion import world
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.images import pil_to_tensor, tensor_to_pil
from spin_diffusion.scoring import frechet_distance_metric as fd

SCENES = world.all_scenes()


def _render(scene, seed, size=32):
    return world.render(scene, size=size, rng=np.random.default_rng(seed))


# ----------------------------------------------------------------------------------------------------------
# Scenes and captions


def test_scene_space():
    assert len(SCENES) == 48 == len(set(SCENES))
    assert SCENES == world.all_scenes()  # fixed order
    assert len(world.COLORS) == 4 and world.SHAPES == ("circle", "square", "triangle")
    assert Counter(s.position for s in SCENES) == {p: 12 for p in world.POSITIONS}
    assert world.Scene("circle", "red", "left").caption == "a red circle on the left"
    assert world.Scene("square", "blue", "top").caption == "a blue square at the top"
    assert world.Scene("triangle", "yellow", "bottom").caption == "a yellow triangle at the bottom"
    with pytest.raises(ValueError):
        world.Scene("hexagon", "red", "left")


def test_parse_caption_round_trip_and_rejects():
    for scene in SCENES:
        assert world.parse_caption(scene.caption) == scene
    assert world.parse_caption("  A Red  Circle on the LEFT ") == world.Scene("circle", "red", "left")
    for bad in [
        "",
        "a red circle",
        "a red circle at the left",
        "a purple circle on the left",
        "a red hexagon on the left",
        "red circle on the left",
        "a red circle on the left!",
        "a red circle on the middle",
        "a red circle on the left and a blue square at the top",
    ]:
        with pytest.raises(ValueError):
            world.parse_caption(bad)


# ----------------------------------------------------------------------------------------------------------
# Rendering and the judge


def test_render_basics():
    image = _render(SCENES[0], 0)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.array_equal(np.asarray(image), np.asarray(_render(SCENES[0], 0)))  # rng fixes the image
    assert not np.array_equal(np.asarray(image), np.asarray(_render(SCENES[0], 1)))  # jitter
    assert _render(SCENES[0], 0, size=64).size == (64, 64)
    # Dark background: the corners are near black.
    pixels = np.asarray(image).astype(int)
    assert pixels[[0, 0, -1, -1], [0, -1, 0, -1]].max() <= 12


@pytest.mark.parametrize("size", [24, 32, 64])
def test_judge_is_exact_on_renders(size):
    seeds = range(6) if size == 32 else range(2)
    for seed in seeds:
        for i, scene in enumerate(SCENES):
            image = _render(scene, [seed, i], size=size)
            assert world.judge(image, scene.caption).all, (scene, seed, size)


def test_judge_flags_exactly_the_changed_attribute():
    for i, scene in enumerate(SCENES):
        image = _render(scene, [7, i])
        for field, values in [("color", world.COLORS), ("shape", world.SHAPES), ("position", world.POSITIONS)]:
            for value in values:
                if value == getattr(scene, field):
                    continue
                judgement = world.judge(image, replace(scene, **{field: value}).caption)
                expected = {"color": True, "shape": True, "position": True, field: False}
                assert (judgement.color, judgement.shape, judgement.position) == tuple(expected.values()), (
                    scene,
                    field,
                    value,
                )
                assert not judgement.all


def test_judge_accepts_arrays_and_tensors():
    scene = world.Scene("triangle", "green", "right")
    image = _render(scene, 3)
    uint8 = np.asarray(image)
    floats = uint8.astype(np.float32) / 255
    chw = torch.from_numpy(floats).permute(2, 0, 1)
    for form in (uint8, floats, floats.transpose(2, 0, 1), chw):
        assert world.judge(form, scene.caption).all


def test_judge_without_an_object_is_all_false():
    caption = SCENES[0].caption
    noise = np.random.default_rng(0).random((32, 32, 3))
    for image in [
        Image.new("RGB", (32, 32)),
        np.zeros((32, 32, 3)),
        np.full((32, 32, 3), 0.5),
        noise,
        np.full((32, 32, 3), np.nan),
    ]:
        judgement = world.judge(image, caption)
        assert judgement == world.Judgement(False, False, False)
    with pytest.raises(ValueError):
        world.judge(np.zeros((32, 32, 3)), "not a caption")


def test_judge_survives_blur_and_noise():
    # Generated images are soft and noisy; the judge should still read mildly degraded renders.
    hits = []
    for i, scene in enumerate(SCENES):
        rng = np.random.default_rng([11, i])
        image = world.render(scene, rng=rng).filter(ImageFilter.GaussianBlur(1.0))
        noisy = np.clip(np.asarray(image) / 255 + rng.normal(0, 0.05, (32, 32, 3)), 0, 1)
        hits.append(world.judge(noisy, scene.caption).all)
    assert np.mean(hits) >= 0.95


def test_judge_batch():
    images = [_render(s, [0, i]) for i, s in enumerate(SCENES)]
    captions = [s.caption for s in SCENES]
    assert world.judge_batch(images, captions) == {"color": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    # Shift captions by one position within each (shape, color) group: position always wrong, rest right.
    shifted = [
        replace(s, position=world.POSITIONS[(world.POSITIONS.index(s.position) + 1) % 4]).caption for s in SCENES
    ]
    assert world.judge_batch(images, shifted) == {"color": 1.0, "shape": 1.0, "position": 0.0, "all": 0.0}
    half = images[:24] + [Image.new("RGB", (32, 32))] * 24
    assert world.judge_batch(half, captions)["all"] == 0.5
    batch = pil_to_tensor(images)  # a [N, 3, H, W] tensor works too
    assert world.judge_batch(batch, captions)["all"] == 1.0
    with pytest.raises(ValueError):
        world.judge_batch(images, captions[:-1])


# ----------------------------------------------------------------------------------------------------------
# Datasets


def _pixels(examples):
    return [np.asarray(image) for image, _ in examples]


def test_make_examples_seeded_and_balanced():
    a = world.make_examples(100, seed=0)
    b = world.make_examples(100, seed=0)
    c = world.make_examples(100, seed=1)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b), strict=True))
    assert [cap for _, cap in a] != [cap for _, cap in c]
    assert not all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(c), strict=True))
    # A shorter list is a prefix of a longer one.
    assert [cap for _, cap in world.make_examples(30, seed=0)] == [cap for _, cap in a[:30]]
    # Balanced: every scene 2 or 3 times in 100; exactly twice in 96; the order is shuffled.
    counts = Counter(cap for _, cap in a)
    assert set(counts) == {s.caption for s in SCENES} and set(counts.values()) <= {2, 3}
    assert set(Counter(cap for _, cap in a[:96]).values()) == {2}
    assert [cap for _, cap in a[:48]] != [s.caption for s in SCENES]
    assert all(image.size == (32, 32) for image, _ in a)
    # Every example is judged correct against its own caption.
    assert world.judge_batch([img for img, _ in a], [cap for _, cap in a])["all"] == 1.0


def test_write_imagefolder(tmp_path):
    out = world.write_imagefolder(tmp_path / "shapes", 10, seed=3)
    assert out == tmp_path / "shapes"
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(10)]
    assert not (tmp_path / "shapes.tmp").exists()
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    expected = world.make_examples(10, seed=3)
    assert [r["text"] for r in rows] == [cap for _, cap in expected]
    for row, (image, _) in zip(rows, expected, strict=True):
        with Image.open(out / row["file_name"]) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))  # PNG is lossless
    with pytest.raises(SpinDiffusionError):  # never overwrites data
        world.write_imagefolder(out, 5, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Features for the Fréchet distance


@pytest.fixture(scope="module")
def real_images():
    return pil_to_tensor([image for image, _ in world.make_examples(96, seed=0)])


def test_image_features_fixed_and_independent_of_global_rng(real_images):
    torch.manual_seed(0)
    a = world.image_features(real_images[:8])
    torch.manual_seed(12345)
    torch.rand(100)
    b = world.image_features(real_images[:8])
    assert a.ndim == 2 and a.shape[0] == 8 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.allclose(world.image_features(real_images[:1]), a[:1], atol=1e-5)  # per image, not per batch
    assert not torch.allclose(a[0], a[1])  # different images, different features
    assert world.image_features(torch.nn.functional.interpolate(real_images[:2], size=64)).shape == (2, a.shape[1])


def test_frechet_distance_in_world_features(real_images):
    """The demo's FD: scoring.frechet_distance_metric (torchmetrics) in the world's fixed feature space."""
    net = world.FeatureNet()
    assert net(real_images[:4]).shape == (4, net.num_features)
    reals = tensor_to_pil(real_images)
    assert fd(reals, reals, net) == pytest.approx(0.0, abs=1e-6)
    # Monotone in a brightness shift, and symmetric.
    shifted = [tensor_to_pil((real_images + s).clamp(0, 1)) for s in (0.02, 0.05, 0.1, 0.2)]
    distances = [fd(reals, f, net) for f in shifted]
    assert all(d1 < d2 for d1, d2 in zip(distances, distances[1:], strict=False)), distances
    assert distances[0] > 0
    for f in shifted:
        assert fd(f, reals, net) == pytest.approx(fd(reals, f, net), rel=1e-4)
    # Two samples of the world are much closer than the world and a blurred or single-color version of it.
    other = [img for img, _ in world.make_examples(96, seed=1)]
    blurred = [img.filter(ImageFilter.GaussianBlur(1.5)) for img in other]
    reds = [img for img, cap in world.make_examples(384, seed=2) if " red " in cap]
    same_world = fd(reals, other, net)
    assert 3 * same_world < fd(reals, blurred, net)
    assert 3 * same_world < fd(reals, reds, net)


def test_split_is_a_balanced_partition_of_the_scenes():
    """The held-out split: 24 train / 12 validation / 12 test scenes, disjoint, every attribute in every split."""
    splits = {name: world.split_scenes(name) for name in world.SPLITS}
    assert {name: len(scenes) for name, scenes in splits.items()} == {"train": 24, "validation": 12, "test": 12}
    assert sorted(s.caption for scenes in splits.values() for s in scenes) == sorted(
        s.caption for s in world.all_scenes()
    )
    for scenes in splits.values():
        assert {s.shape for s in scenes} == set(world.SHAPES)
        assert {s.color for s in scenes} == set(world.COLORS)
        assert {s.position for s in scenes} == set(world.POSITIONS)
    prompts = world.split_prompts("test", 2)
    assert len(prompts) == 24 and prompts[:12] == prompts[12:] == [s.caption for s in splits["test"]]
    with pytest.raises(ValueError, match="unknown split"):
        world.split_scenes("dev")


def test_examples_can_be_restricted_to_scenes_and_noisy_captions_are_counted():
    train = world.split_scenes("train")
    examples = world.make_examples(48, seed=3, scenes=train)
    assert {caption for _, caption in examples} == {s.caption for s in train}  # 2 each, nothing held out
    pairs, wrong = world.noisy_examples(200, seed=0, noise=0.25)
    clean = world.make_examples(200, seed=1)
    assert sum(a != b for (_, a), (_, b) in zip(pairs, clean, strict=True)) == wrong
    assert 25 <= wrong <= 75
