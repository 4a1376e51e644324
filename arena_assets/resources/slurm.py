"""Slurm backend: run a step function as a Slurm job through submitit.

Why submitit: it pickles the very function the other backends call, writes the sbatch script,
runs the function in the job with the chosen interpreter, pickles back the result or the remote
traceback, and implements requeue-on-timeout for ``Checkpointable`` callables. This module adds
what an orchestrator needs on top of it:

- per-step resources (partition/account/qos/gres/gpus/cpus/mem/time) from ``SlurmSettings`` and
  ``StepNeeds``, environment setup lines, and ``PYTHONPATH`` so the job imports ``arena_assets``;
- a submitit folder per ROOT run id (mode 0700: it holds pickles), with a fresh sub-folder per
  submission so a stale result file can never be mistaken for a new job's result;
- the job id logged at submit, its log tail streamed into the Dagster log while it runs, our own
  ``sacct`` polling (submitit's watcher backs off to 10 minutes; a ``scancel`` must fail the
  step within seconds);
- a clear ``dagster.Failure`` (remote traceback + Slurm state) on failure; a job the cluster lost
  (NODE_FAIL, PREEMPTED, BOOT_FAIL without a requeue) becomes ``dagster.RetryRequested``, and the
  step's retry submits it anew;
- stop vs cancel: ``scancel`` only when the Dagster run is being CANCELED (UI "Terminate", the
  run launcher's ``terminate``: Dagster marks the run CANCELING before it signals the worker);
  a run worker that is merely stopped (SIGTERM/Ctrl-C of a restarted ``dagster dev``, a killed
  code server) leaves its job running for the re-executed run to re-attach to;
- a small JSON record per (asset key, partition, step) so a retried run (new run id, same root
  run id) re-attaches to the job its dead predecessor left running, after checking that the job
  really is that one (job name with a random token, submit time, the asset partition of its
  output) -- a reset cluster reuses job ids and must never hand us a stranger's job;
- ``sacct`` facts (state, node, elapsed, max RSS, exit code) in ``result.info["compute"]``.

Dagster is imported lazily: this module is unpickled inside Slurm jobs (the checkpointable
wrapper lives here), possibly in an interpreter without Dagster (the quantization environment).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from arena_assets.core.artifacts import atomic_write_json
from arena_assets.core.results import RESULT_FILE, StepResult
from arena_assets.core.settings import SlurmSettings, StepNeeds

try:  # submitit is light (no Dagster, no torch); the job side needs it anyway.
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a base dependency
    _Checkpointable = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

#: Slurm states after which a job will not run again by itself.
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
}
REQUEUE_GRACE_S = {"PREEMPTED": 120.0, "NODE_FAIL": 120.0}
"""States after which a cluster may requeue the job by itself (PreemptMode=REQUEUE, a node
failure with requeue on): wait this long for it to come back before calling it terminal (only
for a job Slurm may requeue: ``scontrol show job`` says ``Requeue=1``)."""
LOST_STATES = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
"""The cluster, not the step, ended the job: the step's retry resubmits it (RetryRequested)."""
CANCELING_RUN_STATES = {"CANCELING", "CANCELED"}
"""Dagster run statuses that mean a user (or the UI) asked for the run to be terminated."""
#: Slurm states of a job that is still (or again) on its way.
LIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED",
    "REQUEUE_FED", "REQUEUE_HOLD", "STAGE_OUT", "SIGNALING", "STOPPED",
}
TIMEOUT_MARK = "timed-out and not checkpointable"
"""submitit's own words when a non-Checkpointable function receives the time-limit signal."""


