"""Riemannian Adam's options in the experiment driver (``run(..., adam_kwargs=...)``) and
the automatic step rule's safeguards (``adam_safeguards``: the momentum restart
``gradient_restart_`` and the lr back-off)."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttmanifold.experiments import presets as PR
from ttmanifold.experiments import problems as P
from ttmanifold.experiments import solvers as S


def _t3f(seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the preset's rank 5 is clipped at the boundary
        return PR.build_preset("t3f-tutorial", seed=seed)


def test_adam_kwargs_reach_the_optimizer_and_the_step_rule(one_thread):
    spec = _t3f()
    pb, x0, tol = spec["problem"], spec["x0"], spec["tol"]
    kw = dict(iters=100, stop_metric="test_mse", stop_tol=tol, measure_memory=False,
              metrics_every=5, adam_safeguards=False)
    default = S.run(pb, "radam", x0, **kw)
    low = S.run(pb, "radam", x0, adam_kwargs=dict(betas=(0.8, 0.999)), **kw)
    # without the restart, geoopt's default betas need about 129 steps here; beta1 = 0.8
    # about 66
    assert default.reach("test_mse", tol) is None
    r = low.reach("test_mse", tol)
    assert r is not None and r[0] <= 100, r
    # the lr search ran with the same options (its scores differ from the default's)
    assert low.info["tune_scores"] != default.info["tune_scores"]


def test_explicit_default_adam_kwargs_change_nothing():
    pb = P.Completion((6, 6, 6, 6), 2, oversampling=5, seed=0)
    x0 = pb.initial_point(0)
    a = S.run(pb, "radam", x0, iters=5, lr=0.1, metrics_every=0, measure_memory=False)
    b = S.run(pb, "radam", x0, iters=5, lr=0.1, metrics_every=0, measure_memory=False,
              adam_kwargs=dict(betas=(0.9, 0.999), amsgrad=False))
    assert torch.equal(a.x, b.x)  # explicit defaults change nothing
    c = S.run(pb, "radam", x0, iters=5, lr=0.1, metrics_every=0, measure_memory=False,
              adam_kwargs=dict(betas=(0.5, 0.999)))
    assert not torch.allclose(a.x, c.x)


@pytest.mark.parametrize("method, kwargs, match", [
    ("rcg", dict(betas=(0.8, 0.999)), "only for method 'radam'"),
    ("radam", dict(beta1=0.8), "keys among"),
    ("radam", dict(betas=(1.0, 0.999)), "betas"),
    ("radam", dict(betas=0.8), "betas"),
    ("radam", [0.8], "expected a dict"),
])
def test_adam_kwargs_bad_input(method, kwargs, match):
    pb = P.Completion((6, 6, 6, 6), 2, oversampling=5, seed=0)
    with pytest.raises(ValueError, match=match):
        S.run(pb, method, iters=1, lr=0.1, adam_kwargs=kwargs, measure_memory=False)


def test_auto_rule_meets_the_t3f_target_with_default_betas(one_thread):
    # issue 17: Riemannian Adam with lr="auto" reaches test MSE 1.3e-4 in at most 100
    # steps from a random start. Without the safeguards geoopt's betas need 129 steps on
    # this seed (the momentum caps the rate, whatever the lr).
    spec = _t3f()
    pb, x0, tol = spec["problem"], spec["x0"], spec["tol"]
    kw = dict(iters=150, stop_metric="test_mse", stop_tol=tol, measure_memory=False,
              metrics_every=1)
    auto = S.run(pb, "radam", x0, **kw)
    plain = S.run(pb, "radam", x0, adam_safeguards=False, **kw)
    r = auto.reach("test_mse", tol)
    assert r is not None and r[0] <= 100, r
    assert auto.info["restarts"] > 0
    r_plain = plain.reach("test_mse", tol)
    assert r_plain is None or r_plain[0] > 120, r_plain
    assert "restarts" not in plain.info


def _dense_slope(pb, M, p, m):
    """<grad F(X), T> with F the dense float64 loss and T the full tangent tensor of m."""
    full = M.to_tt(p).full().detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(pb.dense_loss(full), full)
    return float((grad * M.tangent_to_tt(p, m).full()).sum())


def test_gradient_restart_slope_against_dense_reference():
    pb = P.Completion((4, 5, 4, 3), 2, oversampling=2, seed=1)
    M = pb.manifold
    gen = torch.Generator().manual_seed(0)
    p = pb.initial_point(0).detach().requires_grad_(True)
    pb.loss(M.unpack_tensor(p)).backward()
    egrad = p.grad.detach()
    x = p.detach()
    for k in range(4):
        m = M.proju(x, torch.randn(x.shape, generator=gen, dtype=x.dtype))
        ref = _dense_slope(pb, M, x, m)
        slope = float(M.inner(x, egrad, m))
        assert slope == pytest.approx(ref, rel=1e-10, abs=1e-12)
        for sign in (1.0, -1.0):  # one of +-m points uphill
            mom = sign * m
            kept = S.gradient_restart_(M, x, egrad, mom)
            assert kept.shape == (1,) and kept.dtype == x.dtype
            uphill = sign * ref < 0
            assert float(kept) == (0.0 if uphill else 1.0)
            if uphill:
                assert torch.count_nonzero(mom) == 0
            else:
                assert torch.equal(mom, sign * m)  # untouched


def test_gradient_restart_acts_per_point_of_a_batch():
    pb = P.Completion((4, 5, 4, 3), 2, oversampling=2, seed=1)
    M = pb.manifold
    p = pb.initial_point(0).detach().requires_grad_(True)
    pb.loss(M.unpack_tensor(p)).backward()
    x, g = p.detach(), p.grad.detach()
    m = M.proju(x, -g)  # downhill momentum (along -grad) is kept, uphill restarted
    mom = torch.stack([m, -m])
    kept = S.gradient_restart_(M, torch.stack([x, x]), torch.stack([g, g]), mom)
    assert kept.tolist() == [[0.0], [1.0]]
    assert torch.count_nonzero(mom[0]) == 0 and torch.equal(mom[1], -m)


def test_float_lr_is_plain_geoopt_adam_and_restart_is_opt_in():
    import geoopt

    pb = P.Completion((6, 6, 6, 6), 2, oversampling=5, seed=0)
    M = pb.manifold
    x0 = pb.initial_point(0)
    kw = dict(iters=8, lr=0.3, metrics_every=0, measure_memory=False)
    a = S.run(pb, "radam", x0, **kw)
    p = geoopt.ManifoldParameter(x0.detach().clone(), manifold=M)
    opt = geoopt.optim.RiemannianAdam([p], lr=0.3)
    for _ in range(8):  # the reference: geoopt's optimizer alone
        opt.zero_grad()
        pb.loss(M.unpack_tensor(p)).backward()
        opt.step()
    assert torch.equal(a.x, p.detach())
    assert "restarts" not in a.info
    b = S.run(pb, "radam", x0, adam_safeguards=True, **kw)
    assert b.info["restarts"] > 0 and not torch.allclose(a.x, b.x)


def _reference_guarded_adam(pb, x0, lr, iters):
    """The safeguards written out with host floats around geoopt's optimizer: halve the lr
    after a rise of the loss over a step without old momentum (the first, or one after a
    restart), restart where <grad, m> < 0."""
    import geoopt

    M = pb.manifold
    p = geoopt.ManifoldParameter(x0.detach().clone(), manifold=M)
    opt = geoopt.optim.RiemannianAdam([p], lr=lr)
    prev, fresh, restarts, backoffs, rises = None, True, 0, 0, []
    for _ in range(iters):
        opt.zero_grad()
        loss = pb.loss(M.unpack_tensor(p))
        loss.backward()
        if prev is not None:
            rises.append((float(loss.detach()) > prev, fresh))
            if float(loss.detach()) > prev and fresh:
                opt.param_groups[0]["lr"] *= 0.5
                backoffs += 1
            m = opt.state[p]["exp_avg"]
            fresh = float((p.grad * m).sum()) < 0
            if fresh:
                m.zero_()
                restarts += 1
        prev = float(loss.detach())
        opt.step()
    return p.detach(), restarts, backoffs, opt.param_groups[0]["lr"], rises


@pytest.mark.parametrize("lr, bounces", [(0.02, False), (3.0, True)])
def test_safeguards_against_a_host_reference(lr, bounces):
    # a small step: a monotone run, no back-off; a large one bounces and backs off
    pb = P.Completion((5, 5, 5, 5), 2, oversampling=5, seed=2)
    x0 = pb.initial_point(0)
    h = S.run(pb, "radam", x0, iters=25, lr=lr, adam_safeguards=True, metrics_every=0,
              measure_memory=False)
    x, restarts, backoffs, lr_final, rises = _reference_guarded_adam(pb, x0, lr, 25)
    assert torch.allclose(h.x, x, rtol=1e-10, atol=1e-12)
    assert (h.info["restarts"], h.info["lr_backoffs"]) == (restarts, backoffs)
    assert h.info["lr_final"] == pytest.approx(lr_final) == pytest.approx(lr * 0.5 ** backoffs)
    losses = h.loss[:-1]
    assert [r for r, _ in rises] == [b > a for a, b in zip(losses, losses[1:])]
    assert (backoffs > 0) == bounces
    if bounces:  # a rise over a step with momentum restarts it but keeps the lr
        assert any(r and not fresh for r, fresh in rises)


def test_auto_rule_search_uses_the_restart():
    pb = P.Completion((6, 6, 6, 6), 2, oversampling=5, seed=0)
    x0 = pb.initial_point(0)
    kw = dict(iters=0, metrics_every=0, measure_memory=False, grid_size=3, tune_iters=6)
    on = S.run(pb, "radam", x0, **kw)
    off = S.run(pb, "radam", x0, adam_safeguards=False, **kw)
    grid = sorted(on.info["tune_scores"])
    assert grid == sorted(off.info["tune_scores"])
    # the same candidates, scored with and without restarts
    assert [on.info["tune_scores"][g] for g in grid] != [off.info["tune_scores"][g] for g in grid]
    for lr in grid:  # each score is the loss of a restarted run with that float lr
        h = S.run(pb, "radam", x0, iters=6, lr=lr, adam_safeguards=True, metrics_every=0,
                  measure_memory=False)
        assert on.info["tune_scores"][lr] == h.final_loss


@pytest.mark.parametrize("method, value, match", [
    ("radam", "yes", "True, False or None"),
    ("radam", 1, "True, False or None"),
    ("rsgd", True, "only for method 'radam'"),
    ("rcg", False, "only for method 'radam'"),
])
def test_adam_safeguards_bad_input(method, value, match):
    pb = P.Completion((6, 6, 6, 6), 2, oversampling=5, seed=0)
    with pytest.raises(ValueError, match=match):
        S.run(pb, method, iters=1, lr=0.1, adam_safeguards=value, measure_memory=False)


def test_adam_safeguards_rejected_on_model_problems():
    pytest.importorskip("sklearn")
    try:
        pb = P.LayerTraining(hidden=16, rank=2)
    except ImportError:
        pytest.skip("ttmanifold.nn not available")
    with pytest.raises(ValueError, match="model problems"):
        S.run(pb, "radam", iters=1, lr=0.1, adam_safeguards=True, measure_memory=False)


@settings(max_examples=12, deadline=None)
@given(shape=st.lists(st.integers(2, 4), min_size=2, max_size=4), rank=st.integers(1, 3),
       seed=st.integers(0, 10**6))
def test_gradient_restart_property(shape, rank, seed):
    # any shape and rank: the kept mask is the sign of the dense slope <grad F(X), T>,
    # and the momentum is either untouched or zero
    total = 1
    for n in shape:
        total *= n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks above a boundary mode size are clipped
        pb = P.Completion(tuple(shape), rank, train_size=max(1, total // 2), test_size=0,
                          seed=seed)
    M = pb.manifold
    p = pb.initial_point(seed).detach().requires_grad_(True)
    pb.loss(M.unpack_tensor(p)).backward()
    x, g = p.detach(), p.grad.detach()
    gen = torch.Generator().manual_seed(seed)
    m = M.proju(x, torch.randn(x.shape, generator=gen, dtype=x.dtype))
    ref = _dense_slope(pb, M, x, m)
    mom = m.clone()
    kept = S.gradient_restart_(M, x, g, mom)
    scale = float(g.norm() * m.norm())
    if abs(ref) > 1e-9 * scale:  # the sign is well defined
        assert float(kept) == (1.0 if ref > 0 else 0.0)
    assert torch.equal(mom, m) if float(kept) else torch.count_nonzero(mom) == 0
