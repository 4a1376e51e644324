"""Stage: inputs. The observed raw files (file hash = data version) and the normalized tables
every later stage reads (the data contract, core/contract.py)."""

# No `from __future__ import annotations`: Dagster reads the bodies' context/resource annotations.
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    SourceAsset,
    asset,
    observable_source_asset,
)

from arena_assets.assets.common import Materialization, step_code_version
from arena_assets.assets.keys import (
    EXTERNAL_PAIRS,
    RAW_EXTERNAL,
    RAW_TEST,
    RAW_TRAIN,
    TEST_TABLE,
    TRAIN_TABLE,
)
from arena_assets.core.settings import Settings
from arena_assets.resources.settings import SettingsResource


def build(settings: Settings, auto: dict[str, Any]) -> list[Any]:
    """inputs assets for these settings (``auto``: the automation conditions by role)."""
    out: list[Any] = []

    # ------------------------------------------------------------------ raw sources
    def raw_source(key: AssetKey, attr: str, description: str) -> SourceAsset:

        @observable_source_asset(key=key, description=description, group_name="inputs",
                                 automation_condition=auto.get("observe"))
        def _observe(context, settings: SettingsResource) -> ObserveResult:  # type: ignore[no-untyped-def]
            from arena_assets.core.artifacts import file_sha256

            s = settings.get()
            path = s.resolve(getattr(s.data, attr))
            if path is None or not path.exists():
                return ObserveResult(data_version=DataVersion("absent"),
                                     metadata={"path": str(path), "exists": False})
            return ObserveResult(
                data_version=DataVersion(file_sha256(path)),
                metadata={"path": MetadataValue.path(str(path)), "exists": True,
                          "size_bytes": path.stat().st_size},
            )

        return _observe

    out += [
        raw_source(RAW_TRAIN, "train_csv", "The competition's train.csv (data version = file hash)."),
        raw_source(RAW_TEST, "test_csv", "The competition's test.csv (data version = file hash)."),
        raw_source(RAW_EXTERNAL, "external", "External preference pairs for post-pretraining and teachers."),
    ]
    eager = auto.get("eager")

    # ------------------------------------------------------------------ tables
    tables_cv = step_code_version(settings, "tables")

    def table_asset(key: AssetKey, raw: AssetKey, attr: str, reader: str, check_name: str) -> AssetsDefinition:
        @asset(key=key, deps=[raw], code_version=tables_cv, group_name="data", kinds={"parquet"},
               automation_condition=eager,
               description=f"The normalized {attr} table (data contract, parquet).")
        def _table(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
            import pandas as pd

            from arena_assets.core import contract
            from arena_assets.core.artifacts import file_sha256, staged_dir

            s = settings.get()
            m = Materialization.begin(context, s, key, None, step="tables")
            src = s.resolve(getattr(s.data, attr))
            if src is not None and src.exists():
                df = getattr(contract, reader)(src)
                m.inputs[raw.to_user_string()] = str(src)
                src_hash = file_sha256(src)
            elif reader == "read_external":
                # optional (the seed's steps 1 and 3): no file, no pairs; say where it was looked for
                df = pd.DataFrame({c: pd.Series(dtype=object) for c in contract.EXTERNAL_COLS})
                src_hash = "absent"
                where = f"data.external={src} missing" if src is not None else "data.external not set"
                context.log.warning(f"{key.to_user_string()}: no external pairs ({where}): an empty table; "
                                    "post-pretraining will pass each base through and teachers train "
                                    "without external rows")
            else:
                from dagster import Failure

                raise Failure(description=f"input file {src} does not exist")
            with staged_dir(m.out_dir) as tmp:
                contract.write_table(df, tmp / "table.parquet")
            summ = contract.summarize(df)
            m.commit({"source_sha256": src_hash, "source": str(src) if src is not None else None})
            md = m.metadata(
                rows=int(len(df)), source_sha256=src_hash,
                source=str(src) if src is not None else "not set", source_exists=src_hash != "absent",
                path=MetadataValue.path(str(m.out_dir / "table.parquet")),
                summary=MetadataValue.json(summ),
            )
            for c, v in (summ.get("label_mean") or {}).items():
                md[f"label_mean_{c}"] = float(v)
            return m.result(md)

        return _table

    out += [
        table_asset(TRAIN_TABLE, RAW_TRAIN, "train_csv", "read_train", "train"),
        table_asset(TEST_TABLE, RAW_TEST, "test_csv", "read_test", "test"),
        table_asset(EXTERNAL_PAIRS, RAW_EXTERNAL, "external", "read_external", "external"),
    ]

    return out
