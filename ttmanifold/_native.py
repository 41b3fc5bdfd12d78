"""Optional compiled CPU kernels, two small C++ extensions built on first use with
:func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja are needed; about 20 s
each, once, then cached in torch's extension directory, by default
``~/.cache/torch_extensions``):

- :func:`get`: the sampled-entry sweeps (``_sampled_kernels.cpp``, used by
  :mod:`ttmanifold.sparse` for index sets of at least ``MIN_SAMPLES`` samples; built
  synchronously on first use);
- :func:`get_dense`: the dense sweeps of the manifold (``_dense_kernels.cpp``: the
  right-orthogonal cores, the projection of a TT, the retraction; used by
  :mod:`ttmanifold.tangent` and :class:`~ttmanifold.FixedTTRank` on the CPU when no gradient
  must flow; built in a background thread).

Both compute what the torch implementations compute; those serve every other case and any
machine where a build fails (one warning each). Set the environment variable
``TTMANIFOLD_NATIVE=0`` (or call ``set_enabled(False)``) to never build or use them.
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
import time
import warnings
from typing import Optional

import torch

# Index sets smaller than this stay on the torch kernels: there the build (about 20 s, once)
# would not pay off, and small runs (tests, ``ttmanifold compare --quick``) never start it.
MIN_SAMPLES = 1 << 14

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sampled_kernels.cpp")
_state = {"module": None, "tried": False,
          "enabled": os.environ.get("TTMANIFOLD_NATIVE", "1").strip().lower()
          not in ("0", "false", "no", "off")}


def set_enabled(flag: bool) -> None:
    """Use (``True``, the default) or never use (``False``) the compiled kernels."""
    _state["enabled"] = bool(flag)


def enabled() -> bool:
    return bool(_state["enabled"])


def _cpu_tag() -> str:
    """The CPU features the build targets (-march=native): part of the build's name, so a
    cache directory shared between different machines never serves a foreign build."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _build(src_path: str = _SRC, prefix: str = "ttmanifold_sampled", openmp: bool = True):
    from torch.utils import cpp_extension

    with open(src_path, "rb") as fh:
        src = fh.read()
    h = hashlib.sha1(src + _cpu_tag().encode() + torch.__version__.encode()).hexdigest()[:12]
    flags = ["-O3"] + (["-fopenmp"] if openmp else [])
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64")
                     else "-mcpu=native")
    name = f"{prefix}_{h}"
    # a build killed half-way leaves its lock file behind, and torch would wait for it
    # forever: drop a lock older than any build takes
    lock = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock")
    try:
        if time.time() - os.path.getmtime(lock) > 300:
            os.remove(lock)
    except OSError:
        pass
    return cpp_extension.load(name=name, sources=[src_path], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"] if openmp else [], verbose=False)


def get() -> Optional[object]:
    """The compiled sampled-entry module, or None (disabled, or the build failed: warned
    once). Builds on first call (blocking)."""
    if not _state["enabled"]:
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = _build()
        except Exception as exc:  # no compiler, no ninja, ...: the torch kernels serve
            warnings.warn(f"ttmanifold: compiled sampled-entry kernels unavailable ({exc!s:.300}); "
                          "using the torch kernels", RuntimeWarning, stacklevel=2)
    return _state["module"]


_DENSE_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dense_kernels.cpp")
_dense = {"module": None, "thread": None, "failed": False}
_dense_lock = threading.Lock()


def _build_dense() -> None:
    try:
        _dense["module"] = _build(_DENSE_SRC, "ttmanifold_dense", openmp=False)
    except Exception as exc:  # no compiler, LAPACK symbols not exported by this torch, ...
        _dense["failed"] = True
        warnings.warn(f"ttmanifold: compiled dense sweeps unavailable ({exc!s:.300}); using "
                      "the torch implementation", RuntimeWarning, stacklevel=2)


def get_dense(wait: bool = False) -> Optional[object]:
    """The compiled dense-sweep module (``_dense_kernels.cpp``: the right-orthogonal cores
    and the tangent projection of a TT, calling LAPACK/BLAS directly), or None.

    The first call starts the build in a background thread and returns None until it is
    done (the torch implementation serves meanwhile), so no manifold operation ever waits
    for the compiler; ``wait=True`` waits for the build (benchmarks, tests)."""
    if not _state["enabled"]:
        return None
    mod = _dense["module"]
    if mod is not None or _dense["failed"]:
        return mod
    with _dense_lock:
        if _dense["thread"] is None:
            t = threading.Thread(target=_build_dense, name="ttmanifold-build", daemon=False)
            _dense["thread"] = t
            t.start()
    if wait:
        _dense["thread"].join()
    return _dense["module"]


def dense_usable(*groups) -> bool:
    """Whether the compiled dense sweeps serve these cores: CPU, float32/float64, all of one
    dtype, no gradient needed, and the module is built (callers pass contiguous copies)."""
    if not _state["enabled"]:
        return False
    ref = groups[0][0]
    if ref.device.type != "cpu" or ref.dtype not in (torch.float32, torch.float64):
        return False
    grad = torch.is_grad_enabled()
    for g in groups:
        for c in g:
            if c is None:
                continue
            if c.dtype != ref.dtype or c.device.type != "cpu" or (grad and c.requires_grad):
                return False
    return get_dense() is not None


def usable(t: torch.Tensor) -> bool:
    """Whether the compiled kernels serve tensors like ``t`` (CPU, float32/float64)."""
    return (_state["enabled"] and t.device.type == "cpu"
            and t.dtype in (torch.float32, torch.float64) and get() is not None)
