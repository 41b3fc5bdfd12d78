"""Riemannian gradients and Hessian-vector products of general losses (written through TT
algebra on the rank-2r tangent TT: sums, norms, inner products, dense and elementwise
terms), against the dense float64 projection of the Euclidean gradient."""
from __future__ import annotations

import pytest
import torch

import ttmanifold as tm
from ttmanifold import TT, FixedTTRank, kernels

F64 = torch.float64
SHAPE, RANKS = (3, 4, 3, 2), (1, 2, 3, 2, 1)


def _oracle(M, p):
    """Orthogonal projector onto the tangent space at p, from the SVD of the Jacobian of the
    dense tensor with respect to the packed cores (float64)."""
    p64 = p.detach().to(F64)
    J = torch.autograd.functional.jacobian(lambda v: M.to_tt(v).full().reshape(-1), p64)
    Uj, S, _ = torch.linalg.svd(J, full_matrices=False)
    Q = Uj[:, : M.dim]
    return Q @ Q.T


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(3)
    M = FixedTTRank(SHAPE, RANKS)
    p = M.random(dtype=F64, generator=g)
    A = TT.random(SHAPE, 2, dtype=F64, generator=g)
    return M, p, A, _oracle(M, p)


LOSSES = {
    # name: (f on a TT, Euclidean gradient of f at the dense X)
    "norm2 of TT(X.cores) - A": (lambda A: lambda X: 0.5 * (TT(X.cores) - A).norm() ** 2,
                                 lambda X, A: X - A),
    "norm of TT(X.cores) - A": (
        lambda A: lambda X: (TT(X.cores) - A).norm(),
        lambda X, A: (X - A) / torch.linalg.vector_norm(X - A)),
    "norm2 of X - A (structured sum)": (lambda A: lambda X: 0.5 * (X - A).norm() ** 2,
                                        lambda X, A: X - A),
    "inner of a sum": (lambda A: lambda X: tm.inner(TT(X.cores) + A, TT(X.cores) - 2 * A),
                       lambda X, A: 2 * X - A),
    "full and elementwise": (lambda A: lambda X: (TT(X.cores).full() ** 3).sum()
                             + tm.inner(TT(X.cores), A), lambda X, A: 3 * X ** 2 + A),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_riemannian_grad_of_general_losses_matches_dense(case, name):
    M, p, A, P = case
    make, egrad = LOSSES[name]
    xi = M.riemannian_grad(p, make(A))
    X = M.to_tt(p).full()
    ref = (P @ egrad(X, A.full()).reshape(-1)).reshape(SHAPE)
    got = M.tangent_to_tt(p, xi).full()
    assert float(torch.linalg.vector_norm(got - ref)) <= 1e-11 * float(
        torch.linalg.vector_norm(ref))


@pytest.mark.parametrize("name", ["norm2 of TT(X.cores) - A", "norm of TT(X.cores) - A"])
def test_riemannian_grad_float32(case, name):
    M, p, A, P = case
    make, egrad = LOSSES[name]
    xi = M.riemannian_grad(p.float(), make(A.to(torch.float32)))
    X = M.to_tt(p).full()
    ref = (P @ egrad(X, A.full()).reshape(-1)).reshape(SHAPE)
    got = M.tangent_to_tt(p, xi.double()).full()
    assert float(torch.linalg.vector_norm(got - ref)) <= 1e-5 * float(
        torch.linalg.vector_norm(ref))


def test_riemannian_grad_near_the_target_float32(case):
    """f = ||X - A|| with A = X + 1e-4 Z in float32: the difference nearly cancels, so its
    norm and gradient come from the concatenated cores (the QR value); the gradient still
    matches the dense float64 one to the difference's conditioning."""
    M, p, _, P = case
    g = torch.Generator().manual_seed(4)
    Z = TT.random(SHAPE, 1, dtype=F64, generator=g)
    A = M.to_tt(p) + 1e-4 * Z
    A32 = TT([c.float() for c in A.cores])
    xi = M.riemannian_grad(p.float(), lambda X: (TT(X.cores) - A32).norm())
    X = M.to_tt(p.float().double()).full()
    D = X - A32.to(F64).full()
    ref = (P @ (D / torch.linalg.vector_norm(D)).reshape(-1)).reshape(SHAPE)
    got = M.tangent_to_tt(p, xi.double()).full()
    assert float(torch.linalg.vector_norm(got - ref)) <= 2e-2 * float(
        torch.linalg.vector_norm(ref))


def test_riemannian_hvp_of_a_general_loss(case):
    """f = 0.5 ||X - A||^2 through TT(X.cores): the Euclidean Hessian is the identity, so the
    projected Hessian-vector product of a tangent u is u (second derivatives through the
    inner-product sweep's differentiable backward)."""
    M, p, A, _ = case
    g = torch.Generator().manual_seed(5)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=g))
    h = M.riemannian_hvp(p, LOSSES["norm2 of TT(X.cores) - A"][0](A), u)
    assert float(torch.linalg.vector_norm(h - u)) <= 1e-11 * float(torch.linalg.vector_norm(u))



