"""Shared plumbing for the weights-based scorers: path specs, weight files, PIL preprocessing, batching.

Nothing here imports transformers, so ``import spin_diffusion.scorers`` stays cheap.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from spin_diffusion import hub
from spin_diffusion.errors import SpinDiffusionError
from spin_diffusion.images import pil_to_tensor

# OpenAI CLIP normalisation, used by CLIP, open_clip ViT-H-14 (HPSv2), BLIP (ImageReward) and the LAION aesthetic
# predictor alike.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


# ----------------------------------------------------------------------------------------------------------
# Path specs


def parse_path_spec(name: str, spec: str | Path | None, keys: Sequence[str], *, hint: str) -> tuple[Path | None, dict]:
    """Split a scorer path spec into ``(root folder or file, {component: value})``.

    A spec is either one path (``/models/pickscore``) or comma-separated ``key=value`` pairs
    (``clip=/a,mlp=/b.pth``) whose keys are in ``keys``. ``hint`` is what the user must download; it is part of
    the error raised when ``spec`` is empty.
    """
    if spec is None or str(spec).strip() == "":
        raise SpinDiffusionError(f"{name} needs {hint}: pass --scorer-path {name}=/path")
    text = str(spec).strip()
    if re.match(r"^\s*[A-Za-z_]+\s*=", text):  # key=value pairs (a path's first "=" follows a "/" or ".")
        parts: dict[str, str] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in keys or not value.strip():
                raise SpinDiffusionError(
                    f"{name}: bad path spec item {item!r} in {text!r}; use one folder or key=value pairs with keys "
                    f"{', '.join(keys)}"
                )
            parts[key] = value.strip()
        return None, parts
    if hub.is_hub_id(text):
        return hub.resolve_repo(text, what=f"{name} weights"), {}
    root = Path(text).expanduser()
    if not root.exists():
        raise SpinDiffusionError(
            f"{name}: {root} does not exist; {name} needs {hint}: pass --scorer-path {name}=/path (or a Hub id)"
        )
    return root, {}


def component(
    name: str,
    root: Path | None,
    parts: dict,
    key: str,
    *,
    found: Callable[[Path], bool],
    what: str,
    subdirs: Sequence[str] = (),
) -> Path:
    """Locate component ``key``: the explicit ``key=`` entry, else ``root/<subdir>`` for ``subdirs`` (default
    ``[key]``), else ``root`` itself, whichever first satisfies ``found``. Raises a one-line error naming ``what``."""
    if key in parts:
        given = parts[key]
        if hub.is_hub_id(given):  # a processor or tokenizer needs its small files, not the repo's weights
            small = ["*.json", "*.txt", "*.model", "*.md"] if key in ("processor", "tokenizer") else None
            path = hub.resolve_repo(given, what=f"{name} {key}", allow_patterns=small)
        else:
            path = Path(given).expanduser()
        if not path.exists():
            raise SpinDiffusionError(f"{name}: {key}={path} does not exist; it should be {what}")
        if not found(path):
            raise SpinDiffusionError(f"{name}: {key}={path} is not {what}")
        return path
    if root is None:
        raise SpinDiffusionError(f"{name}: the path spec has no {key}= entry; add {key}=<{what}>")
    for sub in (*(subdirs or (key,)), ""):
        candidate = root / sub if sub else root
        if candidate.exists() and found(candidate):
            return candidate
    looked = ", ".join(str(root / s) for s in (subdirs or (key,))) + f" or {root}"
    raise SpinDiffusionError(f"{name}: found no {what} in {looked}; put it there or pass {key}=/path")


def has_files(*names: str) -> Callable[[Path], bool]:
    """A ``found`` predicate: a folder holding every one of ``names`` (``a|b`` means either)."""

    def check(path: Path) -> bool:
        return path.is_dir() and all(any((path / alt).is_file() for alt in n.split("|")) for n in names)

    return check


def single_file(path: Path, suffixes: Sequence[str], *, name: str, what: str, exclude: Sequence[str] = ()) -> Path:
    """``path`` itself when it is a file, else the one file in folder ``path`` with one of ``suffixes``."""
    if path.is_file():
        return path
    matches = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes and p.name not in exclude
    )
    if len(matches) != 1:
        found = ", ".join(p.name for p in matches) or "none"
        raise SpinDiffusionError(
            f"{name}: expected exactly one {what} ({'/'.join(suffixes)}) in {path}, found {found}; "
            "pass the file itself"
        )
    return matches[0]


def has_weight_file(*suffixes: str) -> Callable[[Path], bool]:
    """A ``found`` predicate: a file, or a folder with a file ending in one of ``suffixes``."""

    def check(path: Path) -> bool:
        return path.is_file() or (path.is_dir() and any(q.is_file() and q.suffix in suffixes for q in path.iterdir()))

    return check


def locate_checkpoint(
    name: str, spec: str | Path | None, keys: Sequence[str], *, hint: str, what: str
) -> tuple[Path | None, dict, Path]:
    """Parse the path spec of a scorer whose main part is one checkpoint (key "ckpt").

    A path to the checkpoint file itself also works: the other parts are then looked for beside it.
    Returns (root folder or None, parts, location of the checkpoint: a file or a folder holding it).
    """
    root, parts = parse_path_spec(name, spec, keys, hint=hint)
    if root is not None and root.is_file():
        root, parts = root.parent, {"ckpt": str(root)}
    ckpt_loc = component(
        name, root, parts, "ckpt", subdirs=("ckpt",), what=what, found=has_weight_file(".pt", ".pth", ".safetensors")
    )
    return root, parts, ckpt_loc


def is_clip_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "vocab.json").is_file())


# ----------------------------------------------------------------------------------------------------------
# Weight files


def load_state_dict_file(path: Path, *, name: str) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save`` checkpoint (``weights_only``; a top-level
    ``state_dict`` entry is unwrapped and a ``module.`` prefix from DataParallel is dropped)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's to fix
        detail = f"{type(e).__name__}: {e}".splitlines()[0]
        raise SpinDiffusionError(
            f"{name}: cannot read weights {path} ({detail}); it must be a safetensors file or a torch.save'd state "
            "dict of tensors (loaded with weights_only=True)"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpinDiffusionError(f"{name}: {path} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def check_keys(name: str, source: Path | str, leftover: Sequence[str], missing: Sequence[str]) -> None:
    if missing or leftover:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} key(s) e.g. {sorted(missing)[:3]}")
        if leftover:
            detail.append(f"unexpected {len(leftover)} key(s) e.g. {sorted(leftover)[:3]}")
        raise SpinDiffusionError(f"{name}: {source} does not match the expected architecture ({'; '.join(detail)})")


# ----------------------------------------------------------------------------------------------------------
# The improved-aesthetic-predictor / ImageReward head


class RewardMLP(nn.Module):
    """``Linear(d,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1) Linear(64,16)
    Linear(16,1)`` without activations, exactly as in LAION's improved-aesthetic-predictor and ImageReward, so
    their state dicts (``layers.0.weight`` ... ``layers.7.bias``) load as they are."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, d] -> [B]
        return self.layers(x).squeeze(-1)


