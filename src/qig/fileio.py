"""Atomic outputs: write into a temporary sibling, then rename into place; check output locations up front.

A temporary folder is ``.NAME.qig-<pid>-<start>.xxxxxxxx`` beside the output
``NAME``, with a marker file ``.qig-temp.json`` written right after it is
created (the process id, the process's start time, the host and the target
name); a temporary file is ``.NAME.qig-<pid>-<start>.xxxxxxxx`` (its name is the
mark). Before a new temporary is made for an output, the temporaries of that
output left by processes that are gone (killed with ``kill -9``, a power cut) are
removed, with a log line; a live process's temporaries and anything without the
mark are never touched. ``<start>`` is the process start time from
``/proc/<pid>/stat`` (0 where there is none: off Linux only the pid's liveness is
checked), so a reused pid does not keep a stale folder alive.

Temporary files and folders get the permissions an ordinary file or folder
would (``0o666`` / ``0o777`` less the umask), not ``tempfile``'s private ``0o600``;
so does everything written inside a temporary folder (``save_file``'s weights too)
before it is put in place.
A write that fails with an ``OSError`` (no space left, permission denied, a
read-only file system) raises a ``QigError`` naming the output and the cause,
and the temporary is removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from qig.errors import QigError

log = logging.getLogger(__name__)

MARKER = ".qig-temp.json"
# After ".NAME.qig-": pid, start time, tempfile's random part, ".old" for the previous output during a swap.
_TEMP_TAIL = re.compile(r"(?P<pid>\d+)-(?P<start>\d+)\.[A-Za-z0-9_]+(?P<old>\.old)?")
# errno values that mean "this cannot be written here" (other OSErrors inside ``atomic_dir`` are the caller's).
_WRITE_ERRNOS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EFBIG: "write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "fix the permissions or write elsewhere",
    errno.EPERM: "fix the permissions or write elsewhere",
    errno.EIO: "check the disk or write elsewhere",
    errno.ENAMETOOLONG: "choose a shorter name",
}

# Outputs whose temporary was made by this process and not yet put in place (the CLI names them on Ctrl-C).
_unfinished: dict[Path, None] = {}
# Partial runs kept for --resume, with how to resume them (the CLI says so when a run stops).
_resumable: dict[Path, str] = {}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from field 3 (state) on, or None (no such process, or not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rfind(")") + 2 :].split()  # the command name (field 2) may contain spaces and ')'


def _start_time(pid: int) -> int:
    """Process start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``); 0 where unknown."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else 0
    except (IndexError, ValueError):
        return 0


_SELF = (os.getpid(), _start_time(os.getpid()))


def _me() -> tuple[int, int]:
    global _SELF
    if _SELF[0] != os.getpid():  # a forked child
        _SELF = (os.getpid(), _start_time(os.getpid()))
    return _SELF


def _owner_alive(pid: int, start: int, host: str | None) -> bool:
    """Whether the process that made a temporary may still be running (when in doubt: yes)."""
    if host is not None and host != socket.gethostname():
        return True  # another machine's process (a shared file system): its pids mean nothing here
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. EPERM: it exists, it is someone else's
    fields = _proc_stat(pid)
    if not fields:
        return True  # no /proc: a live pid is all we can tell
    if fields[0] in ("Z", "X"):
        return False  # a zombie: it has exited, only its parent has not reaped it yet
    now = _start_time(pid)
    return not (start and now and now != start)  # a different start time: the pid was reused


# ---------------------------------------------------------------- temporaries


def _prefix(target: Path) -> str:
    pid, start = _me()
    return f".{target.name}.qig-{pid}-{start}."


def _inside_temp(path: Path) -> bool:
    return any((p / MARKER).is_file() for p in path.parents)


