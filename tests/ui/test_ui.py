"""The Dagster UI as users use it, in headless Chromium, on the session's materialized pipeline.

Order matters and is the file order: read-only views first (lineage, partitions, metadata,
pictures), then the automation toggles (switched back off), then the tests that add runs (a
backfill launched by clicking, a failing run), so the screenshots show the pipeline's own history.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline_fixture import PipelineSession
from tests.ui import harness

pytestmark = [pytest.mark.ui, pytest.mark.timeout(900)]

T = harness.UI_TIMEOUT_MS


# ----------------------------------------------------------------------------------- helpers
def issue_edges(student: str, teachers: list[str]) -> set[tuple[str, str]]:
    """The dependency table of the code-location issue (issue 5), as (upstream, downstream)."""
    s_base = f"{student}/post_pretrained_base"
    e = {
        ("raw_train_csv", "train_table"), ("raw_test_csv", "test_table"), ("raw_external", "external_pairs"),
        ("train_table", "fold_assignments"),
        ("train_table", "fold_data"), ("fold_assignments", "fold_data"),
        ("fold_data", "student_model"), ("teacher_oof", "student_model"), (s_base, "student_model"),
        ("fold_data", "baseline_student"), (s_base, "baseline_student"),
        ("student_model", "student_calibration"), ("fold_data", "student_calibration"),
        ("student_model", "student_fold_submission"), ("student_calibration", "student_fold_submission"),
        ("test_table", "student_fold_submission"),
        ("student_model", "averaged_lora"),
        ("averaged_lora", "merged_model"), (s_base, "merged_model"),
        ("merged_model", "quantized_model"), ("train_table", "quantized_model"),
        ("quantized_model", "tta_submission"), ("test_table", "tta_submission"),
        ("student_calibration", "tta_submission"),
        ("tta_submission", "final_ensemble"), ("student_fold_submission", "final_ensemble"),
    }
    for fam in sorted({student, *teachers}):
        e.add(("external_pairs", f"{fam}/post_pretrained_base"))
    for t in teachers:
        e |= {
            ("fold_data", f"{t}/teacher_model"), (f"{t}/post_pretrained_base", f"{t}/teacher_model"),
            ("external_pairs", f"{t}/teacher_model"),
            (f"{t}/teacher_model", f"{t}/teacher_oof_probs"), ("fold_data", f"{t}/teacher_oof_probs"),
            (f"{t}/teacher_oof_probs", "teacher_oof"),
        }
    return e


def graph_of(defs: Any) -> tuple[set[str], set[tuple[str, str]], dict[str, str]]:
    """Asset keys, edges and groups of the definitions (what Dagster itself knows)."""
    g = defs.resolve_asset_graph()
    keys = {n.key.to_user_string() for n in g.asset_nodes}
    edges = {(p.to_user_string(), n.key.to_user_string()) for n in g.asset_nodes for p in n.parent_keys}
    groups = {n.key.to_user_string(): n.group_name for n in g.asset_nodes}
    return keys, edges, groups


LINEAGE_JS = """() => {
  const fos = [...document.querySelectorAll('foreignObject')];
  const box = f => ({x: +f.getAttribute('x'), y: +f.getAttribute('y'),
                     w: +f.getAttribute('width'), h: +f.getAttribute('height')});
  const nameOf = f => {
    if (!f.querySelector('[class*=AssetNode_]')) return null;  // group boxes and their labels
    const t = f.querySelector('[data-tooltip]');
    if (t) return t.getAttribute('data-tooltip');
    const n = f.querySelector('[class*=AssetNode_assetName]');
    return n ? n.textContent.trim() : null;
  };
  const nodes = fos.filter(f => nameOf(f)).map(f => ({name: nameOf(f), ...box(f)}));
  const groups = fos.filter(f => !nameOf(f) && (f.textContent || '').trim())
                    .map(f => ({name: f.textContent.trim(), ...box(f)}));
  const edges = [...document.querySelectorAll('path[marker-end]')].map(p => {
    const nums = (p.getAttribute('d') || '').match(/-?[0-9.]+/g).map(Number);
    return {x1: nums[0], y1: nums[1], x2: nums[nums.length - 2], y2: nums[nums.length - 1]};
  });
  return {nodes, groups, edges};
}"""


def name_matches(shown: str, name: str) -> bool:
    """A node label is the asset name, or (zoomed out) the name cut as ``head…tail``."""
    if "…" not in shown:
        return shown == name
    head, tail = shown.split("…", 1)
    return name.startswith(head) and name.endswith(tail) and len(name) >= len(head) + len(tail)


def read_lineage(page: Any, keys: set[str], groups_of: dict[str, str]) -> tuple[set[str], set[tuple[str, str]]]:
    """Asset keys and edges as drawn: nodes by their label and enclosing group box, edges by
    their end points (an edge leaves the right middle of its source and ends at the left
    middle of its target in the horizontal layout).

    Expanding groups re-runs the layout (in a web worker) and animates, possibly in more than
    one pass: read until two reads agree and every edge end sits on a node.
    """
    last, error, deadline = None, "no read", time.time() + 90
    while time.time() < deadline:
        data = page.evaluate(LINEAGE_JS)
        if data == last:
            if len(data["nodes"]) < len(keys):
                # Only nodes near the viewport are drawn: zoom out as a user would.
                error = f"{len(data['nodes'])} of {len(keys)} nodes drawn"
                page.locator("button", has=page.locator("[aria-label=zoom_out]")).first.click()
            else:
                try:
                    return _resolve_lineage(data, keys, groups_of)
                except AssertionError as e:
                    error = str(e)
        last = data
        page.wait_for_timeout(750)
    raise AssertionError(f"the lineage never settled into a readable graph: {error}")


def _resolve_lineage(data: dict[str, Any], keys: set[str], groups_of: dict[str, str]) -> tuple[set[str], set[tuple[str, str]]]:
    resolved = []
    for n in data["nodes"]:
        cands = [k for k in keys if name_matches(n["name"], k.split("/")[-1])]
        if len(cands) > 1:  # e.g. every family's post_pretrained_base: the group box decides
            inside = {g["name"] for g in data["groups"] if g["x"] <= n["x"] and n["x"] + n["w"] <= g["x"] + g["w"]
                      and g["y"] <= n["y"] and n["y"] + n["h"] <= g["y"] + g["h"]}
            cands = [k for k in cands if groups_of.get(k) in inside]
        assert len(cands) == 1, f"cannot tell which asset the node {n['name']!r} is: {cands}"
        resolved.append((cands[0], n))

    def nearest(x: float, y: float, side: str) -> str:
        def dist(n: dict[str, float]) -> float:
            nx = n["x"] + n["w"] if side == "out" else n["x"]
            return abs(x - nx) + abs(y - (n["y"] + n["h"] / 2))
        key, n = min(resolved, key=lambda kn: dist(kn[1]))
        assert dist(n) < 30, f"edge end ({x}, {y}) touches no asset node"
        return key

    edges = {(nearest(e["x1"], e["y1"], "out"), nearest(e["x2"], e["y2"], "in")) for e in data["edges"]}
    return {k for k, _ in resolved}, edges


def metadata_value(page: Any, key: str, timeout: float = T) -> str:
    """The text of a metadata row's value (waits until the row shows a non-empty value; the
    asset overview has a timestamp column between key and value, the partition view an empty
    last column)."""
    js = """(key) => {
      for (const tr of document.querySelectorAll('tr')) {
        const tds = [...tr.children].filter(c => c.tagName === 'TD');  // not a nested table's cells
        if (tds.length >= 2 && tds[0].innerText.trim() === key) {
          const vals = tds.slice(1).filter(td => !td.querySelector('[class*=BaseTag]'))  // not the timestamp
                          .map(td => td.innerText.trim()).filter(t => t);
          if (vals.length) return {value: vals[vals.length - 1]};
        }
      }
      return null;
    }"""
    handle = page.wait_for_function(js, arg=key, timeout=timeout)
    return str(handle.json_value()["value"])


def latest_metadata(session: PipelineSession, key: str, partition: str | None = None) -> dict[str, Any]:
    """The latest materialization's metadata as the instance stores it (what the UI must show)."""
    from dagster import AssetKey

    inst = session.instance
    ak = AssetKey(key.split("/"))
    if partition is None:
        ev = inst.get_latest_materialization_event(ak)
    else:
        from dagster import AssetRecordsFilter

        recs = inst.fetch_materializations(AssetRecordsFilter(asset_key=ak, asset_partitions=[partition]), limit=1)
        ev = recs.records[0].event_log_entry if recs.records else None
    assert ev is not None, f"{key}[{partition}] has no materialization in the instance"
    return {k: v.value for k, v in ev.asset_materialization.metadata.items()}


