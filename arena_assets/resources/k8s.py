"""Kubernetes backend of the compute resource: one ``gpu/`` step = one Kubernetes Job.

How a step reaches a pod
------------------------
1. The backend pickles ``(fn, args, kwargs)`` into the shared artifact volume,
   ``<root>/.k8s/<run id>/<job name>.pkl`` (directory 0700, file 0600), with every path under the
   artifact root rewritten to the pod's mount (``K8sSettings.artifact_mount``).
2. It builds a ``batch/v1`` Job with dagster-k8s's :func:`construct_dagster_k8s_job` (the same
   builder Dagster's own ``K8sRunLauncher``/``k8s_job_executor`` use, so labels, restart policy and
   TTL follow Dagster's conventions): the step's image, ``nvidia.com/gpu`` limits from
   :class:`StepNeeds`, node selector and tolerations, the artifact PVC, a memory-backed
   ``/dev/shm``, plain env values and secrets *by reference* (``secretKeyRef``), and the command
   ``python -m arena_assets.core.remote <call.pkl>``.
3. The pod runs the same plain function as every other backend; it writes its outputs and
   ``result.json`` into the artifact root, plus a status file with the traceback on failure.
4. The backend waits for the Job, reads ``result.json`` back and adds facts under
   ``info['compute']``. A terminated Dagster run deletes the Job (and its pods).

Dry run (``K8sSettings.dry_run``): steps 1-2 happen, the manifest is validated against the
``kubernetes`` client's models, printed, logged and saved next to the call as YAML, and nothing is
submitted. With ``dry_run_execute`` (default) the pod's exact command then runs locally in a
subprocess on an unmapped copy of the call, so a whole materialization completes and prints every
manifest it would submit. :func:`render_manifests` renders one step's Job without any run.

What cannot be checked on a machine without a cluster: the submission path
(:meth:`K8sBackend._submit_and_wait`). It is kept small and separate; everything before it
(manifests, the call file, the runner) is exercised by ``tests/k8s``.

Heavy imports (``kubernetes``, ``dagster_k8s``) happen inside functions so the code location loads
fast when another backend is configured.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from arena_assets.core import remote
from arena_assets.core.results import StepResult
from arena_assets.core.settings import K8sSettings, Settings, StepNeeds

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import V1Job

log = logging.getLogger(__name__)

GPU_STEPS: tuple[str, ...] = (
    "post_pretrain",
    "teacher",
    "teacher_oof",
    "student",
    "calibration",
    "predict",
    "average",
    "merge",
    "quantize",
    "tta",
)
"""Every step the assets hand to ``compute.run`` (docs/steps.md), in recipe order."""

CALL_DIR = ".k8s"
"""Private folder under the artifact root holding pickled calls, status files and manifests."""

CONTAINER_NAME = "step"
ARTIFACT_VOLUME = "artifacts"
SHM_VOLUME = "dshm"
_MAX_JOB_NAME = 52
"""Job names become label values (63 chars); dagster-k8s also names the pod ``<job>-pod``."""


# --------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------
def _dns_label(s: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", s.lower())).strip("-")


def k8s_job_name(step: str, partition: str | None, run_id: str, salt: str = "") -> str:
    """A valid, unique, readable Job name: ``arena-<step>-<partition>-<hash>`` (<= 52 chars).

    The hash covers the run id and ``salt`` (the output directory), so two attempts or two
    partitions never collide, while ``kubectl get jobs`` still shows which step it is.
    """
    digest = hashlib.sha256(f"{run_id}|{step}|{partition}|{salt}".encode()).hexdigest()[:8]
    head = _dns_label(f"arena-{step}" + (f"-{partition}" if partition else ""))
    head = head[: _MAX_JOB_NAME - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def call_file(root: Path, run_id: str, job_name: str) -> Path:
    """Where the orchestrator writes the pickled call (its own view of the volume)."""
    return Path(root) / CALL_DIR / _dns_label(run_id or "no-run") / f"{job_name}.pkl"


def to_pod_path(path: Path, root: Path, mount: str) -> PurePosixPath:
    """The pod's view of a path under the artifact root."""
    return PurePosixPath(str(remote.remap_paths(Path(path), Path(root), mount)))


