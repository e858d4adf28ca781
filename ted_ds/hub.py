"""Model ids (``meta-llama/Llama-3.1-8B``) resolved to a directory of the local Hugging Face cache.

Clusters keep models in a shared cache (``HF_HOME`` / ``HF_HUB_CACHE``), often offline.  A model
path that is not an existing file or directory and looks like ``org/name`` is looked up there the
way transformers does (``huggingface_hub.snapshot_download`` with ``local_files_only``: the
``refs/<revision>`` file names the snapshot; a commit hash names it directly).  Nothing is ever
downloaded: a training job must not depend on the network, and every rank must read the same files.
"""

from __future__ import annotations

import os
import re

from ted_ds.errors import ConfigError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> str:
    """Where huggingface_hub looks, from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def resolve(path: str, revision: str | None = None, what: str = "model") -> str:
    """``path`` itself when it exists locally, else the cached snapshot of the hub id ``path`` at
    ``revision`` (default: the cache's ``main``); one line saying where it looked when absent."""
    if os.path.exists(path):
        if revision is not None:
            raise ConfigError(f"{what} {path} is a local path; a revision ({revision}) only applies to a hub id")
        return path
    if not _REPO_ID.match(path):
        raise ConfigError(f"{what} not found: {path} (neither a local path nor an org/name hub id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = cache_dir()
    try:
        return snapshot_download(path, revision=revision, cache_dir=where, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        at = f" at revision {revision}" if revision else ""
        raise ConfigError(f"{what} {path}{at} is not in the local Hugging Face cache {where} (HF_HUB_CACHE / "
                          f"HF_HOME; nothing is downloaded: fetch it first, e.g. `hf download {path}`) "
                          f"[{type(e).__name__}]") from None


def with_local_models(cfg, teacher: bool = True):
    """``cfg`` with ``teacher.path`` (if the run reads the teacher) and ``student.path`` resolved to
    local directories (hub ids looked up in the cache at their ``revision``)."""
    import dataclasses

    t, s = cfg.teacher, cfg.student
    if t.path and teacher:
        t = dataclasses.replace(t, path=resolve(t.path, t.revision, "teacher.path"), revision=None)
    if s.path:
        s = dataclasses.replace(s, path=resolve(s.path, s.revision, "student.path"), revision=None)
    return dataclasses.replace(cfg, teacher=t, student=s)
