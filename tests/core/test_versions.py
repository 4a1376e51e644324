"""core/versions.py: step views from typed signatures, field markers, per-step code versions.

* the registry resolves: every step function exists and its settings parameters, read from the
  source with ``ast``, are the ones Python's own ``get_type_hints`` sees;
* the assets call each step the way the registry hashes it (the settings they hand over are the
  ones in the step's view, nothing else from the settings);
* every settings field, changed on its own, changes exactly the versions of the steps that
  receive it (marked speed-only / unused fields none, orchestration none);
* the CI check: a snapshot of each step's normalized source; a step whose code changed while its
  ``code_version`` did not fails here. After bumping (or for a change that cannot alter what the
  step writes), re-record with ``UPDATE_SNAPSHOTS=1 pytest tests/core/test_versions.py -k
  code_version_bump`` (``ARENA_UPDATE_SNAPSHOTS=1`` works too).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from arena_assets.core import versions as V
from arena_assets.core.settings import Settings, settings_hash
from tests.core.settings_mutation import leaves, mutated

SNAPSHOT = Path(__file__).parent / "snapshots" / "step_code.json"
UPDATE = any(os.environ.get(v, "") not in ("", "0") for v in ("UPDATE_SNAPSHOTS", "ARENA_UPDATE_SNAPSHOTS"))
ASSETS_DIR = V.PACKAGE_DIR / "assets"


# ------------------------------------------------------------------------------ the registry
@pytest.mark.parametrize("step", sorted(V.STEPS))
def test_step_signature_read_from_source_matches_python(step: str) -> None:
    d = V.STEPS[step]
    module, name = V.split_ref(d.fn)
    fn = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(fn)
    settings_cls = {c for c in vars(V.S).values() if isinstance(c, type) and issubclass(c, BaseModel)}
    real = {}
    for p, t in hints.items():
        found = [a for a in (get_args(t) or (t,)) if a in settings_cls]
        if found:
            real[p] = found[0]
    assert V.signature_settings(d.fn) == real
    for ref in d.also:
        m, n = V.split_ref(ref)
        assert callable(getattr(importlib.import_module(m), n)), ref


def test_gpu_steps_are_typed() -> None:
    """A step function whose settings parameters are ``Any`` would hash nothing: every step
    except the contract's tables receives its settings typed (or the asset passes them, folds)."""
    for step, d in V.STEPS.items():
        if step == "tables":
            continue
        assert V.step_params(step), f"{step}: {d.fn} has no settings-typed parameter"


def test_views_hold_no_marked_fields_and_no_unread_ones() -> None:
    s = Settings()
    for step, fam in V.step_instances(s):
        view = V.step_view(s, step, fam)["settings"]
        for path in view:
            *parents, leaf = path.split(".")
            obj: Any = s
            for part in parents:
                obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
            if leaf in type(obj).model_fields:
                assert not V.is_excluded(type(obj), leaf), (step, path)
        d = V.STEPS[step]
        params = V.step_params(step)
        for u in d.unread:
            param, rest = u.split(".", 1)
            src = params[param][1].replace("{family}", fam or s.student_family)
            assert f"{src}.{rest}" not in view, (step, u)


def test_global_batch_and_ranks() -> None:
    s = Settings()
    view = V.step_view(s, "teacher", "llama")["settings"]
    assert view["teacher.train.global_batch"] == 16
    assert "teacher.train.per_device_batch_size" not in view and "teacher.train.grad_accum" not in view
    raw = s.model_dump()
    raw["compute"] = {"backend": "slurm", "needs": {"student": {"gpus": 4, "nodes": 2}}}
    slurm = Settings.model_validate(raw)
    assert V.data_parallel_ranks(slurm, "student") == 8
    assert V.step_view(slurm, "baseline")["settings"]["baseline.train.global_batch"] == 16 * 8  # needs "student"
    assert V.data_parallel_ranks(slurm, "teacher") == 1