# --------------------------------------------------------------------------------------------
# The Job manifest
# --------------------------------------------------------------------------------------------
def _secret_env(env_secrets: dict[str, str]) -> list[dict[str, Any]]:
    """``ENV -> "secret:key"`` into ``secretKeyRef`` entries; the value is never read."""
    out = []
    for name, ref in sorted(env_secrets.items()):
        secret, sep, key = ref.partition(":")
        if not sep or not secret or not key:
            raise ValueError(f"k8s.env_secrets[{name!r}] must be 'secret-name:key', got {ref!r}")
        out.append({"name": name, "value_from": {"secret_key_ref": {"name": secret, "key": key}}})
    return out


def step_resources(needs: StepNeeds) -> dict[str, dict[str, str]]:
    """Container resources for a step.

    Memory: request = limit (a training step that outgrows its request gets OOM-killed, better at
    once than at random). CPU: request only (a CPU limit throttles data loading through CFS).
    GPUs: ``nvidia.com/gpu`` as limit and equal request (extended resources cannot overcommit).
    """
    if needs.nodes != 1:
        raise ValueError(
            f"the k8s backend runs single-pod steps; needs.nodes={needs.nodes} "
            "(multi-node training needs Slurm or a PyTorchJob operator)"
        )
    requests = {"cpu": str(needs.cpus), "memory": f"{needs.mem_gb}Gi"}
    limits = {"memory": f"{needs.mem_gb}Gi"}
    if needs.gpus:
        requests["nvidia.com/gpu"] = str(needs.gpus)
        limits["nvidia.com/gpu"] = str(needs.gpus)
    return {"requests": requests, "limits": limits}


def build_job(
    k8s: K8sSettings,
    step: str,
    needs: StepNeeds,
    pod_call_path: str | PurePosixPath,
    *,
    job_name: str,
    labels: dict[str, str] | None = None,
) -> V1Job:
    """The Job that runs one pickled step call, built by dagster-k8s."""
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
    )

    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(k8s.env.items())]
    env.append({"name": "ARENA_ARTIFACT_ROOT", "value": k8s.artifact_mount})
    env.append({"name": "ARENA_NODE_NAME", "value_from": {"field_ref": {"field_path": "spec.nodeName"}}})
    env.extend(_secret_env(k8s.env_secrets))

    job_config = DagsterK8sJobConfig(
        job_image=k8s.images.get(step, k8s.image),
        image_pull_policy=k8s.image_pull_policy,
        service_account_name=k8s.service_account,
        volume_mounts=[
            {"name": ARTIFACT_VOLUME, "mount_path": k8s.artifact_mount},
            {"name": SHM_VOLUME, "mount_path": "/dev/shm"},
        ],
        volumes=[
            {"name": ARTIFACT_VOLUME, "persistent_volume_claim": {"claim_name": k8s.artifact_pvc}},
            {"name": SHM_VOLUME, "empty_dir": {"medium": "Memory", "size_limit": f"{k8s.shm_gb}Gi"}},
        ],
        resources=step_resources(needs),
    )
    pod_spec: dict[str, Any] = {
        # Step pods never talk to the API server; the orchestrator does.
        "automount_service_account_token": False,
    }
    # GPU placement only for steps that use GPUs: a CPU-only pod (averaging) must not hold a GPU node.
    selector = k8s.node_selector if needs.gpus else k8s.cpu_node_selector
    if selector:
        pod_spec["node_selector"] = dict(selector)
    if needs.gpus and k8s.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in k8s.tolerations]
    user_config = UserDefinedDagsterK8sConfig(
        container_config={
            "name": CONTAINER_NAME,
            "command": [k8s.python, "-m", "arena_assets.core.remote"],
            "env": env,
        },
        pod_spec_config=pod_spec,
        job_spec_config={
            # A failed step is retried by Dagster (new run, new output dir), not by Kubernetes.
            "backoff_limit": 0,
            # The step's time limit, as Slurm's --time.
            "active_deadline_seconds": int(needs.time_min) * 60,
        },
    )
    return construct_dagster_k8s_job(
        job_config,
        args=[str(pod_call_path)],
        job_name=job_name,
        user_defined_k8s_config=user_config,
        component="arena-step",
        labels={"arena-assets/step": step, **(labels or {})},
    )


