"""geoopt 0.5.1 optimizers run unmodified on :class:`ttmanifold.FixedTTRank`.

The parameter is ``geoopt.ManifoldParameter(M.random(...), manifold=M)``; the loss is
computed from ``p.unpack_tensor()``, whose backward leaves the Riemannian gradient in
``p.grad``.

RiemannianSGD trajectories are compared with an independent dense implementation of the
same method: X is kept as a dense tensor, the Euclidean gradient is computed densely, the
tangent projector comes from the Jacobian of the core map of a TT-SVD of X (plain einsum,
no ttmanifold code), the retraction is the dense TT-SVD (sequential truncated SVDs) of
``X + xi`` and the transport is the dense projection onto the new tangent space.
"""
from __future__ import annotations

import io
import warnings

import geoopt
import pytest
import torch

from ttmanifold import TT, FixedTTRank

F64 = torch.float64
SHAPE = (4, 5, 3)
RANKS = (1, 2, 2, 1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---------------------------------------------------------------------------------------
# independent dense helpers (no ttmanifold code)
# ---------------------------------------------------------------------------------------

def full(cores):
    res = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        res = torch.einsum("ia,ajb->ijb", res, c).reshape(-1, c.shape[2])
    return res.reshape([int(c.shape[1]) for c in cores])


def core_shapes(shape, ranks):
    return [(ranks[k], n, ranks[k + 1]) for k, n in enumerate(shape)]


def unflatten(v, shape, ranks):
    cs = core_shapes(shape, ranks)
    sizes = [a * b * c for a, b, c in cs]
    return [c.reshape(s) for c, s in zip(torch.split(v, sizes), cs)]


def dense_of_point(M, p):
    return full(unflatten(p.detach(), M.shape, M.ranks))


def tt_svd(X, ranks):
    """Dense TT-SVD: sequential truncated SVDs of the unfoldings (left to right)."""
    shape = X.shape
    cores, c, r_prev = [], X.reshape(shape[0], -1), 1
    for k in range(len(shape) - 1):
        c = c.reshape(r_prev * shape[k], -1)
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(r_prev, shape[k], r))
        c = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(c.reshape(r_prev, shape[-1], 1))
    return cores


def tangent_projector(X, ranks):
    """Orthogonal projector onto the tangent space of M_r at the dense X (N x N)."""
    shape = tuple(X.shape)
    cores = tt_svd(X, ranks)
    v0 = torch.cat([c.reshape(-1) for c in cores])
    J = torch.autograd.functional.jacobian(
        lambda v: full(unflatten(v, shape, ranks)).reshape(-1), v0, vectorize=True)
    U, S, _ = torch.linalg.svd(J, full_matrices=False)
    dim = sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape)) - sum(
        r * r for r in ranks[1:-1])
    assert float(S[dim - 1] / S[0]) > 1e-8 and float(S[dim] / S[0]) < 1e-12
    Q = U[:, :dim]
    return Q @ Q.T


def dense_riemannian_sgd(X0, A, ranks, *, lr, steps, momentum=0.0, nesterov=False,
                         weight_decay=0.0):
    """Dense reference of geoopt's RiemannianSGD (dampening 0) for 0.5||X - A||^2.

    geoopt initialises the momentum buffer with a clone of ``p.grad`` before weight decay
    is added; ``p.grad`` is the Riemannian gradient, so ``buffer_0 = P_X(X - A)``.
    """
    shape = X0.shape
    X, buf, traj = X0.clone(), None, []
    P = tangent_projector(X, ranks)
    for _ in range(steps):
        egrad = (X - A).reshape(-1)
        rgrad = P @ (egrad + weight_decay * X.reshape(-1))
        if momentum > 0:
            if buf is None:
                buf = P @ egrad
            buf = momentum * buf + rgrad
            direction = rgrad + momentum * buf if nesterov else buf
        else:
            direction = rgrad
        Xn = full(tt_svd(X - lr * direction.reshape(shape), ranks))
        P = tangent_projector(Xn, ranks)
        if buf is not None:
            buf = P @ buf
        X = Xn
        traj.append(X)
    return traj


# ---------------------------------------------------------------------------------------
# problem and geoopt driver
# ---------------------------------------------------------------------------------------

def problem(seed=0, shape=SHAPE, ranks=RANKS):
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(seed)
    p0 = M.random(dtype=F64, generator=gen)
    target = TT.random(shape, ranks, dtype=F64, generator=gen)
    A = 2.0 * full(target.cores) + 0.05 * torch.randn(shape, dtype=F64, generator=gen)
    return M, p0, A


def loss_of(p, A):
    return 0.5 * (p.unpack_tensor().full() - A).pow(2).sum()


def make_param(M, p0):
    return geoopt.ManifoldParameter(p0.clone(), manifold=M)