def _dense_tangent_map(U, V):
    """The matrix of the linear map packed deltas -> dense ``sum_k U_<k dU_k V_>k`` (float64),
    from dense contractions of the left cores ``U_<k`` and right cores ``V_>k``."""
    d = len(U)
    cols = []
    for k in range(d):
        left = torch.ones(1, 1, dtype=F64)
        for c in U[:k]:
            left = (left @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
        right = torch.ones(1, 1, dtype=F64)
        for c in reversed(V[k + 1:]):
            right = (c.reshape(-1, c.shape[2]) @ right).reshape(c.shape[0], -1)
        a, n, b = U[k].shape
        for i in range(a * n * b):
            e = torch.zeros(a * n * b, dtype=F64)
            e[i] = 1
            cols.append(((left @ e.view(a, n * b)).reshape(-1, b) @ right).reshape(-1))
    return torch.stack(cols, 1)


@pytest.fixture(params=[True, False], ids=["compiled", "torch"])
def native(request, monkeypatch):
    """Run with the compiled dense kernels (built or loaded here; skipped if they cannot
    be) or with the torch implementations only."""
    if request.param:
        kernels.build("dense", verbose=False)
        if kernels.module("dense") is None:
            pytest.skip(f"compiled dense kernels unavailable: {kernels.status()['dense']}")
    monkeypatch.setitem(kernels._config, "enabled", request.param)
    return request.param


def _spy_deltas_sweep(monkeypatch):
    """Count the calls of the deltas-only reverse sweep (a list, one entry per call)."""
    tt_mod = tm.tt.tensor_train
    direct, seen = tt_mod._one_vs_blocks_backward_deltas, []

    class Spy:
        def __call__(self, *a):
            seen.append(1)
            return direct(*a)

        def call_with(self, *a):
            seen.append(1)
            return direct.call_with(*a)

    monkeypatch.setattr(tt_mod, "_one_vs_blocks_backward_deltas", Spy())
    return seen


_BLOCK_CASES = [
    ((4, 5), (1, 3, 1)),                          # d = 2: no middle cores
    ((3, 3, 3, 3, 3, 3), (1, 2, 2, 2, 2, 2, 1)),  # one run of four equal middle cores
    ((2, 3, 4, 3, 2), (1, 2, 3, 3, 2, 1)),        # runs of one core each
]


@pytest.mark.parametrize("shape,ranks", _BLOCK_CASES)
def test_block_cores_of_packed_deltas_match_the_dense_tangent_map(native, shape, ranks):
    """The rank-2r block cores of a tangent TT as a function of its packed deltas (the
    one-node Riemannian autodiff path): their dense tensor ``J w``, the gradient of
    ``<TT(cores), B>`` (``J^T B``) and the second derivative of ``||TT(cores)||^2 / 2``
    (``J^T J v``, create_graph) against the dense float64 map ``J``; for deltas given
    packed and given as cores."""
    g = torch.Generator().manual_seed(7)
    M = FixedTTRank(shape, ranks)
    p = M.random(dtype=F64, generator=g)
    U = M.split(p)
    V = tm.manifold.right_cores(U)
    J = _dense_tangent_map(U, V)
    B = torch.randn(J.shape[0], dtype=F64, generator=g)
    w, v = torch.randn(2, M.size, dtype=F64, generator=g)
    for packed in (True, False):
        flat = w.clone().requires_grad_()
        T = (tm.TangentTT(U, V, None, flat=flat, check=False) if packed
             else tm.TangentTT(U, V, M.split(flat)))
        full = TT(T.cores).full().reshape(-1)
        assert torch.allclose(full, J @ w, rtol=0, atol=1e-13)
        (grad,) = torch.autograd.grad(torch.dot(full, B), flat, retain_graph=True)
        assert torch.allclose(grad, J.T @ B, rtol=0, atol=1e-12)
        (g2,) = torch.autograd.grad(0.5 * torch.dot(full, full), flat, create_graph=True)
        (hv,) = torch.autograd.grad(torch.dot(g2, v), flat)
        assert torch.allclose(hv, J.T @ (J @ v), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"flat must have \d+ entries per point"):
        tm.TangentTT(U, V, None, flat=w[:-1])


@pytest.mark.parametrize("shape,ranks", _BLOCK_CASES)
def test_riemannian_grad_general_loss_and_its_nan_check_on_both_paths(native, shape, ranks):
    """The general-loss gradient (block cores, their backward, the gauge projection with
    its finiteness test: compiled or torch) against the dense float64 projection of the
    Euclidean gradient; a non-finite gradient raises on either path."""
    g = torch.Generator().manual_seed(8)
    M = FixedTTRank(shape, ranks)
    p = M.random(dtype=F64, generator=g)
    A = TT.random(shape, 2, dtype=F64, generator=g)
    U = M.split(p)
    J = _dense_tangent_map(U, tm.manifold.right_cores(U))  # spans the tangent space
    xi = M.riemannian_grad(p, LOSSES["norm2 of TT(X.cores) - A"][0](A))
    Q = torch.linalg.svd(J, full_matrices=False).U[:, :M.dim]  # orthonormal basis
    E = (M.to_tt(p).full() - A.full()).reshape(-1, 1)
    ref = Q @ (Q.T @ E)  # the orthogonal projection of the Euclidean gradient
    got = M.tangent_to_tt(p, xi).full().reshape(-1, 1)
    assert float(torch.linalg.vector_norm(got - ref)) <= 1e-11 * float(
        torch.linalg.vector_norm(ref))
    for val in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match=r"f: gradient contains NaN or Inf"):
            M.riemannian_grad(p, lambda T: (TT(T.cores).full() * val).sum())


