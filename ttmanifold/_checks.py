"""Input validation shared by the modules of ttmanifold.

Every public entry point validates its arguments here, *before* any torch kernel runs,
so that bad input gives a clear error naming the argument instead of a shape error from
deep inside torch.
"""
from __future__ import annotations

import math
import numbers
import os
import tempfile
import warnings
from typing import Optional, Sequence, Tuple

import torch

# half precisions are rejected: torch's QR/SVD kernels (the sweeps) do not support them
SUPPORTED_DTYPES = (torch.float32, torch.float64)

# torch.compiler.is_compiling: true while dynamo traces (checked first wherever a torch._C
# predicate dynamo cannot trace would follow)
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def check_float_dtype(dtype: torch.dtype, name: str) -> None:
    """Raise ``TypeError`` unless ``dtype`` is a supported real floating dtype."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected a real floating dtype (float32 or float64), got {dtype} "
            f"(half precisions and complex dtypes are not supported)"
        )


def check_shape(shape, name: str = "shape") -> Tuple[int, ...]:
    """Validate a tensor shape (a non-empty sequence of positive ints)."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, numbers.Integral):
        shape = (int(shape),)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of positive ints, got {shape!r}") from None
    if len(shape) == 0:
        raise ValueError(f"{name}: expected at least one mode, got an empty shape")
    out = []
    for n in shape:
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name}: every mode size must be a positive int, got {shape!r}")
        out.append(int(n))
    return tuple(out)


def feasible_ranks(shape: Sequence[int]) -> Tuple[int, ...]:
    """The largest TT-ranks a tensor of ``shape`` can have.

    ``r_k^max = min(n_1 ... n_k, n_{k+1} ... n_d)``, returned as ``(1, r_1^max, ..., 1)``.
    Products are capped to avoid overflow for large d.
    """
    shape = check_shape(shape)
    d = len(shape)
    cap = 1 << 62
    left = [1]
    for n in shape:
        left.append(min(left[-1] * n, cap))
    right = [1]
    for n in reversed(shape):
        right.append(min(right[-1] * n, cap))
    right = right[::-1]
    return tuple(min(left[k], right[k]) for k in range(d + 1))