def run(opt, p, A, steps):
    traj, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(p, A)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        traj.append(dense_of_point(p.manifold, p))
    return traj, losses


def final_loss(p, A):
    with torch.no_grad():
        return float(0.5 * (dense_of_point(p.manifold, p) - A).pow(2).sum())


SGD_CONFIGS = {
    "plain": dict(lr=0.3),
    "momentum": dict(lr=0.2, momentum=0.6),
    "nesterov": dict(lr=0.2, momentum=0.6, nesterov=True),
    "weight_decay": dict(lr=0.3, weight_decay=0.05),
    "momentum_weight_decay": dict(lr=0.2, momentum=0.5, weight_decay=0.05),
}


# ---------------------------------------------------------------------------------------
# the loss decreases
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SGD_CONFIGS))
def test_sgd_decreases_loss(name):
    M, p0, A = problem(1)
    p = make_param(M, p0)
    opt = geoopt.optim.RiemannianSGD([p], **SGD_CONFIGS[name])
    _, losses = run(opt, p, A, 30)
    assert final_loss(p, A) < 0.1 * losses[0], (losses[0], final_loss(p, A))
    assert M.check_point_on_manifold(p.detach())


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_decreases_loss(amsgrad):
    M, p0, A = problem(2)
    p = make_param(M, p0)
    opt = geoopt.optim.RiemannianAdam([p], lr=0.05, amsgrad=amsgrad)
    _, losses = run(opt, p, A, 60)
    assert final_loss(p, A) < 0.2 * losses[0], (losses[0], final_loss(p, A))
    assert M.check_point_on_manifold(p.detach())
    if amsgrad:
        st = opt.state[p]
        assert torch.all(st["max_exp_avg_sq"] >= st["exp_avg_sq"])


@pytest.mark.parametrize("method,cg", [("armijo", "steepest"), ("wolfe", "fr"),
                                       ("wolfe", "pr")])
def test_line_search_decreases_loss(method, cg):
    M, p0, A = problem(3)
    p = make_param(M, p0)
    opt = geoopt.optim.RiemannianLineSearch([p], line_search_method=method, cg_method=cg)

    def closure():
        opt.zero_grad()
        loss = loss_of(p, A)
        loss.backward()
        return loss.item()

    l0 = final_loss(p, A)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no suitable step size" once converged
        for _ in range(15):
            losses.append(opt.step(closure))
    assert final_loss(p, A) < 0.05 * l0, (l0, final_loss(p, A))
    assert any(s is not None for s in opt.step_size_history)
    assert M.check_point_on_manifold(p.detach())


# ---------------------------------------------------------------------------------------
# SGD trajectories against the dense reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SGD_CONFIGS))
def test_sgd_trajectory_matches_dense_reference(name):
    cfg = SGD_CONFIGS[name]
    M, p0, A = problem(4)
    p = make_param(M, p0)
    opt = geoopt.optim.RiemannianSGD([p], **cfg)
    steps = 10
    traj, _ = run(opt, p, A, steps)
    ref = dense_riemannian_sgd(dense_of_point(M, p0), A, M.ranks, steps=steps, **cfg)
    for k, (X, R) in enumerate(zip(traj, ref)):
        err = float((X - R).norm())
        assert err < 1e-9, (k, err)
    # the trajectory moved substantially (so the comparison is not vacuous)
    assert float((traj[-1] - dense_of_point(M, p0)).norm()) > 0.5


def test_dense_reference_detects_wrong_method():
    """The reference is sensitive: momentum and plain SGD differ by far more than 1e-9."""
    M, p0, A = problem(4)
    X0 = dense_of_point(M, p0)
    a = dense_riemannian_sgd(X0, A, M.ranks, lr=0.2, steps=3, momentum=0.6)
    b = dense_riemannian_sgd(X0, A, M.ranks, lr=0.2, steps=3, momentum=0.6, nesterov=True)
    assert float((a[-1] - b[-1]).norm()) > 1e-3


# ---------------------------------------------------------------------------------------
# RiemannianAdam against a re-implementation (semi-independent)
# ---------------------------------------------------------------------------------------

def manual_riemannian_adam(M, p0, A, *, lr, steps, betas=(0.9, 0.999), eps=1e-8):
    """Becigneul-Ganea Riemannian Adam written out by hand.

    Semi-independent: it uses the manifold's own ``riemannian_grad`` (not the
    ``unpack_tensor`` backward path that the optimizer sees), ``retr_transp`` and
    ``component_inner``; the optimizer's bookkeeping (moments, bias corrections,
    transport of the first moment) is re-implemented here.
    """
    x = p0.clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    traj = []
    for t in range(1, steps + 1):
        g = M.riemannian_grad(x, lambda T: 0.5 * (T.full() - A).pow(2).sum())
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * M.component_inner(x, g)
        mhat = m / (1 - betas[0] ** t)
        vhat = v / (1 - betas[1] ** t)
        direction = mhat / (vhat.sqrt() + eps)
        x, m = M.retr_transp(x, -lr * direction, m)
        traj.append(dense_of_point(M, x))
    return traj


