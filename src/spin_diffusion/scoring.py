"""Scoring images (not models: model_eval renders models into images for this module): scorers (PickScore, HPSv2,
ImageReward, Aesthetic, CLIP score, the shapes judge), win rates,
Fréchet distance (torchmetrics, with the feature network passed in), and the markdown table.

Images come in as ``list[PIL.Image.Image]`` (this module never imports diffusers or the sampler), one per
prompt. A scorer maps ``(images, prompts)`` to per-image scores ``[N]``; ``summarize`` turns them into
``{"mean", "median", "win_rate"}`` per scorer and ``flat_metrics`` into the flat ``metrics`` of eval.json.

Scorers (``build_scorer(name, path)``; ``path`` is a local folder or a Hub id, resolved through the Hugging Face
cache by spin_diffusion.hub).
What ``path`` must hold, and what the score is:

- ``pickscore``: the ``yuvalkirstain/PickScore_v1`` CLIP folder (``<path>/model`` or ``<path>``) and the
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor (``<path>/processor``, or ``<path>`` when it holds
  ``preprocessor_config.json`` + tokenizer files). Score ``logit_scale.exp() * cos`` (about 18-23).
- ``clip``: any transformers CLIP folder with its processor (e.g. ``openai/clip-vit-large-patch14``), same
  layout. Score ``100 * max(cos, 0)`` (torchmetrics' CLIPScore convention; papers quoting 0.33 mean 33).
- ``aesthetic``: a CLIP ViT-L/14 folder with its image processor (``openai/clip-vit-large-patch14``;
  ``<path>/clip`` or ``<path>``) and LAION's ``sac+logos+ava1-l14-linearMSE.pth`` (``<path>/mlp`` or the one
  ``.pth``/``.pt`` in ``<path>``). Score: the MLP on the L2-normalised image embedding (about 1-10).
- ``hpsv2``: ``HPS_v2_compressed.pt`` (or ``HPS_v2.1_compressed.pt``) from ``xswu/HPSv2``, the one ``.pt`` in
  ``<path>`` (or ``path`` = the file); without open_clip also a CLIP tokenizer (the tokenizer files of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) in ``<path>/tokenizer`` or ``<path>``. Score: the raw cosine
  (about 0.25-0.30; papers often print it x100).
- ``imagereward``: ``ImageReward.pt`` (+ optional ``med_config.json``) from ``THUDM/ImageReward`` and a
  ``bert-base-uncased`` tokenizer (``vocab.txt``) in ``<path>/tokenizer`` or ``<path>``. Score: the normalised
  reward (about -2..2).
- ``shapes_judge`` (no weights): the built-in world's exact judge, 1.0 when color, shape and position all match
  the caption, else 0.0; ``shapes_color`` / ``shapes_shape`` / ``shapes_position`` score one attribute.

``path`` is one folder, or comma-separated ``key=value`` pairs naming each part explicitly:
``pickscore``/``clip``: ``model=,processor=``; ``aesthetic``: ``clip=,mlp=``; ``hpsv2``:
``ckpt=,tokenizer=,backend=auto|open_clip|transformers,arch=,config=``; ``imagereward``:
``ckpt=,tokenizer=,med_config=``. A missing or wrong path raises SpinDiffusionError naming what to download.

Win rate (``summarize``/``win_rate``): the fraction of prompts where the model's image scores better than the
baseline model's image for the same prompt (and the same index, so the same seed); a tie counts as half a win,
so two identical models get 0.5. "Better" is ``>`` for higher-is-better scorers and ``<`` otherwise. With
several images per prompt, repeat each prompt in ``prompts``: the win rate is then over image pairs.
Median: the average of the two middle values for an even count (numpy's convention, not ``torch.median``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.images import pil_to_tensor

# name -> what it needs on disk (None: no weights)
SCORER_HINTS: dict[str, str | None] = {
    "pickscore": "yuvalkirstain/PickScore_v1 (model) and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (processor)",
    "hpsv2": "HPS_v2_compressed.pt from xswu/HPSv2 (+ CLIP-ViT-H-14 tokenizer files without open_clip)",
    "imagereward": "ImageReward.pt + med_config.json from THUDM/ImageReward and the bert-base-uncased tokenizer",
    "aesthetic": "openai/clip-vit-large-patch14 and sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor)",
    "clip": "a transformers CLIP model with its processor, e.g. openai/clip-vit-large-patch14",
    "shapes_judge": None,
    "shapes_color": None,
    "shapes_shape": None,
    "shapes_position": None,
}
SCORER_NAMES: tuple[str, ...] = tuple(SCORER_HINTS)


@runtime_checkable
class Scorer(Protocol):
    """Scores images against prompts. ``__call__`` returns float32 CPU scores ``[N]``, one per (image, prompt)."""

    name: str
    higher_is_better: bool

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor: ...


def check_prompts(scorers: Sequence[Scorer], prompts: Sequence[str]) -> None:
    """Let every scorer that can refuse prompts (a `check_prompts` method) do so before anything is rendered."""
    for scorer in scorers:
        check = getattr(scorer, "check_prompts", None)
        if check is not None:
            check(list(prompts))


def build_scorer(
    name: str,
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    dtype: torch.dtype | str | None = None,
) -> Scorer:
    """Build scorer ``name`` (one of ``SCORER_NAMES``) from the local weights at ``path`` (see the module doc).

    ``device``/``dtype`` place the model (dtype default float32; scores are returned as float32 on the CPU);
    ``batch_size`` images go through the model at once. Models run in eval mode under ``torch.no_grad()``.
    A weights-based scorer without a usable ``path`` raises SpinDiffusionError naming what to download.
    """
    from spin_diffusion.scorers._common import resolve_dtype

    key = name.strip().lower()
    dt = resolve_dtype(dtype)
    if key not in SCORER_HINTS:
        raise SpinDiffusionError(f"unknown scorer {name!r}; choose from {', '.join(SCORER_NAMES)}")
    if key.startswith("shapes_"):
        from spin_diffusion.scorers.shapes import ShapesJudgeScorer

        attribute = "all" if key == "shapes_judge" else key[len("shapes_") :]
        return ShapesJudgeScorer(attribute, batch_size=max(batch_size, 1))
    if path is None or str(path).strip() == "":
        raise SpinDiffusionError(f"{key} needs a local copy of {SCORER_HINTS[key]}: pass --scorer-path {key}=/path")
    kwargs = {"device": device, "dtype": dt, "batch_size": batch_size}
    if key == "pickscore":
        from spin_diffusion.scorers.clip import PickScoreScorer

        return PickScoreScorer(path, **kwargs)
    if key == "clip":
        from spin_diffusion.scorers.clip import ClipScoreScorer

        return ClipScoreScorer(path, **kwargs)
    if key == "aesthetic":
        from spin_diffusion.scorers.clip import AestheticScorer

        return AestheticScorer(path, **kwargs)
    if key == "hpsv2":
        from spin_diffusion.scorers.hpsv2 import HPSv2Scorer

        return HPSv2Scorer(path, **kwargs)
    from spin_diffusion.scorers.imagereward import ImageRewardScorer

    return ImageRewardScorer(path, **kwargs)


def parse_scorer_paths(items: Sequence[str]) -> dict[str, str]:
    """``["pickscore=/a", "aesthetic=clip=/b,mlp=/c.pth"]`` -> ``{"pickscore": "/a", "aesthetic": "clip=/b,..."}``
    (split at the first ``=``), for a ``--scorer-path NAME=PATH`` option."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip().lower()
        if not sep or not path.strip():
            raise SpinDiffusionError(f"--scorer-path {item!r}: expected NAME=PATH, e.g. pickscore=/models/pickscore")
        if name not in SCORER_HINTS:
            raise SpinDiffusionError(
                f"--scorer-path {item!r}: unknown scorer {name!r}; choose from {', '.join(SCORER_NAMES)}"
            )
        out[name] = path.strip()
    return out


