"""Run untrusted Python (a model's completion) against tests in a separate, limited process.

    result = run_python(code, tests, Limits(timeout=2.0))   # SandboxResult(passed, reason, seconds)

One process per call: `python -I -S` (isolated mode, no site-packages, no user site, PYTHON* variables
ignored) started in a new session with an empty environment, in an empty temporary working directory
that is removed afterwards. The child reads the program from stdin, then, before any of it runs:

- resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space), RLIMIT_FSIZE (largest file it may
  write), RLIMIT_NOFILE, RLIMIT_CORE=0, and RLIMIT_NPROC (effective once it runs as an unprivileged user);
- no network: a new, empty network namespace (unshare(CLONE_NEWNET), as root; else inside a new user
  namespace where the kernel allows it), so a socket can be made but reaches nothing, not even the host's
  loopback. Where neither is permitted, only the in-process guard below stands between the code and the
  network, and `SandboxResult.isolation` says so;
- as root: chroot into the working directory and drop to uid/gid 65534 (nobody), so the parent's files are
  out of reach and the process limit counts only the sandbox's processes;
- an in-process guard (best effort, bypassable by determined code): socket creation, fork, exec, spawn and
  os.system raise PermissionError; open() outside the working directory raises PermissionError.

The parent waits at most `timeout` seconds of wall-clock time, then kills the whole process group; it
kills the group after a normal exit too (strays a program left behind). Output is capped (files written
through RLIMIT_FSIZE). The verdict: the child prints a line with a per-call random token after the tests
ran without an exception; anything else (an exception, a non-zero exit, a signal, the time limit) fails
with a one-line reason. What this does not protect against is listed in docs/rl.md.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
OUTPUT_CAP = 1 << 16  # bytes of stdout/stderr kept


@dataclass(frozen=True)
class Limits:
    timeout: float = 2.0  # wall-clock seconds
    cpu: float = 2.0  # CPU seconds (RLIMIT_CPU, rounded up to whole seconds)
    memory_mb: int = 512  # RLIMIT_AS
    file_mb: int = 1  # RLIMIT_FSIZE: the largest file the program may write
    nproc: int = 16  # RLIMIT_NPROC (as the unprivileged user)
    nofile: int = 64  # RLIMIT_NOFILE


@dataclass
class SandboxResult:
    passed: bool
    reason: str  # "passed", or one line: the exception, the signal, "timeout after 2.0 s", ...
    seconds: float
    isolation: str = ""  # what the child could set up: "netns,chroot,nobody" or "guard-only"


# The child's first code. It runs with -I -S; its stdin is a JSON object {code, tests, token, limits}.
_BOOT = r'''
import sys, os, json, resource
cfg = json.loads(sys.stdin.read())
lim = cfg["limits"]
def _set(r, v, hard=None):
    try:
        resource.setrlimit(r, (v, v if hard is None else hard))
    except (ValueError, OSError):
        pass
_set(resource.RLIMIT_CPU, lim["cpu"], lim["cpu"] + 1)  # SIGXCPU at the limit, SIGKILL a second later
_set(resource.RLIMIT_FSIZE, lim["file"])
_set(resource.RLIMIT_CORE, 0)
_set(resource.RLIMIT_NOFILE, lim["nofile"])
done = []
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
        done.append("netns")
    elif os.getuid() != 0 and libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
        done.append("userns+netns")
except Exception:
    pass
import math, re, string, itertools, functools, collections, operator, heapq, bisect, random, statistics
import fractions, decimal, copy, json, textwrap, unicodedata, datetime, enum, dataclasses, typing, io, traceback
import time, array, struct, hashlib, builtins, socket, subprocess, _io, doctest
cwd = os.getcwd()
if os.getuid() == 0:
    try:
        os.chroot(cwd)
        os.chdir("/")
        cwd = "/"
        done.append("chroot")
        os.setgroups([])
        os.setgid(__NOBODY__)
        os.setuid(__NOBODY__)
        done.append("nobody")
    except OSError:
        pass
_set(resource.RLIMIT_NPROC, lim["nproc"])
_set(resource.RLIMIT_AS, lim["memory"])
print("\x00isolation " + (",".join(done) or "guard-only"), file=sys.stderr, flush=True)
def _refuse(*a, **k):
    raise PermissionError("not allowed in the sandbox")
for name in ("system", "fork", "forkpty", "posix_spawn", "posix_spawnp", "popen", "execv", "execve", "execl",
             "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnv", "spawnve", "kill",
             "killpg"):
    if hasattr(os, name):
        setattr(os, name, _refuse)
socket.socket = socket.create_connection = socket.socketpair = socket.create_server = _refuse
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _refuse
_open = builtins.open
def _inside(path):
    if isinstance(path, int):
        return True
    p = os.path.realpath(os.path.join(cwd, os.fsdecode(path)))
    return p == cwd or p.startswith(cwd.rstrip("/") + "/")
def _guarded_open(file, *a, **k):
    if not _inside(file):
        raise PermissionError(f"{file!r}: outside the sandbox folder")
    return _open(file, *a, **k)
builtins.open = io.open = _io.open = _guarded_open
_osopen = os.open
def _guarded_osopen(path, *a, **k):
    if not _inside(path):
        raise PermissionError(f"{path!r}: outside the sandbox folder")
    return _osopen(path, *a, **k)
os.open = _guarded_osopen
code, tests, token = cfg["code"], cfg["tests"], cfg["token"]
del cfg
scope = {"__name__": "__sandbox__"}
try:
    exec(compile(code, "<completion>", "exec"), scope)
    exec(compile(tests, "<tests>", "exec"), scope)
except BaseException as e:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    print("\x00error " + type(e).__name__ + (": " + msg if msg else ""), file=sys.stderr, flush=True)
    os._exit(1)
sys.stdout.flush()
print("\n" + token, flush=True)
os._exit(0)
'''.replace("__NOBODY__", str(NOBODY))


def run_python(code: str, tests: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `code` then `tests` (asserts) in a fresh limited process; passed only if both ran to the end."""
    token = secrets.token_hex(16)
    payload = json.dumps({"code": code, "tests": tests, "token": token,
                          "limits": {"cpu": max(1, int(-(-limits.cpu // 1))), "memory": limits.memory_mb << 20,
                                     "file": limits.file_mb << 20, "nproc": limits.nproc,
                                     "nofile": limits.nofile}})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmlab-sandbox-") as work, \
            tempfile.TemporaryDirectory(prefix="lmlab-sandbox-io-") as io_dir:
        os.chmod(work, 0o777)  # writable by the unprivileged user the child becomes
        out_path, err_path = Path(io_dir) / "out", Path(io_dir) / "err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOT], cwd=work, env={"LANG": "C.UTF-8"},
                                    stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
                                    close_fds=True)
            timed_out = False
            try:
                proc.stdin.write(payload.encode())
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)
            proc.wait()
        seconds = time.perf_counter() - t0
        stdout = _tail(out_path)
        stderr = _tail(err_path)
    isolation = next((ln.split(" ", 1)[1] for ln in stderr.splitlines() if ln.startswith("\x00isolation ")), "")
    if timed_out:
        return SandboxResult(False, f"timeout after {limits.timeout:g} s", seconds, isolation)
    rc = proc.returncode
    lines = stdout.rstrip("\n").splitlines()
    if rc == 0 and lines and lines[-1] == token:
        return SandboxResult(True, "passed", seconds, isolation)
    error = next((ln.split(" ", 1)[1] for ln in stderr.splitlines() if ln.startswith("\x00error ")), None)
    if error is not None:
        reason = error
    elif rc is not None and rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        reason = {"SIGXCPU": f"CPU limit ({limits.cpu:g} s) exceeded", "SIGXFSZ": "file size limit exceeded",
                  "SIGKILL": "killed (CPU limit)"}.get(sig, f"killed by {sig}")
    elif rc == 0:
        reason = "exited before the tests finished"
    else:
        last = stderr.strip().splitlines()[-1:] if stderr.strip() else []
        reason = f"exit code {rc}" + (f" ({last[0][:200]})" if last else "")
    return SandboxResult(False, reason, seconds, isolation)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - OUTPUT_CAP))
        return f.read().decode("utf-8", "replace")
