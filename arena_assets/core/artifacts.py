"""Immutable, versioned artifacts and atomic writes.

Layout (design.md)::

    <root>/<asset key>/<partition or _>/<version>/...     never reused, never modified
    <root>/<asset key>/<partition or _>/latest -> <version>

A step writes into a hidden temporary sibling directory and renames it into place only when it
is complete (:func:`staged_dir`), so a killed job never leaves a half-written artifact. The
``latest`` pointer is a symlink swapped with ``os.replace`` (a rename cannot replace a non-empty
directory, a symlink can), so readers always see either the old or the new version.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LATEST = "latest"


def new_version() -> str:
    """A time-ordered unique version id, e.g. ``20261126T043012Z-3f9a1c``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def asset_dir(root: str | os.PathLike[str], asset_key: str, partition: str | None = None) -> Path:
    """``<root>/<asset key>/<partition or _>``; asset keys with ``/`` become nested folders."""
    return Path(root) / asset_key / (partition if partition is not None else "_")


def new_version_dir(root: str | os.PathLike[str], asset_key: str, partition: str | None = None) -> Path:
    """A fresh (not yet existing) version directory for one materialization."""
    d = asset_dir(root, asset_key, partition)
    d.mkdir(parents=True, exist_ok=True)
    while True:
        v = d / new_version()
        if not v.exists():
            return v


def latest(root: str | os.PathLike[str], asset_key: str, partition: str | None = None) -> Path | None:
    """The current version directory of an asset partition, or None."""
    link = asset_dir(root, asset_key, partition) / LATEST
    if not link.exists():
        return None
    return link.resolve()


def set_latest(version_dir: str | os.PathLike[str]) -> Path:
    """Point ``latest`` at ``version_dir`` atomically (relative symlink + os.replace)."""
    v = Path(version_dir)
    if not v.is_dir():
        raise FileNotFoundError(f"cannot point latest at {v}: not a complete version directory")
    tmp = v.parent / f".{LATEST}.{secrets.token_hex(4)}"
    os.symlink(v.name, tmp)
    os.replace(tmp, v.parent / LATEST)
    return v.parent / LATEST


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block completes.

    On an exception the temporary directory is removed and ``final`` is untouched.
    ``final`` must not exist yet (versions are never reused).
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists: artifact versions are immutable")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file + rename (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a library writer (``df.to_parquet(tmp)``);
    renamed onto ``path`` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Content hash of a file: the data version of an observed source."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
