"""Riemannian Adam's options in the experiment driver (``run(..., adam_kwargs=...)``)."""
import warnings

import pytest
import torch

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
              metrics_every=5)
    default = S.run(pb, "radam", x0, **kw)
    low = S.run(pb, "radam", x0, adam_kwargs=dict(betas=(0.8, 0.999)), **kw)
    # geoopt's default betas need about 129 steps here; beta1 = 0.8 about 66
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
