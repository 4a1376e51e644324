"""Dagster resources: settings, artifact store, compute (local, Slurm via submitit, k8s)."""
