"""A crash at any instant loses nothing (issue 16): real writers SIGKILLed at every file-system call,
ENOSPC at every write, a real full tmpfs, fsync before every rename, and the sweep of what dead
writers leave (never what a live one still writes).

The writer is tests/core/crash_writer.py: the step protocol (staged_dir/step_output) and the real
``Materialization.commit`` for one version of ``fold_data[0]``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from arena_assets.core import artifacts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_writer as cw

WRITER = Path(cw.__file__).resolve()
PROVENANCE = "provenance.json"


def _pdir(root: Path) -> Path:
    return artifacts.asset_dir(root, cw.KEY, cw.PART)


def assert_readers_see_complete(root: Path, expect_latest: Path | None = None) -> list[Path]:
    """What a reader can resolve is complete: ``latest``, every version with provenance (what
    resolve_upstream may pick) and every seed-layout link. Returns the invisible versions (no
    provenance) found on disk."""
    lat = artifacts.latest(root, cw.KEY, cw.PART)
    assert lat is not None and cw.complete(lat), f"latest {lat} is not a complete version"
    if expect_latest is not None:
        assert lat == expect_latest.resolve(), f"latest moved to {lat.name}, expected {expect_latest.name}"
    invisible = []
    for v in _pdir(root).iterdir():
        if v.name.startswith(".") or v.name == artifacts.LATEST:
            continue
        if (v / PROVENANCE).exists():
            assert cw.complete(v), f"{v.name} has provenance but is not complete"
        else:
            invisible.append(v)
            assert v.resolve() != lat
    for name in ("fold_0_train.parquet", "fold_0_valid.parquet"):
        link = root / "seed_layout" / "data" / "fold_data" / name
        if link.exists():
            assert cw.complete(link.resolve().parent), f"{link} points into an incomplete version"
    return invisible


def age_stray_links(root: Path) -> None:
    """Backdate the temporary links of killed set_latest/seed-view calls past
    artifacts.STRAY_LINK_MIN_AGE_S (they record no owner; only their age says they are stale)."""
    old = time.time() - getattr(artifacts, "STRAY_LINK_MIN_AGE_S", 600) - 60
    for d in (_pdir(root), root / "seed_layout" / "data" / "fold_data"):
        for p in d.glob(".*") if d.is_dir() else []:
            if p.is_symlink():
                os.utime(p, (old, old), follow_symlinks=False)


def leftovers(root: Path) -> list[str]:
    """What the sweep must have removed once every writer is dead."""
    d = _pdir(root)
    out = [p.name for p in d.iterdir() if p.name.startswith((".tmp-", ".claim-", ".trash-", ".latest."))]
    out += [p.name for p in d.iterdir() if not p.name.startswith(".") and p.name != "latest"
            and not (p / PROVENANCE).exists()]
    return sorted(out)


# --------------------------------------------------------------------------------------------
# SIGKILL at every file-system call
# --------------------------------------------------------------------------------------------
def _fork_writer_killed_at(root: Path, tag: str, n: int | Callable[[int, str, str], bool], marker: Path) -> bool:
    """Fork a writer that pauses before its n-th file-system call (or the first one ``n`` selects);
    SIGKILL it there. False when it finished before reaching it."""
    marker.unlink(missing_ok=True)
    at = n if callable(n) else (lambda i, op, path: i == n)
    pid = os.fork()
    if pid == 0:  # the writer
        code = 0
        try:
            def hook(i: int, op: str, path: str) -> None:
                if at(i, op, path):
                    fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644)
                    os.write(fd, f"{op} {path}".encode())
                    os.close(fd)
                    time.sleep(600)

            with cw.FsOps(hook):
                cw.write_version(root, tag)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    deadline = time.time() + 60
    while time.time() < deadline:
        if marker.exists():
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, f"writer {tag} failed (see its traceback above)"
            return False
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"writer {tag} neither paused at call {n} nor finished")


def test_sigkill_at_every_call_loses_nothing_and_the_sweep_cleans_up(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    v0 = cw.write_version(root, "v0")
    with cw.FsOps() as count:  # how many calls one more version makes (dirs exist by now)
        cw.write_version(tmp_path / "count", "c0")
        n0 = count.n
        cw.write_version(tmp_path / "count", "c1")
        total = count.n - n0
    assert total > 30, count.trace
    marker = tmp_path / "paused"
    current = v0
    kills = 0
    for n in range(1, total + 1):
        if not _fork_writer_killed_at(root, f"k{n}", n, marker):
            break
        kills += 1
        try:
            assert_readers_see_complete(root)
        except AssertionError as e:
            raise AssertionError(f"killed before call {n} ({marker.read_text()}): {e}") from e
        current = artifacts.latest(root, cw.KEY, cw.PART)
    assert kills >= total - 2, f"only {kills} of {total} kill points reached"
    # every writer is dead: the sweep removes what they left (temporary folders, claims, versions
    # they renamed but never committed) and nothing of a complete version
    def complete_versions() -> list[str]:
        return sorted(p.name for p in _pdir(root).iterdir()
                      if not p.is_symlink() and not p.name.startswith(".") and cw.complete(p))

    complete_before = complete_versions()
    assert leftovers(root), "the kills left nothing to sweep: the test did not kill mid-write"
    age_stray_links(root)
    artifacts.sweep(_pdir(root), grace_s=0, orphan_grace_s_=0)
    artifacts.sweep(_pdir(root), grace_s=0, orphan_grace_s_=0)
    assert leftovers(root) == []
    assert complete_versions() == complete_before
    assert_readers_see_complete(root, current)
    # a re-run succeeds and becomes current; its commit drops the seed view's stale temporary links
    os.environ[artifacts.SWEEP_GRACE_ENV] = "0"
    try:
        v = cw.write_version(root, "rerun")
    finally:
        del os.environ[artifacts.SWEEP_GRACE_ENV]
    assert_readers_see_complete(root, v)
    seed = root / "seed_layout" / "data" / "fold_data"
    assert sorted(p.name for p in seed.iterdir()) == ["fold_0_train.parquet", "fold_0_valid.parquet"]


def _spawn_writer(root: Path, tag: str, pause: str, marker: Path) -> subprocess.Popen[bytes]:
    import arena_assets

    env = dict(os.environ, CRASH_PAUSE=pause, CRASH_MARKER=str(marker),
               PYTHONPATH=str(Path(arena_assets.__file__).resolve().parents[1]))
    marker.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, str(WRITER), str(root), tag], env=env)
    deadline = time.time() + 120
    while not marker.exists():
        if p.poll() is not None:
            raise AssertionError(f"writer exited {p.returncode} before pausing at {pause}")
        if time.time() > deadline:
            p.kill()
            raise AssertionError(f"writer did not reach {pause}")
        time.sleep(0.02)
    return p


@pytest.mark.parametrize("pause", [
    "write:train:2",          # mid-way through a library writer's file in the staged folder
    "rename::1",              # the staged folder complete, not yet renamed
    "open:provenance:1",      # renamed into place, no provenance yet (an invisible version)
    "replace:latest:1",       # committed, latest not yet switched
    "symlink:fold_0_valid:1",  # latest switched, the seed view half updated
])
def test_sigkilled_writer_process(tmp_path: Path, pause: str) -> None:
    """A separate interpreter writing a version, SIGKILLed at a chosen call; a live writer's
    folder is never swept, a dead one's is."""
    root = tmp_path / "artifacts"
    v0 = cw.write_version(root, "v0")
    p = _spawn_writer(root, "killed", pause, tmp_path / "paused")
    try:
        alive = artifacts.sweep(_pdir(root), grace_s=0, orphan_grace_s_=0)
        assert alive.removed == [], f"the sweep removed what a live writer owns: {alive.removed}"
        assert_readers_see_complete(root)
        if pause.startswith(("write", "rename")):
            assert [n for n, state, _ in alive.kept if state == "alive"], alive.kept
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    lat_before = artifacts.latest(root, cw.KEY, cw.PART)
    assert_readers_see_complete(root)
    if pause.startswith(("write", "rename", "open")):
        assert lat_before == v0.resolve()
    age_stray_links(root)
    artifacts.sweep(_pdir(root), grace_s=0, orphan_grace_s_=0)
    artifacts.sweep(_pdir(root), grace_s=0, orphan_grace_s_=0)
    assert leftovers(root) == []
    assert_readers_see_complete(root, lat_before)
    v = cw.write_version(root, "rerun")
    assert_readers_see_complete(root, v)


