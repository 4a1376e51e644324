"""The ``dg`` project's defs folder (``[tool.dg.project] defs_module`` in pyproject.toml).

``arena_assets.definitions`` builds the code location's one ``Definitions`` from this folder
(``dg.ComponentTree``: what ``dg.load_from_defs_folder`` does, without needing pyproject.toml at
run time, so an installed wheel in a pod loads the same way). Each module here contributes
definitions; today there is one, ``recipe.py``: the whole recipe, built from the settings file.
The asset modules themselves stay in ``arena_assets/assets/`` (factories driven by the settings).
"""
