"""Dagster-free, torch-free foundations: data contract, folds, metrics, ensemble, settings,
artifacts and the step result protocol."""
