"""A real artifact writer for the crash tests, and a hook on the file-system calls it makes.

:func:`write_version` runs what every asset does for one version of ``fold_data[0]``: open a
version (``artifacts.new_version_dir``), write it through the step protocol
(``results.step_output`` -> ``artifacts.staged_dir``; a library writer through ``atomic_path`` in
chunks, a small file through ``atomic_write_bytes``) and commit it with the real
``Materialization.commit`` (provenance.json, ``latest``, the seed layout view).

:class:`FsOps` counts the file-system calls that change something (``os.open``/``open`` for
writing, ``write``, ``fsync``, ``mkdir``, ``rename``, ``replace``, ``symlink``, ``link``,
``unlink``) and calls a hook before each: the kill tests pause there and get SIGKILLed, the disk
full tests raise ENOSPC there.

Run as a script (a separate interpreter), it writes one version and pauses before the call
selected by ``CRASH_PAUSE=op:path-substring:occurrence`` (e.g. ``rename::1``), after writing the
call's description to ``CRASH_MARKER``::

    python tests/core/crash_writer.py ROOT TAG
"""

from __future__ import annotations

import builtins
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KEY, PART = "fold_data", "0"
CHUNK = 64 * 1024
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def payload(tag: str, size: int = 256 * 1024) -> tuple[bytes, bytes]:
    rnd = random.Random(tag)
    return rnd.randbytes(size), rnd.randbytes(max(1, size // 4))


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def write_version(root: str | os.PathLike[str], tag: str, size: int = 256 * 1024) -> Path:
    """One version of ``fold_data[0]``, exactly as an asset writes and commits it."""
    from arena_assets.assets.common import Materialization
    from arena_assets.core import artifacts
    from arena_assets.core.results import step_output

    root = Path(root)
    train, valid = payload(tag, size)
    m = Materialization(root=root, key=KEY, partition=PART, code_version="crash-test",
                        out_dir=artifacts.new_version_dir(root, KEY, PART))
    with step_output(m.out_dir, "folds") as (tmp, res):
        with artifacts.atomic_path(tmp / "train.parquet") as p:  # a library writer, in chunks
            with open(p, "wb") as f:
                for i in range(0, len(train), CHUNK):
                    f.write(train[i:i + CHUNK])
        artifacts.atomic_write_bytes(tmp / "valid.parquet", valid)
        res.paths.update(train="train.parquet", valid="valid.parquet")
        res.metrics["rows"] = 1.0
    m.commit(extra={"tag": tag, "sha256": {"train.parquet": sha(train), "valid.parquet": sha(valid)}})
    return m.out_dir


def complete(v: Path) -> bool:
    """A version a reader may follow: provenance, result.json and every file with its recorded hash."""
    import json

    try:
        prov = json.loads((v / "provenance.json").read_text())
        json.loads((v / "result.json").read_text())
        return all(sha((v / name).read_bytes()) == h for name, h in prov["sha256"].items())
    except (OSError, ValueError, KeyError):
        return False


# --------------------------------------------------------------------------------------------
# The hook
# --------------------------------------------------------------------------------------------
class _File:
    def __init__(self, f: Any, ops: "FsOps", path: str) -> None:
        self._f, self._ops, self._path = f, ops, path

    def write(self, b: Any) -> Any:
        self._ops._before("write", self._path)
        return self._f.write(b)

    def __enter__(self) -> "_File":
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class FsOps:
    """Patch the file-system calls that change something; ``hook(n, op, path)`` runs before the
    n-th (1-based). ``trace`` lists ``(op, path)`` of every call made; ``only_writes``: leave out
    ``unlink`` and read-only ``os.open`` (calls that cannot fail with ENOSPC)."""

    def __init__(self, hook: Callable[[int, str, str], None] | None = None, only_writes: bool = False) -> None:
        self.hook, self.only_writes = hook, only_writes
        self.n = 0
        self.trace: list[tuple[str, str]] = []
        self._busy = False
        self._orig: dict[tuple[Any, str], Any] = {}

    def _before(self, op: str, path: Any) -> None:
        if self._busy:
            return
        self.n += 1
        self.trace.append((op, str(path)))
        if self.hook is not None:
            self._busy = True
            try:
                self.hook(self.n, op, str(path))
            finally:
                self._busy = False

    def _wrap(self, mod: Any, name: str, op: str | None = None, path_of: Callable[..., Any] | None = None,
              when: Callable[..., bool] | None = None) -> None:
        orig = getattr(mod, name)
        self._orig[(mod, name)] = orig
        ops = self

        def wrapper(*a: Any, **kw: Any) -> Any:
            if when is None or when(*a, **kw):
                ops._before(op or name, path_of(*a, **kw) if path_of else (a[0] if a else ""))
            return orig(*a, **kw)

        setattr(mod, name, wrapper)

    def __enter__(self) -> "FsOps":
        def fd_path(fd: int, *a: Any, **kw: Any) -> str:
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return f"fd {fd}"

        def writes(_path: Any, flags: int, *a: Any, **kw: Any) -> bool:
            return not self.only_writes or bool(flags & WRITE_FLAGS)

        self._wrap(os, "open", when=writes)
        self._wrap(os, "write", path_of=fd_path)
        self._wrap(os, "fsync", path_of=fd_path)
        for name in ("mkdir", "symlink", "link"):
            self._wrap(os, name, path_of=(lambda *a, **kw: a[1]) if name in ("symlink", "link") else None)
        for name in ("rename", "replace"):
            self._wrap(os, name, path_of=lambda *a, **kw: f"{a[0]} -> {a[1]}")
        if not self.only_writes:
            self._wrap(os, "unlink")
        orig_open = builtins.open
        self._orig[(builtins, "open")] = orig_open
        ops = self

        def open_(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            if any(c in mode for c in "wax+"):
                ops._before("open", file)
                return _File(orig_open(file, mode, *a, **kw), ops, str(file))
            return orig_open(file, mode, *a, **kw)

        builtins.open = open_
        return self

    def __exit__(self, *exc: Any) -> None:
        for (mod, name), orig in self._orig.items():
            setattr(mod, name, orig)
        self._orig.clear()


def _main() -> None:
    root, tag = sys.argv[1], sys.argv[2]
    op, sub, nth = os.environ["CRASH_PAUSE"].split(":")
    marker = os.environ["CRASH_MARKER"]
    seen = 0
    real_open = builtins.open

    def hook(n: int, o: str, path: str) -> None:
        nonlocal seen
        if o == op and sub in path:
            seen += 1
            if seen == int(nth):
                with real_open(marker + ".tmp", "w") as f:
                    f.write(f"{n} {o} {path}")
                os.rename(marker + ".tmp", marker)
                time.sleep(600)

    with FsOps(hook):
        write_version(root, tag)


if __name__ == "__main__":
    _main()
