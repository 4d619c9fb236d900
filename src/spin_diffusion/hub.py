"""Hugging Face Hub ids -> local folders, resolved through huggingface_hub's cache as diffusers resolves them.

A name that is an existing local folder is used as it is; any other ``owner/name`` is a Hub id:

* pipelines go through ``DiffusionPipeline.download`` (what ``DiffusionPipeline.from_pretrained`` calls), so
  ``revision`` and ``variant`` select the same files, the same cache is shared with diffusers, and the Hub is
  contacted only when it can be (``HF_HUB_OFFLINE=1`` reads the cache alone);
* other repositories (scorer weights, processors) go through ``huggingface_hub.snapshot_download``.

Every failure is one line naming the id and, when the Hub cannot be reached, the command that downloads it.
"""

from __future__ import annotations

import re
from pathlib import Path

from spin_diffusion.errors import SpinDiffusionError

_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
_CACHED_REPO = re.compile(r"(models|datasets)--(.+?)--(.+)")  # huggingface_hub's cache folder of a repo


def is_hub_id(name: str) -> bool:
    """``owner/name`` (or a bare ``name``) that is not a local path: what diffusers would look up on the Hub."""
    text = str(name)
    looks_local = text.startswith((".", "/", "~")) or Path(text).expanduser().exists()
    return not looks_local and bool(_HUB_ID.fullmatch(text))


def hub_id_of(path: str | Path) -> str | None:
    """The Hub id of a folder inside huggingface_hub's cache (``models--org--name/snapshots/<commit>``), else None."""
    parts = Path(path).expanduser().absolute().parts
    for i, part in enumerate(parts[:-2]):
        match = _CACHED_REPO.fullmatch(part)
        if match and parts[i + 1] == "snapshots":
            return f"{match.group(2)}/{match.group(3)}"
    return None


def _download_command(repo_id: str, revision: str | None, repo_type: str) -> str:
    flags = "" if repo_type == "model" else f" --repo-type {repo_type}"
    flags += f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{flags}"


def _failure(err: BaseException, what: str, repo_id: str, revision: str | None, repo_type: str) -> SpinDiffusionError:
    """One line for a failed resolution: not found, gated, unknown revision, or not cached while offline."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision}" if revision else ""
    chain = [err, err.__cause__, err.__context__]
    if any(isinstance(e, GatedRepoError) for e in chain):
        return SpinDiffusionError(
            f"{what} {repo_id} is gated: accept its license on https://huggingface.co/{repo_id} and log in with "
            "`hf auth login`"
        )
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return SpinDiffusionError(f"{what} {repo_id} has no revision {revision!r}; give a branch, tag or commit")
    if not constants.HF_HUB_OFFLINE and any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return SpinDiffusionError(
            f"{what} {repo_id} is not on the Hugging Face Hub (or it is private: `hf auth login`); check the id, or "
            "give a local folder"
        )
    reason = "the Hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    return SpinDiffusionError(
        f"{what} {repo_id}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}; download it "
        f"first with `{_download_command(repo_id, revision, repo_type)}` (no local folder {repo_id} exists either)"
    )


def resolve_pipeline(name_or_path: str | Path, *, revision: str | None = None, variant: str | None = None) -> Path:
    """The local folder of a diffusers pipeline: ``name_or_path`` itself when it is a folder, else the cached
    snapshot of that Hub id (downloading what is missing, as ``DiffusionPipeline.from_pretrained`` would)."""
    text = str(name_or_path)
    local = Path(text).expanduser()
    if local.is_dir():
        if revision is not None:
            raise SpinDiffusionError(
                f"model.revision ({revision}) selects a Hub revision, but {local} is a local folder; unset it"
            )
        return local
    if not is_hub_id(text):
        raise SpinDiffusionError(
            f"model folder not found: {local} (give a local diffusers pipeline folder or a Hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5)"
        )
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or None  # offline: read the cache without "cannot reach the Hub" warnings
    try:
        return Path(DiffusionPipeline.download(text, revision=revision, variant=variant, local_files_only=offline))
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one line
        raise _failure(err, "model", text, revision, "model") from err


def resolve_repo(
    name_or_path: str | Path,
    *,
    what: str,
    revision: str | None = None,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
) -> Path:
    """The local folder of any repository (scorer weights, a processor): a folder or file as it is, else the
    cached snapshot of that Hub id (``huggingface_hub.snapshot_download``)."""
    text = str(name_or_path)
    local = Path(text).expanduser()
    if local.exists():
        return local
    if not is_hub_id(text):
        raise SpinDiffusionError(f"{what} not found: {local}; give a local path or a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(text, revision=revision, repo_type=repo_type, allow_patterns=allow_patterns)
        return Path(folder)  # offline: the cache only
    except Exception as err:  # noqa: BLE001
        raise _failure(err, what, text, revision, repo_type) from err
