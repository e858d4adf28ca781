"""Writes that readers see whole or not at all: everything goes to ``<path>.tmp`` beside the
target, then one ``os.replace`` puts it in place.  A crash, a full disk or a SIGKILL in between
leaves the old file (or nothing) and a ``.tmp`` that the next write replaces."""

from __future__ import annotations

import contextlib
import os
import shutil


@contextlib.contextmanager
def atomically(path: str):
    """Yield the temporary path to write ``path``'s new content to (a file or a directory); on
    success it replaces ``path`` (a file's bytes reach the disk first), on failure it is removed."""
    tmp = path.rstrip(os.sep) + ".tmp"
    _remove(tmp)
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if os.path.isdir(tmp):
            _remove(path)  # os.replace cannot put a directory over a non-empty one
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text(path: str, text: str) -> None:
    """``path`` holds ``text``, whole, or keeps what it held."""
    with atomically(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
