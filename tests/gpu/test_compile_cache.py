"""The portable compile cache (gpu/compile_cache.py): a later process compiles nothing.

Each role runs in its own interpreter with its own empty Inductor cache folder (what a new Slurm
job with a private /tmp, a new pod or another GPU shard is), through the project's own TTA entry
point with ``InferSettings.compile_cache`` (tests/gpu/compile_cache_job.py; CPU Inductor).
Without the file, a fresh Inductor folder misses the FX-graph cache; with it, the same compile is
served from the file: FX-graph cache hits, no misses, the same logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("compile_cache_job.py")


def _env(tmp: Path, inductor: str) -> dict[str, str]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / inductor), PYTHONPATH=str(ROOT))
    env.pop("ARENA_COMPILE_CACHE", None)
    return env


def _job(tmp: Path, inductor: str, store: Path, rank: int = 0) -> dict[str, Any]:
    p = subprocess.run([sys.executable, str(JOB), str(store), str(rank)], env=_env(tmp, inductor), capture_output=True,
                       text=True, timeout=900, cwd=ROOT, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Rank 0 on a fresh node: no file, an empty Inductor folder; it compiles and writes the file."""
    tmp = tmp_path_factory.mktemp("cold")
    return tmp / "store", _job(tmp, "inductor", tmp / "store")


def test_first_process_compiles_and_writes_the_file(cold: tuple[Path, dict[str, Any]]) -> None:
    store, first = cold
    files = list(store.glob("tta-*.bin"))
    assert len(files) == 1 and files[0].stat().st_size > 0, files
    assert first["record"]["compile_cache_hit"] is False
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1  # it compiled: a fresh folder misses
    assert first["record"]["compile_cache_saved_bytes"] == files[0].stat().st_size


def test_second_process_loads_the_file_and_compiles_nothing(cold: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    store, first = cold
    second = _job(tmp_path, "inductor_b", store)  # a fresh node: empty Inductor folder, only the file
    assert second["record"]["compile_cache_hit"] is True
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1, second["inductor"]
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second["inductor"]
    assert "compile_cache_saved_bytes" not in second["record"]  # the file is written once
    np.testing.assert_array_equal(np.asarray(second["logits"]), np.asarray(first["logits"]))


def test_other_ranks_wait_for_rank_zero_then_load(cold: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """A shard of rank > 0 waits for rank 0's file instead of compiling the same graphs at once:
    the file appears only once the waiter says it is waiting; it then loads it and compiles nothing."""
    blob = next(cold[0].glob("tta-*.bin"))
    store = tmp_path / "store"
    p = subprocess.Popen([sys.executable, str(JOB), str(store), "1"], env=_env(tmp_path, "inductor_b"), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in p.stderr:  # until the waiter announces that it waits
            seen.append(line)
            if "waits up to" in line:
                break
        else:
            pytest.fail("the rank-1 job never waited: " + "".join(seen)[-2000:])
        time.sleep(3)  # rank 0 "finishes" a little later
        store.mkdir()
        tmp = store / (blob.name + ".tmp")
        tmp.write_bytes(blob.read_bytes())
        tmp.replace(store / blob.name)
        out, err = p.communicate(timeout=900)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    waiter = json.loads(out.strip().splitlines()[-1])
    assert waiter["record"]["compile_cache_waited_s"] >= 2
    assert waiter["record"]["compile_cache_hit"] is True
    assert waiter["inductor"].get("fxgraph_cache_miss", 0) == 0, waiter["inductor"]


def test_key_follows_what_the_compiled_pass_depends_on() -> None:
    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.compile_cache import cache_key
    from tests.gpu.test_fast import _tiny

    _, _, model = _tiny(4)
    base = InferSettings(slab_tokens=512)
    k = cache_key(model, base)
    assert k == cache_key(model, InferSettings(slab_tokens=512, batch_size=3))  # not read by the pass
    assert k != cache_key(model, InferSettings(slab_tokens=1024))
    assert k != cache_key(model, InferSettings(slab_tokens=512, fp8="mlp"))
    model.config.num_hidden_layers += 1
    assert k != cache_key(model, base)


def test_key_follows_the_flex_kernel_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled graphs bake in flex's kernel options (packing.flex_kernel_options): a file
    compiled with another tile must not be taken for this one."""
    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu import packing
    from arena_assets.gpu.compile_cache import cache_key
    from tests.gpu.test_fast import _tiny

    _, _, model = _tiny(4)
    hd = packing.model_head_dim(model)
    infer = InferSettings(slab_tokens=512)
    monkeypatch.setattr(packing, "_FLEX_OPTS", {hd: None})
    k = cache_key(model, infer)
    monkeypatch.setattr(packing, "_FLEX_OPTS", {hd: {"fwd_BLOCK_M": 128}})
    assert cache_key(model, infer) != k


def test_a_corrupt_file_costs_a_compile_not_the_run(tmp_path: Path) -> None:
    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.compile_cache import _OPENED, cache_key, open_cache
    from tests.gpu.test_fast import _tiny

    _, _, model = _tiny(4)
    infer = InferSettings(slab_tokens=512, compile_cache=str(tmp_path))
    (tmp_path / f"tta-{cache_key(model, infer)}.bin").write_bytes(b"not a cache")
    _OPENED.clear()
    try:
        cc = open_cache(model, infer)
    finally:
        _OPENED.clear()
    assert cc is not None and cc.loaded is False
    assert "compile_cache_error" in cc.record


@pytest.mark.parametrize("env", [False, True])
def test_no_folder_no_cache(env: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from arena_assets.core.settings import InferSettings
    from arena_assets.gpu.compile_cache import cache_folder

    monkeypatch.delenv("ARENA_COMPILE_CACHE", raising=False)
    if env:
        monkeypatch.setenv("ARENA_COMPILE_CACHE", str(tmp_path))
    assert cache_folder(InferSettings()) == (tmp_path if env else None)