def normalize_ranks(
    shape: Sequence[int],
    ranks=None,
    max_rank=None,
    *,
    name: str = "ranks",
    clip: bool = True,
    stacklevel: int = 3,
) -> Tuple[int, ...]:
    """Turn a rank request into a full tuple ``(1, r_1, ..., r_{d-1}, 1)``.

    ``ranks`` may be an int (every inner rank), a sequence of length ``d - 1`` (inner ranks)
    or of length ``d + 1`` (with boundary ranks, which must be 1). ``max_rank`` caps every
    inner rank. Ranks beyond the feasible bound ``min(n_1..n_k, n_{k+1}..n_d)`` are clipped
    with a ``UserWarning`` when ``clip`` is true, rejected with ``ValueError`` otherwise.
    """
    shape = check_shape(shape)
    d = len(shape)
    feas = feasible_ranks(shape)
    if ranks is None and max_rank is None:
        raise ValueError(f"{name}: give ranks or max_rank")
    if ranks is None:
        req = [1] + [None] * (d - 1) + [1]
    elif isinstance(ranks, numbers.Integral) and not isinstance(ranks, bool):
        if ranks < 1:
            raise ValueError(f"{name}: ranks must be positive, got {ranks}")
        req = [1] + [int(ranks)] * (d - 1) + [1]
    else:
        try:
            ranks = [int(r) if isinstance(r, numbers.Integral) and not isinstance(r, bool)
                     else r for r in ranks]
        except TypeError:
            raise TypeError(f"{name}: expected an int or a sequence of ints, got {ranks!r}") from None
        if not all(isinstance(r, int) for r in ranks):
            raise TypeError(f"{name}: expected ints, got {ranks!r}")
        if len(ranks) == d + 1:
            if ranks[0] != 1 or ranks[-1] != 1:
                raise ValueError(
                    f"{name}: boundary ranks r_0 and r_d must be 1, got {tuple(ranks)}"
                )
            req = list(ranks)
        elif len(ranks) == d - 1:
            req = [1] + list(ranks) + [1]
        else:
            raise ValueError(
                f"{name}: expected {d - 1} inner ranks or {d + 1} ranks with r_0 = r_d = 1 "
                f"for a tensor of order {d}, got {len(ranks)}"
            )
        if any(r < 1 for r in req):
            raise ValueError(f"{name}: ranks must be positive, got {tuple(req)}")
    if max_rank is not None:
        if not isinstance(max_rank, numbers.Integral) or isinstance(max_rank, bool) or max_rank < 1:
            raise ValueError(f"max_rank: expected a positive int, got {max_rank!r}")
        req = [1] + [min(int(max_rank), r) if r is not None else int(max_rank)
                     for r in req[1:-1]] + [1]
    out = tuple(min(r, f) for r, f in zip(req, feas))
    if out != tuple(req):
        if ranks is not None and not clip:
            raise ValueError(
                f"{name}: ranks {tuple(req)} are infeasible for shape {shape}; each r_k must "
                f"be at most min(n_1..n_k, n_(k+1)..n_d), i.e. {feas}"
            )
        if ranks is not None:
            warnings.warn(
                f"{name}: requested ranks {tuple(req)} exceed the feasible bound {feas} for "
                f"shape {shape}; clipped to {out}",
                UserWarning,
                stacklevel=stacklevel,
            )
    return out


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (skipped on the meta device).

    This synchronizes with the device; call it only on entry points, never in hot loops.
    """
    if x.device.type == "meta":
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf values")


def check_positive_float(value, name: str, *, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
    return float(value)


def assert_finite_async(x, name: str, message: Optional[str] = None) -> None:
    """Fail with ``RuntimeError("<name>: contains NaN or Inf")`` if ``x`` (a tensor, or a
    sequence of tensors checked together) holds a non-finite value, without a host sync
    (``torch._assert_async``: immediate on the CPU, asynchronous on CUDA). ``sum(0 * x)``
    is 0 when every entry is finite and NaN as soon as one is NaN or +-Inf: no overflow,
    and four operations whatever the size (a GPU launches a kernel for each). A sequence
    costs two more whatever its length: one fused 1-norm per tensor (NaN propagates, Inf
    stays Inf; no copy of non-contiguous tensors; as fast as the sums on the CPU, unlike the
    max-norm) and a stack. The one caveat: a sum of magnitudes above the dtype's largest
    value (float32: 3e38) also fails, where the sweeps would overflow anyway. Skipped on
    the meta device and for functorch-wrapped tensors (vmap/grad), whose values are not
    concrete."""
    if not isinstance(x, torch.Tensor):
        xs = [t for t in x if t.numel()]
        if not xs or any(t.device.type == "meta" or functorch_wrapped(t) for t in xs):
            return
        x = xs[0] if len(xs) == 1 else torch.stack(torch._foreach_norm(xs, 1))
    if x.device.type == "meta" or functorch_wrapped(x) or x.numel() == 0:
        return
    torch._assert_async((x * 0).sum() == 0, message or f"{name}: contains NaN or Inf")


def assert_each_finite_async(xs: Sequence[torch.Tensor], messages: Sequence[str]) -> None:
    """:func:`assert_finite_async` of each tensor of ``xs`` with its own message, in order:
    the first non-finite one raises ``RuntimeError(messages[i])`` (no host sync). One
    fused 1-norm call for all (NaN propagates, Inf stays Inf), then a comparison and an
    assert per tensor: ``1 + 2 k`` operations for ``k`` tensors (separate calls: ``4 k``).
    As for a sequence in :func:`assert_finite_async`, a 1-norm above the dtype's largest
    value (float32: 3e38) also fails. Skipped as :func:`assert_finite_async` is (meta,
    functorch); empty tensors pass."""
    xs = list(xs)
    if any(t.device.type == "meta" or functorch_wrapped(t) for t in xs):
        return
    keep = [(t.detach(), m) for t, m in zip(xs, messages) if t.numel()]
    if not keep:
        return
    norms = torch._foreach_norm([t for t, _ in keep], 1)
    for n, (_, m) in zip(norms, keep):
        torch._assert_async(n < math.inf, m)


def functorch_wrapped(t) -> bool:
    """Whether ``t`` (a tensor, or any tensor of a sequence) is a functorch (vmap/grad)
    wrapper or a legacy batched tensor (the batched gradients of
    ``torch.autograd.functional.jacobian(..., vectorize=True)``): kernels that write into
    reused buffers or read raw data pointers cannot take those, nor can checks that read
    values. Ask it of every tensor an operation reads: under ``vmap`` of a function of
    one core, the other cores of a TT are plain tensors.

    Under ``torch.compile`` tracing this is False without calling the functorch C
    predicates (dynamo cannot trace them: a graph break); traced tensors are fake
    tensors, whose values no check reads anyway."""
    if _is_compiling():
        return False
    ts = (t,) if isinstance(t, torch.Tensor) else t
    return any(fn(x) for x in ts for fn in _FUNCTORCH_PREDICATES)


_FUNCTORCH_PREDICATES = tuple(
    fn for fn in (getattr(getattr(torch._C, "_functorch", None), name, None)
                  for name in ("is_functorch_wrapped_tensor", "is_legacy_batchedtensor"))
    if fn is not None)


def ensure_writable_dir(path) -> None:
    """Create the directory ``path`` if missing and check that files can be written in it,
    by creating and removing one.

    ``os.access`` is not enough: it says yes to root on read-only or special file systems
    and can be wrong on network file systems, and a command would then fail only when it
    writes its results, after all its work (also used for the compiled kernels'
    cache).

    Args:
        path: a directory path.
    Raises:
        OSError: when the directory cannot be created or written (``strerror`` says why).
    Cost: one file creation and removal.
    """
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=path)
    os.close(fd)
    os.remove(probe)


def check_right_cores(V, U: Sequence[torch.Tensor], name: str = "V") -> list:
    """Validate right-orthogonal cores passed in by a caller (``V=`` of the sampled
    projections, ``IndexSet.project``) against the point's cores ``U``.

    Args:
        V: ``d`` entries, ``V[0]`` unused, ``V[k]`` of ``U[k]``'s shape (batch included).
        U: the point's (or points') left-orthogonal cores.
        name: the argument named in the error.
    Returns:
        ``V`` as a list; ``ValueError`` naming ``name`` for another length or shape (the
        cores of a batch at one point, or of fewer points, were read silently or out of
        range). Values are not checked (they are trusted to be the point's).
    Cost: O(d)."""
    if (isinstance(V, torch.Tensor) or not isinstance(V, (list, tuple)) or len(V) != len(U)
            or any(not isinstance(v, torch.Tensor) or v.shape != u.shape
                   for v, u in zip(V[1:], U[1:]))):
        raise ValueError(f"{name}: expected the point's right-orthogonal cores, {len(U)} cores "
                         f"of shapes {[tuple(u.shape) for u in U]} ({name}[0] unused)")
    return list(V)
