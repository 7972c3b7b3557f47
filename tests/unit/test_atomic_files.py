"""Atomic writes (engine/atomic_files.py): a file is the old or the whole new one; a folder
(an export) is replaced only once the new one is complete, and a failed move keeps the old."""
import pytest

from raytune_llama.engine.atomic_files import (replace_dir, write_atomic, write_bytes_atomic, write_dir_atomic,
                                               write_json_atomic)


def test_a_file_is_replaced_whole_and_no_temp_file_is_left(tmp_path):
    target = tmp_path / "summary.json"
    write_bytes_atomic(target, b"old")
    write_json_atomic(target, {"step": 3})
    assert target.read_text().strip() == '{\n "step": 3\n}' and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_folder_is_swapped_only_when_the_new_one_is_complete(tmp_path):
    final, new = tmp_path / "export", tmp_path / ".export.tmp"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"old weights")
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"new weights")
    replace_dir(new, final)
    assert (final / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old one removed only after


def test_a_failed_move_puts_the_old_folder_back(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"old weights")
    with pytest.raises(OSError):
        replace_dir(tmp_path / "missing", final)  # the new folder is not there: the rename fails
    assert (final / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_failed_write_keeps_the_old_file_and_folder_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "meta.json"
    write_bytes_atomic(target, b"old")

    def crash(stream):
        stream.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, crash)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]
    model = tmp_path / "models" / "tiny"
    write_dir_atomic(model, lambda d: (d / "config.json").write_text("v1"))

    def half_written(folder):
        (folder / "config.json").write_text("v2")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_dir_atomic(model, half_written)
    assert (model / "config.json").read_text() == "v1" and [p.name for p in model.parent.iterdir()] == ["tiny"]
