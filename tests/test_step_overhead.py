"""The batched Adam step's trimmed overhead (issue 12): component_inner's broadcast view,
TangentTT.batch_shape without broadcast_shapes, unpack_tensor's single split."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from ttmanifold import FixedTTRank, inner
from ttmanifold.kernels.memory import keep_freed_memory
from ttmanifold.manifold.sweeps import right_cores
from ttmanifold.manifold.tangent import TangentTT

F64 = torch.float64


def _dense(cores):
    """The full tensor of (batched) TT cores (r0 = rd = 1), by plain contraction."""
    X = cores[0]
    for c in cores[1:]:
        X = torch.einsum("...aNr,...rns->...aNns", X, c).flatten(-3, -2)
    return X[..., 0, :, 0].reshape(X.shape[:-3] + tuple(c.shape[-2] for c in cores))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_component_inner_is_a_broadcast_view_of_the_dots(dtype):
    M = FixedTTRank((3, 4, 3), 2)
    g = torch.Generator().manual_seed(0)
    p = M.random(5, dtype=dtype, generator=g)
    u = M.proju(p, torch.randn(5, M.size, generator=g, dtype=F64).to(dtype))
    v = M.proju(p, torch.randn(5, M.size, generator=g, dtype=F64).to(dtype))
    c = M.component_inner(p, u, v)
    assert c.shape == u.shape and c.stride(-1) == 0  # no (B, size) copy
    ref = (u.double() * v.double()).sum(-1, keepdim=True).expand_as(c)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert torch.allclose(c.double(), ref, rtol=tol, atol=tol)
    # what Adam does with it: add it to a (B, size) state
    s = torch.zeros_like(u).add_(c, alpha=0.5)
    assert torch.allclose(s.double(), 0.5 * ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("ub, db, want", [((), (4,), (4,)), ((4,), (), (4,)), ((4,), (4,), (4,)),
                                          ((3, 1), (4,), (3, 4)), ((1,), (2, 3), (2, 3))])
def test_tangent_batch_shape_broadcasts(ub, db, want):
    """batch_shape of the point's and the deltas' batches, and the full tensor it stands
    for (a dense reference: X's cores with delta_k in place of U_k, summed)."""
    M = FixedTTRank((2, 3, 2), 2)
    g = torch.Generator().manual_seed(1)
    p = M.random(math.prod(ub), dtype=F64, generator=g).reshape(ub + (M.size,))
    U = M.split(p)
    V = right_cores(U)
    flat = torch.randn(*db, M.size, dtype=F64, generator=g)
    T = TangentTT(U, V, None, flat=flat, check=True)
    assert T.batch_shape == want
    D = M.split(flat)
    Ub = [u.expand(want + u.shape[-3:]) for u in U]
    Vb = [None] + [v.expand(want + v.shape[-3:]) for v in V[1:]]
    Db = [c.expand(want + c.shape[-3:]) for c in D]
    ref = sum(_dense([Db[k] if j == k else (Ub[j] if j < k else Vb[j]) for j in range(3)])
              for k in range(3))
    full = T.full()
    assert full.shape == want + M.shape
    assert torch.allclose(full, ref, atol=1e-12)
    assert torch.allclose(inner(T, T), (ref * ref).sum((-3, -2, -1)), atol=1e-10)


def test_unpack_tensor_gradient_matches_dense_projection():
    """The loss's gradient through unpack_tensor (cores passed on, one split) equals the
    dense tangent projection of the Euclidean gradient."""
    M = FixedTTRank((3, 4, 3), 2)
    g = torch.Generator().manual_seed(2)
    p = M.random(3, dtype=F64, generator=g).requires_grad_()
    A = torch.randn(3, *M.shape, dtype=F64, generator=g)
    T = M.unpack_tensor(p)
    (0.5 * (T.full() ** 2).sum((-3, -2, -1)) - (T.full() * A).sum((-3, -2, -1))).sum().backward()
    G = M.egrad2rgrad(p.detach(), p.grad)
    X = M.to_tt(p.detach()).full()
    for b in range(3):
        # the tangent space's projector from the core map's Jacobian (dense, float64)
        Ub = [c.detach() for c in M.split(p.detach()[b])]
        J = torch.autograd.functional.jacobian(
            lambda f: TangentTT(Ub, right_cores(Ub), None, flat=f).full().reshape(-1),
            torch.zeros(M.size, dtype=F64))
        W, S, _ = torch.linalg.svd(J, full_matrices=False)
        Q = W[:, S > 1e-10 * S[0]]  # an orthonormal basis of the tangent space
        want = Q @ (Q.T @ (X[b] - A[b]).reshape(-1))
        got = M.tangent_to_tt(p.detach()[b], G[b]).full().reshape(-1)
        assert torch.allclose(got, want, atol=1e-10)


_FAULTS = """
import resource, sys, torch
from ttmanifold.kernels.memory import keep_freed_memory
if sys.argv[1] == "1":
    assert keep_freed_memory()
def cycle():
    t = torch.empty(40 << 20, dtype=torch.uint8)
    t.fill_(1)  # first write: faults the pages in unless reused
    del t
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_keep_freed_memory_reuses_large_blocks():
    """A 40 MB temporary allocated and freed again and again: faulted in afresh every time
    by default (~10^4 faults of 4 KB pages each), reused after keep_freed_memory (run in
    a child process: the setting is process-wide)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    counts = [int(subprocess.run([sys.executable, "-c", _FAULTS, arg], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()[-1])
              for arg in ("0", "1")]
    # (with it, at most the first reuse faults: glibc may place it anew once)
    assert counts[0] > 50000 and counts[1] < counts[0] / 3, counts
    with pytest.raises(ValueError, match="limit_bytes"):
        keep_freed_memory(0)