def job_manifest(job: V1Job) -> dict[str, Any]:
    """The Job as the JSON/YAML the API server receives (camelCase keys, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(job)


def validate_manifest(manifest: dict[str, Any], kind: str = "V1Job") -> Any:
    """Deserialize ``manifest`` into the ``kubernetes`` client model ``kind``; return the model.

    The client raises on missing required fields and bad enum values, but silently drops unknown
    keys; so the model is serialized back and must equal the input (a misspelt ``nodeSelectr``
    fails here instead of being ignored by the cluster).
    """
    from kubernetes.client import ApiClient

    client = ApiClient()
    model = client._ApiClient__deserialize(manifest, kind)  # type: ignore[attr-defined]
    back = client.sanitize_for_serialization(model)
    if back != manifest:
        raise ValueError(f"manifest does not round-trip through {kind}: {_first_diff(manifest, back)}")
    return model


def _first_diff(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in b:
                return f"{path}.{k} unknown to the model"
            if k not in a:
                return f"{path}.{k} added by the model"
            if a[k] != b[k]:
                return _first_diff(a[k], b[k], f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_diff(x, y, f"{path}[{i}]")
    return f"{path}: {a!r} != {b!r}"


def manifests_yaml(manifests: Sequence[dict[str, Any]]) -> str:
    """Multi-document YAML, as ``kubectl apply -f`` takes it."""
    import yaml

    return "".join("---\n" + yaml.safe_dump(m, sort_keys=False) for m in manifests)


def render_manifests(
    settings: Settings,
    step: str,
    *,
    partition: str | None = "0",
    run_id: str = "dry-run",
) -> list[dict[str, Any]]:
    """The manifests a materialization of ``step`` would submit, validated, without any run.

    Uses the settings' ``compute.k8s`` and ``compute.needs[step]``; the call path is the one the
    backend would write for this run id. Nothing is written.
    """
    if step not in GPU_STEPS:
        raise KeyError(f"unknown step {step!r}; known: {list(GPU_STEPS)}")
    k8s = settings.compute.k8s
    name = k8s_job_name(step, partition, run_id)
    pod_call = to_pod_path(call_file(settings.root, run_id, name), settings.root, k8s.artifact_mount)
    job = build_job(
        k8s,
        step,
        settings.compute.needs_for(step),
        pod_call,
        job_name=name,
        labels=_run_labels(run_id, partition),
    )
    manifest = job_manifest(job)
    validate_manifest(manifest)
    return [manifest]


def _run_labels(run_id: str, partition: str | None) -> dict[str, str]:
    labels = {"arena-assets/run-id": run_id}
    if partition is not None:
        labels["arena-assets/partition"] = partition
    return labels


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------
class K8sBackend:
    """Runs a step as a Kubernetes Job (or, in a dry run, prints that Job and runs it locally)."""

    name = "k8s"

    def __init__(self, settings: K8sSettings, root: Path, dry_run: bool | None = None) -> None:
        self.settings = settings
        self.root = Path(root)
        self.dry_run = settings.dry_run if dry_run is None else dry_run

    # ---------------------------------------------------------------- public
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
        """Run ``fn(*args, out_dir=out_dir, **kwargs)`` in a pod; return its StepResult.

        ``python`` is the orchestrator-side interpreter for the step (the GPTQ venv for
        ``quantize``); pods use ``K8sSettings.python`` of the step's image (``images[step]``)
        instead, and only the local execution of a dry run uses ``python``.
        """
        from arena_assets.resources.compute import _one_rank_only

        _one_rank_only(context, self.name, step, needs)
        k8s = self.settings
        run_id = _run_id(context)
        partition = _partition_key(context)
        out_dir = Path(out_dir)
        job_name = k8s_job_name(step, partition, run_id, salt=str(out_dir))
        call = call_file(self.root, run_id, job_name)
        mount = k8s.artifact_mount
        outside = _paths_outside(list(args) + list(kwargs.values()), self.root)
        if outside:
            _log(context, "warning", f"k8s: step {step} gets paths outside the artifact root {self.root}; "
                 f"its pod will not see them: {outside[:3]}")
        remote.write_call(
            call,
            fn,
            remote.remap_paths(tuple(args), self.root, mount),
            {**remote.remap_paths(dict(kwargs), self.root, mount), "out_dir": to_pod_path(out_dir, self.root, mount)},
        )
        job = build_job(
            k8s,
            step,
            needs,
            to_pod_path(call, self.root, mount),
            job_name=job_name,
            labels=_run_labels(run_id, partition),
        )
        manifest = job_manifest(job)
        validate_manifest(manifest)
        manifest_path = call.with_suffix(".yaml")
        from arena_assets.core.artifacts import atomic_write_text

        atomic_write_text(manifest_path, manifests_yaml([manifest]))
        facts: dict[str, Any] = {
            "backend": self.name,
            "step": step,
            "job_name": job_name,
            "namespace": k8s.namespace,
            "image": k8s.images.get(step, k8s.image),
            "manifest": str(manifest_path),
            "call": str(call),
            "gpus": needs.gpus,
            "cpus": needs.cpus,
            "mem_gb": needs.mem_gb,
            "time_min": needs.time_min,
            # Names only: values never leave the cluster's Secret objects.
            "env_names": sorted(k8s.env),
            "secret_refs": {name: ref for name, ref in sorted(k8s.env_secrets.items())},
            "dry_run": self.dry_run,
        }
        _log(context, "info", f"k8s: step {step} -> Job {k8s.namespace}/{job_name} ({manifest_path})")
        if self.dry_run:
            return self._dry_run(context, step, fn, args, kwargs, out_dir, manifest, facts, python)
        return self._submit_and_wait(context, job, call, out_dir, facts)

    # ---------------------------------------------------------------- dry run (tested)
    def _dry_run(
        self,
        context: Any,
        step: str,
        fn: Callable[..., StepResult],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        out_dir: Path,
        manifest: dict[str, Any],
        facts: dict[str, Any],
        python: str | None,
    ) -> StepResult:
        text = manifests_yaml([manifest])
        print(text, flush=True)
        _log(context, "info", f"k8s dry run: the Job that would be submitted for {step}:\n{text}")
        if not self.settings.dry_run_execute:
            from dagster import Failure, MetadataValue

            raise Failure(
                description=f"k8s dry run: Job for {step} written to {facts['manifest']}, not submitted "
                "and not executed (k8s.dry_run_execute is false)",
                metadata={"manifest": MetadataValue.path(facts["manifest"])},
            )
        local_call = Path(facts["call"]).with_suffix(".local.pkl")
        remote.write_call(local_call, fn, tuple(args), {**kwargs, "out_dir": out_dir})
        cmd = [python or sys.executable, "-m", "arena_assets.core.remote", str(local_call)]
        t0 = time.time()
        proc = subprocess.Popen(cmd)
        try:
            rc = proc.wait()
        except BaseException:
            # A terminated run must not leave the step running behind it.
            proc.kill()
            proc.wait()
            raise
        facts.update(state="DRY_RUN_EXECUTED_LOCALLY", exit_code=rc, elapsed_s=round(time.time() - t0, 3))
        return self._finish(context, step, local_call, out_dir, facts, ok=rc == 0)

    # ---------------------------------------------------------------- real cluster (untested here)
    def _submit_and_wait(
        self, context: Any, job: V1Job, call: Path, out_dir: Path, facts: dict[str, Any]
    ) -> StepResult:
        """Create the Job, poll it, delete it if the run is terminated. Needs a cluster."""
        from dagster_k8s.client import DagsterKubernetesClient
        from kubernetes import config as kube_config

        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            kube_config.load_kube_config()
        api = DagsterKubernetesClient.production_client()
        name, ns = facts["job_name"], self.settings.namespace
        t0 = time.time()
        api.create_namespaced_job_with_retries(job, ns)
        _log(context, "info", f"k8s: submitted Job {ns}/{name}")
        ok = False
        try:
            while True:
                status = api.get_job_status(name, ns)
                if status is None:
                    facts["state"] = "DELETED"
                    break
                if status.succeeded:
                    facts["state"], ok = "SUCCEEDED", True
                    break
                if status.failed and not status.active:
                    conds = [f"{c.type}: {c.reason} {c.message or ''}".strip() for c in status.conditions or []]
                    facts["state"], facts["conditions"] = "FAILED", conds
                    break
                time.sleep(self.settings.poll_s)
        except BaseException:
            _log(context, "warning", f"k8s: deleting Job {ns}/{name} (run interrupted)")
            api.delete_job(name, ns)
            raise
        facts["elapsed_s"] = round(time.time() - t0, 3)
        if ok:
            # Shared file systems (NFS) may cache a directory listing for up to a minute: give the
            # pod's result a moment to become visible here before calling the step failed.
            deadline = time.time() + 60
            while not (out_dir / "result.json").exists() and time.time() < deadline:
                time.sleep(1)
        else:
            try:
                pods = api.get_pod_names_in_job(name, ns)
                facts["log_tail"] = api.retrieve_pod_logs(pods[-1], ns)[-4000:] if pods else ""
            except Exception as e:  # noqa: BLE001 - logs are a courtesy, the status file is the truth
                facts["log_tail"] = f"(no pod logs: {e})"
        return self._finish(context, facts["step"], call, out_dir, facts, ok=ok)

    # ---------------------------------------------------------------- shared
    def _finish(
        self, context: Any, step: str, call: Path, out_dir: Path, facts: dict[str, Any], *, ok: bool
    ) -> StepResult:
        status = remote.read_status(call) or {}
        if status:
            facts["node"] = status.get("node") or status.get("host")
            facts["pod"] = status.get("pod")
            facts["remote_elapsed_s"] = status.get("elapsed_s")
        if not ok or not status.get("ok") or not (out_dir / "result.json").exists():
            from dagster import Failure, MetadataValue

            tb = status.get("traceback") or facts.get("log_tail") or "(the step left no traceback)"
            raise Failure(
                description=f"k8s step {step or facts['job_name']} failed "
                f"({facts.get('state')}): {status.get('error', 'no result.json')}\n{tb}",
                metadata={
                    "job_name": facts["job_name"],
                    "state": str(facts.get("state")),
                    "manifest": MetadataValue.path(facts["manifest"]),
                },
            )
        result = StepResult.read(out_dir)
        result.info["compute"] = facts
        return result


def _paths_outside(values: list[Any], root: Path) -> list[str]:
    """Absolute paths handed to a step that do not lie under the artifact root (pods see only it)."""
    found: list[str] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            found += _paths_outside(list(v), root)
        elif isinstance(v, dict):
            found += _paths_outside(list(v.values()), root)
        elif isinstance(v, Path) and v.is_absolute() and not v.is_relative_to(root):
            found.append(str(v))
    return found


def _run_id(context: Any) -> str:
    run = getattr(context, "run", None)
    return str(getattr(run, "run_id", None) or "no-run")


def _partition_key(context: Any) -> str | None:
    try:
        if context is not None and getattr(context, "has_partition_key", False):
            return str(context.partition_key)
    except Exception:  # noqa: BLE001 - contexts without partitions raise on access
        return None
    return None


def _log(context: Any, level: str, msg: str) -> None:
    logger = getattr(context, "log", None)
    if logger is not None:
        getattr(logger, level)(msg)
    else:
        getattr(log, level)(msg)
