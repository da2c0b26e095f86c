"""qig.fileio: marked temporaries, stale ones removed (only those of dead processes), write errors, preflight checks."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qig import fileio
from qig.errors import QigError
from qig.fileio import (
    MARKER,
    atomic_dir,
    atomic_write_bytes,
    check_output_dir,
    check_output_file,
    remove_stale_temps,
    temp_dir_beside,
)

LINUX = Path("/proc/self/stat").is_file()
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def _fresh_unfinished():
    fileio.clear_unfinished()


def _siblings(path: Path) -> list[str]:
    """Temporaries of ``path`` (hidden ``.NAME.*`` entries beside it)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _python(code: str, *args) -> str:
    """Run ``code`` in a fresh interpreter (a process that is gone when this returns); returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# A process that makes temporaries like a run killed mid-write: a folder for argv[1], a file for argv[2].
LEAVE_TEMPS = """
    import sys, tempfile
    from pathlib import Path
    from qig.fileio import _prefix, temp_dir_beside
    folder = temp_dir_beside(sys.argv[1])
    (folder / "half-written.bin").write_bytes(b"x")
    _, file = tempfile.mkstemp(prefix=_prefix(Path(sys.argv[2])), dir=Path(sys.argv[2]).parent)
    print(folder); print(file)
"""


def test_temp_folder_is_marked_with_its_process(tmp_path):
    tmp = temp_dir_beside(tmp_path / "out")
    marker = json.loads((tmp / MARKER).read_text())
    assert marker["pid"] == os.getpid() and marker["target"] == "out" and marker["kind"] == "new"
    if LINUX:
        assert marker["start"] == fileio._start_time(os.getpid()) > 0
    assert tmp.parent == tmp_path and tmp.name.startswith(f".out.qig-{os.getpid()}-{marker['start']}.")


def test_finished_output_has_no_marker_and_no_temp(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("newer")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert _siblings(out) == [] and fileio.unfinished_outputs() == []


def test_stale_temps_of_a_dead_process_are_removed_with_a_log_line(tmp_path, caplog):
    out, report = tmp_path / "out", tmp_path / "r.json"
    folder, file = map(Path, _python(LEAVE_TEMPS, out, report).splitlines())
    assert (folder / MARKER).is_file() and file.is_file()
    with caplog.at_level(logging.INFO, logger="qig.fileio"):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("done")
        atomic_write_bytes(report, b"{}")
    assert not folder.exists() and not file.exists()
    assert _siblings(out) == [] and _siblings(report) == []
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(str(folder) in line and "no longer running" in line for line in lines)
    assert any(str(file) in line for line in lines)


@pytest.mark.skipif(not LINUX, reason="start times come from /proc")
def test_a_reused_pid_does_not_keep_a_stale_temp(tmp_path):
    out = tmp_path / "out"
    tmp = temp_dir_beside(out)
    marker = json.loads((tmp / MARKER).read_text())
    marker["start"] += 1  # this pid, but a process that started at another time: the owner is gone
    (tmp / MARKER).write_text(json.dumps(marker))
    assert remove_stale_temps(out) == [tmp] and not tmp.exists()


def test_temps_of_live_processes_are_kept(tmp_path):
    out = tmp_path / "out"
    mine = temp_dir_beside(out)
    code = (
        "import sys; from qig.fileio import temp_dir_beside as t; print(t(sys.argv[1]), flush=True); sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as live:
        theirs = Path(live.stdout.readline().decode().strip())
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("done")
        assert mine.is_dir() and theirs.is_dir()
        live.stdin.close()
        live.wait()
    assert remove_stale_temps(out) == [theirs] and mine.is_dir()


@pytest.mark.parametrize(
    "name, marker",
    [
        pytest.param(".out.qig-{pid}-0.abcd1234", None, id="no-marker"),
        pytest.param(".out.abcd1234", {}, id="old-style-name"),
        pytest.param(".out.qig-{pid}-0.abcd1234", {"target": "other"}, id="another-target"),
        pytest.param(".out.backup", {}, id="not-a-temp-name"),
    ],
)
def test_unmarked_or_foreign_folders_are_kept(tmp_path, name, marker):
    dead = int(_python("import os; print(os.getpid())"))
    folder = tmp_path / name.format(pid=dead)
    folder.mkdir()
    if marker is not None:
        (folder / MARKER).write_text(json.dumps({"pid": dead, "start": 0, "target": "out", **marker}))
    assert remove_stale_temps(tmp_path / "out") == [] and folder.is_dir()


def test_an_interrupted_swap_puts_the_previous_output_back(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("previous")
    code = """
        import os, sys
        from pathlib import Path
        from qig.fileio import _new_temp
        out = Path(sys.argv[1])
        old = _new_temp(out, kind="old")
        os.replace(out, old / out.name)  # killed here, before the new folder took its place
    """
    _python(code, out)
    assert not out.exists()
    check_output_dir(out, overwrite=True)
    assert (out / "a.txt").read_text() == "previous" and _siblings(out) == []


def test_a_signal_during_the_swap_keeps_the_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("previous")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # out has been moved aside; the new folder is about to take its place
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "previous" and _siblings(out) == []
    assert fileio.unfinished_outputs() == [out]


def test_unfinished_outputs_name_what_is_being_written(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        atomic_write_bytes(tmp / "inner.json", b"{}")  # inside a temporary: not an output of its own
        assert fileio.unfinished_outputs() == [out]
    assert fileio.unfinished_outputs() == []


class _FullDisk:
    """A file object whose writes fail like a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_no_space_writing_a_file_is_one_line_error(tmp_path, monkeypatch):
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))
    path = tmp_path / "r.json"
    with pytest.raises(QigError, match="no space left on device") as info:
        atomic_write_bytes(path, b"{}")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not path.exists() and _siblings(path) == []