def test_default_grace_keeps_a_young_dead_writers_folder(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    cw.write_version(root, "v0")
    assert _fork_writer_killed_at(root, "k", lambda i, op, path: op == "write" and "train" in path,
                                  tmp_path / "paused")
    rep = artifacts.sweep(_pdir(root))
    assert not any(n.startswith(".tmp-") for n in rep.removed)
    assert any(n.startswith(".tmp-") and state == "dead" for n, state, _ in rep.kept), rep.kept
    os.environ[artifacts.SWEEP_GRACE_ENV] = "0"
    try:  # the sweep a new version runs, with no grace: the dead writer's folder goes
        cw.write_version(root, "v1")
    finally:
        del os.environ[artifacts.SWEEP_GRACE_ENV]
    assert not [p for p in _pdir(root).iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------------------------
# Owners the sweep cannot or can check
# --------------------------------------------------------------------------------------------
def _fake_tmp(d: Path, name: str, owner: dict | None, age_s: float = 10_000) -> Path:
    t = d / f".tmp-{name}-00000000"
    (t / "model").mkdir(parents=True)
    (t / "model" / "w.bin").write_bytes(b"x" * 1000)
    if owner is not None:
        (d / (t.name + ".owner")).write_text(json.dumps(owner))
    old = time.time() - age_s
    for p in (t, d / (t.name + ".owner")):
        if p.exists():
            os.utime(p, (old, old))
    return t


def _fake_sacct(tmp_path: Path, state: str) -> str:
    b = tmp_path / "bin"
    b.mkdir(exist_ok=True)
    s = b / "sacct"
    s.write_text(f"#!/bin/sh\necho '{state}'\n")
    s.chmod(0o755)
    return str(b)


@pytest.mark.parametrize("state,removed", [("RUNNING", False), ("PENDING", False), ("COMPLETED", True),
                                           ("CANCELLED by 0", True), ("NODE_FAIL", True), (None, False)])
def test_sweep_asks_sacct_about_a_slurm_owner_on_another_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             state: str | None, removed: bool) -> None:
    d = tmp_path / "a" / "_"
    d.mkdir(parents=True)
    owner = {"pid": 4242, "host": "gpu-node-17", "boot_id": "x", "pidns": "y", "start": 1, "slurm_job_id": "987654"}
    t = _fake_tmp(d, "20260101T000000Z-abcdef", owner)
    monkeypatch.setenv("PATH", _fake_sacct(tmp_path, state) if state else str(tmp_path / "nothing"))
    rep = artifacts.sweep(d, grace_s=60)
    assert t.exists() is not removed, rep
    assert (d / (t.name + ".owner")).exists() is not removed


def test_sweep_keeps_what_it_cannot_prove_dead(tmp_path: Path) -> None:
    d = tmp_path / "a" / "_"
    d.mkdir(parents=True)
    me = artifacts.owner_record()
    legacy = _fake_tmp(d, "20260101T000000Z-000001", None)  # written before owners were recorded
    foreign = _fake_tmp(d, "20260101T000000Z-000002", {"pid": 1, "host": "elsewhere", "slurm_job_id": None})
    live = _fake_tmp(d, "20260101T000000Z-000003", me)
    sibling_ns = _fake_tmp(d, "20260101T000000Z-000004", {**me, "pid": 999_999, "pidns": "pid:[1]"})
    rep = artifacts.sweep(d, grace_s=0)
    assert rep.removed == []
    assert all(p.exists() for p in (legacy, foreign, live, sibling_ns))
    states = {n: s for n, s, _ in rep.kept}
    assert states[live.name] == "alive" and states[legacy.name] == "unknown" and states[foreign.name] == "unknown"


def test_sweep_proves_death_by_pid_reuse_zombie_and_reboot(tmp_path: Path) -> None:
    d = tmp_path / "a" / "_"
    d.mkdir(parents=True)
    me = artifacts.owner_record()
    reused = _fake_tmp(d, "20260101T000000Z-000001", {**me, "start": (me["start"] or 0) + 1})  # my pid, not me
    rebooted = _fake_tmp(d, "20260101T000000Z-000002", {**me, "boot_id": "another-boot"})
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":
        time.sleep(0.01)  # wait until it is a zombie: exited, not yet reaped
    zombie = _fake_tmp(d, "20260101T000000Z-000003", {**me, "pid": child.pid, "start": None})
    young = _fake_tmp(d, "20260101T000000Z-000004", {**me, "boot_id": "another-boot"}, age_s=5)
    rep = artifacts.sweep(d, grace_s=60)
    child.wait()
    assert not reused.exists() and not rebooted.exists() and not zombie.exists()
    assert young.exists(), "a dead writer's folder younger than the grace period is kept"
    assert sorted(rep.removed) == sorted([reused.name, rebooted.name, zombie.name])


# --------------------------------------------------------------------------------------------
# fsync before every rename, the parent after
# --------------------------------------------------------------------------------------------
def test_every_rename_is_preceded_by_fsync_of_what_it_moves_and_followed_by_its_parent(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    cw.write_version(root, "v0")
    synced: set[str] = set()
    renames: list[tuple[str, str, int]] = []
    problems: list[str] = []

    def hook(n: int, op: str, path: str) -> None:
        if op == "fsync":
            synced.add(os.path.realpath(path))
        elif op in ("rename", "replace"):
            src, dst = path.split(" -> ")
            if os.path.islink(src):
                pass  # a symlink (latest, the seed view) carries no data
            elif os.path.isdir(src) and (src := os.path.realpath(src)):
                for dp, _ds, fs in os.walk(src):
                    for p in [dp, *(os.path.join(dp, f) for f in fs)]:
                        if p not in synced:
                            problems.append(f"{op} {Path(src).name} -> {Path(dst).name}: {p} was not fsynced")
            elif os.path.realpath(src) not in synced:
                problems.append(f"{op} {src} -> {dst}: the file was not fsynced")
            renames.append((src, dst, len(ops.trace)))

    with cw.FsOps(hook) as ops:
        cw.write_version(root, "v1")
    assert renames, "no rename seen"
    for src, dst, at in renames:
        parent = os.path.realpath(os.path.dirname(dst))
        later = [os.path.realpath(p) for op, p in ops.trace[at:] if op == "fsync"]
        if parent not in later:
            problems.append(f"after renaming {Path(src).name} onto {dst}, its folder {parent} was never fsynced")
    assert not problems, "\n".join(problems[:20])


def test_parquet_tables_are_fsynced_before_their_rename(tmp_path: Path) -> None:
    import pandas as pd

    from arena_assets.core import contract

    seen: list[str] = []

    def hook(n: int, op: str, path: str) -> None:
        seen.append(op if op != "replace" else f"replace {Path(path.split(' -> ')[1]).name}")

    with cw.FsOps(hook):
        contract.write_table(pd.DataFrame({"id": ["a", "b"], "x": [0.5, 0.25]}), tmp_path / "t.parquet")
    at = seen.index("replace t.parquet")
    assert "fsync" in seen[:at], seen
    assert "fsync" in seen[at:], seen


# --------------------------------------------------------------------------------------------
# ENOSPC at each write
# --------------------------------------------------------------------------------------------
def _raise_enospc_at(n: int, state: dict) -> cw.FsOps:
    def hook(i: int, op: str, path: str) -> None:
        if i == n:
            state["at"] = f"{op} {path}"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        if op == "replace" and path.endswith("/latest"):
            state["latest_switched"] = True  # the call runs right after this hook

    return cw.FsOps(hook, only_writes=True)


def test_enospc_at_each_write_leaves_the_previous_version_current(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    v0 = cw.write_version(root, "v0")
    with cw.FsOps(only_writes=True) as count:
        cw.write_version(tmp_path / "count", "c0")
        n0 = count.n
        cw.write_version(tmp_path / "count", "c1")
        total = count.n - n0
    current = v0
    for n in range(1, total + 1):
        state: dict = {"latest_switched": False}
        before = {p.name for p in _pdir(root).iterdir()}
        try:
            with _raise_enospc_at(n, state):
                v = cw.write_version(root, f"full{n}")
        except OSError as e:
            where = state.get("at")
            assert e.errno == errno.ENOSPC, (where, e)
            if not state["latest_switched"]:
                # nothing visible changed: a clear error that says so
                assert "no space left" in str(e) and "previous version stays current" in str(e), (where, str(e))
                assert isinstance(e, artifacts.NoSpaceLeft), (where, repr(e))
                assert_readers_see_complete(root, current)
            else:  # it failed after latest was switched (fsync, seed view): what is current is complete
                current = artifacts.latest(root, cw.KEY, cw.PART)
                assert_readers_see_complete(root, current)
        else:  # ENOSPC from mkdir of a folder that exists is ignored by mkdir -p: nothing was lost
            assert state["at"].startswith("mkdir"), state["at"]
            current = v
            assert_readers_see_complete(root, current)
        new = {p.name for p in _pdir(root).iterdir()} - before
        assert not [x for x in new if x.startswith((".tmp-", ".trash-", ".latest."))], (where, new)
    v = cw.write_version(root, "after")
    assert_readers_see_complete(root, v)


def test_an_uncommitted_version_left_by_a_full_disk_is_invisible_and_swept_once_its_writer_is_dead(
        tmp_path: Path) -> None:
    """ENOSPC writing provenance.json: the version named like a real one is never read, and the
    sweep removes it once the process that opened it is dead and the orphan grace has passed."""
    root = tmp_path / "artifacts"
    v0 = cw.write_version(root, "v0")
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            def hook(i: int, op: str, path: str) -> None:
                if op == "open" and "provenance" in path:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

            with cw.FsOps(hook, only_writes=True):
                cw.write_version(root, "orphan")
        except OSError as e:
            code = 0 if e.errno == errno.ENOSPC else 2
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    orphans = assert_readers_see_complete(root, v0)
    assert len(orphans) == 1 and (orphans[0] / "result.json").exists()
    kept = artifacts.sweep(_pdir(root), grace_s=0)  # default orphan grace (7 days): a retry may adopt it
    assert orphans[0].exists() and [n for n, s, _ in kept.kept if n == orphans[0].name and s == "dead"]
    rep = artifacts.sweep(_pdir(root), grace_s=0, orphan_grace_s_=0)
    assert orphans[0].name in rep.removed and not orphans[0].exists()
    assert leftovers(root) == []
    assert_readers_see_complete(root, v0)


def test_a_live_openers_uncommitted_version_is_never_swept(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    cw.write_version(root, "v0")

    def hook(i: int, op: str, path: str) -> None:
        if op == "open" and "provenance" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    with cw.FsOps(hook, only_writes=True), pytest.raises(OSError):
        cw.write_version(root, "orphan")
    (orphan,) = [p for p in _pdir(root).iterdir() if not p.name.startswith(".") and p.name != "latest"
                 and not (p / "provenance.json").exists()]
    artifacts.sweep(_pdir(root), grace_s=0, orphan_grace_s_=0)
    assert orphan.exists(), "this process opened it and may still commit it"


# --------------------------------------------------------------------------------------------
# A real full disk (tmpfs)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path):
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here (an environment limit: needs root or CAP_SYS_ADMIN): "
                    f"{(r.stderr or r.stdout).strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_version_that_does_not_fit_on_a_real_full_disk(small_disk: Path) -> None:
    root = small_disk / "artifacts"
    v0 = cw.write_version(root, "v0", size=128 * 1024)
    free_before = shutil.disk_usage(small_disk).free
    with pytest.raises(OSError) as ei:
        cw.write_version(root, "big", size=3 * 2**20)
    msg = str(ei.value)
    assert ei.value.errno == errno.ENOSPC
    assert "no space left" in msg and str(_pdir(root)) in msg and "previous version stays current" in msg, msg
    assert isinstance(ei.value, artifacts.NoSpaceLeft)
    assert_readers_see_complete(root, v0)
    names = [p.name for p in _pdir(root).iterdir()]
    assert [n for n in names if not n.startswith(".") and n != "latest"] == [v0.name], names
    assert not [n for n in names if n.startswith((".tmp-", ".trash-"))], names
    assert shutil.disk_usage(small_disk).free >= free_before - 64 * 1024, "the partial version was not removed"
    # with room again, the next version succeeds
    v1 = cw.write_version(root, "v1", size=128 * 1024)
    assert_readers_see_complete(root, v1)
    assert stat.S_ISLNK(os.lstat(_pdir(root) / "latest").st_mode)


def test_owner_record_names_this_process() -> None:
    rec = artifacts.owner_record()
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
    assert artifacts.owner_state(rec)[0] == "alive"
