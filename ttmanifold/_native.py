"""Compatibility shim over :mod:`ttmanifold.kernels` (the one seam for the compiled kernels)
for the call sites not yet moved to it; to be removed.

``get_dense()``, ``dense_usable()`` and ``usable()`` never block (a missing build starts in a
separate background process, see :func:`ttmanifold.kernels.module`); ``get()`` and
``get_dense(wait=True)`` build in the foreground when the set is not loaded
(:func:`ttmanifold.kernels.build`).
"""
from __future__ import annotations

from typing import Optional

from . import kernels as _kernels

# Index sets smaller than this stay on the torch kernels: there the build would not pay
# off, and small runs (tests, ``ttmanifold compare --quick``) never start it.
MIN_SAMPLES = 1 << 14


def set_enabled(flag: bool) -> None:
    _kernels.set_enabled(flag)


def enabled() -> bool:
    return _kernels.enabled()


def _get(name: str, wait: bool):
    mod = _kernels.module(name)
    if mod is None and wait and _kernels.enabled() and _kernels._SETS[name].failed is None:
        _kernels.build((name,), verbose=False)
        mod = _kernels.module(name)
    return mod


def get() -> Optional[object]:
    """The compiled sampled-entry module, or None (disabled, or the build failed: warned
    once). Builds in the foreground when not built yet."""
    return _get("sampled", True)


def get_dense(wait: bool = False) -> Optional[object]:
    """The compiled dense-sweep module, or None; ``wait=True`` builds it in the foreground
    when it is not built yet."""
    return _get("dense", wait)


def dense_usable(*groups) -> bool:
    return _kernels.usable("dense", *groups)


def usable(t) -> bool:
    return _kernels.usable("sampled", t)
