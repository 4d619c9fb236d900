"""A Hugging Face cache laid out as huggingface_hub lays it out, for offline tests of Hub ids.

<cache>/models--org--name/blobs/<sha256 of the file>
<cache>/models--org--name/snapshots/<commit>/<path>  -> ../../blobs/<sha256>  (relative symlinks)
<cache>/models--org--name/refs/<revision>            (the commit that `revision` points at)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_cache(cache: Path, repo_id: str, folder: Path, *, revision: str = "main", repo_type: str = "model") -> Path:
    """Put every file of `folder` into `cache` as the snapshot of `repo_id` at `revision`; returns the snapshot."""
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    tree = hashlib.sha1()
    for path in files:
        tree.update(path.relative_to(folder).as_posix().encode())
        tree.update(path.read_bytes())
    commit = tree.hexdigest()  # 40 hex digits, like a git commit
    snapshot = repo / "snapshots" / commit
    for path in files:
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
