"""Shared checks of the compiled batch kernels' tests: the torch path to compare with, a
relative error, and the dense float64 TT-SVD reference of the retraction."""
from __future__ import annotations

import torch

from ttmanifold import kernels


def torch_path(monkeypatch, fn):
    """fn() with the compiled kernels off (the torch batch path)."""
    with monkeypatch.context() as m:
        m.setitem(kernels._config, "enabled", False)
        return fn()


def rel_err(x, ref):
    """max |x - ref| / max |ref|."""
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def dense_ttsvd(A, ranks):
    """The full tensor of the TT-SVD of the dense float64 ``A`` at TT-ranks ``ranks``
    (sequential truncated SVDs of the unfoldings): round_r(A), the retraction's result."""
    shape, d = A.shape, A.dim()
    cores, rest, r = [], A.reshape(1, -1), 1
    for k in range(d - 1):
        u, s, vh = torch.linalg.svd(rest.reshape(r * shape[k], -1), full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r])
        rest = s[:r, None] * vh[:r]
    out = rest.reshape(r, -1)
    for c in reversed(cores):
        out = (c @ out.reshape(c.shape[1], -1)).reshape(c.shape[0], -1)
    return out.reshape(shape)


def assert_left_orthogonal(M, y, tol):
    """Every core but the last of the packed points ``y`` of ``M`` is left-orthogonal (its
    ``r n x r'`` unfolding has orthonormal columns, within ``tol``)."""
    for c in M._split(y, "y")[:-1]:
        a, n, b = c.shape[-3:]
        m = c.reshape(c.shape[:-3] + (a * n, b)).double()
        eye = torch.eye(b, dtype=torch.float64)
        assert float((m.mT @ m - eye).abs().max()) < tol