def test_ranks_read_defensively() -> None:
    """``tasks_per_node`` None (resolved to the step's GPUs) or absent never breaks a version."""

    class Needs:
        gpus, nodes, tasks_per_node = 4, 1, None

    class Compute:
        backend = "slurm"

        def needs_for(self, step: str) -> Any:
            return Needs()

    fake = types.SimpleNamespace(compute=Compute())
    assert V.data_parallel_ranks(fake, "teacher") == 4  # type: ignore[arg-type]
    Needs.gpus = 0
    assert V.data_parallel_ranks(fake, "teacher") == 1  # type: ignore[arg-type]


def test_code_version_is_the_assets_hash() -> None:
    s = Settings()
    for step, fam in V.step_instances(s):
        assert V.code_version(s, step, fam) == settings_hash(s.for_step(step, fam))
    versions = V.all_versions(s)
    assert len(set(versions.values())) == len(versions)  # the step's name is part of its view


def test_a_passed_plain_value_enters_the_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring the teachers' OOF length (``max_length=s.teacher.oof_length``) is one registry line."""
    d = V.STEPS["teacher_oof"]
    monkeypatch.setitem(V.STEPS, "teacher_oof", V.StepDef(d.fn, d.code_version, passes={"max_length": "teacher.oof_length"},
                                                           unread=(*d.unread, "infer.max_length")))
    base = Settings()
    view = V.step_view(base, "teacher_oof", "llama")["settings"]
    assert view["teacher.oof_length"] == base.teacher.train.max_length and "infer.max_length" not in view
    longer = mutated(base, "teacher.oof_max_length")
    assert V.code_version(longer, "teacher_oof", "llama") != V.code_version(base, "teacher_oof", "llama")
    assert V.code_version(mutated(base, "infer.max_length"), "teacher_oof", "llama") == \
        V.code_version(base, "teacher_oof", "llama")


# ------------------------------------------------------------------------------ every field
LEAVES = leaves(Settings())


def _receivers(s: Settings, path: str) -> dict[str, str]:
    """``{instance: field path relative to the parameter}`` of the steps that RECEIVE ``path``."""
    out = {}
    for step, fam in V.step_instances(s):
        for param, (_, template) in V.step_params(step).items():
            src = template.replace("{family}", fam or s.student_family)
            if path.startswith(src + "."):
                out[f"{step}[{fam}]" if fam else step] = param + path[len(src):]
        for param, src in V.STEPS[step].passes.items():  # plain values the asset hands over
            if path in PASSED_FROM.get(src, (src,)) or path.startswith(src + "."):
                out[f"{step}[{fam}]" if fam else step] = param
    return out


PASSED_FROM = {"teacher.oof_length": ("teacher.oof_max_length", "teacher.train.max_length")}
"""The fields behind a passed property (TeacherSettings.oof_length), written out by hand."""


@pytest.mark.parametrize(("path", "cls", "name", "value"), LEAVES, ids=[x[0] for x in LEAVES])
def test_every_field_changes_exactly_the_steps_receiving_it(path: str, cls: type[BaseModel], name: str,
                                                            value: Any) -> None:
    base = Settings()
    changed_settings = mutated(base, path)
    before, after = V.all_versions(base), V.all_versions(changed_settings)
    stale = {k for k in before if before[k] != after[k]}
    role = V.field_role(cls, name)
    if role in ("speed_only", "unused"):
        assert stale == set(), f"{path} is marked {role} but makes {stale} stale"
        return
    if role.startswith("hashed_as:"):  # only a change of the derived value counts
        parent = ".".join(path.split(".")[:-1])
        derive = V.DERIVED[role.split(":", 1)[1]]
        a, b = (V._resolve(x, parent, None) for x in (base, changed_settings))
        if derive(a, V.ViewContext()) == derive(b, V.ViewContext()):
            assert stale == set(), f"{path}: same {role} but {stale} stale"
            return
    receivers = _receivers(base, path)
    expected = {inst for inst, rel in receivers.items()
                if rel not in V.STEPS[inst.split("[")[0]].unread
                and not any(rel.startswith(u + ".") for u in V.STEPS[inst.split("[")[0]].unread)}
    assert stale == expected, f"{path}: stale {sorted(stale)}, receivers {receivers}"