@pytest.mark.parametrize("shape,ranks", _BLOCK_CASES)
def test_packed_grads_only_reverse_pass_matches_dense_and_keeps_core_gradients(
        native, monkeypatch, shape, ranks):
    """``||TT(T.cores) - A||^2 / 2`` of a tangent TT of packed deltas (the general-loss
    sweep): inside ``packed_grads_only`` the deltas get ``J^T (J w - a)`` directly from the
    delta blocks (compiled or torch; the compiled sweeps skip the cores' zero blocks), and
    the value is ``||J w - a||^2 / 2``, in float64 and float32; outside it, or with a hook on
    a core, the cores still get their whole gradient (against the dense float64 gradient
    ``d/dcores`` of the same loss) and the deltas the same gradient through the cores."""
    tt_mod = tm.tt.tensor_train
    seen = _spy_deltas_sweep(monkeypatch)
    g = torch.Generator().manual_seed(9)
    M = FixedTTRank(shape, ranks)
    p = M.random(dtype=F64, generator=g)
    A = TT.random(shape, 2, dtype=F64, generator=g)
    U64 = M.split(p)
    V64 = tm.manifold.right_cores(U64)
    J = _dense_tangent_map(U64, V64)
    w = torch.randn(M.size, dtype=F64, generator=g)
    a = A.full().reshape(-1)
    want = J.T @ (J @ w - a)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-5)):
        U, V = [u.to(dtype) for u in U64], [None] + [v.to(dtype) for v in V64[1:]]
        Ad = TT([c.to(dtype) for c in A.cores])
        for mode in ("packed", "whole", "hooked", "leaf"):
            leaf = w.to(dtype).clone().requires_grad_()
            flat = leaf if mode == "leaf" else leaf.view_as(leaf)  # packed_grads_only's
            T = tm.TangentTT(U, V, None, flat=flat, check=False)
            cores = T.cores
            hooked = []
            if mode == "hooked":
                cores[1].register_hook(lambda gr: hooked.append(gr))
            val = 0.5 * (TT(cores) - Ad).norm() ** 2
            wval = 0.5 * float(((J @ w - a) ** 2).sum())
            assert abs(float(val) - wval) <= tol * wval
            n0 = len(seen)
            if mode == "leaf":  # a leaf cannot be named: its pass is not told apart
                with pytest.raises(ValueError, match="flat: expected a non-leaf tensor"):
                    tt_mod.packed_grads_only(flat)
                (D,) = torch.autograd.grad(val, flat)
            elif mode == "whole":
                gc = torch.autograd.grad(val, cores, retain_graph=True)
                # the dense float64 gradient of the same loss in the cores
                cs = [c.detach().double().requires_grad_() for c in cores]
                ref = torch.autograd.grad(
                    0.5 * ((TT(cs, check=False).full() - A.full()) ** 2).sum(), cs)
                for x, y in zip(gc, ref):
                    assert float((x.double() - y).abs().max()) <= tol * float(y.abs().max())
                (D,) = torch.autograd.grad(val, flat)
            else:
                with tt_mod.packed_grads_only(flat):
                    (D,) = torch.autograd.grad(val, flat)
            assert len(seen) - n0 == (1 if mode == "packed" else 0)
            assert float((D.double() - want).abs().max()) <= tol * float(want.abs().max())
            if mode == "hooked":  # the hook saw the whole gradient of its core
                assert len(hooked) == 1 and hooked[0].shape == cores[1].shape
                assert float(hooked[0][: hooked[0].shape[0] // 2].abs().max()) > 0


def test_block_cores_backward_with_some_cores_unused(native):
    """A loss of some block cores only: the others' gradients are absent (not made up as
    zeros) and count as zero; the deltas' gradient equals that of the torch concatenation
    build differentiated by autograd."""
    g = torch.Generator().manual_seed(10)
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    p = M.random(dtype=F64, generator=g)
    U = M.split(p)
    V = tm.manifold.right_cores(U)
    w = torch.randn(M.size, dtype=F64, generator=g)
    flat = w.clone().requires_grad_()
    cores = tm.TangentTT(U, V, None, flat=flat, check=False).cores
    B = [torch.randn(c.shape, dtype=F64, generator=g) for c in cores]
    val = (cores[1] * B[1]).sum() + (cores[3] * B[3]).sum()
    (got,) = torch.autograd.grad(val, flat)
    flat2 = w.clone().requires_grad_()
    ref_cores = tm.manifold.tangent._plain_block_cores(U, V, M.split(flat2))
    (want,) = torch.autograd.grad((ref_cores[1] * B[1]).sum() + (ref_cores[3] * B[3]).sum(),
                                  flat2)
    assert torch.allclose(got, want, rtol=0, atol=1e-14)
    assert float(want[: U[0].numel()].abs().max()) == 0 < float(want.abs().max())


def test_packed_grads_only_after_an_in_place_change_of_a_block_core(native):
    """A block core changed in place (here inside its zero block) is no longer taken for
    the tangent TT's: value and deltas' gradient follow the changed cores (dense float64)."""
    g = torch.Generator().manual_seed(11)
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    p = M.random(dtype=F64, generator=g)
    A = TT.random(M.shape, 2, dtype=F64, generator=g)
    U = M.split(p)
    V = tm.manifold.right_cores(U)
    flat = torch.randn(M.size, dtype=F64, generator=g).requires_grad_()
    flat = flat.view_as(flat)
    cores = tm.TangentTT(U, V, None, flat=flat, check=False).cores
    if not native:
        pytest.skip("the torch build's cores are views, which autograd forbids changing")
    with torch.no_grad():
        cores[1][0, 0, -1] += 1.0  # top-right block: zero in a tangent block core
    E = (TT([c.detach() for c in cores]).full() - A.full()).reshape(-1)
    val = 0.5 * (TT(cores) - A).norm() ** 2
    assert abs(float(val) - 0.5 * float(E @ E)) <= 1e-12 * float(E @ E)
    with tm.tt.tensor_train.packed_grads_only(flat):
        (D,) = torch.autograd.grad(val, flat)
    # reference: the torch concatenation build, the same change, the dense loss
    flat2 = flat.detach().clone().requires_grad_()
    ref = tm.manifold.tangent._plain_block_cores(U, V, M.split(flat2))
    bump = torch.zeros_like(ref[1])
    bump[0, 0, -1] = 1.0
    ref[1] = ref[1] + bump
    (want,) = torch.autograd.grad(
        0.5 * ((TT(ref, check=False).full() - A.full()) ** 2).sum(), flat2)
    assert torch.allclose(D, want, rtol=0, atol=1e-12 * float(want.abs().max()))


def test_nested_grad_of_the_block_cores_inside_riemannian_grad(native, monkeypatch):
    """A hook that runs during ``riemannian_grad``'s reverse pass and differentiates a loss
    of the same tangent TT's block cores (a nested ``autograd.grad`` on the same thread)
    gets the cores' whole gradients (dense float64 gradient in the cores), and the outer
    Riemannian gradient is still the dense projection of the Euclidean one: the deltas-only
    reverse pass applies only to the pass that asks for the deltas."""
    g = torch.Generator().manual_seed(12)
    M = FixedTTRank((3, 4, 3, 2), (1, 2, 3, 2, 1))
    p = M.random(dtype=F64, generator=g)
    A = TT.random(M.shape, 2, dtype=F64, generator=g)
    nested, seen = [], _spy_deltas_sweep(monkeypatch)

    def f(X):
        cores = X.cores
        s = (TT(cores) - A).norm()

        def hook(grad):
            with torch.enable_grad():
                v2 = 0.5 * (TT(cores) - A).norm() ** 2
                nested.append((torch.autograd.grad(v2, cores), [c.detach() for c in cores]))

        s.register_hook(hook)
        return 0.5 * s ** 2

    xi = M.riemannian_grad(p, f)
    assert len(nested) == 1 and len(seen) == 1  # the outer pass alone asks for the deltas
    gc, cs = nested[0]
    cs = [c.requires_grad_() for c in cs]
    ref = torch.autograd.grad(0.5 * ((TT(cs, check=False).full() - A.full()) ** 2).sum(), cs)
    for x, y in zip(gc, ref):
        assert x is not None and torch.allclose(x, y, rtol=0, atol=1e-12 * float(y.abs().max()))
    U = M.split(p)
    J = _dense_tangent_map(U, tm.manifold.right_cores(U))
    Q = torch.linalg.svd(J, full_matrices=False).U[:, :M.dim]
    E = (M.to_tt(p).full() - A.full()).reshape(-1)
    want = Q @ (Q.T @ E)
    got = M.tangent_to_tt(p, xi).full().reshape(-1)
    assert float(torch.linalg.vector_norm(got - want)) <= 1e-11 * float(
        torch.linalg.vector_norm(want))
