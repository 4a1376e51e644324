"""What downstream reads and what Dagster calls current, on the real instance of the session.

- A version whose blocking check failed is recorded by Dagster (it cannot be stopped from being
  its latest materialization) but is never what downstream reads: downstream follows the newest
  materialization whose blocking checks passed; the disk ``latest`` is a view of that.
- A run whose launchpad config overrides a setting tags its materialization with the code version
  of the settings it used, so the UI does not call it current.
- ``average.method: mean_deltas`` goes through the assets (averaging writes a merged model, the
  merge step takes it).

Named to run after test_pipeline.py; each test puts the shared instance back the way it found it
(a fresh good materialization), since the UI tests browse the same history.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from arena_assets.assets.common import CHECKS_PASSED, step_code_version
from arena_assets.core import artifacts
from arena_assets.core.settings import load_settings
from arena_assets.definitions import build_definitions


def _latest_event(instance: DagsterInstance, key: str, partition: str | None = None) -> Any:
    from dagster import AssetRecordsFilter

    flt = AssetRecordsFilter(asset_key=AssetKey(key.split("/")), asset_partitions=[partition] if partition else None)
    return instance.fetch_materializations(flt, limit=1).records[0].asset_materialization


def _version_dir(event: Any) -> Path:
    return Path(str(event.metadata["version_dir"].value))


def _run_config(settings_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """What a user types into the launchpad to override a setting for one run."""
    return {"resources": {"settings": {"config": {"path": str(settings_path), "overrides_json": json.dumps(overrides)}}}}


def test_failed_blocking_check_is_never_read_downstream(pipeline, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A fold split that loses a row fails ``folds_disjoint_and_cover``: fold_data keeps reading
    the previous good split (on the old code it read the broken one)."""
    from arena_assets.core import folds as folds_mod

    defs = build_definitions(str(pipeline.settings_path))
    inst = pipeline.instance
    good = _version_dir(_latest_event(inst, "fold_assignments"))
    good_valid = pd.read_parquet(_version_dir(_latest_event(inst, "fold_data", "0")) / "valid.parquet")["id"]
    real_make_folds = folds_mod.make_folds

    def lossy_split(*args: Any, **kwargs: Any) -> dict[str, int]:
        assignment = real_make_folds(*args, **kwargs)
        # move every row to fold 0 but one, which is dropped: not disjoint-and-covering
        ids = sorted(assignment)
        return {i: 0 for i in ids[1:]}

    monkeypatch.setattr(folds_mod, "make_folds", lossy_split)
    res = materialize(list(defs.assets), selection=[AssetKey("fold_assignments")], instance=inst,
                      resources=defs.resources, raise_on_error=False)
    assert not res.success, "a failed blocking check fails the run"
    bad_event = _latest_event(inst, "fold_assignments")
    bad = _version_dir(bad_event)
    assert bad != good and bad.is_dir(), "the failed version stays on disk for inspection"
    monkeypatch.setattr(folds_mod, "make_folds", real_make_folds)

    res = materialize(list(defs.assets), selection=[AssetKey("fold_data")], partition_key="0", instance=inst,
                      resources=defs.resources)
    assert res.success
    event = _latest_event(inst, "fold_data", "0")
    prov = json.loads((_version_dir(event) / "provenance.json").read_text())
    assert prov["inputs"]["fold_assignments"] == str(good), prov["inputs"]
    valid = pd.read_parquet(_version_dir(event) / "valid.parquet")["id"]
    assert sorted(valid) == sorted(good_valid), "fold 0 is the good split's fold 0, not the broken one"
    assert bad_event.metadata[CHECKS_PASSED].value is False
    assert json.loads((bad / "provenance.json").read_text())["blocking_checks_passed"] is False
    assert artifacts.latest(pipeline.artifacts, "fold_assignments") == good, "the disk view did not move"

    # put the shared history back: a fresh good split is the newest materialization again
    assert materialize(list(defs.assets), selection=[AssetKey("fold_assignments")], instance=inst,
                       resources=defs.resources).success


def test_override_records_the_code_version_it_used(pipeline) -> None:  # type: ignore[no-untyped-def]
    """Launchpad config that changes a setting: the materialization carries the code version of
    the settings it ran with (and a data version of its own), not the file's."""
    defs = build_definitions(str(pipeline.settings_path))
    inst = pipeline.instance
    key = AssetKey("student_calibration")
    file_cv = defs.resolve_asset_graph().get(key).code_version
    overrides = {"calibration": {"max_iter": 7}}
    used_cv = step_code_version(load_settings(pipeline.settings_path, overrides), "calibration")
    assert used_cv != file_cv, "the override must change the calibration step's settings"

    res = materialize(list(defs.assets), selection=[key], partition_key="1", instance=inst,
                      resources=defs.resources, run_config=_run_config(pipeline.settings_path, overrides))
    assert res.success
    ev = _latest_event(inst, "student_calibration", "1")
    assert ev.tags["dagster/code_version"] == used_cv
    assert ev.tags.get("dagster/data_version_is_user_provided") == "true"
    assert json.loads((_version_dir(ev) / "provenance.json").read_text())["code_version"] == used_cv

    # a plain run (the file's settings) is current again, with the file's code version
    assert materialize(list(defs.assets), selection=[key], partition_key="1", instance=inst,
                       resources=defs.resources).success
    assert _latest_event(inst, "student_calibration", "1").tags["dagster/code_version"] == file_cv


def test_mean_deltas_through_the_assets(pipeline) -> None:  # type: ignore[no-untyped-def]
    """``average.method: mean_deltas``: averaging writes a merged model; merged_model takes it
    (it used to look for ``adapter/`` and fail)."""
    defs = build_definitions(str(pipeline.settings_path))
    inst = pipeline.instance
    sel = [AssetKey("averaged_lora"), AssetKey("merged_model")]
    res = materialize(list(defs.assets), selection=sel, instance=inst, resources=defs.resources,
                      run_config=_run_config(pipeline.settings_path, {"average": {"method": "mean_deltas"}}))
    assert res.success
    merged = _version_dir(_latest_event(inst, "merged_model"))
    assert (merged / "model" / "config.json").is_file()
    avg = _version_dir(_latest_event(inst, "averaged_lora"))
    assert json.loads((avg / "result.json").read_text())["paths"] == {"model": "model"}
    assert json.loads((merged / "provenance.json").read_text())["inputs"]["averaged_lora"] == str(avg)

    assert materialize(list(defs.assets), selection=sel, instance=inst, resources=defs.resources).success