def test_an_opt_in_switch_at_its_default_changes_no_version() -> None:
    """Adding an opt-in switch must not mark finished runs stale: at its default it is absent from
    every step's view (the versions equal those of settings without the field), set it is hashed."""
    base = Settings()
    path = "student.kd.calibrate_teacher"
    assert V.field_role(type(base.student.kd), "calibrate_teacher") == "opt_in"
    views = [V.step_view(base, s, f)["settings"] for s, f in V.step_instances(base)]
    assert not any(path in v for v in views)
    on = mutated(base, path)
    assert on.student.kd.calibrate_teacher is True
    stale = {k for k, v in V.all_versions(base).items() if V.all_versions(on)[k] != v}
    assert stale == {"student"}, stale  # the KD student only (the CE-only student declares it unread)


def test_every_settings_field_is_hashed_somewhere_or_marked() -> None:
    """A field no step hashes is marked on the field, or declared unread by every step that
    receives it (``StepDef.unread``, checked by tests/gpu/test_versions_oracle.py)."""
    base = Settings()
    hashed = set()
    for step, fam in V.step_instances(base):
        hashed |= set(V.step_view(base, step, fam)["settings"])
    hashed |= {f for src in hashed for f in PASSED_FROM.get(src, ())}
    orchestration = ("artifact_root", "data.", "sample.", "compute.", "automation.")
    dead = []
    for path, cls, name, _ in LEAVES:
        if path.startswith(orchestration) or V.field_role(cls, name) != "hashed":
            continue
        if path not in hashed and not any(h.startswith(path + ".") for h in hashed):
            receivers = _receivers(base, path)
            if not receivers or any(rel not in V.STEPS[i.split("[")[0]].unread for i, rel in receivers.items()):
                dead.append(path)
    assert dead == [], f"hashed by no step, marked by nothing: {dead}"


# ------------------------------------------------------------------------------ the assets' calls
def _shallow_walk(node: ast.AST) -> list[ast.AST]:
    """Nodes of a function body without descending into nested functions/classes."""
    out, todo = [], list(ast.iter_child_nodes(node))
    while todo:
        n = todo.pop()
        out.append(n)
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(n))
    return out


def _settings_path(e: ast.AST, var: str) -> str | None:
    """``s.teacher.train`` -> "teacher.train"; ``s.families[family]`` -> "families.{family}"."""
    if isinstance(e, ast.Name):
        return "" if e.id == var else None
    if isinstance(e, ast.Attribute):
        base = _settings_path(e.value, var)
        return None if base is None else (f"{base}.{e.attr}" if base else e.attr)
    if isinstance(e, ast.Subscript):
        base = _settings_path(e.value, var)
        return None if base is None else f"{base}.{{family}}"
    return None


def _settings_uses(e: ast.AST, var: str) -> list[str]:
    """The settings paths an argument expression uses (``fa / f(s.folds.seed)``: folds.seed)."""
    p = _settings_path(e, var)
    if p is not None:
        return [p]
    return [u for c in ast.iter_child_nodes(e) for u in _settings_uses(c, var)]


def _asset_calls() -> list[dict[str, Any]]:
    """Every asset body that versions itself by a step: the step and the calls it makes."""
    found = []
    for path in sorted(ASSETS_DIR.glob("*.py")):
        module = f"arena_assets.assets.{path.stem}"
        info = V._parse(module)
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = _shallow_walk(fn)
            local = V._import_bindings(module, iter(body))
            var, step = None, None
            for n in body:
                if (isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                        and isinstance(n.value.func, ast.Attribute) and n.value.func.attr == "get"
                        and isinstance(n.value.func.value, ast.Name) and n.value.func.value.id == "settings"):
                    var = n.targets[0].id  # type: ignore[attr-defined]
                if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "begin"
                        and isinstance(n.func.value, ast.Name) and n.func.value.id == "Materialization"):
                    for kw in n.keywords:
                        if kw.arg == "step" and isinstance(kw.value, ast.Constant):
                            step = kw.value.value
            if step is None or var is None:
                continue

            def ref_of(e: ast.AST, module: str = module, info: Any = info, local: Any = local) -> str | None:
                if isinstance(e, ast.Name):
                    t = local.get(e.id) or info.imports.get(e.id)
                    if t and t[1]:
                        return f"{t[0]}:{t[1]}"
                    if e.id in info.defs:
                        return f"{module}:{e.id}"
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name):
                    t = local.get(e.value.id) or info.imports.get(e.value.id)
                    if t and t[1] is None:
                        return f"{t[0]}:{e.attr}"
                return None

            calls = []
            for n in body:
                if not isinstance(n, ast.Call):
                    continue
                if (isinstance(n.func, ast.Attribute) and n.func.attr in ("run", "map")
                        and isinstance(n.func.value, ast.Name) and n.func.value.id == "compute"):
                    ref = ref_of(n.args[2])
                    calls.append({"ref": ref, "needs": getattr(n.args[1], "value", None), "args": n.args[3:],
                                  "kwargs": {k.arg: k.value for k in n.keywords if k.arg != "python"}})
                else:
                    ref = ref_of(n.func)
                    if ref is not None and ref.split(":")[0].startswith(("arena_assets.core.", "arena_assets.gpu.",
                                                                          "arena_assets.assets.ensemble")):
                        calls.append({"ref": ref, "needs": None, "args": n.args,
                                      "kwargs": {k.arg: k.value for k in n.keywords}})
            found.append({"where": f"{path.name}:{fn.name}", "step": step, "var": var, "calls": calls})
    return found


