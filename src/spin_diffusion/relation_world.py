"""A harder procedural world: two colored shapes and a spatial relation, with an exact judge of binding.

Every image shows two filled shapes of different colors and different shapes on a dark background, one beside or
above the other: "a red circle left of a blue square", "a green triangle above a yellow circle". Text-to-image
models get such prompts wrong by *binding*: the right colors on the wrong objects, or the right objects in the
wrong order. The judge reads both objects and reports each part apart (issue 28, item 5):

- ``shape``: the two shapes drawn are the caption's two shapes;
- ``color``: each shape carries its own color (a color swapped between the objects fails here only);
- ``relation``: the first object stands where the relation puts it (a reversed relation fails here only).

Objects are identified by their shape (the noun), as attribute-binding benchmarks do; when the shapes are wrong but
the colors are the caption's, the colors identify them instead, so a shape error alone does not also fail the
relation. 4 colors x 3 shapes, ordered pairs with distinct colors and shapes, 4 relations: 288 scenes, each image
layout described by two captions ("A left of B" = "B right of A"). The simple world (`world`) stays the demo's
default; this one's base is shipped in assets/relation_base (`SHIPPED_BASE`, made by `scripts/train_demo_base.py
--world relations`) and is what `scripts/selfplay_study.py --world relations` fine-tunes (docs/DEMO_STUDY.md §4).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
from PIL import Image, ImageDraw

from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.world import (
    _MIN_CONTRAST,
    COLORS,
    SHAPES,
    _nearest_color,
    _shape_of,
    _shape_polygon,
    _to_float_hwc,
    save_imagefolder,
)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SHIPPED_BASE = Path(__file__).resolve().parent / "assets" / "relation_base"  # scripts/train_demo_base.py
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Rendering ranges, as fractions of the image side.
_SIDE_RANGE = (0.26, 0.32)  # side of each shape's bounding box
_OFFSET_RANGE = (0.20, 0.24)  # distance of each centroid from the image center, along the relation's axis
_ACROSS_JITTER = 0.08  # max |offset| of each centroid across the relation's axis (drawn per object)
_BRIGHTNESS_RANGE = (0.85, 1.0)
_BACKGROUND_MAX = 12
_SUPERSAMPLE = 4

# The judge's thresholds and its shape and color readings are `world`'s (calibrated there: _MIN_CONTRAST,
# _shape_of, _nearest_color), re-checked on this world's smaller objects by tests/test_relation_world.py (every
# rendered scene judged all-correct).


# ----------------------------------------------------------------------------------------------------------
# Scenes and captions


@dataclass(frozen=True)
class Scene:
    """Object 1 (color, shape) stands in `relation` to object 2; colors differ and shapes differ."""

    color1: str
    shape1: str
    relation: str
    color2: str
    shape2: str

    def __post_init__(self) -> None:
        known = {self.color1, self.color2} <= set(COLORS) and {self.shape1, self.shape2} <= set(SHAPES)
        if not known or self.relation not in RELATIONS:
            raise ValueError(
                f"unknown scene {self}; colors in {tuple(COLORS)}, shapes in {SHAPES}, relation in {RELATIONS}"
            )
        if self.color1 == self.color2 or self.shape1 == self.shape2:
            raise ValueError(f"the two objects need different colors and different shapes, got {self}")

    @property
    def caption(self) -> str:
        """E.g. "a red circle left of a blue square"."""
        return f"a {self.color1} {self.shape1} {self.relation} a {self.color2} {self.shape2}"

    def mirrored(self) -> Scene:
        """The same layout described from object 2: "a blue square right of a red circle"."""
        return Scene(self.color2, self.shape2, _INVERSE[self.relation], self.color1, self.shape1)


def all_scenes() -> list[Scene]:
    """All 288 scenes in a fixed order: object 1 (color-major, then shape), relation, object 2."""
    return [
        Scene(c1, s1, rel, c2, s2)
        for c1 in COLORS
        for s1 in SHAPES
        for rel in RELATIONS
        for c2 in COLORS
        for s2 in SHAPES
        if c1 != c2 and s1 != s2
    ]


@lru_cache(maxsize=1)
def _caption_table() -> dict[str, Scene]:
    return {scene.caption: scene for scene in all_scenes()}


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption`. Case and runs of whitespace are ignored; anything else raises ValueError."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    try:
        return _caption_table()[" ".join(caption.lower().split())]
    except KeyError:
        raise ValueError(
            f"not a relation-world caption: {caption!r}; expected e.g. 'a red circle left of a blue square' "
            "(two different colors, two different shapes; left of, right of, above, below)"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Held-out split
#
# A layout and its mirrored caption ("A left of B", "B right of A") show the same images, so both sit in one split:
# the split is fixed on the canonical caption (relation "left of" or "above") by
# r = (2·color1 + color2 + shape1 + 2·shape2 + axis) mod 4 (palette / SHAPES indices; axis 0 horizontal, 1 vertical):
# r = 0 -> "test", r = 2 -> "validation", r = 1 or 3 -> "train". Every color, shape and relation occurs in every
# split, in both object slots (tests/test_relation_world.py); a held-out scene is a new binding of attributes the
# fine-tuning data has all seen.

SPLITS: tuple[str, ...] = ("train", "validation", "test")


def split_of(scene: Scene) -> str:
    """ "train", "validation" or "test" (see the comment above)."""
    canon = scene if scene.relation in ("left of", "above") else scene.mirrored()
    colors, axis = list(COLORS), 0 if canon.relation == "left of" else 1
    r = (
        2 * colors.index(canon.color1)
        + colors.index(canon.color2)
        + SHAPES.index(canon.shape1)
        + 2 * SHAPES.index(canon.shape2)
        + axis
    ) % 4
    return {0: "test", 2: "validation"}.get(r, "train")


def split_scenes(split: str) -> list[Scene]:
    """The scenes of one split, in `all_scenes` order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return [scene for scene in all_scenes() if split_of(scene) == split]