def _new_temp(target: Path, kind: str = "new", track: bool = True) -> Path:
    """Make a marked temporary folder beside ``target`` (``kind`` "old": the previous output during a swap)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".old" if kind == "old" else "", dir=target.parent))
    try:
        pid, start = _me()
        marker = {"pid": pid, "start": start, "host": socket.gethostname(), "target": target.name, "kind": kind}
        marker["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        tmp.chmod(0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if track and kind == "new" and not _inside_temp(target):
        _unfinished[target] = None
    return tmp


def _remove_temp(path: Path) -> None:
    """Remove a temporary; a folder's marker goes last, so a folder half-removed by a kill stays marked."""
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            Path(path).unlink(missing_ok=True)
            return
        for entry in os.scandir(path):
            if entry.name == MARKER:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
        (Path(path) / MARKER).unlink(missing_ok=True)
        os.rmdir(path)
    except OSError as exc:
        log.debug("could not remove the temporary %s: %s", path, exc)


def _done(target: Path) -> None:
    _unfinished.pop(target, None)


def unfinished_outputs() -> list[Path]:
    """Outputs this process began to write (made a temporary for) and has not put in place, oldest first.

    >>> clear_unfinished(); unfinished_outputs()
    []
    """
    return list(_unfinished)


def note_resumable(folder: Path, how: str) -> None:
    """Remember that ``folder`` keeps a partial run; ``how`` says how to continue it."""
    _resumable[Path(folder)] = how


def forget_resumable(folder: Path) -> None:
    _resumable.pop(Path(folder), None)


def resumable_notes() -> list[str]:
    return list(_resumable.values())


def clear_unfinished() -> None:
    """Forget :func:`unfinished_outputs` (the CLI does at the start of each command)."""
    _unfinished.clear()
    _resumable.clear()


def _marker(folder: Path) -> dict:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}  # present but unreadable (a kill while it was written): the folder's name still says whose
    return data if isinstance(data, dict) else {}


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of output ``path`` left by processes that are gone; returns what was removed.

    Only marked ones (see the module docstring) whose process is no longer
    running; a temporary that held the previous output during an interrupted
    swap is put back when ``path`` is missing. One INFO log line per removal.

    >>> remove_stale_temps("/nonexistent/folder/out")
    []
    """
    path = Path(path)
    head = f".{path.name}.qig-"
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(head)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TEMP_TAIL.fullmatch(entry.name[len(head) :])
        if m is None:
            continue
        pid, start, host = int(m["pid"]), int(m["start"]), None
        tmp = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if not (tmp / MARKER).is_file():
                continue  # not ours: never touch a folder without the marker
            info = _marker(tmp)
            if info.get("target", path.name) != path.name:
                continue
            if isinstance(info.get("pid"), int) and isinstance(info.get("start"), int):
                pid, start = info["pid"], info["start"]
            host = info.get("host") if isinstance(info.get("host"), str) else None
            kind = info.get("kind", "old" if m["old"] else "new")
            what = "folder"
        elif entry.is_file(follow_symlinks=False):
            kind, what = "file", "file"
        else:
            continue
        if _owner_alive(pid, start, host):
            continue
        if kind == "old" and not os.path.lexists(path) and os.path.lexists(tmp / path.name):
            try:
                os.replace(tmp / path.name, path)
            except OSError as exc:  # e.g. another process put it back first; never remove the only copy
                log.info("could not put back the previous %s from %s: %s", path, tmp, _cause(exc))
                continue
            log.info("restored %s from %s, where an interrupted replace by process %d had left it", path, tmp, pid)
        _remove_temp(tmp)
        if os.path.lexists(tmp):
            log.info("could not remove %s, a temporary %s left by process %d (no longer running)", tmp, what, pid)
            continue
        log.info("removed %s, a temporary %s left by process %d, which is no longer running", tmp, what, pid)
        removed.append(tmp)
    return removed


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty (but for the marker) folder next to ``path``, on the same file system so ``os.replace`` is atomic.

    Stale temporaries of ``path`` are removed first. The caller removes the folder.

    >>> with tempfile.TemporaryDirectory() as d:
    ...     tmp = temp_dir_beside(Path(d) / "out")
    ...     tmp.name.startswith(".out.qig-"), sorted(p.name for p in tmp.iterdir())
    (True, ['.qig-temp.json'])
    """
    path = Path(path)
    remove_stale_temps(path)
    try:
        return _new_temp(path)
    except OSError as exc:
        raise _cannot_create(path, exc) from exc