def open_markdown_picture(page: Any, key: str) -> dict[str, Any]:
    """Click a long markdown entry's ``[Show Markdown]`` and wait until its image is decoded."""
    row = page.locator("tr", has=page.locator("td", has_text=re.compile(rf"^{re.escape(key)}$")))
    row.get_by_text("[Show Markdown]").first.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('[role=dialog] img')].some(i => i.complete && i.naturalWidth > 0)")
    return page.evaluate("""() => [...document.querySelectorAll('[role=dialog] img')].map(i =>
        ({src: i.getAttribute('src').slice(0, 22), w: i.naturalWidth, h: i.naturalHeight, alt: i.alt}))""")[0]


def close_dialog(page: Any) -> None:
    page.get_by_role("dialog").get_by_role("button", name="Close").click()
    page.get_by_role("dialog").wait_for(state="detached")


# ----------------------------------------------------------------------------------- lineage
def test_lineage_shows_every_recipe_asset_and_the_issue_edges(
    page: Any, dagster_ui: harness.DagsterDev, ui_session: PipelineSession, screenshot_dir: Path,
) -> None:
    from arena_assets.core.settings import load_settings

    s = load_settings(str(ui_session.settings_path))
    keys, def_edges, groups_of = graph_of(ui_session.defs)
    expected = issue_edges(s.student_family, list(s.teacher_families))
    assert expected <= def_edges, f"definitions lack issue edges: {sorted(expected - def_edges)}"

    page.set_viewport_size({"width": 1920, "height": 1200})  # room for every node in the picture
    page.goto(f"{dagster_ui.url}/asset-groups")
    page.get_by_role("button", name=re.compile("Materialize all")).wait_for()
    # Many groups start collapsed; the graph's background menu expands them (as a user would).
    page.locator("svg").filter(has=page.locator("foreignObject")).first.wait_for()
    box = page.locator("svg").filter(has=page.locator("foreignObject")).first.bounding_box()
    page.mouse.click(box["x"] + box["width"] - 40, box["y"] + 40, button="right")
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.get_by_role("menuitem", name="Expand all groups").wait_for(state="detached")
    shown_keys, shown_edges = read_lineage(page, keys, groups_of)

    assert shown_keys == keys, f"missing {sorted(keys - shown_keys)}, extra {sorted(shown_keys - keys)}"
    assert "final_ensemble" in shown_keys and {"raw_train_csv", "raw_test_csv", "raw_external"} <= shown_keys
    assert expected <= shown_edges, f"lineage lacks issue edges: {sorted(expected - shown_edges)}"
    assert shown_edges == def_edges, (f"drawn but not defined: {sorted(shown_edges - def_edges)}; "
                                      f"defined but not drawn: {sorted(def_edges - shown_edges)}")
    harness.screenshot(page, screenshot_dir / "lineage.png")