def split_prompts(split: str, per_scene: int) -> list[str]:
    """Each caption of `split` `per_scene` times, scene-major in rounds (a prefix covers every scene evenly)."""
    captions = [scene.caption for scene in split_scenes(split)]
    return [caption for _ in range(per_scene) for caption in captions]


# ----------------------------------------------------------------------------------------------------------
# Rendering and datasets


def _centroids(relation: str, along: float, across: tuple[float, float]) -> tuple[tuple[float, float], ...]:
    """(x, y) of objects 1 and 2 in fractions of the side: `along` either side of the center on the relation's
    axis, each `across` off it."""
    sign = -1.0 if relation in ("left of", "above") else 1.0  # object 1 before object 2 on the axis
    if relation in ("left of", "right of"):
        return (0.5 + sign * along, 0.5 + across[0]), (0.5 - sign * along, 0.5 + across[1])
    return (0.5 + across[0], 0.5 + sign * along), (0.5 + across[1], 0.5 - sign * along)


def render(scene: Scene, *, size: int = 32, rng: np.random.Generator) -> Image.Image:
    """Render `scene` as a `size` x `size` RGB image with random size, placement and brightness jitter.

    Each shape's bounding box side is 0.26-0.32 of the image side; the centroids lie 0.20-0.24 of the side either
    side of the center along the relation's axis (so the shapes never touch) and at most 0.08 across it, each its
    own; each color is the palette color times a brightness factor in [0.85, 1]; the background a uniform dark gray
    in [0, 12]. Anti-aliased as `world.render`. `judge` is exact on renders of size >= 32 (tested).
    """
    if size < 24:
        raise ValueError(f"size must be >= 24 so that two shapes stay recognisable, got {size}")
    # 1. Random parameters, always in this order (an rng seed fixes the image).
    sides = rng.uniform(*_SIDE_RANGE, size=2)
    along = rng.uniform(*_OFFSET_RANGE)
    across = rng.uniform(-_ACROSS_JITTER, _ACROSS_JITTER, size=2)
    brightness = rng.uniform(*_BRIGHTNESS_RANGE, size=2)
    background = int(rng.integers(0, _BACKGROUND_MAX + 1))
    # 2. Draw both shapes at `_SUPERSAMPLE` x and box-filter down.
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    objects = ((scene.color1, scene.shape1), (scene.color2, scene.shape2))
    centers = _centroids(scene.relation, along, tuple(across))
    for (color, shape), (cx, cy), side, bright in zip(objects, centers, sides, brightness, strict=True):
        kind, points = _shape_polygon(shape, cx * big, cy * big, side * big)
        fill = tuple(int(round(c * bright)) for c in COLORS[color])
        {"ellipse": draw.ellipse, "rectangle": draw.rectangle, "polygon": draw.polygon}[kind](points, fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _balanced_order(n: int, seed: int, scenes: list[Scene] | None) -> list[Scene]:
    """`n` scenes: consecutive seeded permutations of `scenes` (default: all 288)."""
    scenes = all_scenes() if scenes is None else list(scenes)
    if not scenes:
        raise ValueError("scenes must not be empty")
    rng = np.random.default_rng([seed, 0])
    order: list[Scene] = []
    while len(order) < n:
        order.extend(scenes[i] for i in rng.permutation(len(scenes)))
    return order[:n]


def make_examples(
    n: int, *, seed: int, size: int = 32, scenes: list[Scene] | None = None
) -> list[tuple[Image.Image, str]]:
    """`n` (image, caption) pairs, deterministic in `seed`, scenes in balanced shuffled rounds; example i is
    rendered with its own generator seeded by (seed, i), so a shorter list is a prefix of a longer one."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [
        (render(scene, size=size, rng=np.random.default_rng([seed, 1, i])), scene.caption)
        for i, scene in enumerate(_balanced_order(n, seed, scenes))
    ]


def noisy_examples(n: int, *, seed: int, noise: float, size: int = 32) -> tuple[list[tuple[Image.Image, str]], int]:
    """`make_examples(n, seed=seed + 1)` over all scenes with a fraction `noise` of the captions swapped for another
    scene's (a pretraining corpus, as `world.noisy_examples`). Returns (pairs, #wrong)."""
    rng = random.Random(seed)
    captions = [s.caption for s in all_scenes()]
    pairs, wrong = [], 0
    for image, caption in make_examples(n, seed=seed + 1, size=size):
        if rng.random() < noise:
            caption = rng.choice([c for c in captions if c != caption])
            wrong += 1
        pairs.append((image, caption))
    return pairs, wrong


def write_imagefolder(out_dir: Path, n: int, *, seed: int, size: int = 32, scenes: list[Scene] | None = None) -> Path:
    """Write `make_examples(n, ...)` as an imagefolder (``00000.png``, ..., ``metadata.jsonl``; atomic, refuses a
    non-empty `out_dir`: `world.save_imagefolder`) and return `out_dir`."""
    if n < 1:
        raise SpinDiffusionError(f"the relation-world dataset needs at least 1 image, got n={n}; pass n >= 1")
    return save_imagefolder(out_dir, lambda: make_examples(n, seed=seed, size=size, scenes=scenes))


# ----------------------------------------------------------------------------------------------------------
# Judge


@dataclass(frozen=True)
class Judgement:
    """Which parts of a relation caption an image shows (module docstring)."""

    color: bool
    shape: bool
    relation: bool

    @property
    def all(self) -> bool:
        return self.color and self.shape and self.relation


@dataclass(frozen=True)
class _Object:
    color: str
    shape: str
    centroid: tuple[float, float]  # (x, y) in fractions of width / height


def _describe(rgb: np.ndarray, value: np.ndarray, background: float, blob: np.ndarray, around: np.ndarray) -> _Object:
    """Color, shape and centroid of one blob (`world._detect` steps 3-6 on a given blob and neighbourhood)."""
    height, width = value.shape
    level = float(np.median(value[blob]))
    soft = np.clip((value - background) / max(level - background, 1e-9), 0.0, 1.0) * around
    soft = np.clip((soft - 0.1) / 0.8, 0.0, 1.0)
    area = max(float(soft.sum()), 1e-9)
    fill_ratio = area / max(float(soft.max(axis=0).sum() * soft.max(axis=1).sum()), 1e-9)
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    row_mass = soft.sum(axis=1) / area
    cy, cx = float(row_mass @ ys), float((soft.sum(axis=0) / area) @ xs)
    variance = float(row_mass @ (ys - cy) ** 2)
    skew_y = float(row_mass @ (ys - cy) ** 3) / max(variance, 1e-9) ** 1.5
    color = _nearest_color(rgb[blob].mean(axis=0) - background)
    return _Object(color=color, shape=_shape_of(fill_ratio, skew_y), centroid=(cx / width, cy / height))


def _detect(image: Image.Image | np.ndarray | torch.Tensor) -> tuple[_Object, _Object] | None:
    """The two largest bright objects, or None when there are fewer than two."""
    rgb = _to_float_hwc(image)
    height, width, _ = rgb.shape
    # 1. Brightness = max channel, 3x3-median filtered; background = its median; objects = the two largest
    #    8-connected blobs above half-way between background and peak, each clearly above the background.
    value = scipy.ndimage.median_filter(rgb.max(axis=2), size=3, mode="nearest")
    background = float(np.median(value))
    peak = float(np.percentile(value, 99.5))
    if peak - background < _MIN_CONTRAST:
        return None
    labels, count = scipy.ndimage.label(value > (background + peak) / 2, structure=np.ones((3, 3)))
    if count < 2:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    first, second = (int(i) + 1 for i in np.argsort(-sizes, kind="stable")[:2])
    blobs = [labels == first, labels == second]
    if any(b.sum() < max(4, 0.003 * height * width) for b in blobs):
        return None
    # 2. Each pixel belongs to its nearest object; each object's neighbourhood is its blob dilated by 2 px within
    #    its own side, so the blurred edge of one object never counts towards the other.
    mask = np.zeros(value.shape, dtype=np.int64)
    mask[blobs[0]], mask[blobs[1]] = 1, 2
    nearest = mask[tuple(scipy.ndimage.distance_transform_edt(mask == 0, return_distances=False, return_indices=True))]
    objects = []
    for i, blob in enumerate(blobs, start=1):
        around = scipy.ndimage.binary_dilation(blob, structure=np.ones((3, 3)), iterations=2) & (nearest == i)
        objects.append(_describe(rgb, value, background, blob, around))
    return objects[0], objects[1]


def _stands(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    """Does an object at `first` stand `relation` to one at `second`? The larger of |dx|, |dy| picks the axis."""
    dx, dy = first[0] - second[0], first[1] - second[1]
    if abs(dx) >= abs(dy):
        return relation == ("left of" if dx < 0 else "right of")
    return relation == ("above" if dy < 0 else "below")


def judge(image: Image.Image | np.ndarray | torch.Tensor, caption: str) -> Judgement:
    """Does `image` show the shapes, the color of each shape and the relation that `caption` names?

    `image`: PIL image, or an array/tensor [H, W, 3] or [3, H, W], uint8 or float in [0, 1]. The two largest
    bright blobs are the objects; an image with fewer than two gets all False. Objects are matched to the caption's
    by shape, else by color (module docstring); unmatched objects fail `color` and `relation`. `caption` must parse
    (`parse_caption`), else ValueError.
    """
    scene = parse_caption(caption)
    found = _detect(image)
    if found is None:
        return Judgement(color=False, shape=False, relation=False)
    a, b = found
    shape_ok = {a.shape, b.shape} == {scene.shape1, scene.shape2}
    if shape_ok:  # identified by shape: object 1 is the one drawn as shape1
        one, two = (a, b) if a.shape == scene.shape1 else (b, a)
        color_ok = one.color == scene.color1 and two.color == scene.color2
    elif {a.color, b.color} == {scene.color1, scene.color2}:  # identified by color
        one, two = (a, b) if a.color == scene.color1 else (b, a)
        color_ok = True
    else:
        return Judgement(color=False, shape=False, relation=False)
    return Judgement(color=color_ok, shape=shape_ok, relation=_stands(one.centroid, two.centroid, scene.relation))


def judge_batch(images, captions: list[str]) -> dict[str, float]:
    """Accuracies {"color", "shape", "relation", "all"} in [0, 1] of `judge` over paired images and captions.

    `images`: a list of what `judge` accepts, or a tensor [N, 3, H, W] in [0, 1].
    """
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(captions) == 0:
        raise ValueError("judge_batch needs at least one image")
    judgements = [judge(image, caption) for image, caption in zip(images, captions, strict=True)]
    n = len(judgements)
    return {
        "color": sum(j.color for j in judgements) / n,
        "shape": sum(j.shape for j in judgements) / n,
        "relation": sum(j.relation for j in judgements) / n,
        "all": sum(j.all for j in judgements) / n,
    }
