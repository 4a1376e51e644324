"""Stage: teachers. Per family: the post-pretrained base (step 1), the fold teachers (step 3) and
their out-of-fold probabilities (step 4); then every family's OOF in one table (the KD targets)."""

from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from arena_assets.assets import checks as chk
from arena_assets.assets.common import (
    PROVENANCE_FILE,
    Materialization,
    dir_size_mb,
    fold_of,
    fold_tables,
    read_json,
    step_code_version,
)
from arena_assets.assets.keys import (
    EXTERNAL_PAIRS,
    FOLD_BACKFILL,
    FOLD_DATA,
    TEACHER_OOF,
    TEST_TABLE,
    TRAIN_TABLE,
    base_key,
    fold_partitions,
    teacher_key,
    teacher_probs_key,
)
from arena_assets.assets.pools import gpu_pool
from arena_assets.core.settings import Settings, settings_hash
from arena_assets.resources.compute import ComputeResource
from arena_assets.resources.settings import SettingsResource


def external_source(s: Settings, external_version: Path) -> str:
    """Where the ``external_pairs`` version came from, for messages (``data.external=/x missing``):
    the steps say ``no external pairs (<this>)`` when the table has no rows."""
    prov = read_json(external_version / PROVENANCE_FILE)
    src = prov.get("source") or (str(s.resolve(s.data.external)) if s.data.external else None)
    if src is None:
        return "data.external not set"
    if prov.get("source_sha256") == "absent" or not Path(src).exists():
        return f"data.external={src} missing"
    return f"data.external={src}"