# ----------------------------------------------------------------------------------------------------------
# Scoring and summaries


def score_images(
    images: Sequence[Image.Image], prompts: Sequence[str], scorers: Sequence[Scorer]
) -> dict[str, torch.Tensor]:
    """Run every scorer: ``{scorer.name: float32 scores [N]}``. ``images[i]`` was generated for ``prompts[i]``."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise SpinDiffusionError(f"got {len(images)} images but {len(prompts)} prompts; they must pair up one to one")
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise SpinDiffusionError(f"scorer names must be unique, got {names}")
    out = {}
    for scorer in scorers:
        scores = torch.as_tensor(scorer(images, prompts)).detach().float().cpu().reshape(-1)
        if scores.numel() != len(images):
            raise RuntimeError(f"scorer {scorer.name} returned {scores.numel()} scores for {len(images)} images")
        out[scorer.name] = scores
    return out


def win_rate(scores: torch.Tensor, baseline: torch.Tensor, *, higher_is_better: bool = True) -> float:
    """Fraction of paired items where ``scores`` beats ``baseline`` (ties count 1/2). Both ``[N]``, N >= 1."""
    a = torch.as_tensor(scores).detach().double().reshape(-1)
    b = torch.as_tensor(baseline).detach().double().reshape(-1)
    if a.numel() != b.numel():
        raise SpinDiffusionError(
            f"win rate needs the same prompts for model and baseline, got {a.numel()} and {b.numel()} scores"
        )
    if a.numel() == 0:
        raise SpinDiffusionError("win rate needs at least one prompt")
    wins = (a > b) if higher_is_better else (a < b)
    return float((wins.double() + 0.5 * (a == b).double()).mean())


def summarize(
    scores: Mapping[str, torch.Tensor],
    baseline: Mapping[str, torch.Tensor] | None = None,
    *,
    higher_is_better: Mapping[str, bool] | None = None,
) -> dict[str, dict[str, float]]:
    """Per scorer: ``{"mean", "median"}`` and, when ``baseline`` has scores for that scorer, ``"win_rate"``
    (``win_rate`` above: same prompts in the same order; ties half). ``higher_is_better[name]`` defaults to True."""
    hib = dict(higher_is_better or {})
    out: dict[str, dict[str, float]] = {}
    for name, values in scores.items():
        x = torch.as_tensor(values).detach().double().reshape(-1)
        if x.numel() == 0:
            raise SpinDiffusionError(f"no scores for {name}; evaluate at least one prompt")
        entry = {"mean": float(x.mean()), "median": float(torch.quantile(x, 0.5))}
        if baseline is not None and name in baseline:
            entry["win_rate"] = win_rate(x, baseline[name], higher_is_better=hib.get(name, True))
        out[name] = entry
    return out


def flat_metrics(summary: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """One model's summary -> flat ``{"<scorer>": mean, "<scorer>_median": ..., "<scorer>_win_rate": ...}``
    (the ``metrics`` object of an iteration's eval.json that report.py reads)."""
    out: dict[str, float] = {}
    for name, stats in summary.items():
        for stat, value in stats.items():
            out[name if stat == "mean" else f"{name}_{stat}"] = float(value)
    return out


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance (torchmetrics) with a user-given feature network


class _Features(torch.nn.Module):
    """Wraps a feature network so torchmetrics sees ``num_features`` and 2-d ``[B, F]`` output."""

    def __init__(self, net: torch.nn.Module, num_features: int):
        super().__init__()
        self.net = net
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape[0], -1)


