"""Run one pickled step call in another process: ``python -m arena_assets.core.remote <call.pkl>``.

Why this module exists: a Kubernetes pod (or any process started from a bare container command)
needs a way to receive "call ``fn(*args, **kwargs)``" from the orchestrator. The compute backend
pickles the call into the shared artifact volume (:func:`write_call`) and the pod's command runs this
module on it. It imports neither Dagster nor torch at module scope, so it starts in the slim GPTQ
environment as well as in the full image.

Whatever happens, the runner leaves a small status file next to the call (:func:`status_path`):
``{"ok": true, ...}`` after the step returned, or ``{"ok": false, "error": ..., "traceback": ...}``,
so the orchestrator can show the remote traceback even when the pod's logs are gone. The step's own
outputs and ``result.json`` are written by the step function itself (core/results.py).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from arena_assets.core.artifacts import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

STATUS_SUFFIX = ".status.json"


def _pickler() -> Any:
    """cloudpickle when present (closures and lambdas work), else the standard library.

    Functions of importable modules (every ``gpu/`` step) are pickled by reference either way,
    so the pod imports the same code from its image.
    """
    try:
        import cloudpickle

        return cloudpickle
    except ImportError:  # pragma: no cover - cloudpickle is in requirements/gpu.txt
        return pickle


def write_call(
    path: str | os.PathLike[str],
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
) -> Path:
    """Pickle ``(fn, args, kwargs)`` to ``path`` atomically, readable by the owner only.

    The parent directory is created with mode 0700: a call may carry settings that are nobody
    else's business (never secrets: those reach pods as secret references).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    blob = _pickler().dumps((fn, tuple(args), dict(kwargs or {})), protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write_bytes(path, blob)
    os.chmod(path, 0o600)
    return path


def load_call(path: str | os.PathLike[str]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Load a call written by :func:`write_call`."""
    with open(path, "rb") as f:
        fn, args, kwargs = pickle.load(f)
    return fn, tuple(args), dict(kwargs)


def status_path(call_path: str | os.PathLike[str]) -> Path:
    """``<call>.status.json`` next to the call file."""
    p = Path(call_path)
    return p.with_name(p.stem + STATUS_SUFFIX)


def read_status(call_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The runner's status for a call, or None when it has not finished (or never started)."""
    p = status_path(call_path)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def remap_paths(obj: Any, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Any:
    """Rewrite paths under ``src`` to the same place under ``dst`` inside plain containers.

    Why: the orchestrator sees the artifact volume at its own path (``settings.root``), a pod at
    ``K8sSettings.artifact_mount``. ``Path`` objects and strings that are ``src`` or lie under it
    are rewritten; lists, tuples and dicts are walked; anything else (settings objects, numbers) is
    returned unchanged. ``dst`` is a POSIX path (the pod's file system).
    """
    src_s = str(src).rstrip("/") or "/"
    dst_p = PurePosixPath(str(dst))

    def one(s: str) -> str | None:
        if s == src_s:
            return str(dst_p)
        if s.startswith(src_s + "/"):
            return str(dst_p / s[len(src_s) + 1 :])
        return None

    def walk(o: Any) -> Any:
        if isinstance(o, Path):
            m = one(str(o))
            return Path(m) if m is not None else o
        if isinstance(o, str):
            m = one(o)
            return m if m is not None else o
        if isinstance(o, list):
            return [walk(v) for v in o]
        if isinstance(o, tuple) and not hasattr(o, "_fields"):
            return tuple(walk(v) for v in o)
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        return o

    if src_s == str(dst_p):
        return obj
    return walk(obj)


def run_call(call_path: str | os.PathLike[str]) -> Any:
    """Load the call, run it, write the status file; re-raise the step's exception."""
    call_path = Path(call_path)
    t0 = time.time()
    facts: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": sys.executable,
        "pod": os.environ.get("HOSTNAME"),
        "node": os.environ.get("ARENA_NODE_NAME"),
    }
    try:
        fn, args, kwargs = load_call(call_path)
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        log.info("running %s from %s", name, call_path)
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - the status must record every way a step ends
        atomic_write_json(
            status_path(call_path),
            {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
                "elapsed_s": round(time.time() - t0, 3),
                **facts,
            },
        )
        raise
    atomic_write_json(
        status_path(call_path),
        {"ok": True, "function": name, "elapsed_s": round(time.time() - t0, 3), **facts},
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the pod's command. Exit code 0 only when the step returned."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m arena_assets.core.remote <call.pkl>", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_call(argv[0])
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