# ----------------------------------------------------------------------------------- partitions
def test_student_model_partitions_view_shows_five_folds_materialized(
    page: Any, dagster_ui: harness.DagsterDev, screenshot_dir: Path,
) -> None:
    page.goto(f"{dagster_ui.url}/assets/student_model?view=partitions")
    page.get_by_text("Materialized (5)").wait_for()
    for label in ("Failed (0)", "Missing (0)"):
        assert page.get_by_text(label).is_visible()
    page.get_by_text("5 Partitions Selected").wait_for()
    for k in range(5):
        page.get_by_text(str(k), exact=True).first.wait_for()
    harness.screenshot(page, screenshot_dir / "partitions.png")


# ----------------------------------------------------------------------------------- metadata
def test_fold_latest_materialization_shows_cv_logloss_and_backend(
    page: Any, dagster_ui: harness.DagsterDev, ui_session: PipelineSession, screenshot_dir: Path,
) -> None:
    fold = "2"
    want = latest_metadata(ui_session, "student_fold_submission", fold)
    page.set_viewport_size({"width": 1440, "height": 1700})  # the picture shows cv_logloss and backend
    page.goto(f"{dagster_ui.url}/assets/student_fold_submission?view=partitions&partition={fold}")
    page.get_by_text("Latest materialization").first.wait_for()
    cv = metadata_value(page, "cv_logloss")
    assert float(cv) == pytest.approx(float(want["cv_logloss"]), abs=1e-9)
    assert 0.0 < float(cv) < 5.0
    assert float(metadata_value(page, "cv_logloss_raw")) == pytest.approx(float(want["cv_logloss_raw"]), abs=1e-9)
    backend = metadata_value(page, "backend")
    assert backend == want["backend"] and backend.split("/")[0] in ("local", "slurm", "k8s")
    assert metadata_value(page, "fold") == fold
    if backend.startswith("slurm"):
        assert metadata_value(page, "slurm_job_id") == str(want["slurm_job_id"])
    harness.screenshot(page, screenshot_dir / "metadata.png")


