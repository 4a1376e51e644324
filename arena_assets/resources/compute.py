"""The compute resource: one ``run`` call for every step, whatever runs it.

``compute.run(context, "student", train_student, base, cfg, ..., out_dir=v)`` calls the same plain
``gpu/`` function on every backend and returns the :class:`StepResult` read back from the
``result.json`` the step wrote (docs/steps.md):

- ``local`` (default): in this process (fast, what tests and the demo use), or in a child
  process (``local_mode: subprocess``: isolation, a crash cannot take the run worker down). A step
  that needs another interpreter (the GPTQ quantization environment) always runs in a child
  process with that interpreter, even locally, because GPTQModel's protobuf pin cannot live beside
  Dagster's.
- ``slurm``: :class:`arena_assets.resources.slurm.SlurmBackend` (submitit).
- ``k8s``: :class:`arena_assets.resources.k8s.K8sBackend` (a pod per step).

The backend and per-step needs (GPUs, CPUs, memory, time) come from the settings file
(``compute:``); the resource's own fields override the backend for one run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, Failure, MetadataValue

from arena_assets.core.results import StepResult, reset_cuda_peak
from arena_assets.core.settings import Settings, StepNeeds
from arena_assets.resources.settings import SettingsResource

log = logging.getLogger(__name__)

_TAIL_CHARS = 4000


def _tail(path: Path, n: int = _TAIL_CHARS) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", errors="replace")


def _run_id(context: Any) -> tuple[str, str]:
    """(run id, root run id) of the Dagster run, or local placeholders outside a run."""
    run = getattr(context, "run", None)
    if run is None:
        return "no-run", "no-run"
    return run.run_id, (run.root_run_id or run.run_id)


def _logger(context: Any) -> Any:
    return getattr(context, "log", None) or log


def _one_rank_only(context: Any, backend: str, step: str, needs: StepNeeds) -> None:
    """Data-parallel ranks (``tasks_per_node``/``nodes``) are launched by the Slurm backend only."""
    if needs.tasks_per_node * needs.nodes > 1:
        msg = (f"{step}: needs ask for {needs.tasks_per_node * needs.nodes} ranks, but the {backend} backend "
               "runs one process (data-parallel ranks are launched by the Slurm backend, docs/slurm.md)")
        (getattr(context, "log", None) or logging.getLogger(__name__)).warning(msg)


class LocalBackend:
    """Run a step on this machine: in-process, or in a child process (optionally another python)."""

    name = "local"

    def __init__(self, root: Path, mode: str = "inprocess") -> None:
        if mode not in ("inprocess", "subprocess"):
            raise ValueError(f"local mode must be inprocess or subprocess, not {mode!r}")
        self.root = Path(root)
        self.mode = mode

    def run(
        self,
        context: Any,
        step: str,
        fn: Callable[..., StepResult],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        out_dir: Path,
        needs: StepNeeds,
        python: str | None = None,
    ) -> StepResult:
        _one_rank_only(context, self.name, step, needs)
        if python is None and self.mode == "inprocess":
            return self._inprocess(context, step, fn, args, kwargs, out_dir)
        return self._subprocess(context, step, fn, args, kwargs, out_dir, python or sys.executable)

    # ------------------------------------------------------------------ in-process
    def _inprocess(
        self, context: Any, step: str, fn: Callable[..., StepResult], args: Sequence[Any],
        kwargs: dict[str, Any], out_dir: Path,
    ) -> StepResult:
        t0 = time.time()
        reset_cuda_peak()  # several steps share this process: each records its own GPU peak
        try:
            fn(*args, out_dir=out_dir, **kwargs)
        except Exception as e:
            raise Failure(
                description=f"step {step} failed in-process: {type(e).__name__}: {e}",
                metadata={"traceback": MetadataValue.text(traceback.format_exc()[-_TAIL_CHARS:]),
                          "backend": "local/inprocess"},
            ) from e
        res = StepResult.read(out_dir)
        res.info["compute"] = {"backend": "local", "mode": "inprocess", "pid": os.getpid(),
                               "elapsed_s": round(time.time() - t0, 3)}
        return res

    # ------------------------------------------------------------------ child process
    def _subprocess(
        self, context: Any, step: str, fn: Callable[..., StepResult], args: Sequence[Any],
        kwargs: dict[str, Any], out_dir: Path, python: str,
    ) -> StepResult:
        """Pickle the call (core/remote.py), run ``python -m arena_assets.core.remote`` on it.

        Why core/remote.py: it imports neither Dagster nor torch at module scope, so the same
        runner starts in the slim GPTQ environment. Its status file carries the traceback.
        """
        from arena_assets.core import remote

        run_id, _ = _run_id(context)
        calls = self.root / ".compute" / run_id
        calls.mkdir(parents=True, exist_ok=True)
        os.chmod(calls, 0o700)
        stamp = f"{step}-{int(time.time() * 1000)}-{os.getpid()}"
        call = remote.write_call(calls / f"{stamp}.pkl", fn, args, {**kwargs, "out_dir": out_dir})
        log_path = calls / f"{stamp}.log"
        env = dict(os.environ)
        pkg_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_parent, env.get("PYTHONPATH", "")] if p)
        cmd = [python, "-m", "arena_assets.core.remote", str(call)]
        lg = _logger(context)
        lg.info(f"step {step}: {' '.join(cmd)} (log {log_path})")
        t0 = time.time()
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait()
            except BaseException:
                # The Dagster run was terminated (or the worker interrupted): never leave the
                # child training on its own.
                proc.kill()
                proc.wait()
                raise
        status = remote.read_status(call) or {}
        if rc != 0 or not status.get("ok"):
            tb = status.get("traceback") or _tail(log_path)
            raise Failure(
                description=f"step {step} failed in a child process ({python}, exit {rc}): "
                f"{status.get('error', 'no status written')}",
                metadata={"traceback": MetadataValue.text(tb[-_TAIL_CHARS:]),
                          "log_tail": MetadataValue.text(_tail(log_path)),
                          "backend": "local/subprocess", "exit_code": rc},
            )
        res = StepResult.read(out_dir)
        res.info["compute"] = {"backend": "local", "mode": "subprocess", "python": python,
                               "exit_code": rc, "elapsed_s": round(time.time() - t0, 3),
                               "log": str(log_path)}
        return res


def _warn_low_pool_limit(context: Any, s: Settings, backend: str) -> None:
    """Slurm/k8s: warn when the step's concurrency pool allows fewer steps at once than
    ``compute.max_parallel_jobs`` (a forgotten ``arena-assets pools --apply`` serializes every
    backfill on a cluster that could run them all). A check, never a gate; silent without an
    instance (direct invocation, tests)."""
    if backend not in ("slurm", "k8s"):
        return
    try:
        pool = getattr(context.op_def, "pool", None)
        if not pool:
            return
        storage = context.instance.event_log_storage
        if not storage.supports_global_concurrency_limits:
            return
        if pool in storage.get_concurrency_keys():
            have = storage.get_concurrency_info(pool).slot_count
        else:
            have = context.instance.get_concurrency_config().pool_config.default_pool_limit
    except Exception:  # noqa: BLE001 - no instance / op in this context
        return
    want = s.compute.max_parallel_jobs
    if have is not None and have < want:
        _logger(context).warning(
            f"concurrency pool {pool!r} allows {have} step(s) at once in this Dagster instance; "
            f"compute.max_parallel_jobs is {want}: a backfill runs serialized. Apply the limit with "
            f"`arena-assets pools --apply` (or `dagster instance concurrency set {pool} {want}`)."
        )


class ComputeResource(ConfigurableResource):
    """Runs ``gpu/`` steps locally, on Slurm (submitit) or on Kubernetes.

    ``backend``/``local_mode`` empty: take ``compute.backend``/``compute.local_mode`` from the
    settings file. Per-step needs always come from the settings (``compute.needs.<step>``).
    """

    settings: SettingsResource
    backend: str = ""
    local_mode: str = ""

    def backend_name(self) -> str:
        return self.backend or self.settings.get().compute.backend

    def make_backend(self, settings: Settings | None = None) -> Any:
        """The backend object for this resource's configuration (imported lazily)."""
        s = settings or self.settings.get()
        name = self.backend or s.compute.backend
        if name == "local":
            return LocalBackend(s.root, self.local_mode or s.compute.local_mode)
        if name == "slurm":
            from arena_assets.resources.slurm import SlurmBackend

            return SlurmBackend(s.compute.slurm, s.root)
        if name == "k8s":
            from arena_assets.resources.k8s import K8sBackend

            return K8sBackend(s.compute.k8s, s.root)
        raise ValueError(f"unknown compute backend {name!r} (local, slurm, k8s)")

    def run(
        self,
        context: Any,
        step: str,
        fn: Callable[..., StepResult],
        *args: Any,
        out_dir: Path,
        python: str | None = None,
        **kwargs: Any,
    ) -> StepResult:
        """Run ``fn(*args, out_dir=out_dir, **kwargs)`` on the configured backend.

        ``python``: the interpreter the step needs (the GPTQ environment); None = this one.
        Returns the StepResult with ``info['compute']`` facts (backend, job id, ...).
        """
        s = self.settings.get()
        backend = self.make_backend(s)
        needs = s.compute.needs_for(step)
        _logger(context).info(
            f"step {step} -> backend {backend.name} (needs gpus={needs.gpus} cpus={needs.cpus} "
            f"mem={needs.mem_gb}G time={needs.time_min}m){' python=' + python if python else ''}"
        )
        _warn_low_pool_limit(context, s, backend.name)
        res = backend.run(context, step, fn, list(args), dict(kwargs), Path(out_dir), needs, python=python)
        res.info.setdefault("compute", {}).setdefault("backend", backend.name)
        return res
