"""Code versions of the recipe's steps: what each step reads, derived, never listed by hand.

A step's Dagster code version is the hash of :func:`step_view`::

    {"step": name, "code_version": STEPS[name].code_version, "settings": {dotted path: value}}

* **Which settings.** The settings objects the step function RECEIVES: its parameters annotated
  with a settings class (``cfg: TeacherSettings``, ``fmt: FormatSettings``, ``spec: ModelSpec``),
  read from the function's source with :mod:`ast` (core never imports gpu/ or assets/). Each class
  maps to the one ``Settings`` field of that type (``ModelSpec`` to ``families[<family>]``);
  ``StepDef.bind`` picks where the type alone is ambiguous (``StudentSettings``: ``student`` or
  ``baseline``). A setting a step does not receive cannot make it stale: the averaging step takes
  only ``AverageSettings``, so ``calibration.*`` leaves ``averaged_lora`` alone.
* **Which fields.** Every field of those objects except the ones marked on the field itself in
  ``core/settings.py``: :func:`~arena_assets.core.settings.speed_only` (batch sizes of inference,
  GPU counts, compile, logging/save intervals) and
  :func:`~arena_assets.core.settings.read_by_no_step`, and minus ``StepDef.unread``: fields of a
  received object that this step never reads (``teacher_oof`` never applies a temperature).
* **Derived values.** Fields marked :func:`~arena_assets.core.settings.hashed_as` enter through
  :data:`DERIVED`: ``global_batch`` = per-device batch x grad_accum x data-parallel ranks (so 16 x 1
  and 8 x 2 are one version), ``attention_math`` (eager, flex_attention and arena_flex compute the
  same softcapped attention; sdpa drops Gemma-2's softcapping, a different function).
* **Code.** ``StepDef.code_version``, bumped by hand when the step's code changes what it writes.
  tests/core/test_versions.py keeps a snapshot of each step's normalized source (the step function
  and every arena_assets function/class/constant it reaches, docstrings and annotations dropped;
  settings classes and the write protocol excluded: :data:`CODE_EXCLUDED`) and fails when that
  source changed while the constant did not.

tests/gpu/test_versions_oracle.py checks the derivation against an independent oracle: it runs
every step on tiny models with settings objects that RECORD the fields read, then changes one
field at a time: a field the step reads (not speed-only) must change its version, a field it
never reads must not.

Why a step that takes a model directory does not hash the family's ``ModelSpec`` (teacher,
student, merge, quantize, TTA): the spec travels inside the model artifact (``arena_spec.json``,
written by post-pretraining and read back by ``gpu.models.load_classifier``). A spec change makes
``<family>/post_pretrained_base`` stale and reaches the teacher through that asset's new data
version; hashing it in the teacher as well would call the teacher stale while re-training it alone
would still load the old spec from the old base.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from arena_assets.core import settings as S

PACKAGE = "arena_assets"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SETTINGS_MODULE = "arena_assets.core.settings"


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepDef:
    """One step of the recipe as the asset calls it."""

    fn: str
    """``module:function`` the asset calls; its settings-typed parameters ARE the step's view."""
    code_version: int
    """Bump when the step's code changes what it writes (the snapshot test says when to look)."""
    bind: Mapping[str, str] = field(default_factory=dict)
    """parameter -> ``Settings`` field, only where the parameter's type is ambiguous."""
    passes: Mapping[str, str] = field(default_factory=dict)
    """parameter -> ``Settings`` path, for what the asset hands over as plain values: a settings
    object's fields (folds: ``make_folds(train, n_folds, seed, group_by_prompt)``) or one value
    (e.g. ``{"max_length": "teacher.oof_length"}``, a property). tests/core/test_versions.py
    fails when an asset passes ``s.<anything>`` that its step's view does not hold."""
    unread: tuple[str, ...] = ()
    """``param.field`` paths of received settings this step never reads (the oracle checks it)."""
    needs: str | None = None
    """``compute.needs`` key of the step's data-parallel ranks (default: the step's name)."""
    also: tuple[str, ...] = ()
    """Further ``module:function``s the asset body calls: part of the step's code, not its view."""