def test_no_space_writing_a_folder_is_one_line_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(QigError, match="no space left on device") as info, atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "b.bin"))
    assert str(out) in str(info.value) and "b.bin" not in str(info.value)  # the temporary's name is no help
    assert not out.exists() and _siblings(out) == []


def test_a_write_error_inside_a_temporary_names_the_output(tmp_path):
    out = tmp_path / "out"
    outer = temp_dir_beside(out)  # as ``qig quantize --format`` writes its run into a temporary first
    with pytest.raises(QigError) as info, atomic_dir(outer / "run"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    assert str(info.value).startswith(f"could not write {out}: read-only file system; ")


def test_other_errors_inside_atomic_dir_pass_through(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError), atomic_dir(out):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "source.bin")
    assert not out.exists() and _siblings(out) == []


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path


@pytest.mark.parametrize(
    "setup, overwrite, message",
    [
        pytest.param(lambda d: d.mkdir(parents=True), False, "already exists; pass --overwrite", id="exists"),
        pytest.param(_file, False, "is a file, not a folder", id="file-in-the-way"),
        pytest.param(_file, True, "is a file, not a folder", id="file-in-the-way-overwrite"),
        pytest.param(lambda d: _file(d.parent), False, "is a file, not a folder", id="parent-is-a-file"),
    ],
)
def test_check_output_dir_refuses(tmp_path, setup, overwrite, message):
    out = tmp_path / "p" / "out"
    setup(out)
    with pytest.raises(QigError, match=message) as info:
        check_output_dir(out, overwrite=overwrite)
    assert "\n" not in str(info.value)


def test_check_output_dir_accepts_and_leaves_no_trace(tmp_path):
    check_output_dir(tmp_path / "a" / "b" / "out", overwrite=False)
    (tmp_path / "c").mkdir()
    check_output_dir(tmp_path / "c", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.skipif(ROOT or os.name != "posix", reason="chmod does not restrict root")
@pytest.mark.parametrize(
    "sub", [pytest.param("out", id="unwritable-parent"), pytest.param("new/out", id="cannot-mkdir")]
)
def test_check_output_dir_unwritable_parent(tmp_path, sub):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(QigError, match="permission denied") as info:
            check_output_dir(locked / sub, overwrite=False)
    finally:
        locked.chmod(0o700)
    assert str(locked / sub) in str(info.value) and "choose another --output" in str(info.value)


def test_check_output_dir_read_only_file_system(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(fileio.tempfile, "mkdtemp", read_only)
    with pytest.raises(QigError, match="is not writable \\(read-only file system\\)"):
        check_output_dir(tmp_path / "out", overwrite=False)


def test_check_output_file(tmp_path):
    check_output_file(tmp_path / "new" / "r.json")
    check_output_file(_file(tmp_path / "old.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    with pytest.raises(QigError, match="is a folder, not a file"):
        check_output_file(tmp_path)
    with pytest.raises(QigError, match="is a file, not a folder"):
        check_output_file(tmp_path / "old.json" / "r.json")
    if Path("/dev/null").exists():
        with pytest.raises(QigError, match="not a regular file"):
            check_output_file("/dev/null")


@pytest.mark.skipif(ROOT or os.name != "posix", reason="chmod does not restrict root")
def test_check_output_file_unwritable_parent(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(QigError, match="is not writable \\(permission denied\\)"):
            check_output_file(tmp_path / "r.json")
    finally:
        tmp_path.chmod(0o700)


def test_writing_a_file_onto_a_folder_is_refused(tmp_path):
    with pytest.raises(QigError, match="is a folder, not a file"):
        atomic_write_bytes(tmp_path, b"{}")