# ---------------------------------------------------------------- errors


def _cause(exc: OSError) -> str:
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return text[:1].lower() + text[1:]


def _public(path: Path) -> Path:
    """The output the user named, for a path inside a temporary (``.out.qig-1-2.abcd1234/run`` -> ``out``)."""
    for p in reversed(path.parents):  # the outermost temporary first
        if (p / MARKER).is_file():
            target = _marker(p).get("target")
            return p.parent / target if isinstance(target, str) else path
    return path


def _write_error(out: Path, exc: OSError, tmp: Path | None = None) -> QigError:
    """``could not write OUT: no space left on device; free some space or write elsewhere; nothing was written``."""
    out, where, name = _public(out), "", exc.filename
    if isinstance(name, str) and Path(name) != out and _public(Path(name)) == Path(name):
        if not (tmp is not None and Path(name).is_relative_to(tmp)):  # a temporary's name would not help
            where = f" ({name})"
    hint = _WRITE_ERRNOS.get(exc.errno, "write elsewhere")
    return QigError(f"could not write {out}: {_cause(exc)}{where}; {hint}; nothing was written")


def _blocking_file(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists but is not a folder (it stops folders being made)."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return None if p.is_dir() else p
    return None


def _cannot_create(out: Path, exc: OSError) -> QigError:
    out = _public(out)
    blocker = _blocking_file(out.parent)
    if blocker is not None:
        return QigError(f"cannot write {out}: {blocker} is a file, not a folder; choose another location")
    hint = _WRITE_ERRNOS.get(exc.errno, "write elsewhere")
    return QigError(f"cannot write {out}: {_cause(exc)} in {out.parent}; {hint}")


# ---------------------------------------------------------------- writing


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling file renamed into place.

    >>> with tempfile.TemporaryDirectory() as d:
    ...     atomic_write_bytes(Path(d) / "a.txt", b"done")
    ...     (Path(d) / "a.txt").read_bytes()
    b'done'
    """
    path = Path(path)
    if path.is_dir():
        raise QigError(f"cannot write {path}: it is a folder, not a file; give a file path")
    remove_stale_temps(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path), dir=path.parent)
    except OSError as exc:
        raise _cannot_create(path, exc) from exc
    if not _inside_temp(path):
        _unfinished[path] = None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.lexists(tmp):
            Path(tmp).unlink(missing_ok=True)
        else:
            _done(path)  # it was put in place just before the exception
        if isinstance(exc, OSError):
            raise _write_error(path, exc, Path(tmp)) from exc
        raise
    _done(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder (empty but for the marker); on success it replaces ``out``, on failure it is removed.

    An existing ``out`` is refused unless ``overwrite``; it is only swapped out
    once the new folder is complete, so a failure (or a signal) never loses it.

    >>> with atomic_dir("/tmp/qig-doc-example", overwrite=True) as tmp:  # doctest: +SKIP
    ...     (tmp / "a.txt").write_text("done")
    """
    out = Path(out)
    remove_stale_temps(out)  # first: it may put back a previous output an interrupted swap had moved away
    if os.path.lexists(out) and not out.is_dir():
        raise QigError(f"output {out} is a file, not a folder; remove it or choose another --output")
    if out.exists() and not overwrite:
        raise QigError(f"output folder {out} already exists; pass --overwrite to replace it")
    try:
        tmp = _new_temp(out)
    except OSError as exc:
        raise _cannot_create(out, exc) from exc
    try:
        yield tmp
        (tmp / MARKER).unlink(missing_ok=True)
        _ordinary_modes(tmp)
        if os.path.lexists(out):
            _swap(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        if os.path.lexists(tmp):
            _remove_temp(tmp)
        else:
            _done(out)  # it was put in place just before the exception
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise _write_error(out, exc, tmp) from exc
        raise
    _done(out)


def _ordinary_modes(folder: Path) -> None:
    """Give what was written in ``folder`` the modes ``save_pretrained`` leaves under the umask (0644 / 0755 under 022).

    safetensors' ``save_file`` (so ``save_pretrained``'s weights, too) creates private 0600 files, which a
    server or teammate under another user cannot read.
    """
    mask = _umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _swap(tmp: Path, out: Path) -> None:
    """Replace the existing ``out`` by ``tmp``; whatever interrupts it, ``out`` is the old or the new folder."""
    old = _new_temp(out, kind="old")
    try:
        os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        if not os.path.lexists(out) and os.path.lexists(old / out.name):
            os.replace(old / out.name, out)
        raise
    finally:
        if os.path.lexists(out):  # else the previous output is still in ``old``; the next run puts it back
            _remove_temp(old)


# ---------------------------------------------------------------- preflight


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that could not be written.

    Refused: an existing folder without ``overwrite``; a file in the way; a
    parent that does not exist and cannot be created, or that is not writable
    (a temporary sibling is made and removed, so permissions and read-only
    file systems are caught). Parents it had to create are removed again.

    >>> with tempfile.TemporaryDirectory() as d:
    ...     check_output_dir(Path(d) / "new" / "out", overwrite=False)  # fine; "new" is not left behind
    ...     check_output_dir(d, overwrite=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qig.errors.QigError: output folder ... already exists; pass --overwrite to replace it
    """
    out = Path(path)
    remove_stale_temps(out)
    if out.is_dir():
        if not overwrite:
            raise QigError(f"output folder {out} already exists; pass --overwrite to replace it")
    elif os.path.lexists(out):
        kind = "a file" if out.is_file() else "not a folder"
        raise QigError(f"output {out} is {kind}, not a folder; remove it or choose another --output")
    _probe(out, folder=True)


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse, before any work, an output file (``--json``) that could not be written.

    Refused: a folder (or a device, a pipe) at ``path``; a parent that cannot
    be created or is not writable (a temporary sibling file is made and removed).

    >>> with tempfile.TemporaryDirectory() as d:
    ...     check_output_file(Path(d) / "report.json")
    """
    out = Path(path)
    if out.is_dir():
        example = out / "report.json"
        raise QigError(f"cannot write {out}: it is a folder, not a file; give a file path such as {example}")
    if os.path.lexists(out) and not out.is_file():
        raise QigError(f"cannot write {out}: it exists and is not a regular file; choose another path")
    remove_stale_temps(out)
    _probe(out, folder=False)


def _probe(out: Path, folder: bool) -> None:
    """Make and remove a temporary beside ``out``, creating (then removing) missing parents; errors name the fix."""
    what = "output folder" if folder else "output file"
    fix = "choose another --output" if folder else "choose another path"
    blocker = _blocking_file(out.parent)
    if blocker is not None:
        raise QigError(f"cannot write {what} {out}: {blocker} is a file, not a folder; {fix}")
    missing = []
    for p in (out.parent, *out.parent.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    created: list[Path] = []
    try:
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue  # made meanwhile by someone else
            except OSError as exc:
                raise QigError(
                    f"cannot write {what} {out}: cannot create the folder {p} ({_cause(exc)}); "
                    f"create it yourself or {fix}"
                ) from exc
            created.append(p)
        try:
            if folder:
                _remove_temp(_new_temp(out, track=False))
            else:
                fd, tmp = tempfile.mkstemp(prefix=_prefix(out), dir=out.parent)
                os.close(fd)
                os.unlink(tmp)
        except OSError as exc:
            raise QigError(
                f"cannot write {what} {out}: {out.parent} is not writable ({_cause(exc)}); fix its permissions or {fix}"
            ) from exc
    finally:
        for p in reversed(created):
            with suppress(OSError):
                p.rmdir()