def build(settings: Settings, auto: dict[str, Any]) -> list[Any]:
    """teachers assets for these settings (``auto``: the automation conditions by role)."""
    parts = fold_partitions(settings)
    eager = auto.get("eager")
    cron = auto.get("cron")
    pool = gpu_pool(settings)
    out: list[Any] = []

    # ------------------------------------------------------------------ per family: base, teachers
    def base_asset(family: str) -> AssetsDefinition:
        cv = step_code_version(settings, "post_pretrain", family)
        key = base_key(family)

        @asset(key=key, deps=[EXTERNAL_PAIRS, TRAIN_TABLE, TEST_TABLE], code_version=cv, group_name=family,
               pool=pool, automation_condition=cron, kinds={"pytorch"},
               description=f"Step 1: {family}'s base post-pretrained on external pairs "
                           "(passed through when post_pretrain.enabled is false).")
        def _base(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
            from arena_assets.gpu.pretrain import post_pretrain

            s = settings.get()
            m = Materialization.begin(context, s, key, None, step="post_pretrain", family=family)
            ext_dir = m.read(EXTERNAL_PAIRS)
            external = ext_dir / "table.parquet"
            source = external_source(s, ext_dir)  # messages only: the table's data version is the input
            corpus = [m.read(TRAIN_TABLE) / "table.parquet", m.read(TEST_TABLE) / "table.parquet", external]
            res = compute.run(context, "post_pretrain", post_pretrain, s.families[family], s.post_pretrain,
                              s.fmt, external, corpus, out_dir=m.out_dir,
                              checkpoint_dir=m.checkpoint_dir("post_pretrain"), external_source=source)
            m.commit()
            done = bool(res.info.get("post_pretrained", True))
            extra: dict[str, Any] = {"post_pretrained": done, "external_rows": int(res.info.get("external_rows", 0)),
                                     "random_init": bool(res.info.get("random_init", False))}
            if not done:
                extra["reason"] = str(res.info.get("reason", ""))
                if s.post_pretrain.enabled:
                    context.log.warning(
                        f"{m.key}: base not post-pretrained, passed through "
                        f"({'an untrained random-init tiny model' if extra['random_init'] else 'the untouched checkpoint'}"
                        f"): {extra['reason']}")
            return m.result(m.metadata(
                res, family=family, model_size_mb=dir_size_mb(res.path("model")),
                post_pretrain_enabled=s.post_pretrain.enabled, **extra))

        return _base

    def teacher_assets(family: str) -> list[AssetsDefinition]:
        cv_t = step_code_version(settings, "teacher", family)
        cv_o = step_code_version(settings, "teacher_oof", family)
        tkey, okey = teacher_key(family), teacher_probs_key(family)

        @asset(key=tkey, deps=[FOLD_DATA, base_key(family), EXTERNAL_PAIRS], partitions_def=parts, backfill_policy=FOLD_BACKFILL,
               code_version=cv_t, group_name=family, pool=pool, automation_condition=cron,
               kinds={"pytorch"}, description=f"Step 3: {family} teacher (LoRA) trained on one fold.")
        def _teacher(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
            from arena_assets.gpu.train import train_teacher

            s = settings.get()
            k = fold_of(context)
            m = Materialization.begin(context, s, tkey, str(k), step="teacher", family=family)
            tr, va = fold_tables(m, k)
            base = m.read(base_key(family)) / "model"
            ext_dir = m.read(EXTERNAL_PAIRS)
            external = ext_dir / "table.parquet"
            source = external_source(s, ext_dir)  # messages only: the table's data version is the input
            res = compute.run(context, "teacher", train_teacher, base, s.teacher, s.fmt, tr, va, external,
                              out_dir=m.out_dir, checkpoint_dir=m.checkpoint_dir("teacher"),
                              external_source=source)
            m.commit()
            n_ext = int(res.info.get("external_rows", 0))
            extra: dict[str, Any] = {"external_rows": n_ext, "trained_with_external": n_ext > 0}
            if res.info.get("external_reason"):
                extra["external_reason"] = str(res.info["external_reason"])
                if s.teacher.use_external:
                    context.log.warning(f"{m.key}[{k}]: trained without external rows "
                                        f"(teacher.use_external is true): {extra['external_reason']}")
            return m.result(m.metadata(
                res, fold=k, family=family, adapter_size_mb=dir_size_mb(res.path("model")), **extra))

        @asset(key=okey, deps=[tkey, FOLD_DATA], partitions_def=parts, backfill_policy=FOLD_BACKFILL, code_version=cv_o, group_name=family,
               pool=pool, automation_condition=cron, kinds={"parquet"},
               description=f"Step 4: {family} teacher's out-of-fold probabilities on its validation fold.")
        def _probs(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
            from arena_assets.gpu.predict import teacher_oof

            s = settings.get()
            k = fold_of(context)
            m = Materialization.begin(context, s, okey, str(k), step="teacher_oof", family=family)
            _, va = fold_tables(m, k)
            model = m.read(tkey, str(k)) / "model"
            res = compute.run(context, "teacher_oof", teacher_oof, model, s.fmt, s.infer, va, k, family,
                              out_dir=m.out_dir, max_length=s.teacher.oof_length)
            m.commit()
            return m.result(m.metadata(res, fold=k, family=family))

        return [_teacher, _probs]

    for fam in settings.families:
        out.append(base_asset(fam))
    for fam in settings.teacher_families:
        out += teacher_assets(fam)

    # ------------------------------------------------------------------ teacher OOF (all families)
    cv_toof = settings_hash({"teacher_families": list(settings.teacher_families), "n_folds": settings.folds.n_folds})

    @asset(key=TEACHER_OOF, deps=[teacher_probs_key(f) for f in settings.teacher_families] + [TRAIN_TABLE],
           code_version=cv_toof, group_name="teachers", automation_condition=eager, kinds={"parquet"},
           check_specs=[AssetCheckSpec("oof_covers_train_once_per_family", asset=TEACHER_OOF, blocking=True,
                                       description="Every train id appears exactly once per teacher family.")],
           description="All teacher families' out-of-fold probabilities in one table (the KD targets).")
    def teacher_oof(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        import pandas as pd

        from arena_assets.core import contract
        from arena_assets.core.artifacts import staged_dir

        s = settings.get()
        m = Materialization.begin(context, s, TEACHER_OOF, None, code_version=cv_toof)
        train = contract.read_table(m.read(TRAIN_TABLE) / "table.parquet")
        frames = []
        for fam in s.teacher_families:
            for k in range(s.folds.n_folds):
                frames.append(pd.read_parquet(m.read(teacher_probs_key(fam), str(k)) / "oof.parquet"))
        oof = pd.concat(frames, ignore_index=True)
        with staged_dir(m.out_dir) as tmp:
            oof.to_parquet(tmp / "teacher_oof.parquet", index=False)
        ok, details = chk.oof_covers_once_per_family(oof, train["id"].tolist(), list(s.teacher_families))
        checks = [AssetCheckResult(check_name="oof_covers_train_once_per_family", passed=ok, metadata=details)]
        m.commit(checks=checks)
        md = m.metadata(rows=int(len(oof)), families=", ".join(s.teacher_families),
                        path=MetadataValue.path(str(m.out_dir / "teacher_oof.parquet")),
                        oof_coverage=float(details["coverage"]))
        md.update(chk.teacher_oof_metrics(oof, train))
        return m.result(md, checks)

    out.append(teacher_oof)
    return out
