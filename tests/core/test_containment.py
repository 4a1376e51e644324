"""Nothing is written outside the artifact root (issue 16): planted symlinks under the root are
refused with an error naming the path, and the files they point at stay untouched; a shared Slurm
folder keeps its mode."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from arena_assets.core import artifacts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_writer as cw


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the root holding a file that must never change."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "fold_0_train.parquet").write_bytes(b"precious")
    return d


def _attempt(fn) -> BaseException | None:  # type: ignore[no-untyped-def]
    """Run ``fn``; its exception (checked after what it did to the disk is), or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _refused(err: BaseException | None, *names: object) -> str:
    assert err is not None, "not refused: the write went through"
    assert isinstance(err, artifacts.OutsideArtifactRoot), repr(err)
    msg = str(err)
    assert "outside the artifact root" in msg and all(str(n) in msg for n in names), msg
    return msg


def _untouched(outside: Path) -> None:
    f = outside / "fold_0_train.parquet"
    assert not f.is_symlink() and f.read_bytes() == b"precious", "a file outside the artifact root was replaced"
    assert sorted(p.name for p in outside.iterdir()) == ["fold_0_train.parquet"], list(outside.iterdir())


@pytest.mark.parametrize("planted", ["seed_layout/data/fold_data", "seed_layout/data", "seed_layout"])
def test_a_symlink_planted_under_the_seed_layout_is_refused(tmp_path: Path, outside: Path, planted: str) -> None:
    """The probe: ``seed_layout/data/fold_data -> /elsewhere`` made a normal fold_data commit replace
    /elsewhere/fold_0_train.parquet with a link."""
    root = tmp_path / "artifacts"
    cw.write_version(root, "v0")
    link = root / planted
    shutil.rmtree(link)  # made by v0's commit; a user (or an attacker) puts a symlink there
    os.symlink(outside, link)
    err = _attempt(lambda: cw.write_version(root, "v1"))
    _untouched(outside)  # neither replaced nor a folder created there
    _refused(err, link, outside.resolve())


def test_latest_pointing_outside_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "artifacts"
    cw.write_version(root, "v0")
    latest = artifacts.asset_dir(root, cw.KEY, cw.PART) / "latest"
    os.unlink(latest)
    os.symlink(os.path.relpath(outside, latest.parent), latest)
    got: list[Path | None] = []
    err = _attempt(lambda: got.append(artifacts.latest(root, cw.KEY, cw.PART)))
    assert not got, f"latest was followed outside the root to {got[0]}"
    _refused(err, latest, outside.resolve())
    os.unlink(latest)
    os.symlink(outside, latest)  # absolute
    _refused(_attempt(lambda: got.append(artifacts.latest(root, cw.KEY, cw.PART))), latest)
    assert not got
    _untouched(outside)


def test_an_asset_folder_pointing_outside_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "artifacts"
    (root / cw.KEY).mkdir(parents=True)
    os.symlink(outside, root / cw.KEY / cw.PART)
    err = _attempt(lambda: cw.write_version(root, "v0"))
    _untouched(outside)
    _refused(err, root / cw.KEY / cw.PART)
    os.unlink(root / cw.KEY / cw.PART)
    os.rmdir(root / cw.KEY)
    os.symlink(outside, root / cw.KEY)  # one level up, the partition folder does not exist yet
    err = _attempt(lambda: cw.write_version(root, "v0"))
    _untouched(outside)
    _refused(err)


def test_a_root_that_is_itself_a_symlink_works(tmp_path: Path) -> None:
    real = tmp_path / "big-disk" / "arena"
    real.mkdir(parents=True)
    root = tmp_path / "artifacts"
    os.symlink(real, root)
    v = cw.write_version(root, "v0")
    assert artifacts.latest(root, cw.KEY, cw.PART) == v.resolve()
    assert (root / "seed_layout/data/fold_data/fold_0_train.parquet").resolve() == (v / "train.parquet").resolve()


def test_links_inside_the_root_are_followed(tmp_path: Path) -> None:
    """Containment is about where a path resolves, not about symlinks as such."""
    root = tmp_path / "artifacts"
    (root / "elsewhere-inside").mkdir(parents=True)
    (root / "seed_layout").mkdir()
    os.symlink(root / "elsewhere-inside", root / "seed_layout" / "data")
    v = cw.write_version(root, "v0")
    link = root / "elsewhere-inside" / "fold_data" / "fold_0_train.parquet"
    assert link.is_symlink() and link.resolve() == (v / "train.parquet").resolve()


# --------------------------------------------------------------------------------------------
# Slurm folders
# --------------------------------------------------------------------------------------------
def test_a_shared_slurm_folder_keeps_its_mode_and_run_folders_are_private(tmp_path: Path) -> None:
    from arena_assets.core.settings import SlurmSettings
    from arena_assets.resources.slurm import SlurmBackend

    shared = tmp_path / "shared-submitit"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    b = SlurmBackend(SlurmSettings(folder=str(shared)), artifact_root=tmp_path / "artifacts")
    run = b.run_folder("run-1")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777, "a shared folder this code did not create was chmodded"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert b.run_folder("run-1") == run and stat.S_IMODE(run.stat().st_mode) == 0o700

    default = SlurmBackend(SlurmSettings(), artifact_root=tmp_path / "artifacts")
    run = default.run_folder("run-2")  # the default folder is created here: private
    assert stat.S_IMODE((tmp_path / "artifacts" / ".submitit").stat().st_mode) == 0o700
    assert stat.S_IMODE(run.stat().st_mode) == 0o700


def test_a_checkpoint_folder_pointing_outside_is_refused(tmp_path: Path, outside: Path) -> None:
    from arena_assets.assets.common import Materialization

    root = tmp_path / "artifacts"
    root.mkdir()
    m = Materialization(root=root, key="student_model", partition="0", code_version="cv",
                        out_dir=artifacts.new_version_dir(root, "student_model", "0"))
    assert m.checkpoint_dir("student").is_relative_to(root)
    os.symlink(outside, root / ".checkpoints")
    got: list[Path] = []
    err = _attempt(lambda: got.append(m.checkpoint_dir("student")))
    assert not got, f"training checkpoints would be written outside the root, into {got[0].resolve()}"
    _refused(err, "checkpoints")
    _untouched(outside)


def test_a_default_submitit_folder_pointing_outside_is_refused(tmp_path: Path, outside: Path) -> None:
    """Slurm job pickles go to ``<root>/.submitit`` unless a folder is configured: a planted
    symlink there must not carry them outside the root (a configured shared folder stays allowed)."""
    from arena_assets.core.settings import SlurmSettings
    from arena_assets.resources.slurm import SlurmBackend

    root = tmp_path / "artifacts"
    root.mkdir()
    os.symlink(outside, root / ".submitit")
    got: list[Path] = []
    err = _attempt(lambda: got.append(SlurmBackend(SlurmSettings(), artifact_root=root).run_folder("run-1")))
    assert not got, f"Slurm pickles would be written outside the root, into {got[0].resolve()}"
    _refused(err, "Slurm")
    _untouched(outside)
