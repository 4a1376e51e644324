"""The settings file: nested partial overrides keep the parent's defaults; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from arena_assets.core.settings import Settings, load_settings, settings_hash


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "arena.yaml"
    p.write_text(text)
    return p


def test_partial_nested_block_keeps_the_parents_default(tmp_path: Path) -> None:
    default = Settings()
    s = load_settings(_write(tmp_path, "teacher:\n  train:\n    seed: 7\n"))
    assert s.teacher.train.seed == 7
    # the teacher's own default learning rate, not TrainSettings' class default
    assert s.teacher.train.learning_rate == default.teacher.train.learning_rate
    assert s.student == default.student


def test_dict_fields_are_replaced_not_merged(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, "families:\n  qwen: {tiny: {arch: llama}}\n  gemma: {}\n"
                                       "teacher_families: [qwen]\n"))
    assert set(s.families) == {"qwen", "gemma"}


def test_defaults_file_equals_no_file(tmp_path: Path) -> None:
    a = load_settings(_write(tmp_path, "{}\n"))
    b = Settings(base_dir=str(tmp_path))
    assert settings_hash(a.for_step("student")) == settings_hash(b.for_step("student"))


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"student\.kd\.alpah"):
        load_settings(_write(tmp_path, "student:\n  kd:\n    alpah: 0.3\n"))


def test_undefined_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen"):
        load_settings(_write(tmp_path, "teacher_families: [qwen]\n"))
