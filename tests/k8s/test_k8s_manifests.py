"""The Job manifests of every GPU step, validated with the `kubernetes` client's models.

No cluster runs on the development machines; these tests check everything short of submitting:
the manifests deserialize into ``V1Job`` without losing a key, and the image, command, GPU
limits, volumes, env and secret references are what the settings ask for.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes")
pytest.importorskip("dagster_k8s")

from kubernetes.client import V1Job  # noqa: E402

from arena_assets.core import remote  # noqa: E402
from arena_assets.core.settings import K8sSettings, Settings, StepNeeds  # noqa: E402
from arena_assets.resources.k8s import (  # noqa: E402
    GPU_STEPS,
    build_job,
    job_manifest,
    k8s_job_name,
    manifests_yaml,
    render_manifests,
    step_resources,
    validate_manifest,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

# Different needs per step, so a mix-up between steps would show.
NEEDS = {
    "post_pretrain": {"gpus": 8, "cpus": 32, "mem_gb": 400, "time_min": 1440},
    "teacher": {"gpus": 4, "cpus": 16, "mem_gb": 200, "time_min": 720},
    "teacher_oof": {"gpus": 1, "cpus": 8, "mem_gb": 64, "time_min": 90},
    "student": {"gpus": 2, "cpus": 12, "mem_gb": 96, "time_min": 600},
    "calibration": {"gpus": 0, "cpus": 2, "mem_gb": 8, "time_min": 15},
    "predict": {"gpus": 1, "cpus": 4, "mem_gb": 48, "time_min": 60},
    "average": {"gpus": 0, "cpus": 6, "mem_gb": 128, "time_min": 30},
    "merge": {"gpus": 1, "cpus": 6, "mem_gb": 120, "time_min": 45},
    "quantize": {"gpus": 1, "cpus": 8, "mem_gb": 110, "time_min": 180},
    "tta": {"gpus": 3, "cpus": 8, "mem_gb": 64, "time_min": 100},
}
K8S = {
    "image": "registry.example.com/arena-assets:1.2.3",
    "images": {"quantize": "registry.example.com/arena-assets:1.2.3-quant"},
    "namespace": "ml",
    "artifact_pvc": "arena-rwx",
    "artifact_mount": "/mnt/arena",
    "node_selector": {"nvidia.com/gpu.product": "H100"},
    "cpu_node_selector": {"pool": "cpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "env": {"HF_HOME": "/mnt/arena/.hf", "HF_HUB_OFFLINE": "1"},
    "env_secrets": {"HF_TOKEN": "huggingface:token", "WANDB_API_KEY": "wandb:key"},
    "service_account": "arena-steps",
    "python": "/opt/venv/bin/python",
    "shm_gb": 12,
}


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "artifact_root": str(tmp_path / "artifacts"),
            "compute": {"backend": "k8s", "needs": NEEDS, "k8s": K8S},
        }
    )


@pytest.mark.parametrize("step", GPU_STEPS)
def test_every_step_renders_a_valid_job(settings: Settings, step: str) -> None:
    [manifest] = render_manifests(settings, step, partition="3", run_id="run-abc")
    job = validate_manifest(manifest)
    assert isinstance(job, V1Job)
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    need = NEEDS[step]

    # Names: valid DNS labels, short enough for the pod name dagster-k8s derives.
    name = job.metadata.name
    assert DNS_LABEL.match(name) and len(name) <= 52, name
    assert step.replace("_", "-") in name and "-3-" in name
    labels = job.spec.template.metadata.labels
    assert labels["arena-assets/step"] == step and labels["arena-assets/partition"] == "3"
    assert labels["arena-assets/run-id"] == "run-abc"

    # Job-level policy: Dagster retries, Kubernetes does not; the time limit is the step's.
    assert job.spec.backoff_limit == 0
    assert job.spec.active_deadline_seconds == need["time_min"] * 60
    pod = job.spec.template.spec
    assert pod.restart_policy == "Never"
    assert pod.service_account_name == "arena-steps"
    assert pod.automount_service_account_token is False

    # The container: image (per-step override for quantize), the runner command, the call path.
    [c] = pod.containers
    assert c.image == K8S["images"].get(step, K8S["image"])
    assert c.command == ["/opt/venv/bin/python", "-m", "arena_assets.core.remote"]
    [arg] = c.args
    assert arg.startswith("/mnt/arena/.k8s/run-abc/") and arg.endswith(f"{name}.pkl")

    # Resources: GPUs as limit == request, memory request == limit, CPU request only.
    res = c.resources
    assert res.requests["cpu"] == str(need["cpus"])
    assert res.requests["memory"] == res.limits["memory"] == f"{need['mem_gb']}Gi"
    assert "cpu" not in res.limits
    if need["gpus"]:
        assert res.limits["nvidia.com/gpu"] == res.requests["nvidia.com/gpu"] == str(need["gpus"])
        assert pod.node_selector == K8S["node_selector"]
        assert [t.to_dict()["key"] for t in pod.tolerations] == ["nvidia.com/gpu"]
    else:
        assert "nvidia.com/gpu" not in res.limits and "nvidia.com/gpu" not in res.requests
        assert pod.node_selector == K8S["cpu_node_selector"]
        assert not pod.tolerations

    # Volumes: the artifact PVC at the mount, /dev/shm in memory.
    mounts = {m.name: m.mount_path for m in c.volume_mounts}
    assert mounts == {"artifacts": "/mnt/arena", "dshm": "/dev/shm"}
    vols = {v.name: v for v in pod.volumes}
    assert vols["artifacts"].persistent_volume_claim.claim_name == "arena-rwx"
    assert vols["dshm"].empty_dir.medium == "Memory" and vols["dshm"].empty_dir.size_limit == "12Gi"

    # Env: plain values as values, secrets only as references.
    env = {e.name: e for e in c.env}
    assert env["HF_HOME"].value == "/mnt/arena/.hf" and env["HF_HUB_OFFLINE"].value == "1"
    assert env["ARENA_ARTIFACT_ROOT"].value == "/mnt/arena"
    assert env["ARENA_NODE_NAME"].value_from.field_ref.field_path == "spec.nodeName"
    for var, (secret, key) in {"HF_TOKEN": ("huggingface", "token"), "WANDB_API_KEY": ("wandb", "key")}.items():
        assert env[var].value is None
        assert env[var].value_from.secret_key_ref.name == secret
        assert env[var].value_from.secret_key_ref.key == key


def test_secret_values_never_reach_a_manifest(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend references Secrets; even a value present in its own environment stays out."""
    monkeypatch.setenv("HF_TOKEN", "hf_s3cr3t_value_from_env")
    text = manifests_yaml([m for s in GPU_STEPS for m in render_manifests(settings, s)])
    assert "hf_s3cr3t_value_from_env" not in text
    assert text.count("secretKeyRef") == 2 * len(GPU_STEPS)