STEPS: dict[str, StepDef] = {
    "tables": StepDef(
        "arena_assets.core.contract:read_train", 1,
        also=("arena_assets.core.contract:read_test", "arena_assets.core.contract:read_external",
              "arena_assets.core.contract:write_table"),
    ),
    "folds": StepDef(
        "arena_assets.core.folds:make_folds", 1, passes={"cfg": "folds"},
        also=("arena_assets.core.folds:split_fold", "arena_assets.core.folds:write_folds",
              "arena_assets.core.folds:read_folds", "arena_assets.core.folds:folds_filename"),
    ),
    # 4: a tiny (random-init) base is built in its spec's dtype on the step's device (issue 15)
    "post_pretrain": StepDef("arena_assets.gpu.pretrain:post_pretrain", 4),
    "teacher": StepDef(
        # 4: under fixed packed slabs the final evaluation batches hold per_device_batch_size rows
        "arena_assets.gpu.train:train_teacher", 4,
        # the OOF length; train_teacher never reads it (the teacher_oof asset may pass
        # s.teacher.oof_length as teacher_oof's max_length: then STEPS["teacher_oof"].passes says so)
        unread=("cfg.oof_max_length",),
    ),
    "teacher_oof": StepDef(
        # 3: a quantized model's layers are never compiled (issue 15)
        "arena_assets.gpu.predict:teacher_oof", 3, passes={"max_length": "teacher.oof_length"},
        # OOF probabilities are raw (the student distils them); no FP8 swap for teachers; the
        # length is the teacher's (passed as max_length), not the inference one
        unread=("infer.apply_calibration", "infer.fp8", "infer.max_length"),
    ),
    "student": StepDef(
        "arena_assets.gpu.train:train_student", 3, bind={"cfg": "student"},  # 3: as teacher's 4
        unread=("cfg.train.label_smoothing",),  # a student smooths through kd.label_smoothing
    ),
    "baseline": StepDef(
        "arena_assets.gpu.train:train_student", 3, bind={"cfg": "baseline"}, needs="student",
        # the asset passes no teacher OOF: the CE-only student never looks at the KD weights
        unread=("cfg.train.label_smoothing", "cfg.kd.alpha", "cfg.kd.mse_weight", "cfg.kd.cos_weight",
                "cfg.kd.teacher_families", "cfg.kd.calibrate_teacher"),
    ),
    "calibration": StepDef(
        # 2: fitted on the fold model's TTA logits of its held-out rows (the logits the submissions
        # divide by T), no longer on the training step's non-TTA valid_predictions (issue 15).
        # apply_calibration decides whether the submissions apply T, never what T is.
        "arena_assets.gpu.calibrate:calibrate", 3, unread=("cfg.merged_temperature", "infer.apply_calibration"),
    ),
    "predict": StepDef("arena_assets.gpu.predict:fold_submission", 3),
    # 2: bases for merging (mean_deltas, merge) load on the step's GPU, not its CPU (issue 15)
    "average": StepDef("arena_assets.gpu.average:average_adapters", 2),
    "merge": StepDef("arena_assets.gpu.average:merge_adapter", 2, unread=("cfg.max_iter",)),
    # 3: GPTQModel's kernel named by quant.gptq_backend and saved with the model
    "quantize": StepDef("arena_assets.gpu.quantize:quantize", 3),
    # 3 (and teacher_oof, calibration, predict): a quantized model's layers are never compiled
    "tta": StepDef("arena_assets.gpu.predict:tta_submission", 3),
    # 2: CV table from the calibration step; CV weights with a noise-scaled temperature and a cap;
    # the seed's fallback to the TTA submission (issue 15)
    "ensemble": StepDef("arena_assets.assets.ensemble:build_ensemble", 2),
}
"""Every step with a code version. Family steps: post_pretrain (every family), teacher and
teacher_oof (teacher families); the others belong to the student."""

FAMILY_STEPS = ("post_pretrain", "teacher", "teacher_oof")


# --------------------------------------------------------------------------------------------
# Field roles (the markers of core/settings.py) and derived values
# --------------------------------------------------------------------------------------------
def field_role(cls: type[BaseModel], name: str) -> str:
    """``hashed`` | ``speed_only`` | ``unused`` | ``opt_in`` | ``hashed_as:<derived>`` of one settings field."""
    extra = cls.model_fields[name].json_schema_extra
    if isinstance(extra, dict) and S.CODE_VERSION_KEY in extra:
        return str(extra[S.CODE_VERSION_KEY])
    return "hashed"


def is_excluded(cls: type[BaseModel], name: str) -> bool:
    return field_role(cls, name) in ("speed_only", "unused")


ATTENTION_MATH = {
    "eager": "softcapped",
    "flex_attention": "softcapped",
    "arena_flex": "softcapped",
    "sdpa": "sdpa",
    "flash_attention_2": "flash_attention_2",
}
"""What an attention implementation computes. eager, flex_attention and arena_flex (flex with the
softcap as score_mod, gpu/packing.py) apply Gemma-2's attention-logit softcapping: the same
function up to float rounding, so switching among them re-runs nothing. sdpa silently drops the
softcapping (a different model for Gemma-2); flash_attention_2 depends on the flash-attn build's
softcap support: each is its own class. Llama-style models have no softcapping, but a real
checkpoint's architecture is unknown here, so the classes stay conservative."""


