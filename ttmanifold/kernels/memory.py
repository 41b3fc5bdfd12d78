"""Large outputs and reductions of packed batches that do not pay for fresh memory.

A batch of packed points ``(B, size)`` is tens of MB (256 points at d = 10, n = 20,
r = 10 in float64: 34 MB). Above 32 MB glibc maps every allocation afresh, and the
first write faults it in 4 KB pages: a product of two such tensors cost 14 ms instead of
4 ms. :func:`empty_for_output` asks the kernel for transparent huge pages before the
first write (2 MB pages: ~500x fewer faults); :func:`packed_dot` reduces without a full
temporary. Neither changes the process's allocator settings; :func:`keep_freed_memory`
(opt-in, process-wide) does, for the temporaries other code allocates afresh every step.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Optional, Sequence

import torch

from . import enabled as kernels_enabled

__all__ = ["advise_huge_pages", "big_cpu_output", "clone_for_output", "empty_for_output",
           "dot_in_slices", "keep_freed_memory", "packed_dot", "HUGE_PAGE_MIN_BYTES",
           "DOT_CHUNK_BYTES"]

#: CPU tensors of at least this many bytes are advised to use transparent huge pages
#: (two 2 MB pages: below that no whole aligned page fits reliably inside).
HUGE_PAGE_MIN_BYTES = 4 << 20

#: :func:`packed_dot` multiplies and sums slices of about this many bytes (in cache)
#: when the inputs are larger than four of them; smaller inputs take one product.
DOT_CHUNK_BYTES = 1 << 20

_PAGE = 2 << 20
_MADV = getattr(mmap, "MADV_HUGEPAGE", None)
_madvise = None  # libc's madvise, loaded on first use (Linux only)


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Opt-in, process-wide: let glibc's ``malloc`` serve CPU blocks up to ``limit_bytes``
    from its heap and keep freed memory instead of returning it to the OS
    (``mallopt(M_MMAP_THRESHOLD, limit_bytes)``, ``mallopt(M_TRIM_THRESHOLD,
    2 * limit_bytes)``).

    By default glibc maps every block above 32 MB afresh and unmaps it when freed, so
    each such temporary is faulted in again in 4 KB pages on its first write: an optimizer
    step that allocates new ``(B, size)`` tensors every call (geoopt's ``RiemannianAdam``
    makes four) pays that every step (256 float64 points at d = 10, n = 20, r = 10:
    34 MB each, ~13 ms per tensor). With this the blocks are reused, already faulted in.
    The cost: memory freed by the process stays in it (the resident size does not shrink
    after a peak). Not called by ttmanifold itself.

    Args:
        limit_bytes: blocks up to this size come from the heap (default and at most 1 GB).
    Returns:
        whether both settings were applied (False off Linux/glibc: nothing changed).
    Cost: two library calls.
    """
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes <= 0:
        raise ValueError(f"limit_bytes: expected a positive int, got {limit_bytes!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = min(limit_bytes, 1 << 30)  # (mallopt takes a C int)
    return (mallopt(_M_MMAP_THRESHOLD, limit) == 1
            and mallopt(_M_TRIM_THRESHOLD, min(2 * limit, (1 << 31) - 1)) == 1)


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise transparent huge pages (``madvise(MADV_HUGEPAGE)``) for the whole 2 MB pages
    inside the memory of ``t``, a CPU tensor of at least :data:`HUGE_PAGE_MIN_BYTES`.

    Advice only (the values are untouched, errors ignored); a no-op off Linux, off the
    CPU, for meta tensors, small tensors and tensors that do not own contiguous memory.
    Best called before the first write (the pages are then faulted in 2 MB at a time).

    Args:
        t: the tensor.
    Returns:
        whether the advice was given.
    Cost: one system call (a few microseconds), no pass over the data.
    """
    if (_MADV is None or not sys.platform.startswith("linux") or t.device.type != "cpu"
            or t.is_sparse or not t.is_contiguous() or torch.compiler.is_compiling()):
        return False
    nbytes = t.numel() * t.element_size()
    if nbytes < HUGE_PAGE_MIN_BYTES:
        return False
    fn = _libc_madvise()
    if not fn:
        return False
    a = t.data_ptr()
    s, e = (a + _PAGE - 1) & ~(_PAGE - 1), (a + nbytes) & ~(_PAGE - 1)
    return e > s and fn(s, e - s, _MADV) == 0


def big_cpu_output(t: torch.Tensor) -> bool:
    """Whether an output of ``t``'s size, dtype and device is worth :func:`empty_for_output`:
    on the CPU with the compiled kernels enabled, at least :data:`HUGE_PAGE_MIN_BYTES`, not
    while tracing. Smaller tensors, other devices and the torch path (kernels off: what a
    GPU runs, and what the operation counts measure) keep their single operation."""
    return (t.device.type == "cpu" and t.numel() * t.element_size() >= HUGE_PAGE_MIN_BYTES
            and kernels_enabled() and not torch.compiler.is_compiling())


def clone_for_output(t: torch.Tensor) -> torch.Tensor:
    """``t.clone()`` (contiguous), into :func:`empty_for_output` when :func:`big_cpu_output`;
    differentiable as ``clone``. Cost: one pass over ``t``."""
    if not big_cpu_output(t):
        return t.clone()
    return empty_for_output(t.shape, t.dtype, t.device).copy_(t)


def empty_for_output(shape: Sequence[int], dtype: torch.dtype,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, advised to use transparent huge
    pages when it is a large CPU tensor (:func:`advise_huge_pages`), for a kernel or an
    ``out=`` operation to write next.

    Args:
        shape: the shape; dtype, device: as ``torch.empty``'s (device None: the default).
    Returns:
        the uninitialised tensor.
    Cost: the allocation plus at most one system call; the first write then faults the
    memory in 2 MB pages (a 34 MB float64 batch: ~4 ms to write instead of ~14 ms).
    """
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    advise_huge_pages(out)
    return out


def dot_in_slices(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`packed_dot` sums ``a * b`` in slices: two ``(B, n)`` CPU tensors of
    one shape, at least four slices large, with the compiled kernels enabled (a CPU-kernel
    choice: with them off the torch path is what a GPU runs, and what the operation counts
    measure), not while tracing. Cost: a few attribute reads."""
    return (a.dim() == 2 and a.shape == b.shape and a.device.type == "cpu"
            and a.numel() * a.element_size() >= 4 * DOT_CHUNK_BYTES
            and kernels_enabled() and not torch.compiler.is_compiling())


def packed_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` of two packed batches ``(B, n)`` of one shape, on the CPU in
    slices of rows of about :data:`DOT_CHUNK_BYTES` when they are larger than four slices
    (the products stay in cache: no full-size temporary); otherwise one product and sum.
    Differentiable only as one product (the slices are taken without a graph).

    Args:
        a, b: tensors of one shape ``(*B, n)``, dtype and device.
    Returns:
        the ``B`` inner products (values as ``(a * b).sum(-1)``: the same products and
        the same reduction of each row).
    Cost: O(B n), one pass over each input; ~1.9 ms instead of ~14.8 for 256 x 16400
    float64 numbers (1 thread).
    """
    if not dot_in_slices(a, b) or (torch.is_grad_enabled()
                                   and (a.requires_grad or b.requires_grad)):
        return (a * b).sum(-1)
    rows = max(1, DOT_CHUNK_BYTES // max(1, a.shape[1] * a.element_size()))
    out = a.new_empty(a.shape[0])
    for i in range(0, a.shape[0], rows):
        torch.sum(a[i:i + rows] * b[i:i + rows], -1, out=out[i:i + rows])
    return out