def test_yaml_is_multi_document_and_round_trips(settings: Settings) -> None:
    manifests = [m for s in ("teacher", "student") for m in render_manifests(settings, s)]
    docs = list(yaml.safe_load_all(manifests_yaml(manifests)))
    assert docs == manifests
    for d in docs:
        validate_manifest(d)


def test_validation_catches_unknown_keys_and_missing_required_fields(settings: Settings) -> None:
    [manifest] = render_manifests(settings, "teacher")
    typo = yaml.safe_load(yaml.safe_dump(manifest))
    typo["spec"]["template"]["spec"]["nodeSelectr"] = typo["spec"]["template"]["spec"].pop("nodeSelector")
    with pytest.raises(ValueError, match="nodeSelectr"):
        validate_manifest(typo)
    nameless = yaml.safe_load(yaml.safe_dump(manifest))
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        validate_manifest(nameless)


def test_bad_settings_fail_before_anything_is_built(tmp_path: Path) -> None:
    bad = K8sSettings(env_secrets={"HF_TOKEN": "just-a-name"})
    with pytest.raises(ValueError, match="secret-name:key"):
        build_job(bad, "teacher", StepNeeds(gpus=1), "/artifacts/x.pkl", job_name="x")
    with pytest.raises(ValueError, match="nodes"):
        step_resources(StepNeeds(gpus=8, nodes=2))
    with pytest.raises(KeyError):
        render_manifests(Settings(artifact_root=str(tmp_path)), "folds")


def test_built_job_equals_its_manifest(settings: Settings) -> None:
    """build_job's V1Job and the dict the API receives describe the same object."""
    job = build_job(settings.compute.k8s, "tta", StepNeeds(gpus=2), "/mnt/arena/c.pkl", job_name="arena-tta-x")
    manifest = job_manifest(job)
    assert validate_manifest(manifest) == job


def test_job_names_are_valid_unique_and_bounded() -> None:
    long_part = "gemma-2-9b-it-with-a-very-long-family-name|fold_4"
    names = {k8s_job_name("post_pretrain", long_part, "run", salt=str(i)) for i in range(50)}
    assert len(names) == 50
    for n in names:
        assert DNS_LABEL.match(n) and len(n) <= 52, n
        assert n.startswith("arena-post-pretrain-gemma")
    assert k8s_job_name("teacher", "0", "r1") != k8s_job_name("teacher", "0", "r2")
    assert k8s_job_name("teacher", None, "r1") == k8s_job_name("teacher", None, "r1")


def test_remap_paths_rewrites_only_paths_under_the_root() -> None:
    root = Path("/data/arena")
    obj = (
        root / "teacher/0/v1",
        "/data/arena",
        "/data/arena-other/x",  # a sibling with the same prefix: untouched
        ["/data/arena/a.parquet", {"k": Path("/data/arena/b")}],
        "relative/path",
        3.5,
        K8sSettings(),
    )
    out = remote.remap_paths(obj, root, "/artifacts")
    assert out[0] == Path("/artifacts/teacher/0/v1")
    assert out[1] == "/artifacts"
    assert out[2] == "/data/arena-other/x"
    assert out[3] == ["/artifacts/a.parquet", {"k": Path("/artifacts/b")}]
    assert out[4:6] == ("relative/path", 3.5)
    assert out[6] is obj[6]
    assert remote.remap_paths(obj, "/artifacts", "/artifacts") is obj
