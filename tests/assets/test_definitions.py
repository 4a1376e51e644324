"""The code location's shape: loads without torch, validates, matches the committed snapshot,
takes families from the settings, and derives code versions from exactly the settings a step uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from arena_assets.definitions import build_definitions

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"
ARENA_YAML = str(REPO / "arena.yaml")


def _py_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_loading_definitions_imports_no_torch() -> None:
    code = ("import sys, arena_assets.definitions as d; d.defs.resolve_asset_graph(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "assert not heavy, heavy; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_py_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_dagster_definitions_validate() -> None:
    dagster = Path(sys.executable).parent / "dagster"
    r = subprocess.run([str(dagster), "definitions", "validate", "-m", "arena_assets.definitions"],
                       cwd=REPO, env=_py_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Validation successful" in r.stdout + r.stderr


def describe(defs) -> dict:  # type: ignore[no-untyped-def]
    """Asset keys, deps, partitions, groups, checks, pools and jobs (not code versions, which
    follow the settings defaults)."""
    g = defs.resolve_asset_graph()
    assets = {}
    for node in sorted(g.asset_nodes, key=lambda n: n.key.to_user_string()):
        assets[node.key.to_user_string()] = {
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": node.partitions_def.get_partition_keys() if node.partitions_def else None,
            "group": node.group_name,
            "kind": "observable_source" if node.is_observable and not node.is_materializable else "asset",
            "checks": sorted(k.name for k in node.check_keys),
            "pool": node.pools and sorted(node.pools) or None,
        }
    jobs = sorted(j.name for j in defs.jobs or [])
    sensors = sorted(s.name for s in defs.sensors or [])
    return {"assets": assets, "jobs": jobs, "sensors": sensors}


def test_definitions_snapshot() -> None:
    got = describe(build_definitions(ARENA_YAML))
    if os.environ.get("UPDATE_SNAPSHOTS") == "1" or not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        if os.environ.get("UPDATE_SNAPSHOTS") != "1":
            pytest.fail(f"wrote a new snapshot {SNAPSHOT}; review and commit it")
    want = json.loads(SNAPSHOT.read_text())
    assert got == want, "the definitions changed; if on purpose: UPDATE_SNAPSHOTS=1 pytest tests/assets/test_definitions.py"


def test_issue_dependency_table_holds() -> None:
    """Spot checks of the dependency table in the issue (not a chain)."""
    g = build_definitions(ARENA_YAML).resolve_asset_graph()

    def deps(k: str) -> set[str]:
        from dagster import AssetKey

        return {p.to_user_string() for p in g.get(AssetKey.from_user_string(k)).parent_keys}

    assert deps("student_model") == {"fold_data", "teacher_oof", "gemma/post_pretrained_base"}
    assert deps("llama/teacher_model") == {"fold_data", "llama/post_pretrained_base", "external_pairs"}
    assert deps("teacher_oof") >= {"llama/teacher_oof_probs"}
    assert deps("baseline_student") == {"fold_data", "gemma/post_pretrained_base"}
    # arena.yaml's ensemble mode is `merged`: no wait for the fold submissions; the per-fold CV
    # table comes from the calibration (issue 15). The fold modes depend on them.
    assert deps("final_ensemble") == {"tta_submission", "student_calibration", "test_table", "train_table"}
    for mode in ("folds_mean", "folds_cv_weighted", "blend"):
        g2 = build_definitions(ARENA_YAML, {"ensemble": {"mode": mode}}).resolve_asset_graph()
        from dagster import AssetKey

        assert {p.to_user_string() for p in g2.get(AssetKey("final_ensemble")).parent_keys} == \
            {"tta_submission", "student_fold_submission", "student_calibration", "test_table", "train_table"}, mode
    assert deps("train_table") == {"raw_train_csv"}


def test_families_come_from_settings() -> None:
    over = {"families": {"qwen": {"tiny": {"arch": "llama"}}}, "teacher_families": ["llama", "qwen"]}
    keys = {k.to_user_string() for k in build_definitions(ARENA_YAML, over).resolve_asset_graph().get_all_asset_keys()}
    assert {"qwen/post_pretrained_base", "qwen/teacher_model", "qwen/teacher_oof_probs"} <= keys
    assert {"gemma/post_pretrained_base", "student_model"} <= keys and "gemma/teacher_model" not in keys


def _code_versions(defs) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    g = defs.resolve_asset_graph()
    return {n.key.to_user_string(): n.code_version for n in g.asset_nodes if n.is_materializable}


@pytest.mark.parametrize(
    ("override", "changed"),
    [
        ({"student": {"kd": {"alpha": 0.9}}}, {"student_model"}),
        ({"teacher": {"lora": {"r": 8}}}, {"llama/teacher_model"}),
        ({"ensemble": {"mode": "folds_mean"}}, {"final_ensemble"}),
        ({"calibration": {"max_iter": 7}}, {"student_calibration"}),  # averaging never reads it
        ({"calibration": {"merged_temperature": "median"}}, {"merged_model"}),
        ({"infer": {"batch_size": 3, "gpus": 2, "compile": False}}, set()),  # speed only
        # the teacher OOF runs at the teacher's own length (teacher.oof_max_length), not this one
        # ... and the calibration, fitted on the same TTA logits the submissions use (issue 15)
        ({"infer": {"max_length": 64}}, {"student_calibration", "student_fold_submission", "tta_submission"}),
        ({"infer": {"apply_calibration": False}}, {"student_fold_submission", "tta_submission"}),
        ({"teacher": {"oof_max_length": 64}}, {"llama/teacher_oof_probs"}),
        ({"folds": {"seed": 1}}, {"fold_assignments", "fold_data"}),
    ],
)
def test_a_setting_changes_exactly_its_steps_code_versions(override: dict, changed: set[str]) -> None:
    a = _code_versions(build_definitions(ARENA_YAML))
    b = _code_versions(build_definitions(ARENA_YAML, override))
    assert all(v for v in a.values()), "every materializable asset has a code version"
    assert {k for k in a if a[k] != b[k]} == changed


def test_definitions_load_clean() -> None:
    """No DeprecationWarning while loading (Dagster's own, raised inside its observable-source
    conversion, is filtered for that module alone in arena_assets/assets/__init__.py), no warning
    but the Beta/Preview ones filtered on purpose attributed to project code, and no private ``dagster._`` import in the package."""
    code = ("import warnings\n"
            "import arena_assets.definitions as d\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    g = d.defs.resolve_asset_graph(); d.defs.resolve_all_job_defs()\n"
            "    d.build_definitions()\n"
            "from dagster import BetaWarning, PreviewWarning\n"
            "ours = [f'{x.filename}:{x.lineno}: {x.message}' for x in w if '/arena_assets/' in x.filename\n"
            "        and not issubclass(x.category, (BetaWarning, PreviewWarning))]\n"
            "assert not ours, ours\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], cwd=REPO, env=_py_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, (r.stdout + r.stderr)[-3000:]
    private = [f"{p.relative_to(REPO)}:{i + 1}" for p in sorted((REPO / "arena_assets").rglob("*.py"))
               for i, line in enumerate(p.read_text().splitlines())
               if line.lstrip().startswith(("from dagster._", "import dagster._"))]
    assert not private, f"private Dagster imports: {private}"