# ----------------------------------------------------------------------------------- pictures
def test_pictures_appear_where_the_ui_shows_metadata(
    page: Any, dagster_ui: harness.DagsterDev, ui_session: PipelineSession, screenshot_dir: Path,
) -> None:
    # Every training run (post-pretraining, teachers, students, baseline) carries its loss curves.
    from arena_assets.core.settings import load_settings

    st = load_settings(str(ui_session.settings_path))
    trained = [(f"{f}/post_pretrained_base", None) for f in st.families]
    trained += [(f"{t}/teacher_model", str(k)) for t in st.teacher_families for k in range(5)]
    trained += [(a, str(k)) for a in ("student_model", "baseline_student") for k in range(5)]
    for key, pk in trained:
        md = latest_metadata(ui_session, key, pk)
        assert "data:image/png;base64," in str(md.get("loss_curves", "")), f"{key}[{pk}]: {sorted(md)}"
    # In the UI: a fold's train and validation loss curves from the Trainer's log history.
    page.goto(f"{dagster_ui.url}/assets/student_model?view=partitions&partition=0")
    metadata_value(page, "loss_curves")
    img = open_markdown_picture(page, "loss_curves")
    assert img["src"].startswith("data:image/png") and img["w"] > 100 and img["h"] > 100
    close_dialog(page)

    # Every fold's calibration: a reliability diagram (before/after the temperature).
    for fold in range(5):
        page.goto(f"{dagster_ui.url}/assets/student_calibration?view=partitions&partition={fold}")
        want = latest_metadata(ui_session, "student_calibration", str(fold))
        assert float(metadata_value(page, "ece_after")) == pytest.approx(float(want["ece_after"]), abs=1e-9)
        img = open_markdown_picture(page, "reliability_diagram")
        assert img["src"].startswith("data:image/png") and img["w"] > 100
        if fold == 0:
            harness.screenshot(page, screenshot_dir / "reliability.png")
        close_dialog(page)

    # The ensemble: per-fold CV log-loss as a chart and as inline bars (no click needed).
    page.goto(f"{dagster_ui.url}/assets/final_ensemble")
    bars = metadata_value(page, "cv_logloss_bars")
    assert all(re.search(rf"(^|\s){k}\s", bars) for k in range(5)), bars
    assert "█" in bars
    img = open_markdown_picture(page, "cv_logloss_plot")
    assert img["src"].startswith("data:image/png") and img["w"] > 100
    harness.screenshot(page, screenshot_dir / "cv_logloss.png")
    close_dialog(page)