def test_adam_trajectory_matches_reimplementation():
    M, p0, A = problem(5)
    p = make_param(M, p0)
    opt = geoopt.optim.RiemannianAdam([p], lr=0.05)
    steps = 10
    traj, _ = run(opt, p, A, steps)
    ref = manual_riemannian_adam(M, p0, A, lr=0.05, steps=steps)
    for k, (X, R) in enumerate(zip(traj, ref)):
        err = float((X - R).norm())
        assert err < 1e-9, (k, err)
    assert float((traj[-1] - dense_of_point(M, p0)).norm()) > 0.1


def test_adam_direction_stays_tangent():
    """component_inner is constant per core, so Adam's scaled direction keeps the gauge."""
    M, p0, A = problem(6)
    g = M.riemannian_grad(p0, lambda T: 0.5 * (T.full() - A).pow(2).sum())
    direction = g / (M.component_inner(p0, g).sqrt() + 1e-8)
    ok, msg = M._check_vector_on_tangent(p0, direction, atol=1e-12, rtol=1e-12)
    assert ok, msg


# ---------------------------------------------------------------------------------------
# stabilize and checkpointing
# ---------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd_momentum": lambda params, **kw: geoopt.optim.RiemannianSGD(
        params, lr=0.2, momentum=0.6, **kw),
    "sgd_nesterov_wd": lambda params, **kw: geoopt.optim.RiemannianSGD(
        params, lr=0.2, momentum=0.6, nesterov=True, weight_decay=0.01, **kw),
    "adam": lambda params, **kw: geoopt.optim.RiemannianAdam(params, lr=0.05, **kw),
    "adam_amsgrad": lambda params, **kw: geoopt.optim.RiemannianAdam(
        params, lr=0.05, amsgrad=True, **kw),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_stabilize_does_not_change_trajectory(name):
    M, p0, A = problem(7)
    trajs = []
    for stabilize in (None, 1):
        p = make_param(M, p0)
        opt = OPTIMIZERS[name]([p], stabilize=stabilize)
        traj, _ = run(opt, p, A, 12)
        trajs.append(traj)
    for k, (X, Y) in enumerate(zip(*trajs)):
        assert float((X - Y).norm()) < 1e-12, k


def _resume_run(name, *, restore_int_step):
    M, p0, A = problem(8)
    n1, n2 = 5, 6

    p = make_param(M, p0)
    opt = OPTIMIZERS[name]([p])
    run(opt, p, A, n1 + n2)
    uninterrupted = p.detach().clone()

    p = make_param(M, p0)
    opt = OPTIMIZERS[name]([p])
    run(opt, p, A, n1)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "point": p.detach().clone()}, buf)
    del p, opt
    buf.seek(0)
    ckpt = torch.load(buf)
    p2 = make_param(M, ckpt["point"])
    opt2 = OPTIMIZERS[name]([p2])
    opt2.load_state_dict(ckpt["optimizer"])
    if restore_int_step:
        for st in opt2.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = int(st["step"])
    run(opt2, p2, A, n2)
    return p2.detach(), uninterrupted


@pytest.mark.parametrize("name", ["sgd_momentum", "sgd_nesterov_wd"])
def test_sgd_state_dict_resume_is_bit_identical(name):
    resumed, uninterrupted = _resume_run(name, restore_int_step=False)
    assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("name", ["adam", "adam_amsgrad"])
def test_adam_state_dict_resume_is_bit_identical(name):
    """RiemannianAdam resumes bit-identically once the integer ``step`` is restored.

    geoopt's RiemannianAdam keeps ``state["step"]`` as a Python int, but
    ``torch.optim.Adam.__setstate__`` (run by ``load_state_dict``) turns it into a
    *float32* scalar tensor (the default dtype), so after a plain load geoopt computes the
    bias corrections ``beta ** step`` in float32 and the float64 trajectory drifts by
    ~1e-7 (see the xfail below). Restoring the int is the workaround.
    """
    resumed, uninterrupted = _resume_run(name, restore_int_step=True)
    assert torch.equal(resumed, uninterrupted)


@pytest.mark.xfail(strict=True, reason=(
    "torch.optim.Adam.__setstate__ converts geoopt's integer state['step'] to a float32 "
    "tensor on load_state_dict; geoopt's RiemannianAdam then computes beta**step in "
    "float32, so a plainly resumed float64 run differs by ~1e-7 (torch/geoopt issue, not "
    "ttmanifold)"))
@pytest.mark.parametrize("name", ["adam"])
def test_adam_state_dict_plain_resume_known_drift(name):
    resumed, uninterrupted = _resume_run(name, restore_int_step=False)
    assert torch.equal(resumed, uninterrupted)