class CheckpointableStep(_Checkpointable):  # type: ignore[misc,valid-type]
    """Wraps a resumable step function so submitit requeues it at its time limit.

    Slurm sends USR2 ``signal_delay_s`` seconds before the limit; submitit then calls
    :meth:`checkpoint` (the default resubmits the same call), requeues the job and exits.
    The requeued job calls the function again with the same arguments: the step itself resumes
    from its ``checkpoint_dir`` (the transformers Trainer's ``resume_from_checkpoint``), so no
    state has to be pickled here. Lives in a Dagster-free import path (see module docstring).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class DistributedStep:
    """Runs a step as one rank of a multi-task Slurm job (``StepNeeds.tasks_per_node`` > 1).

    Every task of the job calls this with the same arguments. It exports torch.distributed's
    environment from the Slurm allocation (submitit's ``TorchDistributedEnvironment``: MASTER_ADDR
    = first node, RANK, WORLD_SIZE, LOCAL_RANK, and CUDA_VISIBLE_DEVICES = the local rank's GPU),
    so the transformers Trainer inside the step runs DDP by itself; the step lets rank 0 alone
    write the artifact (``gpu/train.py``). The orchestrator reads task 0's result.
    """

    def __init__(self, fn: Callable[..., Any], gpus: bool) -> None:
        self.fn = fn
        self.gpus = gpus

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.gpus, overwrite=True)
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# sacct
# --------------------------------------------------------------------------------------------
SACCT_FIELDS = ["JobID", "JobName", "State", "NodeList", "Elapsed", "MaxRSS", "ExitCode", "Submit"]


def sacct(job_id: str) -> dict[str, str] | None:
    """The accounting facts of one job, or None when sacct does not know it.

    ``State`` is the allocation's first word ("CANCELLED by 0" -> "CANCELLED"); ``MaxRSS`` is the
    largest over the job's steps (the allocation line itself carries none).
    """
    try:
        out = subprocess.run(
            ["sacct", "-j", str(job_id), "-P", "-n", "-o", ",".join(SACCT_FIELDS)],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as e:
        log.warning("sacct -j %s failed: %s", job_id, e)
        return None
    main: dict[str, str] | None = None
    rss = 0
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) != len(SACCT_FIELDS):
            continue
        row = dict(zip(SACCT_FIELDS, parts))
        if row["JobID"] == str(job_id):
            main = row
        rss = max(rss, _rss_bytes(row["MaxRSS"]))
    if main is None:
        return None
    main["State"] = main["State"].split()[0] if main["State"] else "UNKNOWN"
    main["MaxRSSBytes"] = str(rss)
    return main


def _rss_bytes(s: str) -> int:
    m = re.fullmatch(r"([\d.]+)([KMGT]?)", s.strip())
    if not m:
        return 0
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def _sacct_time(s: str) -> float | None:
    try:
        return time.mktime(time.strptime(s, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Job records (re-attach after a retry)
# --------------------------------------------------------------------------------------------
@dataclass
class JobRecord:
    """What a run remembers about the job it submitted for one (asset, partition, step)."""

    key: str
    job_id: str
    job_name: str
    out_dir: str
    folder: str
    submitted_at: float
    run_id: str
    status: str = "submitted"
    """submitted (maybe still running) | handed_over (its result went to an asset) | failed |
    cancelled. Only ``submitted`` records are re-attached: a handed-over result belongs to the
    run that received it, a re-execution after that wants a new materialization."""
    history: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> JobRecord | None:
        try:
            d = json.loads(path.read_text())
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))


def check_identity(record: JobRecord, out_dir: Path, facts: dict[str, str] | None) -> tuple[bool, str]:
    """Is the job Slurm reports under ``record.job_id`` really the one ``record`` describes?

    A retry may adopt a job only if (1) the record was made for the same asset partition (the
    recorded output lives next to the requested one), (2) sacct knows the id, (3) with the job
    name we gave it -- it carries a random token, so a reset cluster that hands the same id to
    another job never matches -- and (4) it was submitted no earlier than we submitted ours.
    Returns ``(ok, reason)``.
    """
    if Path(record.out_dir).parent.resolve() != Path(out_dir).parent.resolve():
        return False, f"record is for {Path(record.out_dir).parent}, not {Path(out_dir).parent}"
    if facts is None:
        return False, f"sacct does not know job {record.job_id} (cluster reset or purged accounting)"
    if facts.get("JobName") != record.job_name:
        return False, (
            f"job {record.job_id} is named {facts.get('JobName')!r}, ours was {record.job_name!r} "
            "(job ids were reused: a stranger's job)"
        )
    sub = _sacct_time(facts.get("Submit", ""))
    if sub is not None and sub < record.submitted_at - 120:
        return False, f"job {record.job_id} was submitted before our record was made: not ours"
    return True, "same job name, same asset partition"


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------
class SlurmBackend:
    """Runs ``fn(*args, out_dir=..., **kwargs)`` as a Slurm job (see the module docstring).

    ``slurm`` holds the cluster settings; ``artifact_root`` the (shared-filesystem) root of the
    artifacts; the submitit folder defaults to ``<artifact_root>/.submitit/<root run id>/``.
    """

    name = "slurm"

    def __init__(self, slurm: SlurmSettings | None = None, artifact_root: str | os.PathLike[str] = ".arena/artifacts") -> None:
        self.slurm = slurm or SlurmSettings()
        self.artifact_root = Path(artifact_root).absolute()

    # ---------------------------------------------------------------- folders and keys
    def base_folder(self) -> Path:
        """``compute.slurm.folder`` as configured (a shared folder may live anywhere), else
        ``<root>/.submitit``, which must stay inside the artifact root (no planted symlink)."""
        if self.slurm.folder:
            return Path(self.slurm.folder).absolute()
        from arena_assets.core.artifacts import ensure_inside

        folder = self.artifact_root / ".submitit"
        ensure_inside(self.artifact_root, folder, "write Slurm job pickles into")
        return folder

    def run_folder(self, root_run_id: str) -> Path:
        """The root run's submitit folder, created with mode 0700 (it holds pickles). Only a folder
        created here is chmodded: a shared ``slurm.folder`` that exists (e.g. mode 1777) keeps its mode."""
        folder = self.base_folder() / root_run_id
        for d in (self.base_folder(), folder):
            d.parent.mkdir(parents=True, exist_ok=True)
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:
                continue
            os.chmod(d, 0o700)  # mkdir's mode is masked by the umask
        return folder

    @staticmethod
    def record_key(asset_key: str, partition: str | None, step: str) -> str:
        return f"{asset_key}|{partition if partition is not None else '_'}|{step}"

    def record_path(self, root_run_id: str, key: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        return self.run_folder(root_run_id) / "records" / f"{slug}-{digest}.json"

    # ---------------------------------------------------------------- executor
    def executor(self, folder: Path, job_name: str, needs: StepNeeds, python: str | None) -> Any:
        """A submitit ``SlurmExecutor`` for one submission, parameters from settings + needs."""
        import submitit

        ex = submitit.SlurmExecutor(folder=folder, python=python)
        repo_root = Path(__file__).resolve().parents[2]
        setup = [
            # The job imports arena_assets (and the step's module) like the submitter does.
            f"export PYTHONPATH={_shq(str(repo_root))}${{PYTHONPATH:+:$PYTHONPATH}}",
            *self.slurm.setup,
        ]
        limit_s = needs.time_min * 60
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": needs.time_min,
            "nodes": needs.nodes,
            "ntasks_per_node": needs.tasks_per_node,
            "cpus_per_task": needs.cpus,
            "mem": f"{needs.mem_gb}GB",
            "setup": setup,
            # USR2 this long before the limit: submitit requeues Checkpointable steps then.
            "signal_delay_s": max(5, min(self.slurm.signal_delay_s, limit_s // 2)),
        }
        for k in ("partition", "account", "qos"):
            if getattr(self.slurm, k):
                params[k] = getattr(self.slurm, k)
        if self.slurm.gres:
            params["gres"] = self.slurm.gres
        elif needs.gpus:
            params["gpus_per_node"] = needs.gpus
        if self.slurm.requeue is not None:
            params["additional_parameters"] = {"requeue" if self.slurm.requeue else "no_requeue": True}
        ex.update_parameters(**params)
        return ex

    # ---------------------------------------------------------------- run
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
        out_dir = Path(out_dir).absolute()
        ctx = _Ctx(context)
        key = self.record_key(ctx.asset_key, ctx.partition, step)
        rec_path = self.record_path(ctx.root_run_id, key)

        job, record = self._reattach(ctx, rec_path, out_dir)
        if job is None:
            job, record = self._submit(ctx, step, fn, args, kwargs, out_dir, needs, python, key, rec_path)
        return self._follow(ctx, step, job, record, rec_path, out_dir, needs)

    def map(
        self,
        context: Any,
        step: str,
        fn: Callable[..., StepResult],
        calls: Sequence[tuple[Sequence[Any], dict[str, Any], Path]],
        needs: StepNeeds,
        python: str | None = None,
    ) -> list[StepResult]:
        """Run ``fn(*args, out_dir=out_dir, **kwargs)`` for every ``(args, kwargs, out_dir)`` as
        ONE Slurm job array (submitit ``executor.batch()``): one sbatch for a whole fold sweep in
        a single run, scheduled in one go. Results come back in order; if any task fails, the
        Failure lists every failed task (with its traceback) after all tasks have ended.

        Unlike :meth:`run`, array tasks are not recorded for re-attachment (a retried run
        resubmits the array).
        """
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        ctx = _Ctx(context)
        if not calls:
            return []
        token = secrets.token_hex(4)
        job_name = f"arena-{re.sub(r'[^A-Za-z0-9_-]+', '-', step)}-{token}"
        folder = self.run_folder(ctx.root_run_id) / f"{time.strftime('%Y%m%dT%H%M%S')}-{token}"
        ex = self.executor(folder, job_name, needs, python)
        outs = [Path(o).absolute() for _, _, o in calls]
        submitted_at = time.time()
        try:
            with ex.batch():
                jobs = [
                    ex.submit(CheckpointableStep(fn) if kw.get("checkpoint_dir") is not None else fn, *a, out_dir=o, **kw)
                    for (a, kw, _), o in zip(calls, outs)
                ]
        except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError) as e:
            raise _failure(
                f"Slurm refused the {step} job array at submit: {_submit_reason(e)}",
                {"backend": "slurm", "step": step, "state": "REFUSED", "needs": needs.model_dump()},
            ) from e
        records = [
            JobRecord(key=f"{step}[{i}]", job_id=str(j.job_id), job_name=job_name, out_dir=str(o), folder=str(folder),
                      submitted_at=submitted_at, run_id=ctx.run_id)
            for i, (j, o) in enumerate(zip(jobs, outs))
        ]
        ctx.info(f"submitted Slurm job array {str(jobs[0].job_id).split('_')[0]} ({job_name}): {len(jobs)} tasks of {step}")
        tails = self._wait(ctx, [(j, r, None) for j, r in zip(jobs, records)])
        import dagster as dg

        results: list[StepResult] = []
        errors: list[str] = []
        lost: list[BaseException] = []
        for j, r, t, o in zip(jobs, records, tails, outs):
            try:
                results.append(self._finish(ctx, step, j, r, None, o, needs, t))
            except dg.RetryRequested as e:  # lost to the cluster: the retry resubmits the array
                lost.append(e)
            except Exception as e:  # dagster.Failure: collect, report all at once
                errors.append(getattr(e, "description", None) or str(e))
        if lost and not errors:
            raise lost[0]
        if lost:
            errors += [getattr(e.__cause__, "description", None) or str(e) for e in lost]
        if errors:
            raise _failure(
                f"{len(errors)} of {len(jobs)} tasks of the {step} job array failed:\n\n" + "\n\n".join(errors),
                {"backend": "slurm", "step": step, "job_ids": [r.job_id for r in records]},
            )
        return results

    def _reattach(self, ctx: _Ctx, rec_path: Path, out_dir: Path) -> tuple[Any, JobRecord | None]:
        record = JobRecord.load(rec_path)
        if record is None:
            return None, None
        if record.status != "submitted":
            ctx.info(f"previous job {record.job_id} of this root run is {record.status}: submitting anew")
            return None, None
        facts = sacct(record.job_id)
        ok, reason = check_identity(record, out_dir, facts)
        if not ok:
            ctx.warning(f"not re-attaching to job {record.job_id}: {reason}; submitting anew")
            return None, None
        state = facts["State"] if facts else "UNKNOWN"
        if state in LIVE_STATES or (state == "COMPLETED" and (Path(record.out_dir) / RESULT_FILE).exists()):
            import submitit

            ctx.info(
                f"re-attaching to Slurm job {record.job_id} ({record.job_name}, {state}) submitted by "
                f"run {record.run_id} of this root run"
            )
            record.history.append(f"{time.time():.0f} re-attached by {ctx.run_id} in state {state}")
            record.save(rec_path)
            return submitit.SlurmJob(folder=record.folder, job_id=record.job_id), record
        ctx.info(f"previous job {record.job_id} ended {state}: submitting anew")
        return None, None

    def _submit(
        self, ctx: _Ctx, step: str, fn: Callable[..., StepResult], args: Sequence[Any], kwargs: dict[str, Any],
        out_dir: Path, needs: StepNeeds, python: str | None, key: str, rec_path: Path,
    ) -> tuple[Any, JobRecord]:
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        token = secrets.token_hex(4)
        job_name = f"arena-{re.sub(r'[^A-Za-z0-9_-]+', '-', step)}-{token}"
        # A fresh folder per submission: a result pickle left by an earlier job with the same id
        # (after a cluster reset) can never be read as this job's result.
        folder = self.run_folder(ctx.root_run_id) / f"{time.strftime('%Y%m%dT%H%M%S')}-{token}"
        ex = self.executor(folder, job_name, needs, python)
        resumable = kwargs.get("checkpoint_dir") is not None
        call: Callable[..., Any] = fn
        if needs.tasks_per_node * needs.nodes > 1:
            call = DistributedStep(call, gpus=needs.gpus > 0)
        if resumable:
            call = CheckpointableStep(call)
        submitted_at = time.time()
        try:
            job = ex.submit(call, *args, out_dir=out_dir, **kwargs)
        except (FailedJobError, FailedSubmissionError, subprocess.CalledProcessError) as e:
            raise _failure(
                f"Slurm refused the {step} job at submit: {_submit_reason(e)}",
                {"backend": "slurm", "step": step, "state": "REFUSED", "needs": needs.model_dump()},
            ) from e
        earlier = JobRecord.load(rec_path)
        history = [*(earlier.history if earlier else []), f"{submitted_at:.0f} submitted {job.job_id} by {ctx.run_id}"]
        record = JobRecord(
            key=key, job_id=str(job.job_id), job_name=job_name, out_dir=str(out_dir), folder=str(folder),
            submitted_at=submitted_at, run_id=ctx.run_id, history=history,
        )
        record.save(rec_path)
        ctx.info(
            f"submitted Slurm job {job.job_id} ({job_name}) for {key}: cpus={needs.cpus} mem={needs.mem_gb}GB "
            f"gpus={needs.gpus} time={needs.time_min}min"
            f"{f' ranks={needs.tasks_per_node * needs.nodes}' if needs.tasks_per_node * needs.nodes > 1 else ''}"
            f"{' (checkpointable)' if resumable else ''}; "
            f"logs: {job.paths.stdout} / {job.paths.stderr}"
        )
        return job, record

    def _follow(
        self, ctx: _Ctx, step: str, job: Any, record: JobRecord, rec_path: Path | None, out_dir: Path, needs: StepNeeds
    ) -> StepResult:
        tails = self._wait(ctx, [(job, record, rec_path)])[0]
        return self._finish(ctx, step, job, record, rec_path, out_dir, needs, tails)

    def _wait(self, ctx: _Ctx, jobs: list[tuple[Any, JobRecord, Path | None]]) -> list[dict[str, _Tail]]:
        """Poll until every job has ended, streaming their log tails.

        If the wait is interrupted (the step process gets Dagster's interrupt, or anything else
        raises), the run's status decides: a run being CANCELED (Dagster marks it CANCELING before
        it signals the worker) scancels its jobs; any other interruption -- SIGTERM/Ctrl-C of the
        run worker, a restarted ``dagster dev`` or code server -- leaves them running, recorded
        ``submitted``, so that the re-executed run (same root run id) re-attaches to them.
        """
        tails = [{"stdout": _Tail(j.paths.stdout), "stderr": _Tail(j.paths.stderr)} for j, _, _ in jobs]
        state = ["PENDING"] * len(jobs)
        last = [""] * len(jobs)
        since = [time.time()] * len(jobs)
        done = [False] * len(jobs)
        requeueable: dict[int, bool] = {}
        try:
            while not all(done):
                for i, (job, record, _) in enumerate(jobs):
                    if done[i]:
                        continue
                    for name, tail in tails[i].items():
                        for line in tail.new_lines():
                            ctx.info(f"[slurm {job.job_id} {name}] {line}")
                    facts = sacct(record.job_id)
                    state[i] = facts["State"] if facts else state[i]
                    if state[i] != last[i]:
                        ctx.info(f"Slurm job {job.job_id}: {state[i]}")
                        last[i], since[i] = state[i], time.time()
                    grace = 0.0
                    if state[i] in REQUEUE_GRACE_S:
                        if i not in requeueable:
                            requeueable[i] = self._requeueable(record.job_id)
                        grace = REQUEUE_GRACE_S[state[i]] if requeueable[i] else 0.0
                    done[i] = job.paths.result_pickle.exists() or (
                        state[i] in TERMINAL_STATES and time.time() - since[i] >= grace
                    )
                if not all(done):
                    time.sleep(self.slurm.poll_s)
        except BaseException as e:
            live = [(job, record, rec_path) for i, (job, record, rec_path) in enumerate(jobs) if not done[i]]
            if live:
                self._interrupted(ctx, live, e)
            raise
        for (job, _, _), t in zip(jobs, tails):
            for name, tail in t.items():
                for line in tail.new_lines(final=True):
                    ctx.info(f"[slurm {job.job_id} {name}] {line}")
        return tails

    def _interrupted(self, ctx: _Ctx, live: list[tuple[Any, JobRecord, Path | None]], error: BaseException) -> None:
        """Stop vs cancel: scancel ``live`` jobs only when the run is being canceled, or when
        nothing could re-attach to them (no Dagster instance; job-array tasks, which are not
        recorded)."""
        status = ctx.run_status(settle_s=2.0)
        if ctx.instance is None:
            reason = "interrupted outside a Dagster run: nothing could re-attach"
        elif status in CANCELING_RUN_STATES:
            reason = f"the Dagster run is {status}"
        else:
            kept = [(r, p) for _, r, p in live if p is not None]
            ids = ", ".join(r.job_id for r, _ in kept)
            for record, rec_path in kept:
                record.history.append(
                    f"{time.time():.0f} run {ctx.run_id} stopped ({type(error).__name__}, run {status or 'unknown'}); "
                    "job left running for re-attach"
                )
                self._save(record, rec_path)
            if kept:
                ctx.warning(
                    f"step stopped ({type(error).__name__}) but the Dagster run is {status or 'of unknown status'}, "
                    f"not being canceled: Slurm job(s) {ids} keep running. Re-execute the run (same root run id) "
                    f"to re-attach, or terminate the run / scancel {ids} to stop them."
                )
            live = [(j, r, p) for j, r, p in live if p is None]
            reason = "job-array tasks are not re-attachable"
        for _, record, rec_path in live:
            subprocess.run(["scancel", str(record.job_id)], capture_output=True, timeout=60, check=False)
            ctx.warning(f"step interrupted ({reason}): cancelled Slurm job {record.job_id}")
            record.status = "cancelled"
            record.history.append(f"{time.time():.0f} cancelled by run {ctx.run_id}: {reason}")
            self._save(record, rec_path)

    def _requeueable(self, job_id: str) -> bool:
        """May Slurm requeue this job by itself after a node failure/preemption? (``Requeue=``
        of ``scontrol show job``; unknown -> True, i.e. wait the grace period.)"""
        if self.slurm.requeue is False:
            return False
        try:
            out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, check=False,
                                 timeout=30).stdout
        except (subprocess.SubprocessError, OSError):
            return True
        m = re.search(r"\bRequeue=(\d)", out)
        return m is None or m.group(1) != "0"

    def _finish(
        self, ctx: _Ctx, step: str, job: Any, record: JobRecord, rec_path: Path | None, out_dir: Path,
        needs: StepNeeds, tails: dict[str, _Tail],
    ) -> StepResult:
        """Turn an ended job into its StepResult (with sacct facts) or a dagster.Failure."""
        state = "UNKNOWN"
        facts = self._final_facts(record.job_id)
        state = facts.get("State", state) if facts else state
        compute = {
            "backend": "slurm",
            "job_id": record.job_id,
            "job_name": record.job_name,
            "state": state,
            "node": (facts or {}).get("NodeList", ""),
            "elapsed": (facts or {}).get("Elapsed", ""),
            "max_rss_mb": round(int((facts or {}).get("MaxRSSBytes", "0")) / 2**20, 1),
            "exit_code": (facts or {}).get("ExitCode", ""),
            "submitit_folder": record.folder,
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
        }
        outcome, payload = _read_outcome(job, wait_s=10.0 if state in {"COMPLETED", "FAILED"} else 1.0)
        if outcome != "success":
            text = _failure_text(step, record, state, payload, tails, needs)
            if outcome == "missing" and state in LOST_STATES:
                # The cluster lost the job (node failure, preemption, boot failure) and did not
                # requeue it: the step did nothing wrong, its retry resubmits (the record's status
                # is no longer "submitted", so the retry does not re-attach to the dead job).
                import dagster as dg

                record.status = "lost"
                record.history.append(f"{time.time():.0f} ended {state} (lost by the cluster): retry resubmits")
                self._save(record, rec_path)
                retries = self.slurm.lost_job_retries
                ctx.warning(f"Slurm job {record.job_id} ended {state} without a requeue: asking Dagster to retry the "
                            f"step (up to {retries} time(s)), which submits a new job")
                raise dg.RetryRequested(max_retries=retries) from _failure(text, compute)
            record.status = "failed" if state != "CANCELLED" else "cancelled"
            record.history.append(f"{time.time():.0f} ended {state}")
            self._save(record, rec_path)
            # A Python exception inside the step: the same code on the same inputs raises again,
            # so no retry policy may resubmit it (fix the cause, then re-execute).
            raise _failure(text, compute, allow_retries=outcome != "error")

        src = Path(record.out_dir)
        if src != out_dir and src.exists() and not out_dir.exists():
            # A re-attached job wrote into the version directory its first run chose; it was
            # never handed to any asset, so it becomes the version this run asked for.
            os.rename(src, out_dir)
            ctx.info(f"re-attached job's output moved from {src} to {out_dir}")
        if (out_dir / RESULT_FILE).exists():
            result = StepResult.read(out_dir)
        elif isinstance(payload, StepResult):
            result = payload
        else:
            record.status = "failed"
            self._save(record, rec_path)
            raise _failure(f"Slurm job {record.job_id} ({step}) completed but wrote no {RESULT_FILE} in {out_dir}", compute)
        result.info["compute"] = compute
        result.info["backend"] = "slurm"
        result.info["job_id"] = record.job_id
        record.status = "handed_over"
        record.out_dir = str(out_dir)
        record.history.append(f"{time.time():.0f} handed over to run {ctx.run_id}")
        self._save(record, rec_path)
        ctx.info(f"Slurm job {record.job_id} {state} on {compute['node']} in {compute['elapsed']}, max RSS {compute['max_rss_mb']} MB")
        return result

    @staticmethod
    def _save(record: JobRecord, rec_path: Path | None) -> None:
        if rec_path is not None:
            record.save(rec_path)

    @staticmethod
    def _final_facts(job_id: str, wait_s: float = 10.0) -> dict[str, str] | None:
        """sacct facts once the allocation has a terminal state (the result file can appear a
        moment before the job leaves RUNNING/COMPLETING)."""
        deadline = time.time() + wait_s
        facts = sacct(job_id)
        while time.time() < deadline and (facts is None or facts["State"] not in TERMINAL_STATES):
            time.sleep(0.5)
            facts = sacct(job_id)
        return facts


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
class _Ctx:
    """What the backend needs from a Dagster context (works with None: plain logging)."""

    def __init__(self, context: Any) -> None:
        self.context = context
        run = getattr(context, "run", None) or getattr(context, "dagster_run", None)
        self.run_id = str(getattr(run, "run_id", None) or getattr(context, "run_id", None) or f"adhoc-{secrets.token_hex(4)}")
        self.root_run_id = str(getattr(run, "root_run_id", None) or self.run_id)
        self.asset_key = "_"
        try:
            self.asset_key = context.asset_key.to_user_string()
        except Exception:  # not an asset context, or several assets
            pass
        self.partition: str | None = None
        try:
            if context is not None and context.has_partition_key:
                self.partition = context.partition_key
        except Exception:
            pass
        self.log = getattr(context, "log", None) or log
        self.instance = getattr(context, "instance", None) if run is not None else None

    def run_status(self, settle_s: float = 0.0) -> str | None:
        """The Dagster run's status now (``DagsterRunStatus`` value), None if unknown. Polls up to
        ``settle_s`` while the run is not (yet) CANCELING: a launcher marks the run before it
        signals the worker, but a signal from elsewhere may race a cancel in flight."""
        instance = self.instance
        if instance is None:
            return None
        deadline = time.time() + settle_s
        status: str | None = None
        while True:
            try:
                run = instance.get_run_by_id(self.run_id)
                status = getattr(getattr(run, "status", None), "value", None)
            except Exception as e:  # noqa: BLE001 - storage unreachable: treat as unknown
                log.warning("could not read the status of run %s: %s", self.run_id, e)
                status = None
            if status in CANCELING_RUN_STATES or time.time() >= deadline:
                return status
            time.sleep(0.25)

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warning(self, msg: str) -> None:
        self.log.warning(msg)


class _Tail:
    """Incremental reader of a growing log file (complete lines only; ``\\r`` progress bars
    collapse to their last frame)."""

    MAX_LINES = 200

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.partial = ""
        self.lines: list[str] = []

    def new_lines(self, final: bool = False) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
                self.offset = f.tell()
        except OSError:
            return []
        text = self.partial + data.decode("utf-8", errors="replace")
        parts = text.split("\n")
        self.partial = "" if final else parts.pop()
        out = [p.split("\r")[-1].rstrip() for p in parts]
        out = [p for p in out if p]
        self.lines = (self.lines + out)[-self.MAX_LINES :]
        if len(out) > self.MAX_LINES:
            out = [f"... {len(out) - self.MAX_LINES} lines skipped ..."] + out[-self.MAX_LINES :]
        return out


def _read_outcome(job: Any, wait_s: float) -> tuple[str, Any]:
    """("success", value) | ("error", remote traceback) | ("missing", None), without submitit's
    blocking wait (it waits ~15 s for a result file a cancelled job never writes)."""
    from submitit.core.utils import pickle_load

    deadline = time.time() + wait_s
    path = job.paths.result_pickle
    while not path.exists() and time.time() < deadline:
        time.sleep(0.25)
    if not path.exists():
        return "missing", None
    for _ in range(5):
        try:
            return pickle_load(path)
        except EOFError:
            time.sleep(0.5)
    return "missing", None


def _failure_text(step: str, record: JobRecord, state: str, payload: Any, tails: dict[str, _Tail], needs: StepNeeds) -> str:
    head = f"Slurm job {record.job_id} ({record.job_name}, step {step}) ended {state}"
    if isinstance(payload, str) and TIMEOUT_MARK in payload:
        head = (
            f"Slurm job {record.job_id} (step {step}) reached its time limit of {needs.time_min} min and is not "
            f"resumable (no checkpoint_dir): it was stopped, not requeued. Raise needs.time_min for '{step}'. "
            f"State {state}"
        )
    elif state == "TIMEOUT":
        head += f": reached its time limit of {needs.time_min} min"
    elif state == "CANCELLED":
        head += " (scancel, or cancelled by an administrator/preemption)"
    elif state == "OUT_OF_MEMORY":
        head += f": out of memory (asked {needs.mem_gb} GB)"
    body = [head]
    if isinstance(payload, str) and payload:
        body += ["", "Remote traceback:", payload.strip()]
    else:
        err = "\n".join(tails["stderr"].lines[-40:])
        if err:
            body += ["", "Last lines of the job's stderr:", err]
    body += ["", f"Logs: {tails['stdout'].path} / {tails['stderr'].path}"]
    return "\n".join(body)


def _submit_reason(e: BaseException) -> str:
    text = str(e)
    m = re.findall(r"sbatch: error: .*", text)
    if m:
        return "; ".join(s.strip() for s in m)
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def _failure(description: str, meta: dict[str, Any], allow_retries: bool = True) -> BaseException:
    import dagster as dg

    metadata: dict[str, Any] = {}
    for k, v in meta.items():
        metadata[k] = dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else str(v)
    return dg.Failure(description=description, metadata=metadata, allow_retries=allow_retries)


def _shq(s: str) -> str:
    import shlex

    return shlex.quote(s)


__all__ = ["SlurmBackend", "CheckpointableStep", "JobRecord", "check_identity", "sacct", "TERMINAL_STATES"]