# ----------------------------------------------------------------------------------- automation
AUTOMATION_QUERY = """{ workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError {
  ... on RepositoryLocation { repositories { name
    schedules { name scheduleState { status } }
    sensors { name description sensorType sensorState { status } } } } } } } } }"""


def automations(dev: harness.DagsterDev) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for entry in dev.graphql(AUTOMATION_QUERY)["workspaceOrError"]["locationEntries"]:
        for repo in (entry.get("locationOrLoadError") or {}).get("repositories", []):
            for sc in repo["schedules"]:
                out[sc["name"]] = {"kind": "schedule", "status": sc["scheduleState"]["status"]}
            for se in repo["sensors"]:
                out[se["name"]] = {"kind": "sensor", "status": se["sensorState"]["status"],
                                   "description": se["description"] or "", "type": se["sensorType"]}
    return out


def _set_all_stopped(dev: harness.DagsterDev) -> None:
    """Safety net: never leave automation running after the test (it could start training)."""
    q = """{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError {
      ... on RepositoryLocation { repositories { name sensors { name sensorState { id status } }
      schedules { name scheduleState { id status } } } } } } } } }"""
    data = dev.graphql(q)["workspaceOrError"]["locationEntries"]
    for entry in data:
        for repo in (entry.get("locationOrLoadError") or {}).get("repositories", []):
            for se in repo["sensors"]:
                if se["sensorState"]["status"] == "RUNNING":
                    dev.graphql("""mutation($id: String!) { stopSensor(id: $id) { __typename } }""",
                                {"id": se["sensorState"]["id"]})
            for sc in repo["schedules"]:
                if sc["scheduleState"]["status"] == "RUNNING":
                    dev.graphql("""mutation($id: String!) { stopRunningSchedule(id: $id) { __typename } }""",
                                {"id": sc["scheduleState"]["id"]})


def test_schedule_and_input_change_automation_listed_and_switchable(
    page: Any, dagster_ui: harness.DagsterDev, screenshot_dir: Path,
) -> None:
    before = automations(dagster_ui)
    assert before, "the code location defines no schedule or sensor"
    # The cron re-materialization and the input-change automation (declarative automation:
    # one automation-condition sensor evaluates both conditions on every asset).
    auto = [n for n, a in before.items() if a["kind"] == "sensor" and a["type"] in ("AUTOMATION", "AUTO_MATERIALIZE")]
    assert auto, f"no automation-condition sensor among {before}"
    # Off by default (settings.automation.running); an aborted earlier session may have left it on.
    _set_all_stopped(dagster_ui)

    page.goto(f"{dagster_ui.url}/automation")
    rows = {name: automation_row(page, name, a["kind"]) for name, a in before.items()}
    for row in rows.values():
        row.wait_for()
    harness.screenshot(page, screenshot_dir / "automation.png")
    try:
        for name, row in rows.items():
            switch = row.locator("label[class*=formatSwitch]")
            assert not switch.locator("input").is_checked()
            switch.click()
            expect_checked(switch.locator("input"))
        deadline = time.time() + 60
        while time.time() < deadline and any(a["status"] != "RUNNING" for a in automations(dagster_ui).values()):
            time.sleep(0.5)
        assert all(a["status"] == "RUNNING" for a in automations(dagster_ui).values())
        # Where a user reads what it does: the asset's automation condition names both triggers.
        page.goto(f"{dagster_ui.url}/assets/student_model")
        page.get_by_text(re.compile(r"on cron .*missing or stale")).first.wait_for()
        page.get_by_text(re.compile(r"eager on input changes")).first.wait_for()
    finally:
        # Switch them off again by clicking too, then make sure (it could start training).
        with contextlib.suppress(Exception):
            page.goto(f"{dagster_ui.url}/automation")
            for name, a in before.items():
                switch = automation_row(page, name, a["kind"]).locator("label[class*=formatSwitch]")
                switch.wait_for(timeout=30_000)
                if switch.locator("input").is_checked():
                    switch.click()
        _set_all_stopped(dagster_ui)
    assert all(a["status"] == "STOPPED" for a in automations(dagster_ui).values())


