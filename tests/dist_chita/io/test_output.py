import os

import pytest

from dist_chita.io.output import atomic_directory, check_target


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as d:
        (d / "half.bin").write_bytes(b"12")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_refused_unless_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        with atomic_directory(target):
            pass
    with pytest.raises(ValueError), atomic_directory(target, overwrite=True) as d:
        (d / "new.txt").write_text("new")
        raise ValueError("fail")
    assert (target / "old.txt").read_text() == "old"  # untouched by a failed overwrite
    with atomic_directory(target, overwrite=True) as d:
        (d / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_output_may_not_overlap_inputs(tmp_path):
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    for bad in (ckpt, ckpt / "pruned", tmp_path):
        with pytest.raises(ValueError, match="overlaps the input"):
            check_target(bad, overwrite=True, protected=[ckpt])
        with pytest.raises(ValueError, match="choose another output.dir$"):  # not: set output.overwrite
            check_target(bad, overwrite=False, protected=[ckpt])
    check_target(tmp_path / "pruned", overwrite=False, protected=[ckpt])


def test_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match=f"overlaps the input {tmp_path / 'model'};"):
        check_target("~/model", overwrite=True, protected=["~/model"])
    with pytest.raises(ValueError, match="overlaps the input"):
        check_target(tmp_path / "model" / "out", overwrite=False, protected=["~/model"])
    assert check_target("~/out", overwrite=False) == tmp_path / "out"
    with atomic_directory("~/out") as d:
        (d / "a.txt").write_text("x")
    assert (tmp_path / "out" / "a.txt").read_text() == "x"


def test_a_target_that_cannot_be_replaced_is_refused_before_any_work(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def immutable(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "rename", immutable)
    with pytest.raises(PermissionError) as e:
        check_target(target, overwrite=True)
    assert str(e.value) == f"cannot replace the output directory {target}: Operation not permitted"
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").read_text() == "old"


@pytest.mark.parametrize("failing", [0, 1])  # moving the old target aside, or the new one into place
def test_a_failed_final_move_leaves_the_old_target_and_no_temporary(tmp_path, monkeypatch, failing):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == failing + 1:
            raise OSError(16, "Device or resource busy")
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match=f"^cannot move the finished output into {target}: Device or resource busy$"):
        with atomic_directory(target, overwrite=True) as d:
            (d / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in target.iterdir()] == ["old.txt"]


def test_messages_name_the_callers_options(tmp_path):
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    hints = {"overwrite_hint": "pass --overwrite", "name": "output directory"}
    with pytest.raises(FileExistsError) as e:
        check_target(ckpt, overwrite=False, **hints)
    assert str(e.value) == f"output directory {ckpt} already exists (pass --overwrite to replace it)"
    with pytest.raises(ValueError) as e:
        check_target(ckpt / "sub", overwrite=False, protected=[ckpt], **hints)
    assert str(e.value) == f"output directory {ckpt / 'sub'} overlaps the input {ckpt}; choose another output " \
                           "directory"


def test_unwritable_location_is_refused_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: a directory of the kernel's instead
            with pytest.raises(PermissionError, match="/proc is not writable"):
                check_target("/proc/dist-chita-out/a", overwrite=False)
        else:
            with pytest.raises(PermissionError, match="is not writable"):
                check_target(locked / "a" / "out", overwrite=False)
        assert not (locked / "a").exists()
    finally:
        locked.chmod(0o700)


def test_a_path_under_a_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "t.sh").write_text("x")
    for target in (tmp_path / "t.sh" / "out", tmp_path / "t.sh" / "a" / "out"):
        with pytest.raises(NotADirectoryError) as e:
            check_target(target, overwrite=False)
        assert str(e.value) == f"cannot write the output directory {target}: {tmp_path / 't.sh'} is not a directory"
    assert (tmp_path / "t.sh").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["t.sh"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_output_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Files written with a private mode (a 0600 temporary file, as safetensors writes) and plain files end with
    the mode a new file gets under the umask, as does the directory itself and its subdirectories."""
    import stat
    import tempfile

    old = os.umask(umask)
    try:
        target = tmp_path / "out"
        with atomic_directory(target) as d:
            fd, private = tempfile.mkstemp(dir=d)
            os.close(fd)
            os.replace(private, d / "model.safetensors")
            (d / "sub").mkdir(mode=0o700)
            (d / "sub" / "report.json").write_text("{}")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [target, *target.rglob("*")]}
    finally:
        os.umask(old)
    assert modes == {"out": dir_mode, "model.safetensors": file_mode, "sub": dir_mode, "report.json": file_mode}
