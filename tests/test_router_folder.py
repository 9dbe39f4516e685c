"""The routing model's temporary folder: its supervisor removes it when the server exits (by itself or by a
signal, after the server's last process), exits as the server did, and a folder that a killed supervisor left
behind is swept by the next start, never one that a live server still holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle.serving import router_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and prctl: Linux")


def supervise(root: Path, code: str) -> tuple[subprocess.Popen, Path]:
    """``lifecycle serve``'s last step, with ``python -c code`` as the server: claim a folder, hand its lock to
    the supervisor (``python -m lifecycle.serving.router_folder``). The server prints "up" once running."""
    held = router_folder.claim(root)
    os.set_inheritable(held.fd, True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "lifecycle.serving.router_folder", str(held.folder),
                             str(held.fd), "--", sys.executable, "-c", code], pass_fds=(held.fd,), env=env,
                            stdout=subprocess.PIPE, text=True)
    os.close(held.fd)  # the supervisor holds the lock now, and the server with it
    return proc, held.folder


def wait_for(check, what: str, timeout: float = 60.0):
    """Poll ``check()`` until it returns something true (a condition, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


UP = "import sys, time; print('up', flush=True); "


def test_normal_exit_removes_the_folder_and_keeps_the_exit_code(tmp_path):
    proc, folder = supervise(tmp_path, UP + "sys.exit(3)")
    assert proc.wait(60) == 3 and not folder.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_is_passed_on_then_the_folder_goes_and_the_supervisor_ends_by_it(tmp_path, sig):
    proc, folder = supervise(tmp_path, UP + "time.sleep(120)")
    assert proc.stdout.readline().strip() == "up" and folder.exists()
    assert router_folder.sweep(tmp_path) == [] and folder.exists()  # held: a live server's folder stays
    proc.send_signal(sig)  # to the supervisor alone: it must reach the server
    assert proc.wait(60) == -sig and not folder.exists()


def test_the_folder_outlives_the_servers_last_process(tmp_path):
    """The server's own children (uvicorn, its workers) still import from the folder while they stop: the
    supervisor, their subreaper, removes it only after the last one is gone."""
    marker = tmp_path / "grandchild-saw-the-folder"
    grandchild = ("import os, sys, time; time.sleep(1); "
                  "open(sys.argv[2], 'w').write(str(os.path.isdir(sys.argv[1])))")
    code = (UP + "import subprocess, pathlib; "
            f"folder = next(pathlib.Path({str(tmp_path)!r}).glob('lifecycle-router-*')); "
            f"subprocess.Popen([sys.executable, '-c', {grandchild!r}, str(folder), {str(marker)!r}])")
    proc, folder = supervise(tmp_path, code)
    assert proc.wait(60) == 0 and not folder.exists()
    assert marker.read_text() == "True"  # written by the orphan before the supervisor went on


def test_a_killed_supervisor_takes_the_server_down_and_the_next_sweep_removes_its_folder(tmp_path):
    proc, folder = supervise(tmp_path, UP + "time.sleep(120)")
    assert proc.stdout.readline().strip() == "up"
    proc.kill()  # SIGKILL: no cleanup of its own; the server gets SIGTERM and lets go of the lock
    proc.wait(60)
    assert folder.exists() and (folder / router_folder.LOCK).exists()
    assert wait_for(lambda: router_folder.sweep(tmp_path), "the stale folder to be swept") == [folder]
    assert not folder.exists()


def test_sweep_leaves_what_it_cannot_judge(tmp_path):
    unlocked_kind = tmp_path / f"{router_folder.PREFIX}old-layout"  # an older lifecycle's folder: no lock file
    (unlocked_kind / "model").mkdir(parents=True)
    other = tmp_path / "not-ours"
    other.mkdir()
    held = router_folder.claim(tmp_path)
    try:
        assert held.folder.name.startswith(router_folder.PREFIX)
        assert router_folder.sweep(tmp_path) == []
        assert unlocked_kind.exists() and other.exists() and held.folder.exists()
    finally:
        held.release()
    assert not held.folder.exists()
    assert router_folder.sweep(tmp_path / "missing") == []
