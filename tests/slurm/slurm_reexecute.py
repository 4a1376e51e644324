"""Re-execute a dead run from failure, as a new process (what a retry does): same root run id.

Usage: python slurm_reexecute.py <parent run id> <run config json file>
Prints one JSON line: run_id, root_run_id, success. Uses $DAGSTER_HOME's instance.
"""

import json
import sys

import dagster as dg
import slurm_defs


def main() -> None:
    parent_id, cfg_path = sys.argv[1], sys.argv[2]
    instance = dg.DagsterInstance.get()
    parent = instance.get_run_by_id(parent_id)
    assert parent is not None, parent_id
    if not parent.is_finished:
        instance.report_run_failed(parent)  # what run monitoring does for a dead run worker
    with open(cfg_path) as f:
        run_config = json.load(f)
    result = dg.execute_job(
        dg.reconstructable(slurm_defs.get_job), instance, run_config=run_config,
        reexecution_options=dg.ReexecutionOptions.from_failure(parent.run_id, instance), tags=parent.tags,
    )
    print(json.dumps({"run_id": result.run_id, "root_run_id": result.dagster_run.root_run_id, "success": result.success}))


if __name__ == "__main__":
    main()
