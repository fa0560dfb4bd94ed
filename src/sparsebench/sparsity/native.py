"""Build and load the native CSR kernels (``csrc/csr_linear.cpp``) on first use (issue 14).

The source is compiled once per machine type with the system C++ compiler (``$CXX``, else ``c++``):
``-O3 -march=native -fopenmp -shared -fPIC``, into ``$SPARSEBENCH_CACHE/native/`` (default
``~/.cache/sparsebench``), under a name that hashes the source, the flags, the compiler's version and
the CPU (model and instruction-set flags), so nodes of a cluster that share a home directory never load
a library built for another CPU. Concurrent first uses (pytest workers, DDP ranks) serialise on a
``filelock``; the library is written to a temporary name and renamed, so no process loads half a file.
It is loaded with :mod:`ctypes` after torch, so its OpenMP calls bind to the ``libgomp.so.1`` torch
already loaded (one thread pool, sized per call from ``torch.get_num_threads()``).

The kernels need AVX-512F (``torch.backends.cpu.get_cpu_capability()``) and float32 CPU tensors.
:func:`load` returns None where the library cannot be had: no AVX-512, no compiler, a failed build, or
``SPARSEBENCH_NATIVE=0``; :func:`unavailable_reason` says which. The ``native`` kernels backend is then
not available and ``trainer.sparse_backend=auto`` picks the next one.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch  # noqa: F401  (loaded first: the library's OpenMP binds to torch's libgomp)

SOURCE = Path(__file__).with_name("csrc") / "csr_linear.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++14")
ABI_VERSION = 8
_reason: Optional[str] = None


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> Optional[Tuple[str, ...]]:
    """The lines of Linux ``/proc/cpuinfo`` (read once), or None where it cannot be read."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return None


def _cpuinfo_value(key: str) -> str:
    """The value of the first ``/proc/cpuinfo`` line starting with ``key`` (the first CPU's), else ``""``."""
    for ln in _cpuinfo() or ():
        if ln.startswith(key) and ":" in ln:
            return ln.split(":", 1)[1].strip()
    return ""


def _cpu_id() -> str:
    """Model name and instruction-set flags of this CPU (Linux ``/proc/cpuinfo``; else the platform)."""
    lines = _cpuinfo()
    if lines is None:
        return platform.processor() + platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep) or platform.processor()


def cpu_vendor() -> str:
    """The CPU's ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``), else ``""``: the kernels' register-block
    widths are measured per vendor (:attr:`~sparsebench.sparsity.kernels.NativeKernels.CHUNKS`)."""
    return _cpuinfo_value("vendor_id")


def cpu_flags() -> frozenset:
    """The CPU's instruction-set flags (``avx512f``, ``avx512_bf16``, ...), empty where unknown."""
    return frozenset(_cpuinfo_value("flags").split())


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def library_path(cxx: str) -> Path:
    """Where the library for this source, compiler, flags and CPU lives in the cache."""
    from sparsebench.data import cache_dir

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_id()]).encode()).hexdigest()
    return cache_dir() / "native" / f"csr_linear-{key[:16]}.so"


def _build(cxx: str, target: Path) -> None:
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
        try:
            res = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, L, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suf in ("i16", "i32"):
        getattr(lib, f"sb_spmm_{suf}").argtypes = [L, L, P, P, P, P, P, L, P, L, I, I]
        getattr(lib, f"sb_bwd_{suf}").argtypes = [L, L, L, L, P, P, P, P, L, P, L, P, L, P, I, I]
        getattr(lib, f"sb_sddmm_{suf}").argtypes = [L, L, P, P, P, L, P, L, P, I, I]
        getattr(lib, f"sb_transpose_{suf}").argtypes = [L, L, P, P, P, P, P, P]
        getattr(lib, f"sb_merge_{suf}").argtypes = [L, L, P, P, P, L, P, L, P, P, P, L]
        getattr(lib, f"sb_merge_{suf}").restype = I
        for f in ("spmm", "bwd", "sddmm", "transpose"):
            getattr(lib, f"sb_{f}_{suf}").restype = None
    lib.sb_select_gt.argtypes = [P, L, ctypes.c_float, P, L]
    lib.sb_select_gt.restype = L
    lib.sb_select_vals.argtypes = [P, L, ctypes.c_float, I, L, P, P, L, I]
    lib.sb_select_vals.restype = L
    lib.sb_select_bound_bf16.argtypes = [P, L, L, ctypes.c_float, P, P, L, P, L, I]
    lib.sb_select_bound_bf16.restype = L
    lib.sb_drop_listed.argtypes = [P, P, L, P, L]
    lib.sb_drop_listed.restype = L
    lib.sb_remap.argtypes = [P, L, P, P]
    lib.sb_remap.restype = None
    lib.sb_abi_version.restype = I
    if lib.sb_abi_version() != ABI_VERSION:
        raise RuntimeError(f"ABI version {lib.sb_abi_version()} != {ABI_VERSION}")
    return lib


@functools.lru_cache(maxsize=1)
def load() -> Optional[ctypes.CDLL]:
    """The loaded kernels library (built on first call), or None with :func:`unavailable_reason` set."""
    global _reason
    _reason = None  # a reason from an earlier call (before a cache_clear) no longer holds
    if os.environ.get("SPARSEBENCH_NATIVE", "1") == "0":
        _reason = "disabled by SPARSEBENCH_NATIVE=0"
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        _reason = f"needs AVX-512 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
        return None
    cxx = _compiler()
    if cxx is None:
        _reason = "no C++ compiler ($CXX, c++ or g++) on PATH"
        return None
    try:
        target = library_path(cxx)
        if not target.exists():
            _build(cxx, target)
        return _bind(ctypes.CDLL(str(target)))
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        _reason = f"build or load failed: {exc}"
        return None


def available() -> bool:
    """True when :func:`load` gives the library (builds it on the first call)."""
    return load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`load` returned None (None while it has not, or when it loaded)."""
    return _reason