def test_assets_hand_each_step_the_settings_its_version_hashes() -> None:
    problems: list[str] = []
    used = set()
    for a in _asset_calls():
        where, step, var = a["where"], a["step"], a["var"]
        if step not in V.STEPS:
            problems.append(f"{where}: Materialization.begin(step={step!r}) is not in core/versions.STEPS")
            continue
        d = V.STEPS[step]
        used.add(step)
        params = V.step_params(step)
        allowed = {t for _, t in params.values()}
        main = [c for c in a["calls"] if c["ref"] == d.fn]
        others = [c for c in a["calls"] if c["ref"] != d.fn and c["ref"] is not None]
        if not main and not any(c["ref"] in d.also for c in others):
            callers = sorted({c["ref"] for c in a["calls"] if c["ref"]} & {x.fn for x in V.STEPS.values()})
            owner = [k for k, x in V.STEPS.items() if x.fn in callers]
            problems.append(f"{where}: versioned as step {step!r} ({d.fn}) but calls {callers or 'no step'}"
                            + (f": use step={owner[0]!r}" if owner else ""))
            continue
        for c in main:
            if c["needs"] is not None and c["needs"] != (d.needs or step):
                problems.append(f"{where}: compute.run(..., {c['needs']!r}, ...) but STEPS[{step!r}].needs is "
                                f"{d.needs or step!r} (its ranks enter the global batch)")
            node = V._function_node(d.fn)
            positional = [x.arg for x in [*node.args.posonlyargs, *node.args.args]]
            bound = dict(zip(positional, c["args"]))
            bound.update(c["kwargs"])
            for param, (_, template) in params.items():
                if param in d.passes:
                    continue
                got = _settings_path(bound[param], var) if param in bound else None
                if got != template:
                    problems.append(f"{where}: {d.fn} gets {param}={ast.unparse(bound[param]) if param in bound else '-'}"
                                    f" but its version hashes {template}")
        for c in [*main, *[c for c in others if c["ref"] in d.also]]:
            for e in [*c["args"], *c["kwargs"].values()]:
                for p in _settings_uses(e, var):
                    if not (p in allowed or any(p == x or p.startswith(x + ".") for x in d.passes.values())):
                        problems.append(f"{where}: passes {var}.{p} to {c['ref']}, which step {step!r}'s version does "
                                        "not hash: type the parameter with its settings class, or add it to "
                                        f"STEPS[{step!r}].passes")
    for step in sorted(set(V.STEPS) - used - {"tables"}):
        problems.append(f"no asset versions itself by step {step!r} (Materialization.begin(..., step={step!r}))")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ step code
def test_normalized_source_ignores_docs_comments_and_annotations() -> None:
    a = ast.parse('def f(x: int) -> int:\n    """doc"""\n    # comment\n    return x + 1\n').body[0]
    b = ast.parse("def f(x):\n    return x + 1\n").body[0]
    c = ast.parse("def f(x):\n    return x + 2\n").body[0]
    assert V.normalized_source(a) == V.normalized_source(b) != V.normalized_source(c)


