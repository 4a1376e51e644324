"""The deployment files in deploy/ agree with each other, with the code and with Kubernetes' schema.

No container engine or cluster is available here, so the image is never built and nothing is
applied; what can be checked is: every manifest deserializes into its ``kubernetes`` model, the
Helm values' Kubernetes fragments do too, names and paths line up across files, and the dry-run
script prints a valid Job for every step of the example settings.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes")
pytest.importorskip("dagster_k8s")

from arena_assets.core.settings import load_settings  # noqa: E402
from arena_assets.resources.k8s import GPU_STEPS, render_manifests, validate_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def example_settings():
    return load_settings(DEPLOY / "settings-k8s.yaml")


@pytest.fixture(scope="module")
def user_deployment() -> dict:
    values = yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())
    [dep] = values["dagster-user-deployments"]["deployments"]
    assert values["dagster-user-deployments"]["enabled"] is True
    return dep


def test_pvc_is_a_valid_rwx_claim_named_as_the_settings_say(example_settings) -> None:
    [pvc] = _docs(DEPLOY / "k8s" / "pvc.yaml")
    model = validate_manifest(pvc, "V1PersistentVolumeClaim")
    assert model.spec.access_modes == ["ReadWriteMany"]
    assert model.metadata.name == example_settings.compute.k8s.artifact_pvc


def test_rbac_lets_the_run_worker_create_watch_and_delete_step_jobs() -> None:
    role, binding = _docs(DEPLOY / "k8s" / "rbac.yaml")
    role_m = validate_manifest(role, "V1Role")
    binding_m = validate_manifest(binding, "V1RoleBinding")
    verbs = {(g, r): set(rule.verbs) for rule in role_m.rules for g in rule.api_groups for r in rule.resources}
    assert {"create", "get", "delete"} <= verbs[("batch", "jobs")]
    assert "get" in verbs[("", "pods/log")] and "list" in verbs[("", "pods")]
    assert binding_m.role_ref.name == role_m.metadata.name


def test_helm_values_mount_the_artifact_volume_where_the_steps_expect_it(user_deployment, example_settings) -> None:
    k8s = example_settings.compute.k8s
    vols = {v["name"]: validate_manifest(v, "V1Volume") for v in user_deployment["volumes"]}
    mounts = [validate_manifest(m, "V1VolumeMount") for m in user_deployment["volumeMounts"]]
    for e in user_deployment["env"]:
        validate_manifest(e, "V1EnvVar")
    validate_manifest(user_deployment["resources"], "V1ResourceRequirements")

    art = [m for m in mounts if vols[m.name].persistent_volume_claim is not None]
    assert len(art) == 1
    assert vols[art[0].name].persistent_volume_claim.claim_name == k8s.artifact_pvc
    # Same path in the code location, its run workers and the step pods: no path mapping needed.
    assert art[0].mount_path == k8s.artifact_mount == str(example_settings.root)

    # ARENA_SETTINGS points into a mounted volume (the settings ConfigMap).
    env = {e["name"]: e.get("value") for e in user_deployment["env"]}
    assert any(env["ARENA_SETTINGS"].startswith(m.mount_path + "/") for m in mounts)
    # Run workers inherit this configuration (volumes, env, service account).
    assert user_deployment["includeConfigInLaunchedRuns"]["enabled"] is True


def test_helm_values_load_the_code_location_module_pyproject_names(user_deployment) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    module = pyproject["tool"]["dagster"]["module_name"]
    args = user_deployment["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == module


def test_example_settings_render_a_valid_job_for_every_step(example_settings) -> None:
    assert example_settings.compute.backend == "k8s"
    images = set()
    for step in GPU_STEPS:
        [m] = render_manifests(example_settings, step)
        job = validate_manifest(m)
        c = job.spec.template.spec.containers[0]
        images.add(c.image)
        gpus = example_settings.compute.needs_for(step).gpus
        assert c.resources.limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        assert not any(e.value for e in c.env if e.name == "HF_TOKEN")
    # quantize runs in the GPTQ image (Dockerfile target `quant`), everything else in the app image.
    assert len(images) == 2


def test_dry_run_script_prints_one_valid_job_per_step() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "k8s-dry-run.py"), str(DEPLOY / "settings-k8s.yaml"), "--run-id", "ci"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    docs = list(yaml.safe_load_all(out))
    assert [d["metadata"]["labels"]["arena-assets/step"] for d in docs] == list(GPU_STEPS)
    for d in docs:
        validate_manifest(d)
        assert d["spec"]["template"]["spec"]["containers"][0]["args"][0].startswith("/artifacts/.k8s/ci/")


def test_dockerfile_copies_files_that_exist_and_has_both_targets() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM .* AS app$", text, re.M) and re.search(r"^FROM app AS quant$", text, re.M)
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            # README.md is the project's readme (pyproject), required by `pip install .`.
            assert (REPO / src.rstrip("/")).exists() or src == readme, f"COPY {src}: not in the repository"
    # The pod's command runs this module; the quant target relies on this script.
    assert (REPO / "arena_assets" / "core" / "remote.py").exists()
    assert (REPO / "scripts" / "setup-quant-env.sh").exists() and "setup-quant-env.sh" in text