def data_parallel_ranks(settings: S.Settings, needs_key: str) -> int:
    """Ranks a training step really runs with: ``tasks_per_node`` (None: one per GPU) x ``nodes``
    on the Slurm backend; the local and k8s backends run one process (compute._one_rank_only)."""
    compute = settings.compute
    if getattr(compute, "backend", "local") != "slurm":
        return 1
    needs = compute.needs_for(needs_key)
    tasks = getattr(needs, "tasks_per_node", 1)
    if tasks is None:
        tasks = getattr(needs, "gpus", 0) or 1
    nodes = getattr(needs, "nodes", 1) or 1
    return max(1, int(tasks)) * max(1, int(nodes))


@dataclass(frozen=True)
class ViewContext:
    ranks: int = 1


DERIVED: dict[str, Callable[[Any, ViewContext], Any]] = {
    "global_batch": lambda train, ctx: int(train.per_device_batch_size) * int(train.grad_accum) * ctx.ranks,
    "attention_math": lambda spec, ctx: ATTENTION_MATH.get(spec.attn_implementation, spec.attn_implementation),
}
"""``hashed_as`` name -> the value hashed, from the object holding the marked fields."""


# --------------------------------------------------------------------------------------------
# Reading step signatures (ast: no import of gpu/ or assets/ from core)
# --------------------------------------------------------------------------------------------
def module_file(module: str) -> Path:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(f"{module} is not part of {PACKAGE}")
    base = PACKAGE_DIR.joinpath(*parts[1:])
    pkg = base / "__init__.py"
    return pkg if pkg.exists() else base.with_suffix(".py")


def is_module(module: str) -> bool:
    return module.split(".")[0] == PACKAGE and module_file(module).exists()


@dataclass
class _Module:
    name: str
    defs: dict[str, ast.AST]
    imports: dict[str, tuple[str, str | None]]
    """local name -> (module, attribute or None for the module itself)."""


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if module_file(module).name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_bindings(module: str, nodes: Iterator[ast.AST]) -> dict[str, tuple[str, str | None]]:
    out: dict[str, tuple[str, str | None]] = {}
    for n in nodes:
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.asname:
                    out[a.asname] = (a.name, None)
                else:
                    out[a.name.split(".")[0]] = (a.name.split(".")[0], None)
        elif isinstance(n, ast.ImportFrom):
            src = _absolute(module, n)
            for a in n.names:
                if a.name == "*":
                    continue
                sub = f"{src}.{a.name}"
                out[a.asname or a.name] = (sub, None) if is_module(sub) else (src, a.name)
    return out


