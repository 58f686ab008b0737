"""Building lmlab's C++ CPU kernels: compiled once per source, compiler, flags and CPU, cached on disk, loaded with
ctypes (no Python headers, no torch C++ API: the kernels take raw pointers, so any g++ or clang++ builds them).

    lib = build("kernels_cpu", kernel_source("kernels_cpu.cpp"))       # vmath.h + the file: compiled or cached
    KERNELS = Library("kernels_cpu", lambda: kernel_source("kernels_cpu.cpp"), what="fused C++ CPU kernels",
                      fallback="the torch reference paths", disable_env="LMLAB_DISABLE_CPP_KERNELS")
    KERNELS.available()                      # built once per process, on first use; False with one warning

Flag sets are tried in order; the first that compiles wins ($LMLAB_CXXFLAGS is appended to each, e.g. `-mno-avx512f`
to build the 8-lane kernels on an AVX-512 machine). -ffast-math is for compiling only: linked with it,
GCC < 13 would add crtfastmath.o, which flushes denormals for the whole process at load time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

FLAG_SETS = (
    (["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"], ["-fopenmp", "-lmvec"]),
    (["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"], ["-fopenmp"]),
    (["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp"], ["-fopenmp"]),
    (["-O3"], []),  # no OpenMP (e.g. Apple clang): single-threaded
)


def kernel_source(filename: str) -> str:
    """A kernel's source as compiled: vmath.h (the vectorisable exp/log the kernels share), then `filename`, both
    package data of lmlab.models. The whole text keys the build cache, so an edit to either builds anew."""
    from importlib import resources

    files = resources.files(__package__)
    return "\n".join(files.joinpath(f).read_text(encoding="utf-8") for f in ("vmath.h", filename))


def cache_dir(name: str) -> Path:
    root = os.environ.get("LMLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmlab")
    return Path(root) / name


def cpu_fingerprint() -> str:
    """The flags line of /proc/cpuinfo (what -march=native depends on), else the platform string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.platform() + platform.processor()


def build(name: str, source: str) -> ctypes.CDLL:
    """Compile `source` into a shared library (or reuse the cached one) and load it; RuntimeError with every
    compiler message if no flag set works."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    out_dir = cache_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    extra = os.environ.get("LMLAB_CXXFLAGS", "").split()  # appended, e.g. -mno-avx512f or -march=x86-64-v3
    for cflags, lflags in FLAG_SETS:
        cflags = cflags + extra
        tag = " ".join(cflags + lflags)
        key = hashlib.sha256("\n".join([source, cxx, tag, cpu_fingerprint()]).encode())
        so = out_dir / f"{name}_{key.hexdigest()[:16]}.so"
        if not so.exists():
            with tempfile.TemporaryDirectory() as tmp:
                src, obj, tmp_so = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.so"
                src.write_text(source)
                for cmd in ([cxx, *cflags, "-std=c++17", "-fPIC", "-c", str(src), "-o", str(obj)],
                            [cxx, "-shared", str(obj), "-o", str(tmp_so), *lflags]):
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode != 0:
                        errors.append(f"{tag}: {res.stderr.strip()[:300]}")
                        break
                else:
                    part = so.with_suffix(f".{os.getpid()}.part")
                    shutil.copyfile(tmp_so, part)
                    os.replace(part, so)  # atomic: concurrent builders never see half a file
            if not so.exists():
                continue
        try:
            return ctypes.CDLL(str(so))
        except OSError as e:
            errors.append(f"{tag}: {e}")
    raise RuntimeError(f"could not build {name}: " + " | ".join(errors))


class Library:
    """A C++ library built on first use, once per process (under a lock), loaded, and kept; when that fails (no
    compiler, or `disable_env` set) `available()` is False, after one RuntimeWarning naming the cause and the
    torch path used instead. `declare(lib)` may set the functions' ctypes signatures."""

    def __init__(self, name: str, source: Callable[[], str], *, what: str, fallback: str, disable_env: str,
                 declare: Callable[[ctypes.CDLL], None] | None = None):
        self.name, self.source, self.what, self.fallback = name, source, what, fallback
        self.disable_env, self.declare = disable_env, declare
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def available(self) -> bool:
        if self.lib is not None:
            return True
        if self.error is not None:
            return False
        with self._lock:
            if self.lib is None and self.error is None:
                if os.environ.get(self.disable_env):
                    self.error = f"disabled by {self.disable_env}"
                else:
                    try:
                        lib = build(self.name, self.source())
                        if self.declare is not None:
                            self.declare(lib)
                        self.lib = lib
                    except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                        self.error = str(e)
                if self.error is not None:
                    warnings.warn(f"lmlab: {self.what} unavailable ({self.error}); using {self.fallback}",
                                  RuntimeWarning, stacklevel=3)
        return self.lib is not None
