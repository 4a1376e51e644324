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


# --- issue 15: a fixed packed slab must hold a whole batch ----------------------------------------
def test_a_packed_slab_smaller_than_a_batch_is_refused() -> None:
    """``pack`` raises "do not fit a slab" at the first batch whose rows are long: hours into a
    GPU run. The settings refuse that slab when they are built, and the message says the minimum."""
    from arena_assets.core.settings import TrainSettings

    with pytest.raises(ValueError, match=r"packing_slab_tokens=1000\b.*at least 1024\b"):
        TrainSettings(packing=True, packing_slab_tokens=1000, per_device_batch_size=4, max_length=256)
    # exactly a batch at max_length fits
    ok = TrainSettings(packing=True, packing_slab_tokens=1024, per_device_batch_size=4, max_length=256)
    assert ok.packing_slab_tokens == 1024
    # no packing, or a slab sized per batch (None), is never checked
    assert TrainSettings(packing=False, packing_slab_tokens=8, per_device_batch_size=4, max_length=256).packing is False
    assert TrainSettings(packing=True, packing_slab_tokens=None, per_device_batch_size=4,
                         max_length=256).packing_slab_tokens is None


def test_a_settings_file_with_a_too_small_slab_names_the_key(tmp_path: Path) -> None:
    """Through ``load_settings``: the error names the file's key path and the minimum slab
    (the student's default batch x length), so the fix is obvious from the message."""
    t = Settings().student.train
    need = t.per_device_batch_size * t.max_length
    text = f"student:\n  train:\n    packing: true\n    packing_slab_tokens: {need - 1}\n"
    with pytest.raises(ValueError, match=rf"student\.train.*packing_slab_tokens={need - 1}\b.*at least {need}\b"):
        load_settings(_write(tmp_path, text))
    s = load_settings(_write(tmp_path, text.replace(str(need - 1), str(need))))
    assert s.student.train.packing_slab_tokens == need
