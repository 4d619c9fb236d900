"""Atomic file writes: write ``<name>.tmp`` next to the target, then ``os.replace`` it into place.

A reader (or a resumed run after a kill) sees either the old file or the whole new one, never half of it.
Folders (exported pipelines, LoRA adapters) are written into `fresh_dir(out)` and moved with `move_into_place`.

    with atomic.path(out / "shard.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic.write_json(out / "state.json", {"completed": [...]})
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def path(target: str | os.PathLike, *, per_process: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; when the block ends without an error, move it onto
    ``target``. ``per_process`` puts the process id in the temporary name, for files that several processes
    may write at once. The parent folder is created if needed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp" if per_process else f"{target.name}.tmp")
    try:
        yield tmp
    except BaseException:
        if tmp.is_file():
            tmp.unlink()
        raise
    os.replace(tmp, target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically; returns ``target`` as a Path."""
    with path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON (``indent`` spaces per level) atomically; returns ``target`` as a Path."""
    return write_text(target, json.dumps(obj, indent=indent) + "\n")


def fresh_dir(out_dir: Path) -> Path:
    """``<out_dir>.tmp`` to write a whole folder into (then `move_into_place`); stale ``.tmp``/``.old`` leftovers of
    a killed run are removed."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    for stale in (tmp, out_dir.with_name(out_dir.name + ".old")):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def move_into_place(tmp: Path, out_dir: Path) -> Path:
    """Move ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first (os.replace cannot overwrite it)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, out_dir)
    return out_dir