def automation_row(page: Any, name: str, kind: str) -> Any:
    """The Automation page's row of a sensor or schedule (its link and its on/off switch)."""
    return page.locator("[class*=ListItem_listItem_]").filter(
        has=page.locator(f"a[href$='/{kind}s/{name}']")).first


def expect_checked(locator: Any, timeout: float = T) -> None:
    from playwright.sync_api import expect

    expect(locator).to_be_checked(timeout=timeout)


# ----------------------------------------------------------------------------------- backfill
BACKFILL_QUERY = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  __typename ... on PartitionBackfill { id status partitionNames
  runs(limit: 10) { runId status } } } }"""


def test_backfill_of_two_folds_launched_by_clicking_runs_to_success(
    page: Any, dagster_ui: harness.DagsterDev, ui_session: PipelineSession, screenshot_dir: Path,
) -> None:
    from dagster import AssetKey, AssetRecordsFilter

    asset, folds = "student_model", ["1", "3"]
    ak = AssetKey(asset)

    def count(pk: str) -> int:
        return len(ui_session.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=ak, asset_partitions=[pk]), limit=100).records)

    before = {pk: count(pk) for pk in folds}
    page.goto(f"{dagster_ui.url}/assets/{asset}")
    page.get_by_role("button", name="Materialize…").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Launch runs to materialize {asset}").wait_for()
    dialog.get_by_text("Select a partition or create one").click()
    for pk in folds:  # the partition list: one menu item (checkbox + status dot + key) per fold
        item = page.get_by_role("menuitem").filter(has=page.get_by_text(pk, exact=True))
        item.click()
        expect_checked(item.locator("input[type=checkbox]"))
    dialog.get_by_text("Launch runs to materialize").click()  # close the partition list
    dialog.get_by_text("2 partitions").wait_for()
    dialog.get_by_role("button", name=re.compile("Launch")).last.click()

    # The UI confirms with a link to the backfill; follow it as a user would.
    link = page.locator("a[href*='/runs/b/']").first
    link.wait_for()
    link.click()
    page.wait_for_url(re.compile(r"/runs/b/"))
    backfill_id = re.search(r"/runs/b/([^/?#]+)", page.url).group(1)

    deadline = time.time() + 600
    status = None
    while time.time() < deadline:
        bf = dagster_ui.graphql(BACKFILL_QUERY, {"id": backfill_id})["partitionBackfillOrError"]
        status = bf.get("status")
        if status in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"):
            break
        time.sleep(2)
    assert status in ("COMPLETED", "COMPLETED_SUCCESS"), f"backfill ended {status}: {bf}\n{dagster_ui.log_tail()}"
    assert sorted(bf["partitionNames"]) == folds
    assert len(bf["runs"]) == 2 and all(r["status"] == "SUCCESS" for r in bf["runs"]), bf["runs"]
    # Seen in the UI: the backfill page says so, and each fold has one more materialization.
    page.reload()
    page.get_by_text("Succeeded", exact=True).first.wait_for()
    page.get_by_text("100% completed").first.wait_for()
    harness.screenshot(page, screenshot_dir / "backfill.png")
    for pk in folds:
        assert count(pk) == before[pk] + 1
    page.goto(f"{dagster_ui.url}/assets/{asset}?view=partitions")
    page.get_by_text("Materialized (5)").wait_for()


# ----------------------------------------------------------------------------------- failure
def slurm_up() -> tuple[bool, str]:
    """The single-node cluster of scripts/slurm-up.sh answers (same test as tests/slurm)."""
    import shutil
    import subprocess

    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False, "sbatch/sinfo not installed (scripts/slurm-up.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, capture_output=True, text=True, timeout=20)
    except (subprocess.SubprocessError, OSError) as e:
        return False, f"sinfo failed: {e}"
    if out.returncode != 0 or not any(t.rstrip("*") in {"idle", "mixed", "allocated"} for t in out.stdout.split()):
        return False, f"no usable Slurm node: {out.stdout.strip() or out.stderr.strip()}"
    return True, ""


BACKENDS = {
    # backend -> (settings overrides, the readable one-liner Dagster shows)
    "local": ({"compute": {"local_mode": "subprocess"}}, r"step calibration failed in a child process"),
    "slurm": ({"compute": {"backend": "slurm", "slurm": {"poll_s": 0.5},
                           "needs": {"calibration": {"cpus": 1, "mem_gb": 1, "time_min": 5}}}},
              r"[Ss]lurm job \d+|FAILED"),
}


def make_failing_run(session: PipelineSession, scratch: Path, backend: str) -> str:
    """A real run of ``student_calibration`` whose step fails in another process.

    Downstream reads what the session's Dagster instance records (assets/common.py), so the
    broken inputs go to a sixth fold the instance has never seen, in a scratch artifact root (an
    instance without records of an upstream reads the root's disk view; the session's five folds
    stay untouched): fold 4's model, and fold 4's validation table without its label columns, as
    a table exported without labels would be. The step runs in a child process (``local``) or as
    a Slurm job (``slurm``), so the traceback Dagster shows is a remote one.
    """
    import json
    import shutil

    import pandas as pd
    from dagster import AssetKey, materialize

    from arena_assets.core import artifacts
    from arena_assets.definitions import build_definitions
    from arena_assets.resources.compute import ComputeResource
    from arena_assets.resources.settings import SettingsResource

    fold, new = "4", "5"
    src = artifacts.latest(session.artifacts, "fold_data", fold)
    assert src is not None
    v = artifacts.new_version_dir(scratch, "fold_data", new)
    shutil.copytree(src, v)
    valid = pd.read_parquet(v / "valid.parquet")
    valid.drop(columns=[c for c in valid.columns if c.startswith("winner")]).to_parquet(v / "valid.parquet", index=False)
    artifacts.set_latest(v)
    v = artifacts.new_version_dir(scratch, "student_model", new)
    shutil.copytree(artifacts.latest(session.artifacts, "student_model", fold), v)
    artifacts.set_latest(v)

    overrides = {"artifact_root": str(scratch), "folds": {"n_folds": 6}, **BACKENDS[backend][0]}
    defs = build_definitions(str(session.settings_path), {"folds": {"n_folds": 6}})
    settings = SettingsResource(path=str(session.settings_path), overrides_json=json.dumps(overrides))
    res = materialize(list(defs.assets), selection=[AssetKey("student_calibration")], partition_key=new,
                      instance=session.instance, raise_on_error=False, tags={"arena/test": f"ui-failure-{backend}"},
                      resources={"settings": settings, "compute": ComputeResource(settings=settings)})
    assert not res.success
    return res.run_id


@pytest.mark.parametrize("backend", ["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_failed_run_shows_readable_error_and_remote_traceback(
    backend: str, page: Any, dagster_ui: harness.DagsterDev, ui_session: PipelineSession, tmp_path: Path,
    screenshot_dir: Path,
) -> None:
    if backend == "slurm":
        ok, why = slurm_up()
        if not ok:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(f"CI: the Slurm cluster must be up: {why}")
            pytest.skip(why)
    run_id = make_failing_run(ui_session, tmp_path / "scratch_artifacts", backend)
    page.goto(f"{dagster_ui.url}/runs/{run_id}")
    page.get_by_text("Failure", exact=False).first.wait_for()
    # The readable one-liner: which step, where it ran, the exception.
    page.get_by_text(re.compile(BACKENDS[backend][1])).first.wait_for()
    # The remote traceback (child process / Slurm job) rides on the failure, shown in the event log.
    page.get_by_text(re.compile(r"Traceback \(most recent call last\)")).first.wait_for()
    body = page.inner_text("body")
    assert "KeyError" in body and "winner_model_a" in body
    assert "arena_assets/gpu/calibrate.py" in body
    harness.screenshot(page, screenshot_dir / ("failed_run.png" if backend == "local" else f"failed_run_{backend}.png"))