@cache
def _parse(module: str) -> _Module:
    tree = ast.parse(module_file(module).read_text(encoding="utf-8"))
    defs: dict[str, ast.AST] = {}
    top: list[ast.AST] = []

    def visit(body: list[ast.stmt]) -> None:
        for st in body:
            top.append(st)
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs[st.name] = st
            elif isinstance(st, ast.Assign):
                for t in st.targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            defs[n.id] = st
            elif isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                defs[st.target.id] = st
            elif isinstance(st, (ast.If, ast.Try)):  # TYPE_CHECKING blocks, optional imports
                visit(st.body)
                visit(getattr(st, "orelse", []))
                for h in getattr(st, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return _Module(module, defs, _import_bindings(module, iter(top)))


def split_ref(ref: str) -> tuple[str, str]:
    module, _, name = ref.partition(":")
    return module, name


def _function_node(ref: str) -> ast.FunctionDef:
    module, name = split_ref(ref)
    node = _parse(module).defs.get(name)
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise LookupError(f"{ref}: no function {name!r} in {module_file(module)}")  # noqa: TRY004
    return node  # type: ignore[return-value]


def _settings_classes() -> dict[str, type[BaseModel]]:
    return {n: c for n, c in vars(S).items() if isinstance(c, type) and issubclass(c, BaseModel) and c.__module__ == S.__name__}


def signature_settings(ref: str) -> dict[str, type[BaseModel]]:
    """``{parameter: settings class}`` of a step function, from its annotations (``X``,
    ``X | None``, ``"X"``; X imported from core.settings)."""
    module, _ = split_ref(ref)
    node = _function_node(ref)
    imports = _parse(module).imports
    classes = _settings_classes()
    out: dict[str, type[BaseModel]] = {}
    args = node.args
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
        ann = a.annotation
        if ann is None:
            continue
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            ann = ast.parse(ann.value, mode="eval").body
        found = []
        for n in ast.walk(ann):
            name = None
            if isinstance(n, ast.Name):
                src = imports.get(n.id)
                if (src and src == (SETTINGS_MODULE, n.id)) or (module == SETTINGS_MODULE and n.id in classes):
                    name = n.id
                elif src and src[1] and src[0] == SETTINGS_MODULE:
                    name = src[1]
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                src = imports.get(n.value.id)
                if src and src == (SETTINGS_MODULE, None):
                    name = n.attr
            if name and name in classes:
                found.append(classes[name])
        if len(found) > 1:
            raise TypeError(f"{ref}: parameter {a.arg} is annotated with several settings classes")
        if found:
            out[a.arg] = found[0]
    return out


def settings_sources(cls: type[BaseModel]) -> list[str]:
    """The ``Settings`` fields holding a ``cls`` (``families.{family}`` for a dict of them)."""
    out = []
    for name, f in S.Settings.model_fields.items():
        ann = f.annotation
        if ann is cls:
            out.append(name)
        elif get_origin(ann) is dict and get_args(ann)[-1] is cls:
            out.append(name + ".{family}")
    return out


def step_params(step: str) -> dict[str, tuple[type[BaseModel], str]]:
    """``{parameter: (settings class, Settings path template)}`` of one step."""
    d = STEPS[step]
    out: dict[str, tuple[type[BaseModel], str]] = {}
    for param, cls in signature_settings(d.fn).items():
        if param in d.bind:
            src = d.bind[param]
        else:
            srcs = settings_sources(cls)
            if len(srcs) != 1:
                raise LookupError(f"step {step}: parameter {param}: {cls.__name__} is held by {srcs or 'no field'} "
                                  "of Settings; say which in STEPS[...].bind")
            src = srcs[0]
        out[param] = (cls, src)
    for param, src in d.passes.items():
        cls = type(_resolve(S.Settings(), src, None))
        out[param] = (cls, src)
    for u in d.unread:
        if u.split(".")[0] not in out:
            raise LookupError(f"step {step}: unread {u!r} names no settings parameter of {d.fn}")
    return out


def _resolve(settings: S.Settings, path: str, family: str | None) -> Any:
    obj: Any = settings
    for part in path.split("."):
        if part == "{family}":
            fam = family or settings.student_family
            if fam not in obj:
                raise KeyError(f"family {fam!r} is not defined under `families`")
            obj = obj[fam]
        elif isinstance(obj, dict):
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------------
# The view
# --------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json")
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def flatten(obj: BaseModel, prefix: str, ctx: ViewContext, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``{prefix.field: value}`` of the hashed leaves of ``obj`` (nested settings recursed)."""
    out: dict[str, Any] = {}
    derived: set[str] = set()
    cls = type(obj)
    for name in cls.model_fields:
        path = f"{prefix}.{name}"
        if path in skip:
            continue
        role = field_role(cls, name)
        if role in ("speed_only", "unused"):
            continue
        if role.startswith("hashed_as:"):
            derived.add(role.split(":", 1)[1])
            continue
        value = getattr(obj, name)
        if role == "opt_in" and value == cls.model_fields[name].default:
            continue  # at its default the step computes what it did before the switch existed
        if isinstance(value, BaseModel):
            out.update(flatten(value, path, ctx, skip))
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            for k, v in sorted(value.items()):
                out.update(flatten(v, f"{path}.{k}", ctx, skip))
        else:
            out[path] = _plain(value)
    for name in sorted(derived):
        out[f"{prefix}.{name}"] = DERIVED[name](obj, ctx)
    return out


def step_view(settings: S.Settings, step: str, family: str | None = None) -> dict[str, Any]:
    """What ``step``'s code version is made of (see the module doc); ``settings_hash`` of it is
    the asset's Dagster code version."""
    if step not in STEPS:
        raise KeyError(f"unknown step {step!r}; known: {sorted(STEPS)}")
    d = STEPS[step]
    ctx = ViewContext(ranks=data_parallel_ranks(settings, d.needs or step))
    params = step_params(step)
    view: dict[str, Any] = {}
    for param, (_, template) in sorted(params.items()):
        path = template.replace("{family}", family or settings.student_family)
        obj = _resolve(settings, template, family)
        if not isinstance(obj, BaseModel):  # a plain value the asset passes (StepDef.passes)
            view[path] = _plain(obj)
            continue
        skip = frozenset(path + u[len(param):] for u in d.unread if u.split(".")[0] == param)
        view.update(flatten(obj, path, ctx, skip))
    return {"step": step, "code_version": d.code_version, "settings": view}


def code_version(settings: S.Settings, step: str, family: str | None = None) -> str:
    """The asset's Dagster code version (= ``settings_hash(settings.for_step(step, family))``)."""
    return S.settings_hash(step_view(settings, step, family))


def step_instances(settings: S.Settings) -> list[tuple[str, str | None]]:
    """Every (step, family) the recipe's assets version, for these settings."""
    out: list[tuple[str, str | None]] = []
    for step in STEPS:
        if step == "post_pretrain":
            out += [(step, f) for f in settings.families]
        elif step in ("teacher", "teacher_oof"):
            out += [(step, f) for f in settings.teacher_families]
        else:
            out.append((step, None))
    return out


def all_versions(settings: S.Settings) -> dict[str, str]:
    """``{"step" or "step[family]": code version}`` of every versioned asset step."""
    return {(f"{s}[{f}]" if f else s): code_version(settings, s, f) for s, f in step_instances(settings)}


# --------------------------------------------------------------------------------------------
# The code a step runs (for the snapshot test)
# --------------------------------------------------------------------------------------------
CODE_EXCLUDED = (SETTINGS_MODULE, "arena_assets.core.versions", "arena_assets.core.artifacts",
                 "arena_assets.core.results")
"""Not part of any step's code: settings are versioned by value (the view), not by their classes'
source; artifacts/results are the write protocol (staging, atomic renames, result.json), how a
version directory is written, never what a step computes."""


def normalized_source(node: ast.AST) -> str:
    """``ast.dump`` without docstrings, no-op string statements and annotations: comments,
    formatting, docs and type hints never count as a code change."""
    node = copy.deepcopy(node)
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(body, list):
            kept = [st for st in body if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant)
                                              and isinstance(st.value.value, str))]
            n.body = kept or [ast.Pass()]  # type: ignore[attr-defined]
        if isinstance(n, ast.arg):
            n.annotation = None
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n.returns = None
        if isinstance(n, ast.AnnAssign):
            n.annotation = ast.Constant(None)
    return ast.dump(node, include_attributes=False)


