"""The code-reward sandbox: hostile completions (an endless loop, a fork bomb, 10 GB, writes outside the folder,
a socket, os.system, reading the parent's files) each end within their limits with reward 0 and a reason, and
leave nothing behind; where the platform allows, the kernel-level layers hold when the in-process guard is
bypassed (ctypes fork, the raw _socket module)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from lmlab.rewards import code_reward, extract_code
from lmlab.rewards.sandbox import Limits, run_python

LIMITS = Limits(timeout=2.0, cpu=1, memory_mb=256, file_mb=1)
SLACK = 2.0  # seconds beyond the wall-clock limit for process start and teardown on a loaded machine


def _run(code: str, tests: str = ""):
    t0 = time.perf_counter()
    r = run_python(code, tests, LIMITS)
    elapsed = time.perf_counter() - t0
    assert elapsed < LIMITS.timeout + SLACK, f"took {elapsed:.1f} s"
    return r


def test_a_correct_function_passes_and_a_wrong_one_fails_with_the_assertion():
    good = _run("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5")
    assert good.passed and good.reason == "passed"
    bad = _run("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5")
    assert not bad.passed and bad.reason == "AssertionError"
    assert not _run("def add(a, b:\n", "assert add(2, 3) == 5").passed  # a syntax error


@pytest.mark.parametrize("code, reason", [
    ("while True:\n    pass\n", r"timeout|CPU limit"),
    ("import time\ntime.sleep(60)\n", r"timeout"),
    ("import os\nwhile True:\n    os.fork()\n", r"PermissionError|BlockingIOError|fork"),
    ("x = bytearray(10 * 1024 ** 3)\n", r"MemoryError"),
    ("open('big', 'w').write('x' * (8 << 20))\n", r"File too large|file size"),
    ("import sys\nsys.exit(0)\n", r"SystemExit"),
])
def test_hostile_programs_end_within_their_limits_with_a_reason(code, reason):
    import re

    r = _run(code, "assert True")
    assert not r.passed
    assert re.search(reason, r.reason), r.reason


def test_no_write_outside_the_folder_and_no_shell(tmp_path):
    target = tmp_path / "written"
    marker = tmp_path / "from_shell"
    for code in (f"open({str(target)!r}, 'w').write('x')\n",
                 f"import os\nos.system('touch {marker}')\n",
                 f"import os\nfd = os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n"):
        r = _run(code, "assert True")
        assert not r.passed and r.reason
    time.sleep(0.2)
    assert not target.exists() and not marker.exists()


def test_the_parents_files_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    r = _run(f"data = open({str(secret)!r}).read()\n", "assert data == 'hunter2'")
    assert not r.passed and ("FileNotFoundError" in r.reason or "PermissionError" in r.reason), r.reason
    # the control: the same program reads what is inside its own folder
    assert _run("open('mine', 'w').write('ok')\ndata = open('mine').read()\n", "assert data == 'ok'").passed


def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(LIMITS.timeout + SLACK)
    hits = []

    def accept():
        try:
            conn, _ = srv.accept()
            hits.append(1)
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    return srv, t, hits


@pytest.mark.parametrize("module", ["socket", "_socket"])
@pytest.mark.slow
def test_no_socket_reaches_the_host(module):
    srv, thread, hits = _listener()
    port = srv.getsockname()[1]
    try:
        r = _run(f"import {module}\ns = {module}.socket()\ns.connect(('127.0.0.1', {port}))\n", "assert True")
        assert not r.passed
        if module == "_socket" and "netns" not in r.isolation:
            pytest.skip(f"no network namespace on this platform ({r.isolation}): only the guard protects")
        srv.close()
        thread.join()
        assert not hits, "the sandboxed program reached the host's loopback"
    finally:
        srv.close()


def test_a_fork_bomb_below_the_guard_is_stopped_by_the_process_limit():
    code = ("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n"
            "    if libc.fork() < 0:\n        raise OSError('fork refused')\n")
    r = _run(code, "assert True")
    assert not r.passed
    if "nobody" not in r.isolation:
        pytest.skip(f"not root here ({r.isolation}): RLIMIT_NPROC counts the user's own processes")
    deadline = time.monotonic() + 5  # the group was killed (SIGKILL lands asynchronously): nothing runs on
    while (left := _running_as(65534)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"{len(left)} sandbox processes left running"


def _running_as(uid: int) -> list[str]:
    """Live (not zombie) processes of `uid`."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            status = dict(ln.split(":", 1) for ln in (p / "status").read_text().splitlines() if ":" in ln)
        except OSError:
            continue
        if int(status["Uid"].split()[1]) == uid and not status["State"].strip().startswith("Z"):
            out.append(p.name)
    return out


def test_the_environment_is_clean(monkeypatch):
    monkeypatch.setenv("LMLAB_SECRET_TOKEN", "s3cret")
    r = _run("import os\nleak = os.environ.get('LMLAB_SECRET_TOKEN')\n", "assert leak is None")
    assert r.passed, r.reason
    assert _run("import os\nfiles = os.listdir('.')\n", "assert files == []").passed  # an empty folder


def test_code_reward_scores_each_completion_and_notes_the_reasons():
    completions = ["```python\ndef sq(x):\n    return x * x\n```", "def sq(x):\n    return x + x\n",
                   "while True: pass"]
    notes = [None] * 3
    cfg = type("RL", (), {"sandbox_timeout": 1.5, "sandbox_cpu": 1.0, "sandbox_memory_mb": 256,
                          "sandbox_workers": 2})()
    rewards = code_reward(["p"] * 3, completions, tests=["assert sq(3) == 9"] * 3, config=cfg, notes=notes)
    assert rewards == [1.0, 0.0, 0.0]
    assert notes[0] is None and notes[1] == "code: AssertionError"
    assert "timeout" in notes[2] or "CPU limit" in notes[2], notes[2]  # whichever limit the loop reaches first
    assert extract_code("text\n```py\nx = 1\n```\nmore") == "x = 1\n"


def test_the_parent_is_unaffected():
    before = os.getcwd(), dict(os.environ)
    _run("import os\nos.chdir('..')\n", "assert True")
    assert (os.getcwd(), dict(os.environ)) == before
