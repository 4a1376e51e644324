"""Dagster assets, checks, jobs and automation: thin orchestration over gpu/ and core/."""
