"""A real Dagster deployment for tests: a temporary DAGSTER_HOME, ``dagster-daemon run`` as a
subprocess, and a code location loaded from a workspace.yaml (see :mod:`tests.harness.daemon`)."""

from tests.harness.daemon import DaemonHarness, RunInfo, project_instance_config

__all__ = ["DaemonHarness", "RunInfo", "project_instance_config"]