def _refs_in(module: str, node: ast.AST) -> set[tuple[str, str | None]]:
    """arena_assets symbols (module, name) a definition refers to (``name`` None: a whole module)."""
    info = _parse(module)
    local = _import_bindings(module, ast.walk(node))
    out: set[tuple[str, str | None]] = set()
    bases: set[int] = set()

    def lookup(name: str) -> tuple[str, str | None] | None:
        if name in local:
            return local[name]
        if name in info.defs:
            return (module, name)
        return info.imports.get(name)

    for n in ast.walk(node):
        if isinstance(n, ast.Attribute):
            chain = []
            cur: ast.AST = n
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if not isinstance(cur, ast.Name):
                continue
            target = lookup(cur.id)
            if target is None or target[1] is not None:
                continue
            bases.add(id(cur))
            mod = target[0]
            for attr in reversed(chain):  # a.b.c: descend through submodules, then one symbol
                if is_module(f"{mod}.{attr}"):
                    mod = f"{mod}.{attr}"
                    continue
                out.add((mod, attr))
                break
            else:
                out.add((mod, None))
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and id(n) not in bases:
            target = lookup(n.id)
            if target is not None:
                out.add(target)
    return {(m, a) for m, a in out if m.split(".")[0] == PACKAGE and m not in CODE_EXCLUDED}


def code_symbols(refs: list[str]) -> dict[str, str]:
    """``{"module:name": hash of its normalized source}`` of ``refs`` and every arena_assets
    function, class or module constant they reach (calls, references, local imports)."""
    seen: dict[str, str] = {}
    todo: list[tuple[str, str | None]] = [split_ref(r) for r in refs]
    while todo:
        module, name = todo.pop()
        if not is_module(module):
            continue
        info = _parse(module)
        names = sorted(info.defs) if name is None else [name]
        for nm in names:
            key = f"{module}:{nm}"
            if key in seen:
                continue
            node = info.defs.get(nm)
            if node is None:
                imp = info.imports.get(nm)  # re-exported: follow the import
                if imp is not None:
                    todo.append(imp)
                continue
            seen[key] = hashlib.sha256(normalized_source(node).encode()).hexdigest()[:16]
            todo.extend(_refs_in(module, node))
    return dict(sorted(seen.items()))


def step_code(step: str) -> dict[str, str]:
    d = STEPS[step]
    return code_symbols([d.fn, *d.also])


def code_digest(symbols: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(symbols.items()))).encode()).hexdigest()[:16]
