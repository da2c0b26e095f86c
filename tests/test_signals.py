"""Signals end ``qig`` cleanly: one line, exit 130 (SIGINT) / 143 (SIGTERM), no output and no temporary left.

Real subprocesses of ``python -m qig``; ``qig world eval --n 3000`` writes
3000 PNGs, long enough to be stopped while its temporary folder exists.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")

WORLD = ("world", "eval", "--n", "3000")
QUANTIZE = ("quantize", "--method", "rtn", "--wbits", "4", "--no-progress")  # its command imports torch: > 1 s


def _start(*argv) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "qig", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _temps(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _until(proc: subprocess.Popen, ready, what: str, timeout: float = 120.0) -> None:
    """Poll ``ready()`` until true; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"qig ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _importing(proc: subprocess.Popen):
    """True about 0.2 s after the start, once ``main`` catches SIGTERM (Linux: /proc's SigCgt mask).

    ``main`` installs its handlers just before it imports the command asked for (qig quantize's: over a second of
    torch and friends; a library whose import is interrupted may turn the stop into its own error, which ``main``
    reports as the stop).
    """
    status = Path(f"/proc/{proc.pid}/status")
    start = time.monotonic()

    def ready():
        if time.monotonic() - start < 0.2:
            return False
        if not status.exists():
            return True  # no /proc: the 0.2 s alone
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return False
        return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))

    return ready


def _finish(proc: subprocess.Popen) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.splitlines()


@pytest.mark.parametrize(
    "sig, code, word",
    [
        pytest.param(signal.SIGINT, 130, "interrupted", id="SIGINT"),
        pytest.param(signal.SIGTERM, 143, "terminated", id="SIGTERM"),
    ],
)
def test_signal_during_the_imports(tmp_path, sig, code, word):
    out = tmp_path / "w"
    proc = _start(*QUANTIZE, "--output", out)
    _until(proc, _importing(proc), "its signal handlers were installed")
    proc.send_signal(sig)
    rc, err = _finish(proc)
    assert rc == code and err == [word]
    assert not out.exists() and _temps(out) == []


def test_sigterm_while_writing_removes_the_temporary(tmp_path):
    out = tmp_path / "w"
    proc = _start(*WORLD, "--output", out)
    _until(proc, lambda: any((t / ".qig-temp.json").exists() for t in _temps(out)), "it began to write")
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 143 and err == [f"terminated; nothing was written to {out}"]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and _temps(out) == []


@pytest.mark.slow
def test_sigkill_while_writing_leaves_a_temporary_the_rerun_removes(tmp_path):
    out = tmp_path / "w"
    proc = _start(*WORLD, "--output", out)
    _until(proc, lambda: any((t / "images").is_dir() for t in _temps(out)), "it began to write")
    proc.kill()
    proc.communicate(timeout=60)
    (stale,) = _temps(out)
    assert (stale / ".qig-temp.json").is_file() and not out.exists()

    rerun = _start("world", "eval", "--n", "20", "--output", out)
    rc, err = _finish(rerun)
    assert rc == 0, err
    assert any(str(stale) in line and "no longer running" in line for line in err)
    assert (out / "data.json").is_file() and _temps(out) == []


def test_an_error_a_stop_turned_into_is_reported_as_the_stop(monkeypatch, capsys):
    """numpy interrupted in its import raises ImportError, not KeyboardInterrupt: still 'interrupted', 130."""
    import qig.commands.models as models
    from qig.cli import main

    def run(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # main's handler raises KeyboardInterrupt here
            time.sleep(5)
        except KeyboardInterrupt:
            raise ImportError("cannot load module more than once per process") from None

    monkeypatch.setattr(models, "run", run)
    assert main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr(models, "run", lambda args: (_ for _ in ()).throw(ImportError("broken")))
    with pytest.raises(ImportError):  # without a stop, an error is an error
        main(["models"])
