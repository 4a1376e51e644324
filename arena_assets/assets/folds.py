"""Stage: folds. The stratified K-fold assignment (the seed's folds_<n>_seed<s>.json, with its
blocking checks) and one fold's train/validation tables per partition (core/folds.py)."""

from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from arena_assets.assets import checks as chk
from arena_assets.assets.common import Materialization, fold_of, step_code_version
from arena_assets.assets.keys import (
    FOLD_ASSIGNMENTS,
    FOLD_BACKFILL,
    FOLD_DATA,
    TRAIN_TABLE,
    fold_partitions,
)
from arena_assets.core.settings import Settings
from arena_assets.resources.settings import SettingsResource


def fold_table(columns: list[tuple[str, str]], rows: dict[int, tuple[Any, ...]]) -> Any:
    """A per-fold table as ``MetadataValue.table`` (sortable in the UI, typed columns): a ``fold``
    column, then ``columns`` (name, type: int | float | string); NaN is written as null."""
    import math

    from dagster import TableColumn, TableRecord, TableSchema

    def cell(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    schema = TableSchema(columns=[TableColumn("fold", "int"), *(TableColumn(n, t) for n, t in columns)])
    records = [TableRecord({"fold": int(k), **{n: cell(v) for (n, _), v in zip(columns, vals)}})
               for k, vals in sorted(rows.items())]
    return MetadataValue.table(records=records, schema=schema)


def build(settings: Settings, auto: dict[str, Any]) -> list[Any]:
    """folds assets for these settings (``auto``: the automation conditions by role)."""
    parts = fold_partitions(settings)
    eager = auto.get("eager")
    out: list[Any] = []

    # ------------------------------------------------------------------ folds
    folds_cv = step_code_version(settings, "folds")

    @asset(key=FOLD_ASSIGNMENTS, deps=[TRAIN_TABLE], code_version=folds_cv, group_name="data",
           automation_condition=eager, kinds={"json"},
           check_specs=[AssetCheckSpec("folds_disjoint_and_cover", asset=FOLD_ASSIGNMENTS, blocking=True,
                                       description="Every train id in exactly one fold."),
                        AssetCheckSpec("folds_stratified", asset=FOLD_ASSIGNMENTS, blocking=True,
                                       description="Each fold's label balance is within 5 points of the whole.")],
           description="Stratified K-fold assignment (scikit-learn), the seed's folds_<n>_seed<s>.json.")
    def fold_assignments(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        from arena_assets.core import contract, folds
        from arena_assets.core.artifacts import staged_dir

        s = settings.get()
        m = Materialization.begin(context, s, FOLD_ASSIGNMENTS, None, step="folds")
        train = contract.read_table(m.read(TRAIN_TABLE) / "table.parquet")
        assignment = folds.make_folds(train, s.folds.n_folds, s.folds.seed, s.folds.group_by_prompt)
        name = folds.folds_filename(s.folds.n_folds, s.folds.seed)
        with staged_dir(m.out_dir) as tmp:
            folds.write_folds(assignment, tmp / name)
        fold_of = chk.fold_of_ids(folds.read_folds(m.out_dir / name))
        ok1, d1 = chk.folds_disjoint_and_cover(fold_of, train["id"].tolist(), s.folds.n_folds)
        ok2, d2 = chk.folds_stratified(fold_of, train)
        checks = [AssetCheckResult(check_name="folds_disjoint_and_cover", passed=ok1, metadata=d1),
                  AssetCheckResult(check_name="folds_stratified", passed=ok2, metadata=d2)]
        m.commit(checks=checks)  # a split failing a blocking check is never what fold_data reads
        sizes = {str(k): int(v) for k, v in sorted(chk.fold_sizes(fold_of).items())}
        md = m.metadata(path=MetadataValue.path(str(m.out_dir / name)), n_folds=s.folds.n_folds,
                        rows=len(fold_of), fold_sizes=MetadataValue.json(sizes),
                        fold_table=fold_table([("rows", "int")], {int(k): (v,) for k, v in sizes.items()}))
        md["dagster/row_count"] = len(fold_of)  # one assignment per train row
        return m.result(md, checks)

    @asset(key=FOLD_DATA, deps=[TRAIN_TABLE, FOLD_ASSIGNMENTS], partitions_def=parts, backfill_policy=FOLD_BACKFILL, code_version=folds_cv,
           group_name="data", automation_condition=eager, kinds={"parquet"},
           description="One fold's train and validation tables.")
    def fold_data(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        from arena_assets.core import contract, folds
        from arena_assets.core.artifacts import staged_dir

        s = settings.get()
        k = fold_of(context)
        m = Materialization.begin(context, s, FOLD_DATA, str(k), step="folds")
        train = contract.read_table(m.read(TRAIN_TABLE) / "table.parquet")
        fa = m.read(FOLD_ASSIGNMENTS)
        assignment = folds.read_folds(fa / folds.folds_filename(s.folds.n_folds, s.folds.seed))
        tr, va = folds.split_fold(train, assignment, k)
        with staged_dir(m.out_dir) as tmp:
            contract.write_table(tr, tmp / "train.parquet")
            contract.write_table(va, tmp / "valid.parquet")
        m.commit()
        md = m.metadata(
            fold=k, train_rows=int(len(tr)), valid_rows=int(len(va)),
            valid_label_mean=MetadataValue.json(contract.summarize(va).get("label_mean", {})),
            train_path=MetadataValue.path(str(m.out_dir / "train.parquet")),
            valid_path=MetadataValue.path(str(m.out_dir / "valid.parquet")),
        )
        md["dagster/row_count"] = len(tr) + len(va)  # the fold's train + held-out rows
        return m.result(md)

    out += [fold_assignments, fold_data]
    return out