def load_reward_mlp(state: dict[str, torch.Tensor], *, name: str, source: Path | str) -> RewardMLP:
    if "layers.0.weight" not in state:
        raise SpinDiffusionError(f"{name}: {source} has no layers.0.weight; it is not an aesthetic/ImageReward MLP")
    mlp = RewardMLP(int(state["layers.0.weight"].shape[1]))
    want = set(mlp.state_dict())
    check_keys(name, source, sorted(set(state) - want), sorted(want - set(state)))
    try:
        mlp.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise SpinDiffusionError(f"{name}: {source} has the wrong tensor shapes for the MLP head ({e})") from e
    return mlp.eval()


# ----------------------------------------------------------------------------------------------------------
# PIL preprocessing (the torchvision transforms of the reference code, without torchvision)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size, BICUBIC)`` (shorter side -> size) then ``CenterCrop(size)``, on a PIL image."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def resize_max_pad_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's ``preprocess_val`` before normalisation, as its code runs it: ``ToTensor()`` first, then open_clip's
    ``ResizeMaxSize`` on the *float tensor* (longer side -> ``size``: torchvision's tensor resize, i.e. bicubic
    ``interpolate`` with ``antialias=True``, not clamped or rounded to uint8), then zero padding to a centred square
    (only when a resize happened, as in the reference code). Returns ``[3, size, size]`` float32.

    Resizing the PIL image instead quantises to uint8 and uses PIL's bicubic, which moves HPSv2 scores by ~3e-4
    (see docs/SCORER_PARITY.md)."""
    x = pil_to_tensor([image.convert("RGB")])  # [1, 3, H, W] in [0, 1]
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        x = nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        x = nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return x[0]


def normalize_tensor(
    pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ``(x - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels.float() - m) / s).contiguous()


def to_normalized_tensor(
    images: Sequence[Image.Image], mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """Same-size RGB PIL images -> ``[B, 3, H, W]`` float32, ``(x/255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pil_to_tensor(images) - m) / s).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Batching


def batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise SpinDiffusionError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


class BatchedScorer:
    """Base for scorers: checks inputs, runs ``_score_batch`` under ``no_grad`` in batches, returns float32 CPU [N].

    Subclasses set ``name``, ``higher_is_better`` and implement ``_score_batch(images, prompts) -> Tensor [B]``.
    """

    name: str = "scorer"
    higher_is_better: bool = True
    batch_size: int = 16

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        images, prompts = list(images), [str(p) for p in prompts]
        if len(images) != len(prompts):
            raise SpinDiffusionError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        out = []
        with torch.no_grad():
            for sl in batches(len(images), self.batch_size):
                scores = self._score_batch(images[sl], prompts[sl])
                out.append(scores.detach().float().cpu().reshape(-1))
        return torch.cat(out) if out else torch.zeros(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, higher_is_better={self.higher_is_better})"


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in table:
        raise SpinDiffusionError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def isqrt_exact(n: int, *, what: str) -> int:
    r = math.isqrt(n)
    if r * r != n:
        raise SpinDiffusionError(f"{what}: {n} position embeddings do not form a square grid")
    return r


def build_from_state_dict(
    ctor: Callable[[], nn.Module], state: dict[str, torch.Tensor], *, name: str, source
) -> nn.Module:
    """Build ``ctor()`` on the meta device (no slow random init of a 1B-parameter model) and assign ``state``.

    Every parameter and persistent buffer must be in ``state`` and nothing else may be; non-persistent
    ``position_ids`` buffers (transformers embeddings) are recreated as ``arange``.
    """
    with torch.device("meta"):
        model = ctor()
    want = set(model.state_dict())
    check_keys(name, source, sorted(set(state) - want), sorted(want - set(state)))
    try:
        model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise SpinDiffusionError(
            f"{name}: {source} has tensor shapes that do not fit the model ({e})".replace("\n", " ")
        ) from e
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if buf_name != "position_ids":
                raise RuntimeError(f"cannot materialise buffer {mod_name}.{buf_name}")
            module._buffers[buf_name] = torch.arange(buf.shape[-1]).expand(tuple(buf.shape))
    return model