def test_step_code_reaches_helpers_through_imports_and_modules() -> None:
    oof = V.step_code("teacher_oof")
    assert "arena_assets.gpu.predict:tta_logits" in oof  # called directly
    assert "arena_assets.gpu.formatting:encode_rows" in oof  # two calls deep, another module
    assert "arena_assets.gpu.models:load_classifier" in oof  # imported inside a function
    assert not any(k.startswith("arena_assets.core.settings:") for k in oof)  # settings: by value
    assert "arena_assets.gpu.losses:kd_loss" in V.step_code("student")  # inside the Trainer subclass
    assert "arena_assets.gpu.losses:kd_loss" not in V.step_code("calibration")
    assert "arena_assets.core.folds:make_folds" in V.step_code("folds")


def _current_code() -> dict[str, Any]:
    steps, symbols = {}, {}
    for step, d in sorted(V.STEPS.items()):
        code = V.step_code(step)
        symbols.update(code)
        steps[step] = {"code_version": d.code_version, "digest": V.code_digest(code), "symbols": sorted(code)}
    return {"steps": steps, "symbols": dict(sorted(symbols.items()))}


RERECORD = "then re-record: UPDATE_SNAPSHOTS=1 pytest tests/core/test_versions.py -k code_version_bump"


def snapshot_problems(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    problems = []
    for step, cur in current["steps"].items():
        rec = recorded["steps"].get(step)
        if rec is None:
            problems.append(f"{step}: a new step, not in the snapshot; {RERECORD}")
            continue
        if rec["digest"] != cur["digest"]:
            names = set(rec["symbols"]) | set(cur["symbols"])
            diff = sorted(n for n in names
                          if recorded["symbols"].get(n) != current["symbols"].get(n)
                          or (n in rec["symbols"]) != (n in cur["symbols"]))
            shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            if rec["code_version"] == cur["code_version"]:
                problems.append(
                    f"{step}: its code changed ({shown}) but STEPS[{step!r}].code_version is still "
                    f"{cur['code_version']}: bump it in arena_assets/core/versions.py if the change can alter what "
                    f"the step writes (a pure refactor or logging change may keep it; say so in the commit); {RERECORD}")
            else:
                problems.append(f"{step}: code_version bumped to {cur['code_version']}; {RERECORD}")
        elif rec["code_version"] != cur["code_version"]:
            problems.append(f"{step}: code_version {rec['code_version']} -> {cur['code_version']} with no code "
                            f"change recorded; {RERECORD}")
    for step in sorted(set(recorded["steps"]) - set(current["steps"])):
        problems.append(f"{step}: in the snapshot but no longer a step; {RERECORD}")
    return problems


def test_step_code_changes_need_a_code_version_bump() -> None:
    """The CI check of per-step code versions (see the module doc)."""
    current = _current_code()
    if UPDATE:
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        return
    assert SNAPSHOT.exists(), f"no snapshot at {SNAPSHOT}: record it with UPDATE_SNAPSHOTS=1"
    problems = snapshot_problems(json.loads(SNAPSHOT.read_text()), current)
    assert not problems, "\n".join(problems)


def test_snapshot_check_names_the_changed_code_and_the_constant() -> None:
    """A helper two modules away changes: every step reaching it fails until bumped and re-recorded."""
    recorded = _current_code()
    current = json.loads(json.dumps(recorded))
    current["symbols"]["arena_assets.gpu.formatting:encode_rows"] = "0" * 16
    for st in current["steps"].values():
        st["digest"] = V.code_digest({n: current["symbols"][n] for n in st["symbols"]})
    problems = snapshot_problems(recorded, current)
    stale = {p.split(":")[0] for p in problems}
    assert {"teacher", "teacher_oof", "student", "predict", "tta", "quantize"} <= stale
    assert not {"average", "ensemble", "folds"} & stale
    assert all("encode_rows" in p and "bump it" in p for p in problems)
    for st in current["steps"].values():
        st["code_version"] += 1
    assert all("re-record" in p and "bump it" not in p for p in snapshot_problems(recorded, current))
