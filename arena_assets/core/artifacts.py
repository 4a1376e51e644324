"""Immutable, versioned artifacts: atomic, durable and contained writes.

Layout (design.md)::

    <root>/<asset key>/<partition or _>/<version>/...     never reused, never modified
    <root>/<asset key>/<partition or _>/latest -> <version>

**Atomic and durable.** A step writes into a hidden temporary sibling ``.tmp-<version>-<hex>``
and renames it into place only when it is complete (:func:`staged_dir`): before the rename every
file and directory in it is fsynced, after it the parent directory, so after a SIGKILL or a power
loss the version directory is either absent or holds complete files. One file
(:func:`atomic_write_bytes`, :func:`atomic_path`): temp file, fsync, ``os.replace``, fsync of the
parent. The ``latest`` pointer is a symlink swapped with ``os.replace`` and the parent fsynced
(:func:`set_latest`): readers see either the old or the new version.

**What readers see.** A version is complete once ``provenance.json`` (:data:`PROVENANCE_FILE`,
written by the asset's commit in assets/common.py after the step's rename) is in it. Readers
follow only such versions (``common.resolve_upstream`` requires it; ``latest`` is switched after
it is written). A version directory without provenance -- its orchestrator died, or failed (a
full disk), between the step's rename and the commit -- is invisible: never ``latest``, never
resolved, never in the seed layout. Why not write the provenance inside the staged directory
before the rename: it records the verdict of the blocking checks, which the asset body computes
from the renamed version, often after the step ran in another process (a Slurm job). Such an
orphan is kept a while, not removed at once: a retried Dagster run of the same root run adopts a
completed Slurm job's output and commits it (resources/slurm.py re-attachment), so it is swept
only once its opener is provably dead and it is older than :func:`orphan_grace_s` (7 days).

**Owners and the sweep.** Whoever may still write something records itself (pid, host, boot id,
pid namespace, process start time, ``SLURM_JOB_ID``): the staging process next to its
temporary directory (``.tmp-<version>-<hex>.owner``, written before the directory exists), the
process that opened a version (``.claim-<version>``, :func:`new_version_dir`; dropped when the
version is committed -- :func:`set_latest`, or the sweep once provenance is there -- or when its
step fails in :func:`staged_dir`).
:func:`sweep` (run by :func:`new_version_dir`, so each new materialization of an asset partition
tidies that partition) removes a temporary directory only when its owner is provably dead -- a
process of this host (same boot, same pid namespace) that no longer exists, is a zombie or whose
pid was reused; a host that rebooted since; or a Slurm job ``sacct`` reports ended -- and it is
older than :func:`sweep_grace_s`. An owner it cannot check (another host without a Slurm job id,
a temporary directory of a writer older than owner records) is kept and named in a warning.

**Contained.** Everything written under the root stays under it, symlinks included: the asset
folders of :func:`new_version_dir`, the ``latest`` pointer :func:`latest` follows and the seed
layout links (assets/seed_view.py) resolve inside ``root.resolve()`` or are refused with
:class:`OutsideArtifactRoot` naming the path. (Reading inputs such as a checkpoint from any
configured path stays allowed.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LATEST = "latest"
PROVENANCE_FILE = "provenance.json"
"""The file that makes a version complete (written by ``assets/common.Materialization.commit``)."""
TMP_PREFIX = ".tmp-"
OWNER_SUFFIX = ".owner"
CLAIM_PREFIX = ".claim-"
TRASH_PREFIX = ".trash-"
SWEEP_GRACE_ENV = "ARENA_SWEEP_GRACE_S"
STRAY_LINK_MIN_AGE_S = 600.0
"""A temporary link of ``set_latest`` or the seed view lives microseconds (symlink, then replace)
and records no owner: one left behind is removed only when older than this, whatever the grace."""
ORPHAN_GRACE_ENV = "ARENA_ORPHAN_GRACE_S"
SLURM_ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                         "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED"})
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class OutsideArtifactRoot(ValueError):
    """A path the code would write (or a pointer it would follow) resolves outside the root."""

    def __init__(self, action: str, path: str | os.PathLike[str], resolved: Path, root: Path) -> None:
        self.path, self.resolved, self.root = Path(path), resolved, root
        super().__init__(f"refusing to {action} {path}: it resolves to {resolved}, outside the artifact root "
                         f"{root} (a symlink under the root points outside it; remove it)")


class NoSpaceLeft(OSError):
    """The disk (or quota) filled up while writing an artifact; nothing partial was made visible."""


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text


def _disk_full(e: BaseException, what: str, where: Path) -> NoSpaceLeft:
    free = ""
    with contextlib.suppress(OSError):
        free = f", {shutil.disk_usage(where).free / 2**20:.1f} MiB free there now"
    code = e.errno if isinstance(e, OSError) and e.errno in _DISK_FULL else errno.ENOSPC
    return NoSpaceLeft(code, f"no space left on the device (or quota) of {where}{free} while writing {what}: "
                             "nothing partial was made visible, the previous version stays current")


# --------------------------------------------------------------------------------------------
# Containment
# --------------------------------------------------------------------------------------------
def ensure_inside(root: str | os.PathLike[str], path: str | os.PathLike[str], action: str = "write") -> Path:
    """``path`` resolved (every existing symlink followed, dangling ones too); raises
    :class:`OutsideArtifactRoot` unless it lies inside ``root.resolve()``."""
    r = Path(root).resolve()
    p = Path(path).resolve()
    if not p.is_relative_to(r):
        raise OutsideArtifactRoot(action, path, p, r)
    return p


# --------------------------------------------------------------------------------------------
# Durability
# --------------------------------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory (its entries: a rename or a new file in it survives a power loss).
    File systems that cannot fsync a directory (EINVAL/ENOTSUP) are tolerated."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every regular file and directory under ``path`` (or the file ``path``); symlinks are
    not followed."""
    p = Path(path)
    if p.is_symlink():
        return
    if not p.is_dir():
        fsync_file(p)
        return
    for dirpath, _dirs, files in os.walk(p, topdown=False):
        for f in files:
            fp = os.path.join(dirpath, f)
            if not os.path.islink(fp) and os.path.isfile(fp):
                fsync_file(fp)
        fsync_dir(dirpath)


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` whose new directories are durable (each new one's parent fsynced)."""
    path = Path(path)
    new: list[Path] = []
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        new.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in new:
        fsync_dir(d.parent)
    return path


# --------------------------------------------------------------------------------------------
# Owners: who may still write something, and is it provably dead
# --------------------------------------------------------------------------------------------
def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, or None when it does not exist;
    raises OSError where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def owner_record() -> dict[str, Any]:
    """This process as the owner of something it writes."""
    pid = os.getpid()
    start = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        st = _proc_stat(pid)
        start = st[1] if st else None
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "pidns": _pidns(), "start": start,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None, "created": time.time()}


def _write_owner(path: Path) -> None:
    """Create ``path`` (exclusively) holding :func:`owner_record`."""
    data = json.dumps(owner_record(), sort_keys=True).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def read_owner(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "pid" in rec and "host" in rec else None


def slurm_job_state(job_id: str) -> str | None:
    """The job's state as ``sacct`` reports it (``COMPLETED``, ``RUNNING``, ...), or None when sacct
    is missing, fails or does not know the job."""
    exe = shutil.which("sacct")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-X", "-n", "-P", "-o", "State", "-j", str(job_id)], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        if line.strip():
            return line.split()[0].rstrip("+")
    return None


def owner_state(owner: dict[str, Any] | None, _cache: dict[str, str | None] | None = None) -> tuple[str, str]:
    """``("dead" | "alive" | "unknown", why)`` of an owner record; "dead" only when provable."""
    if owner is None:
        return "unknown", "no owner record"
    pid, host = owner.get("pid"), owner.get("host")
    if host == socket.gethostname():
        boot = _boot_id()
        if owner.get("boot_id") and boot and owner["boot_id"] != boot:
            return "dead", f"{host} rebooted since pid {pid} wrote it"
        if owner.get("pidns") == _pidns():
            try:
                st = _proc_stat(int(pid))
            except (OSError, ValueError, IndexError):  # no /proc: the signal test
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    return "dead", f"pid {pid} on {host} no longer exists"
                except OSError:
                    pass
                return "alive", f"pid {pid} on {host} is alive"
            if st is None:
                return "dead", f"pid {pid} on {host} no longer exists"
            if st[0] in ("Z", "X"):
                return "dead", f"pid {pid} on {host} has exited"
            if owner.get("start") is not None and st[1] != owner["start"]:
                return "dead", f"pid {pid} on {host} exited (the pid now belongs to another process)"
            return "alive", f"pid {pid} on {host} is alive"
    job = owner.get("slurm_job_id")
    if job:
        cache = {} if _cache is None else _cache
        if str(job) not in cache:
            cache[str(job)] = slurm_job_state(str(job))
        state = cache[str(job)]
        if state is None:
            return "unknown", f"Slurm job {job} (host {host}): sacct does not say whether it ended"
        if state in SLURM_ENDED:
            return "dead", f"Slurm job {job} ended ({state})"
        return "alive", f"Slurm job {job} is {state}"
    return "unknown", f"written by pid {pid} on {host}, which cannot be checked from {socket.gethostname()}"


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------
def new_version() -> str:
    """A time-ordered unique version id, e.g. ``20261126T043012Z-3f9a1c``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def asset_dir(root: str | os.PathLike[str], asset_key: str, partition: str | None = None) -> Path:
    """``<root>/<asset key>/<partition or _>``; asset keys with ``/`` become nested folders."""
    return Path(root) / asset_key / (partition if partition is not None else "_")


def new_version_dir(root: str | os.PathLike[str], asset_key: str, partition: str | None = None,
                    sweep_stale: bool = True) -> Path:
    """A fresh (not yet existing) version directory for one materialization, claimed by this
    process (``.claim-<version>``); the asset partition's folder must resolve inside ``root``.
    Sweeps the partition's stale temporary folders first (:func:`sweep`)."""
    d = asset_dir(root, asset_key, partition)
    ensure_inside(root, d, f"create versions of {asset_key} in")
    make_dirs(d)
    ensure_inside(root, d, f"create versions of {asset_key} in")
    if sweep_stale:
        _sweep_quietly(d)
    while True:
        name = new_version()
        v = d / name
        if v.exists():
            continue
        try:
            _write_owner(d / f"{CLAIM_PREFIX}{name}")
        except FileExistsError:
            continue
        except OSError as e:
            if _is_disk_full(e):
                raise _disk_full(e, f"the claim of a new version of {asset_key}", d) from e
            raise
        return v


def latest(root: str | os.PathLike[str], asset_key: str, partition: str | None = None) -> Path | None:
    """The current version directory of an asset partition, or None; a ``latest`` resolving
    outside the root is refused (:class:`OutsideArtifactRoot`)."""
    link = asset_dir(root, asset_key, partition) / LATEST
    if not link.exists():
        return None
    return ensure_inside(root, link, "follow")


def set_latest(version_dir: str | os.PathLike[str]) -> Path:
    """Point ``latest`` at ``version_dir`` atomically and durably (relative symlink + os.replace +
    fsync of the folder)."""
    v = Path(version_dir)
    if not v.is_dir():
        raise FileNotFoundError(f"cannot point latest at {v}: not a complete version directory")
    tmp = v.parent / f".{LATEST}.{secrets.token_hex(4)}"
    try:
        os.symlink(v.name, tmp)
        os.replace(tmp, v.parent / LATEST)
    except BaseException as e:
        _unlink_quiet(tmp)
        if _is_disk_full(e):
            raise _disk_full(e, f"the latest pointer of {v.parent}", v.parent) from e
        raise
    fsync_dir(v.parent)  # the pointer is switched: a failure here is raised as it is
    _unlink_quiet(v.parent / f"{CLAIM_PREFIX}{v.name}")  # committed: its opener's claim is done
    return v.parent / LATEST


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block completes.

    The owner (this process) is recorded before the directory exists; on success every file and
    folder in it is fsynced, it is renamed to ``final`` and the parent fsynced. On an exception the
    temporary directory is removed and ``final`` is untouched; a full disk raises
    :class:`NoSpaceLeft`. ``final`` must not exist yet (versions are never reused).
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} exists: artifact versions are immutable")
    parent = make_dirs(final.parent)
    tmp = parent / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    owner = parent / (tmp.name + OWNER_SUFFIX)
    try:
        _write_owner(owner)
        try:
            tmp.mkdir()
        except BaseException:
            _unlink_quiet(owner)
            raise
    except BaseException as e:
        if _is_disk_full(e):
            raise _disk_full(e, f"version {final.name}", parent) from e
        raise
    try:
        yield tmp
        fsync_tree(tmp)
        os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlink_quiet(owner)
        _unlink_quiet(parent / f"{CLAIM_PREFIX}{final.name}")  # this version will never exist
        if _is_disk_full(e):
            raise _disk_full(e, f"version {final.name} of {final.parent}", parent) from e
        raise
    _unlink_quiet(owner)
    try:
        fsync_dir(parent)
    except OSError as e:  # renamed, not committed: still invisible to readers
        if _is_disk_full(e):
            raise _disk_full(e, f"version {final.name} of {final.parent}", parent) from e
        raise


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file + fsync + rename + fsync of the folder
    (never a partial file; a full disk raises :class:`NoSpaceLeft` and leaves ``path`` as it was)."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        _unlink_quiet(tmp)
        if _is_disk_full(e):
            raise _disk_full(e, str(path), path.parent) from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a library writer (``df.to_parquet(tmp)``); fsynced
    (a file or a whole folder) and renamed onto ``path`` only if the block completes."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
    try:
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _unlink_quiet(tmp)
        if _is_disk_full(e):
            raise _disk_full(e, str(path), path.parent) from e
        raise


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def sweep_grace_s() -> float:
    """Minimum age of a dead writer's temporary folder before it is removed (``ARENA_SWEEP_GRACE_S``,
    default 1 hour: slack for clocks and shared-filesystem caches, not a liveness guess)."""
    return _env_seconds(SWEEP_GRACE_ENV, 3600.0)


def orphan_grace_s() -> float:
    """Minimum age of a version without provenance whose opener is dead before it is removed
    (``ARENA_ORPHAN_GRACE_S``, default 7 days: a retried run may still adopt it)."""
    return _env_seconds(ORPHAN_GRACE_ENV, 7 * 86400.0)


@dataclass
class SweepReport:
    removed: list[str] = field(default_factory=list)
    kept: list[tuple[str, str, str]] = field(default_factory=list)
    """(name, owner state: alive | unknown | dead, why) of temporary folders and orphans left in place."""


def _mtime(path: Path, *, ctime: bool = False) -> float:
    try:
        st = os.lstat(path)
    except OSError:
        return 0.0
    return max(st.st_mtime, st.st_ctime) if ctime else st.st_mtime


def _discard(d: Path, name: str) -> None:
    """Rename ``d/name`` to a ``.trash-`` folder (gone from view at once), then delete it."""
    trash = d / f"{TRASH_PREFIX}{name.lstrip('.')}-{secrets.token_hex(3)}"
    try:
        os.rename(d / name, trash)
    except FileNotFoundError:
        return  # another sweeper got it
    shutil.rmtree(trash, ignore_errors=True)


def sweep(partition_dir: str | os.PathLike[str], grace_s: float | None = None,
          orphan_grace_s_: float | None = None) -> SweepReport:
    """Remove what dead writers left in one asset partition's folder (see the module doc):
    ``.tmp-*`` folders (and their owner files) of provably dead owners older than ``grace_s``;
    versions without provenance whose opener is provably dead, older than ``orphan_grace_s_``;
    claims of committed versions; stray ``.latest.*`` links; ``.trash-*`` leftovers. Never touches
    anything of a live or unverifiable owner."""
    d = Path(partition_dir)
    grace = sweep_grace_s() if grace_s is None else grace_s
    orphan_grace = orphan_grace_s() if orphan_grace_s_ is None else orphan_grace_s_
    now = time.time()
    cache: dict[str, str | None] = {}
    rep = SweepReport()
    try:
        entries = list(os.scandir(d))
    except FileNotFoundError:
        return rep
    names = {e.name for e in entries}
    entries.sort(key=lambda e: e.name.startswith(CLAIM_PREFIX))  # claims last: they look at what is left
    for e in entries:
        n = e.name
        if not n.startswith("."):
            continue
        if n.startswith(TRASH_PREFIX):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)  # a sweep killed while deleting
            else:
                _unlink_quiet(Path(e.path))
            rep.removed.append(n)
        elif n.startswith(TMP_PREFIX) and n.endswith(OWNER_SUFFIX):
            if n[: -len(OWNER_SUFFIX)] in names:
                continue  # judged with its folder
            # no folder: its writer died before making it or after renaming it. An unreadable
            # record is one whose writer died while writing it (it is written before the folder).
            owner = read_owner(e.path)
            state = owner_state(owner, cache)[0] if owner is not None else "dead"
            if state == "dead" and now - _mtime(Path(e.path)) >= grace:
                _unlink_quiet(Path(e.path))
                rep.removed.append(n)
        elif n.startswith(TMP_PREFIX) and e.is_dir(follow_symlinks=False):
            owner_file = d / (n + OWNER_SUFFIX)
            owner = read_owner(owner_file)
            state, why = owner_state(owner, cache)
            if owner is None:
                why = "no owner record (written before owners were recorded): remove it by hand once no job writes it"
            age = now - max(_mtime(Path(e.path)), _mtime(owner_file))
            if state == "dead" and age >= grace:
                _discard(d, n)
                _unlink_quiet(owner_file)
                names.discard(n)
                rep.removed.append(n)
            else:
                rep.kept.append((n, state, why if state != "dead" else f"{why}; younger than the grace period ({grace:.0f} s)"))
        elif n.startswith(CLAIM_PREFIX):
            version = n[len(CLAIM_PREFIX):]
            vdir = d / version
            if (vdir / PROVENANCE_FILE).is_file():
                _unlink_quiet(Path(e.path))  # committed: nobody needs the claim any more
                continue
            claim = read_owner(e.path)
            state, why = owner_state(claim, cache)
            if claim is None and not vdir.exists():
                state = "dead"  # its opener died while writing it (it writes it before anything else)
            if state != "dead":
                continue  # its opener may still commit it
            if not vdir.exists():
                if not any(x.startswith(f"{TMP_PREFIX}{version}-") for x in names) and now - _mtime(Path(e.path)) >= grace:
                    _unlink_quiet(Path(e.path))  # the opener died before its step produced the version
                continue
            age = now - max(_mtime(Path(e.path)), _mtime(vdir, ctime=True))
            if age >= orphan_grace:
                _discard(d, version)
                _unlink_quiet(Path(e.path))
                rep.removed.append(version)
            else:
                rep.kept.append((version, state, (f"a version without provenance (never read) whose opener is dead "
                                                  f"({why}); kept {orphan_grace:.0f} s for a retried run to adopt")))
        elif (n.startswith(f".{LATEST}.") and e.is_symlink()
              and now - _mtime(Path(e.path)) >= max(grace, STRAY_LINK_MIN_AGE_S)):
            _unlink_quiet(Path(e.path))  # set_latest killed between symlink and replace
            rep.removed.append(n)
    return rep


_WARNED: set[str] = set()


def _sweep_quietly(d: Path) -> None:
    """:func:`sweep` for :func:`new_version_dir`: logs, never fails a materialization."""
    try:
        rep = sweep(d)
    except Exception as e:  # noqa: BLE001 - tidying must never fail a materialization
        log.warning("sweeping %s failed: %s", d, e)
        return
    if rep.removed:
        log.info("removed what dead writers left in %s: %s", d, ", ".join(rep.removed))
    for name, state, why in rep.kept:  # once per process and folder: it is looked at on every new version
        key = f"{d}/{name}"
        if key not in _WARNED:
            _WARNED.add(key)
            (log.warning if state == "unknown" else log.info)("left %s in place: %s", d / name, why)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Content hash of a file: the data version of an observed source."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