def frechet_distance_metric(
    images_a: Sequence[Image.Image],
    images_b: Sequence[Image.Image],
    feature: torch.nn.Module,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    resolution: tuple[int, int] | int | None = None,
) -> float:
    """Fréchet distance between two image sets in the feature space of ``feature``, computed by torchmetrics'
    ``FrechetInceptionDistance(feature=<module>)`` (float64 statistics; >= 2 images per set).

    Input scaling: ``feature`` receives float32 ``[B, 3, H, W]`` RGB in **[0, 1]** on ``device`` (torchmetrics'
    ``normalize=True`` passes a custom network's input through unchanged), so any resizing to the network's
    size and any mean/std normalisation belong inside ``feature``. Images are first brought to one size:
    ``resolution`` (int or (H, W)) if given, else the size of ``images_a[0]`` (bicubic resize where needed).
    ``feature`` may expose ``num_features``; if not, it is probed on the first batch. Its output is flattened
    to ``[B, F]``. The value is clamped at 0 (float error can make identical sets read -1e-7).
    With the Inception network of "FID" (torch-fidelity, which needs torchvision) this is FID proper; with
    e.g. ``clip_feature_network`` it is FD in CLIP space -- only compare numbers from the same network.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from spin_diffusion.scorers._common import batches

    images_a, images_b = list(images_a), list(images_b)
    if len(images_a) < 2 or len(images_b) < 2:
        raise SpinDiffusionError(
            f"the Fréchet distance needs at least 2 images per set, got {len(images_a)} and {len(images_b)}"
        )
    if resolution is None:
        w, h = images_a[0].size
        size = (h, w)
    else:
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    device = torch.device(device)
    net = feature.to(device).eval()
    num = getattr(net, "num_features", None)
    with torch.no_grad():
        if isinstance(num, torch.Tensor):
            num = int(num.item())
        if not isinstance(num, int):
            probe = pil_to_tensor(images_a[: min(batch_size, len(images_a))], size).to(device)
            num = int(net(probe).reshape(probe.shape[0], -1).shape[1])
        # sync_on_compute=False: the images are all here (the main process scores alone); a synced compute()
        # would wait, inside a multi-process run, for ranks that never call it
        metric = FrechetInceptionDistance(feature=_Features(net, num), normalize=True, sync_on_compute=False).to(
            device
        )
        for images, real in ((images_a, True), (images_b, False)):
            for sl in batches(len(images), batch_size):
                metric.update(pil_to_tensor(images[sl], size).to(device), real=real)
        value = float(metric.compute())
    if not math.isfinite(value):
        raise SpinDiffusionError("the Fréchet distance is not finite; check the feature network's outputs")
    return max(value, 0.0)


class ClipImageFeatures(torch.nn.Module):
    """A transformers CLIP vision tower as an FD feature network: [0, 1] images -> projected image embeddings.

    Resizes the shorter side to the model's input size (bicubic, antialiased), centre-crops, normalises with the
    processor's mean/std (CLIP's defaults if the folder has no preprocessor_config.json).
    """

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.size = int(model.config.vision_config.image_size)
        self.num_features = int(model.config.projection_dim)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (nh, nw) != (h, w):
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top : top + self.size, left : left + self.size]
        x = (x - self.mean) / self.std
        out = self.model.get_image_features(pixel_values=x.to(self.model.dtype))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out.float()


def clip_feature_network(path: str | os.PathLike) -> ClipImageFeatures:
    """``ClipImageFeatures`` from a transformers CLIP folder or Hub id (e.g. openai/clip-vit-large-patch14)."""
    from transformers import CLIPModel

    from spin_diffusion import hub
    from spin_diffusion.scorers._common import CLIP_MEAN, CLIP_STD

    folder = hub.resolve_repo(path, what="--fid-features")
    if not (folder / "config.json").is_file():
        raise SpinDiffusionError(
            f"{folder} is not a transformers CLIP folder (no config.json); download e.g. openai/clip-vit-large-patch14"
        )
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise SpinDiffusionError(f"cannot load CLIP from {folder}: {e}".replace("\n", " ")) from e
    mean, std = CLIP_MEAN, CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text(encoding="utf-8"))
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return ClipImageFeatures(model, mean, std)


# ----------------------------------------------------------------------------------------------------------
# Outputs


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.4f}"


def format_table(
    metrics: Mapping[str, Mapping[str, float | None]], scorers: Sequence[str], *, baseline: str | None = None
) -> str:
    """A markdown table of flat metrics (``{model: {"<scorer>": mean, "<scorer>_median", "<scorer>_win_rate",
    ...}}``, as in eval.json), one row per (model, scorer): ``| model | scorer | mean | median | win rate |``.

    The win rate is a percentage ("–" where there is none, e.g. the baseline itself). Set-level metrics (keys
    that belong to no scorer, e.g. ``fd``) get a column each, repeated on every row of their model; a model
    without scorers gets one row with scorer "–".
    """
    scorer_keys = {f"{n}{suffix}" for n in scorers for suffix in ("", "_median", "_win_rate")}
    extra = list(dict.fromkeys(k for per_model in metrics.values() for k in per_model if k not in scorer_keys))
    win_head = f"win rate vs {baseline}" if baseline else "win rate"
    header = ["model", "scorer", "mean", "median", win_head, *extra]
    rows = []
    for model, m in metrics.items():
        for scorer in scorers or ["–"]:
            w = m.get(f"{scorer}_win_rate")
            win = "–" if w is None or not math.isfinite(float(w)) else f"{100.0 * float(w):.1f}%"
            rows.append(
                [model, scorer, _fmt(m.get(scorer)), _fmt(m.get(f"{scorer}_median")), win]
                + [_fmt(m.get(k)) for k in extra]
            )
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
