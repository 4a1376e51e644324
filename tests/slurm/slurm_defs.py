"""A Dagster code location defined by the Slurm tests: one asset partitioned by the 5 folds.

The asset is the same shape as the project's GPU-step assets (new version dir, compute.run on a
Dagster-free function, ``latest`` switched only on success, job facts as metadata) but calls the
tiny functions of slurm_jobfns.py, so the Slurm machinery is tested in seconds. The compute
resource is the project's real ``ComputeResource``; the settings file comes from
``$ARENA_SETTINGS`` (the tests write one with ``compute.backend: slurm``). Like the project's
GPU assets it declares the Slurm backend's concurrency pool (assets/pools.py).

``fold_sleep_job`` is the same asset with a default run config (``dagster job backfill`` takes
no config): each fold's step sleeps ``$ARENA_TEST_SLEEP_S`` seconds (read when the code location
loads; the daemon harness passes it to the code server) as Slurm step ``$ARENA_TEST_STEP``.
"""

import os

import dagster as dg

from arena_assets.assets.pools import pool_for_backend
from arena_assets.core.artifacts import new_version_dir, set_latest
from arena_assets.resources.compute import ComputeResource
from arena_assets.resources.settings import SettingsResource

FOLDS = dg.StaticPartitionsDefinition([str(k) for k in range(5)])


class DemoConfig(dg.Config):
    mode: str = "ok"
    """ok | fail | count (counting_step, needs/time from step ``demo_<...>``)."""
    step: str = "demo"
    sleep_s: float = 0.0
    total_s: int = 0
    resumable: bool = False


@dg.asset(partitions_def=FOLDS, pool=pool_for_backend("slurm"))
def fold_demo(context: dg.AssetExecutionContext, config: DemoConfig, compute: ComputeResource) -> dg.MaterializeResult:
    import slurm_jobfns as fns

    fold = context.partition_key
    s = compute.settings.get()
    out_dir = new_version_dir(s.root, "fold_demo", fold)
    if config.mode == "ok":
        res = compute.run(context, config.step, fns.fold_step, fold, out_dir=out_dir, sleep_s=config.sleep_s)
    elif config.mode == "fail":
        res = compute.run(context, config.step, fns.failing_step, fold, out_dir=out_dir)
    elif config.mode == "count":
        ckpt = str(s.root / ".checkpoints" / "fold_demo" / fold) if config.resumable else None
        res = compute.run(context, config.step, fns.counting_step, fold, config.total_s, out_dir=out_dir, checkpoint_dir=ckpt)
    else:
        raise ValueError(config.mode)
    set_latest(res.out_dir)
    c = res.info["compute"]
    return dg.MaterializeResult(
        metadata={
            "job_id": str(c["job_id"]),
            "slurm_state": c["state"],
            "node": c["node"],
            "elapsed": c["elapsed"],
            "max_rss_mb": float(c["max_rss_mb"]),
            "out_dir": str(res.out_dir),
            "remote_job_id": str(res.info.get("slurm_job_id")),
            "starts": dg.MetadataValue.json(res.info.get("starts", [])),
        }
    )


def _compute() -> ComputeResource:
    return ComputeResource(settings=SettingsResource(), backend="slurm")


fold_demo_job = dg.define_asset_job("fold_demo_job", selection=[fold_demo])
fold_sleep_job = dg.define_asset_job(
    "fold_sleep_job", selection=[fold_demo],
    config={"ops": {"fold_demo": {"config": {
        "sleep_s": float(os.environ.get("ARENA_TEST_SLEEP_S", "20")),
        "step": os.environ.get("ARENA_TEST_STEP", "demo"),
    }}}},
)
defs = dg.Definitions(assets=[fold_demo], jobs=[fold_demo_job, fold_sleep_job], resources={"compute": _compute()})


def get_job() -> dg.JobDefinition:
    """The resolved job, for ``reconstructable`` (re-execution of a run from Python)."""
    return defs.resolve_job_def("fold_demo_job")
