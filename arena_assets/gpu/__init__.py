"""Model steps of the recipe: plain PyTorch/transformers/peft, no Dagster (runs anywhere)."""
