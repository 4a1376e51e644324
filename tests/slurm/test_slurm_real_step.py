"""A real recipe step through Slurm: the project's definitions with ``compute.backend: slurm``.

Post-pretraining of the llama base and the llama teacher of fold 0 (tiny models, a few optimizer
steps) each run as a Slurm job; everything else (tables, folds) stays in the orchestrator. The
teacher runs data-parallel: two Slurm tasks = two torch.distributed ranks (gloo on CPU, NCCL on
GPUs), DDP by the Trainer, rank 0 writing the artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from arena_assets.resources.slurm import sacct

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]


def test_teacher_fold_partition_runs_as_slurm_job(slurm_cluster: None, tmp_path: Path) -> None:
    from dagster import AssetKey, DagsterInstance

    from arena_assets.assets.pipeline import materialize_pipeline
    from arena_assets.definitions import build_definitions
    from tests.pipeline_fixture import write_session_files

    path = write_session_files(tmp_path / "session")
    cfg = yaml.safe_load(path.read_text())
    small = {"cpus": 1, "mem_gb": 3, "time_min": 10}
    cfg["compute"] = {
        "backend": "slurm",
        "slurm": {"poll_s": 0.5, "folder": str(tmp_path / "submitit")},
        "needs": {"post_pretrain": small, "teacher": {**small, "tasks_per_node": 2}},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    defs = build_definitions(str(path))
    instance = DagsterInstance.from_config(str(tmp_path / "session" / "dagster_home"))
    wanted = {"raw_train_csv", "raw_test_csv", "raw_external", "train_table", "test_table", "external_pairs",
              "fold_assignments", "fold_data", "llama/post_pretrained_base", "llama/teacher_model"}
    exclude = [k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.to_user_string() not in wanted]
    materialize_pipeline(defs, instance, partitions=["0"], exclude=exclude)

    for key, partition, step in (("llama/post_pretrained_base", None, "post_pretrain"), ("llama/teacher_model", "0", "teacher")):
        ev = instance.get_latest_materialization_event(AssetKey.from_user_string(key))
        assert ev is not None, key
        mat = ev.asset_materialization
        assert mat.partition == partition
        md = {k: v.value for k, v in mat.metadata.items()}
        assert md["backend"] == "slurm", md
        facts = sacct(md["slurm_job_id"])
        assert facts is not None and facts["State"] == "COMPLETED", facts
        assert facts["JobName"].startswith(f"arena-{step}-"), facts
        assert md["compute_facts"]["state"] == "COMPLETED"
        result = json.loads((Path(md["version_dir"]) / "result.json").read_text())
        assert result["step"] == step
    # the teacher job trained with 2 ranks (DDP) and produced a real adapter and validation predictions
    assert result["info"]["train"]["world_size"] == 2, result["info"]["train"]
    vdir = Path(md["version_dir"])
    assert (vdir / "model" / "adapter_config.json").exists()
    assert (vdir / "valid_predictions.parquet").exists()
