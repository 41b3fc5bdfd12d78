"""Data-parallel completion (ttmanifold.experiments.distributed): single-process runs
against the library's riemannian_cg / rsgd (independent code path: autodiff for RSGD),
checkpoints, the deterministic sharding; and two gloo processes on 127.0.0.1 (in a
subprocess with a hard timeout, tests/distributed_worker.py): iterates equal to the
single-process run, replicas identical, resume, a dead or silent peer stops the other
with a clear error."""
import math
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from ttmanifold import TT, FixedTTRank
from ttmanifold import round as tt_round
from ttmanifold.experiments.distributed import (ShardedCompletion, distributed_cg,
                                                distributed_als, distributed_lbfgs,
                                                distributed_rank_adaptive, distributed_rsgd,
                                                distributed_trust_region, init_from_env,
                                                load_checkpoint,
                                                row_hash, shard_mask, validation_mask)
from ttmanifold.experiments.problems import Completion, sample_distinct_indices
from ttmanifold.experiments.solvers import (als_completion, cg_direction, riemannian_cg,
                                            riemannian_lbfgs, riemannian_trust_region, run)
from ttmanifold.manifold import hessian_operator

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as W  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario, tmp_path, timeout=150):
    out = tmp_path / scenario
    out.mkdir()
    # the workers import this checkout's package (not another installed copy)
    path = os.pathsep.join([str(HERE.parent)] + ([os.environ["PYTHONPATH"]]
                                                  if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    res = subprocess.run([sys.executable, str(HERE / "distributed_worker.py"), scenario,
                          str(out), str(_free_port())], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return out, res


def _full_problem(val_fraction=0.1):
    idx, vals = W.data()
    val = torch.from_numpy(validation_mask(idx, val_fraction))
    return Completion.from_data(idx[~val], vals[~val], W.SHAPE, W.RANK)


def test_single_process_equals_riemannian_cg_and_rsgd():
    P = _full_problem()
    S = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, W.RANK)
    x0 = P.initial_point(0)
    assert torch.equal(S.initial_point(0), x0)
    h = riemannian_cg(P, x0, iters=15)
    hd = distributed_cg(S, x0, iters=15)
    np.testing.assert_allclose(hd.loss, h.loss, rtol=1e-9, atol=1e-13)
    assert float((hd.x - h.x).abs().max()) < 1e-10
    hs = run(P, "rsgd", x0, iters=8, lr=0.3, measure_memory=False)
    hsd = distributed_rsgd(S, x0, lr=0.3, iters=8)
    assert float((hsd.x - hs.x).abs().max()) < 1e-12
    # metrics: against a dense float64 reference on the training samples
    X = P.manifold.to_tt(hd.x).full()
    r = X[tuple(P.train.indices.t())] - P.a_train
    m = hd.metrics[-1]
    assert abs(m["train_rmse"] - float(r.pow(2).mean().sqrt())) < 1e-14
    assert abs(m["train_err"] - float(r.norm() / P.a_train.norm())) < 1e-14


def test_metrics_and_control_error_of_tiny_data(scale=1e-170):
    # sums of squares underflowed below ~1e-154: train_err / val_err were 0 / 0 = NaN, the
    # rmse 0, and the rank-adaptive control error 0 (a false "converged")
    P = _full_problem()
    idx, a = P.train.indices, P.a_train
    val = torch.from_numpy(validation_mask(idx, 0.2))
    ref = ShardedCompletion(idx[~val], a[~val], W.SHAPE, W.RANK,
                            validation=(idx[val], a[val]))
    S = ShardedCompletion(idx[~val], a[~val] * scale, W.SHAPE, W.RANK,
                          validation=(idx[val], a[val] * scale))
    x = P.manifold.to_tt(P.initial_point(0))
    m, m1 = S.metrics(x * scale), ref.metrics(x)
    X = x.full()
    r = X[tuple(idx[~val].t())] - a[~val]  # the unit-scale dense reference
    assert m["train_err"] == pytest.approx(float(r.norm() / a[~val].norm()), rel=1e-12)
    for k in ("train_err", "val_err"):
        assert m[k] == pytest.approx(m1[k], rel=1e-12)
        k = k.replace("err", "rmse")
        assert m[k] == pytest.approx(scale * m1[k], rel=1e-12)
    d, d1 = (T.rank_adaptive_data(control_fraction=0.2, seed=0) for T in (S, ref))
    sub, sub1 = d.make([1, 2, 2, 2, 2, 1]), d1.make([1, 2, 2, 2, 2, 1])
    z = tt_round(P.manifold.to_tt(P.initial_point(1)), ranks=2)  # a point of sub
    err = d.control_err(sub, sub.manifold.pack_point(z * scale))
    rc = z.full()[tuple(d1.idx_ctrl.t())] - d1.vals_ctrl  # dense, at unit scale
    assert err == pytest.approx(float(rc.norm() / d1.vals_ctrl.norm()), rel=1e-12)
    assert 0.5 < err < 10  # an unrelated tensor


def _tensor_dist(M, a, b) -> float:
    """``||X_a - X_b||`` of the tensors of two packed points (gauge-invariant)."""
    return float((M.to_tt(a) - M.to_tt(b)).norm())


def test_single_process_lbfgs_equals_the_solver_and_resumes(tmp_path):
    P = _full_problem()
    S = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, W.RANK)
    M = P.manifold
    x0 = P.initial_point(0)
    h = riemannian_lbfgs(P, x0, iters=12, measure_memory=False)
    hd = distributed_lbfgs(S, x0, iters=12)
    np.testing.assert_allclose(hd.loss, h.loss, rtol=1e-10, atol=1e-14)
    assert _tensor_dist(M, hd.x, h.x) < 1e-12
    assert hd.info["backtracks"] == h.info["backtracks"]
    # (the trust region against riemannian_trust_region: in the two-process test)
    # resume: the L-BFGS memory is in the checkpoint
    ck = tmp_path / "ck.pt"
    full = distributed_lbfgs(S, x0, iters=9, metrics_every=0)
    distributed_lbfgs(S, x0, iters=6, checkpoint=str(ck), checkpoint_every=5, metrics_every=0)
    info = load_checkpoint(ck)
    assert info["method"] == "rlbfgs" and info["iteration"] == 5
    assert info["state"]["s"].shape[0] == len(info["state"]["rho"]) > 1
    again = distributed_lbfgs(S, x0, iters=9, checkpoint=str(ck), resume=True,
                              metrics_every=0)
    assert torch.equal(again.x, full.x) and again.loss == full.loss
    with pytest.raises(ValueError, match="method"):
        distributed_trust_region(S, x0, iters=9, checkpoint=str(ck), resume=True)
    # (the trust region's resume: in the two-process test)
    # float32: the same rules converge to the single-precision floor
    S32 = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, W.RANK, dtype=torch.float32)
    h32 = distributed_lbfgs(S32, S32.initial_point(0, kind="spectral"), iters=40,
                            stop_metric="train_err", stop_tol=1e-5)
    assert h32.status == "converged" and h32.x.dtype == torch.float32
    # errors name the argument
    with pytest.raises(ValueError, match="memory"):
        distributed_lbfgs(S, x0, memory=0)
    with pytest.raises(ValueError, match="c1"):
        distributed_lbfgs(S, x0, c1=1.5)
    with pytest.raises(ValueError, match="radius"):
        distributed_trust_region(S, x0, radius=-1.0)
    with pytest.raises(ValueError, match="max_inner"):
        distributed_trust_region(S, x0, max_inner=0)
    with pytest.raises(ValueError, match="max_backtracks"):
        distributed_trust_region(S, x0, max_backtracks=-1)


def test_single_process_lbfgs_equals_the_solver_far_from_large_data():
    # data of norm ~1e6 from a unit start: pairs are skipped and the step without memory
    # is capped by the problem's scale (lbfgs_first_length), the same rule in both
    idx, vals = W.data()
    val = torch.from_numpy(validation_mask(idx, 0.1))
    P = Completion.from_data(idx[~val], vals[~val] * 1e6, W.SHAPE, W.RANK)
    S = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, W.RANK)
    x0 = P.initial_point(0)
    h = riemannian_lbfgs(P, x0, iters=6, measure_memory=False, metrics_every=0)
    hd = distributed_lbfgs(S, x0, iters=6, metrics_every=0)
    assert h.info["skipped_updates"] >= 1
    np.testing.assert_allclose(hd.loss, h.loss, rtol=1e-10)
    assert _tensor_dist(P.manifold, hd.x, h.x) < 1e-10 * float(P.manifold.to_tt(h.x).norm())


def test_checkpoint_resume_is_exact_and_records_the_run(tmp_path):
    P = _full_problem()
    S = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, W.RANK)
    x0 = S.initial_point(0)
    full = distributed_cg(S, x0, iters=9)
    ck = tmp_path / "ck.pt"
    part = distributed_cg(S, x0, iters=5, checkpoint=str(ck), checkpoint_every=4)
    info = load_checkpoint(ck)
    assert info["iteration"] == 4 and info["shape"] == list(W.SHAPE)
    assert info["ranks"] == list(S.ranks) and info["dtype"] == "float64"
    assert info["method"] == "rcg" and info["world_size"] == 1
    assert part.n_iters == 5
    again = distributed_cg(S, x0, iters=9, checkpoint=str(ck), resume=True)
    assert torch.equal(again.x, full.x)
    assert again.iters == full.iters and again.loss == full.loss
    # another run's checkpoint is refused, naming the mismatch
    S2 = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, 2)
    with pytest.raises(ValueError, match="ranks"):
        distributed_cg(S2, S2.initial_point(0), iters=9, checkpoint=str(ck), resume=True)
    with pytest.raises(ValueError, match="method"):
        distributed_rsgd(S, x0, lr=0.1, iters=9, checkpoint=str(ck), resume=True)
    # fewer iterations than the checkpoint holds: it returned the checkpoint's iterate 4
    # (with status "ok") for iters=3
    with pytest.raises(ValueError, match=r"iters: 3 is below the checkpoint's iteration 4"):
        distributed_cg(S, x0, iters=3, checkpoint=str(ck), resume=True)
    assert distributed_cg(S, x0, iters=4, checkpoint=str(ck), resume=True).iters == \
        list(range(5))
    # a checkpoint that cannot be written: refused before the first iteration (it failed at
    # the first save, with torch's error, leaving a temporary file beside a directory)
    d = tmp_path / "sub"
    d.mkdir()
    for path, why in ((d / "no" / "ck.pt", "checkpoint: the directory .* does not exist"),
                      (d, "checkpoint: .* is a directory")):
        with pytest.raises(ValueError, match=why):
            distributed_cg(S, x0, iters=3, checkpoint=str(path), checkpoint_every=2,
                           metrics_every=0)
        with pytest.raises(ValueError, match=why):
            distributed_rank_adaptive(S, max_rank=2, checkpoint=str(path), checkpoint_every=1)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt", "sub"] and not list(d.iterdir())
    bad = tmp_path / "bad.pt"
    torch.save({"x": 1}, bad)
    with pytest.raises(ValueError, match="not a ttmanifold distributed checkpoint"):
        load_checkpoint(bad)


def test_an_interrupt_or_a_stop_after_a_step_returns_the_iterate_of_the_last_row():
    """Ctrl-C in the callback (e.g. the progress bar of ``ttmanifold complete``) after
    step t: the point was iterate t + 1 but the history ended at row t, so the written
    tensor and the report's final metrics disagreed. In one process the row of the
    newer iterate is recorded (the two-process case: test_two_processes_equal_one)."""
    P = _full_problem()
    S = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, W.RANK)
    x0 = S.initial_point(0)
    full = distributed_cg(S, x0, iters=5)

    def stop(t, hist):
        if t == 3:
            raise KeyboardInterrupt
        return False

    h = distributed_cg(S, x0, iters=5, callback=stop)
    assert h.status == "interrupted" and h.iters == [0, 1, 2, 3, 4]
    assert torch.equal(h.x, distributed_cg(S, x0, iters=4).x)
    assert h.loss == full.loss[:5] and h.metrics[-1] == full.metrics[4]
    # a callback that stops the run after step 2 likewise (the row of iterate 3 was
    # missing; run() records it)
    h = distributed_cg(S, x0, iters=5, callback=lambda t, hist: t == 2)
    assert h.status == "stopped" and h.iters == [0, 1, 2, 3]
    assert torch.equal(h.x, distributed_cg(S, x0, iters=3).x)
    assert h.loss == full.loss[:4] and h.metrics[-1] == full.metrics[3]


def test_sharding_is_a_partition_independent_of_the_world_size():
    idx = sample_distinct_indices((9, 8, 7, 6), 3000, generator=3)
    for world in (1, 2, 3, 5):
        masks = np.stack([shard_mask(idx, r, world) for r in range(world)])
        assert (masks.sum(0) == 1).all()
        if world > 1:
            assert masks.sum(1).min() > 0.6 * 3000 / world
    # equal rows, equal hashes; a different row, a different hash (for these rows)
    assert (row_hash(idx[:5]) == row_hash(idx[:5].clone())).all()
    assert len(np.unique(row_hash(idx))) == 3000
    v = validation_mask(idx, 0.2, seed=1)
    assert abs(v.mean() - 0.2) < 0.03
    assert (v == validation_mask(idx.numpy(), 0.2, seed=1)).all()
    with pytest.raises(ValueError, match="rank, world_size"):
        shard_mask(idx, 2, 2)
    with pytest.raises(ValueError, match="fraction"):
        validation_mask(idx, 1.0)


def test_errors_name_the_argument(tmp_path):
    P = _full_problem()
    with pytest.raises(TypeError, match="shape"):
        ShardedCompletion(P.train.indices, P.a_train, None, 3)
    with pytest.raises(TypeError, match="indices"):
        ShardedCompletion(P.train.indices.double(), P.a_train, W.SHAPE, 3)
    with pytest.raises(ValueError, match="no training samples"):
        ShardedCompletion(P.train.indices[:0], P.a_train[:0], W.SHAPE, 3)
    # held-out samples: a NaN value gave a NaN val_err silently (a stop on it never fired)
    idx, a = P.train.indices, P.a_train
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"validation\[1\] \(values\): contains NaN"):
            ShardedCompletion(idx[5:], a[5:], W.SHAPE, W.RANK,
                              validation=(idx[:5], torch.cat([a[:4], a.new_full((1,), bad)])))
    with pytest.raises(ValueError, match=r"validation\[0\] \(indices\): .*out of range"):
        ShardedCompletion(idx[5:], a[5:], W.SHAPE, W.RANK, validation=(idx[:5] + 9, a[:5]))
    S = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, W.RANK)
    x0 = S.initial_point(0)
    with pytest.raises(ValueError, match="lr"):
        distributed_rsgd(S, x0, lr=-1.0)
    with pytest.raises(ValueError, match="checkpoint"):
        distributed_cg(S, x0, checkpoint_every=3)
    with pytest.raises(ValueError, match="x0"):
        distributed_cg(S, x0[:-1])
    # a batch of starts is not one point (the error named index_set, from the sampled
    # kernels, or the ALS sweep's cores); a bool is not a number of iterations
    for solver, kw in ((distributed_cg, {}), (distributed_rsgd, {"lr": 0.1}),
                       (distributed_lbfgs, {}), (distributed_trust_region, {}),
                       (distributed_als, {})):
        with pytest.raises(ValueError, match=r"x0: expected one packed point of shape"):
            solver(S, torch.stack([x0, x0]), iters=1, **kw)
        with pytest.raises(ValueError, match=r"iters: expected a non-negative int"):
            solver(S, x0, iters=True, **kw)
    with pytest.raises(ValueError, match="x0: .*not left-orthogonal"):  # (it ran)
        distributed_lbfgs(S, torch.randn_like(x0), iters=2)
    # a stopping rule that can never fire (it ran to the end) or without a tolerance (a
    # TypeError from inside)
    with pytest.raises(ValueError, match="stop_metric: 'val_er' is not a metric"):
        distributed_cg(S, x0, iters=2, stop_metric="val_er", stop_tol=1e-3)
    with pytest.raises(ValueError, match="stop_tol"):
        distributed_cg(S, x0, iters=2, stop_metric="train_err")
    with pytest.raises(ValueError, match="never evaluated"):
        distributed_cg(S, x0, iters=2, stop_metric="train_err", stop_tol=1e-3,
                       metrics_every=0)


def test_two_processes_equal_one(tmp_path):
    out, res = _launch("equal", tmp_path)
    assert "exitcodes [0, 0]" in res.stdout, res.stdout + res.stderr
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    # replicas identical, bit for bit; the shards partition the training samples
    for key in ("a", "b", "c", "sgd", "als"):
        assert torch.equal(r0[key], r1[key]), key
    P = _full_problem()
    assert r0["n_local"] + r1["n_local"] == r0["n_train"] == len(P.train)
    assert r0["n_local"] > 0 and r1["n_local"] > 0 and r0["n_val"] > 0
    # equal to the single-process run on the same data, to rounding
    x0 = P.initial_point(0)
    h = riemannian_cg(P, x0, iters=20)
    assert float((r0["a"] - h.x).abs().max()) < 1e-9
    np.testing.assert_allclose(r0["loss_a"], h.loss, rtol=1e-8, atol=1e-13)
    hs = run(P, "rsgd", x0, iters=10, lr=0.3, measure_memory=False)
    assert float((r0["sgd"] - hs.x).abs().max()) < 1e-11
    # ALS with the normal equations summed over the shards: the single-process sweeps
    ha = als_completion(P, x0, iters=4, measure_memory=False)
    M = P.manifold
    assert _tensor_dist(M, r0["als"], ha.x) < 1e-9 * float(M.to_tt(ha.x).norm())
    np.testing.assert_allclose(r0["loss_als"], ha.loss, rtol=1e-8, atol=1e-13)
    # the resumed run (checkpoint at 12, written by rank 0, read and broadcast) is exact
    assert torch.equal(r0["c"], r0["a"]) and r0["loss_c"] == r0["loss_a"]
    assert r0["iters_c"] == list(range(21))
    # interrupted after step 3 on both: the point of the history's last row, iterate 3 (it
    # was iterate 4); no row is added, since that would need the peers
    for r in (r0, r1):
        status, iters, x = r["interrupted"]
        assert status == "interrupted" and iters == [0, 1, 2, 3]
        assert torch.equal(x, r0["x3"])


def test_a_bad_shard_or_a_dead_peer_stops_the_others_with_a_clear_error(tmp_path):
    out, res = _launch("dead", tmp_path)
    assert "exitcodes [0, 3]" in res.stdout, res.stdout + res.stderr
    seconds, msg = (out / "rank0.txt").read_text().split("\n", 1)
    assert msg.startswith("PeerFailure: rank 0 of 2:"), msg
    assert "peer process stopped" in msg
    assert float(seconds) < 30
    # before that, rank 1's bad shards and mismatched calls: both processes raise the
    # same error, naming rank 1 or the argument (no hang, no gloo abort, no silent drift)
    expected = ["ValueError: (rank 1) indices: process 1 of 2 has no training samples",
                "ValueError: (rank 1) indices: repeated multi-indices",
                "ValueError: ranks: (1, 3, 3, 3, 3, 1) on rank 0, (1, 2, 2, 2, 2, 1) on "
                "rank 1; every process must build the problem with the same shape",
                "ValueError: dtype: 'float64' on rank 0, 'float32' on rank 1",
                "ValueError: iters: 5 on rank 0, 8 on rank 1; every process must call",
                "ValueError: x0: 'bits ",
                "ValueError: kind: 'random' on rank 0, 'spectral' on rank 1",
                "ValueError: (rank 0) checkpoint: the directory",
                "ValueError: max_rank: 4 on rank 0, 3 on rank 1",
                "ValueError: time_budget (set): True on rank 0, False on rank 1"]
    for r in (0, 1):
        lines = (out / f"bad_shard{r}.txt").read_text().splitlines()
        assert len(lines) == len(expected), lines
        for line, want in zip(lines, expected):
            assert line.startswith(want), (line, want)


def test_a_silent_peer_times_out(tmp_path):
    out, res = _launch("silent", tmp_path)
    seconds, msg = (out / "rank0.txt").read_text().split("\n", 1)
    assert msg.startswith("PeerFailure: rank 0 of 2:"), msg
    assert 2.5 < float(seconds) < 30  # the group's 3 s timeout


def test_two_processes_lbfgs_and_trust_region_equal_one(tmp_path):
    out, res = _launch("second_order", tmp_path)
    assert "exitcodes [0, 3]" in res.stdout, res.stdout + res.stderr
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    for key in ("lbfgs", "lbfgs_resumed", "rtr", "rtr_resumed", "grad", "hess_grad"):
        assert torch.equal(r0[key], r1[key]), key
    P = _full_problem()
    M = P.manifold
    x0 = P.initial_point(0)
    # equal to the single-process solvers on the union of the shards, to rounding
    h = riemannian_lbfgs(P, x0, iters=12, measure_memory=False)
    assert _tensor_dist(M, r0["lbfgs"], h.x) < 1e-9
    np.testing.assert_allclose(r0["loss_lbfgs"], h.loss, rtol=1e-8, atol=1e-13)
    assert r0["info_lbfgs"]["backtracks"] == h.info["backtracks"]
    h = riemannian_trust_region(P, x0, iters=5, measure_memory=False)
    assert _tensor_dist(M, r0["rtr"], h.x) < 1e-9
    np.testing.assert_allclose(r0["loss_rtr"], h.loss, rtol=1e-8, atol=1e-13)
    for key in ("inner_iters", "rejected", "backtracked"):
        assert r0["info_rtr"][key] == h.info[key], key
    assert h.info["rejected"] + h.info["backtracked"] > 0  # a failed step's branch ran
    # the summed Hessian product of the shards is the full problem's
    g = M.proju(x0, M.riemannian_grad(x0, P.loss))
    assert float((r0["grad"] - g).abs().max()) < 1e-12
    hg = hessian_operator(M, x0, P.loss, grad=g)(g)
    assert float((r0["hess_grad"] - hg).norm()) < 1e-10 * float(hg.norm())
    # resumed runs (checkpoint written by rank 0, read and broadcast) are exact
    assert torch.equal(r0["lbfgs_resumed"], r0["lbfgs"])
    assert r0["loss_lbfgs_resumed"] == r0["loss_lbfgs"]
    assert r0["iters_resumed"] == list(range(13))
    assert torch.equal(r0["rtr_resumed"], r0["rtr"])
    assert r0["loss_rtr_resumed"] == r0["loss_rtr"]
    assert r0["info_rtr_resumed"]["inner_iters"] == r0["info_rtr"]["inner_iters"]
    for r in (r0, r1):
        assert "has method = 'rlbfgs', this run has 'rtr'" in r["refused"], r["refused"]
    # a dead peer during the trust region's inner CG: a clear error, no hang
    seconds, msg = (out / "rank0.txt").read_text().split("\n", 1)
    assert msg.startswith("PeerFailure: rank 0 of 2: the all-reduce of the Hessian product "
                          "failed"), msg
    assert float(seconds) < 30


def test_single_process_als_equals_the_solver_and_resumes(tmp_path):
    P = _full_problem()
    S = ShardedCompletion(P.train.indices, P.a_train, W.SHAPE, W.RANK)
    M = P.manifold
    x0 = P.initial_point(0)
    h = als_completion(P, x0, iters=6, measure_memory=False)
    hd = distributed_als(S, x0, iters=6)
    np.testing.assert_allclose(hd.loss, h.loss, rtol=1e-10, atol=1e-14)
    assert _tensor_dist(M, hd.x, h.x) < 1e-10 * float(M.to_tt(h.x).norm())
    assert h.loss[-1] < 0.1 * h.loss[0]  # the sweeps fit the data (not a vacuous check)
    ck = tmp_path / "ck_als.pt"
    full = distributed_als(S, x0, iters=5, metrics_every=0)
    distributed_als(S, x0, iters=3, checkpoint=str(ck), checkpoint_every=2, metrics_every=0)
    assert load_checkpoint(ck)["method"] == "als"
    again = distributed_als(S, x0, iters=5, checkpoint=str(ck), resume=True, metrics_every=0)
    assert torch.equal(again.x, full.x) and again.loss == full.loss
    with pytest.raises(ValueError, match="ridge"):
        distributed_als(S, x0, ridge=-1.0)


def test_cg_from_an_exact_fit_stays_there():
    """A start whose residual is exactly 0 (data gathered from the start itself): the
    gradient is 0, the next one rounding-small, and the Polak-Ribiere / Fletcher-Reeves
    ratio divided by ``<g, g> = 0`` (beta = inf, a NaN direction): riemannian_cg said
    "diverged", distributed_cg failed in the retraction's SVD. The rule restarts instead."""
    shape = (4, 5, 3, 4)
    gen = torch.Generator().manual_seed(0)
    M = FixedTTRank(shape, 2)
    x0 = torch.Tensor(M.random(dtype=torch.float64, generator=gen))
    idx = torch.stack(torch.unravel_index(torch.randperm(240, generator=gen)[:150], shape), 1)
    vals = M.to_tt(x0).gather(idx)
    exact = Completion.from_data(idx, vals, shape, 2)
    assert float(exact.cg_grad(x0)[0]) == 0.0  # (else the case is not exercised)
    S = ShardedCompletion(idx, vals, shape, 2)
    for h in (riemannian_cg(exact, x0, iters=3, metrics_every=0),
              distributed_cg(S, x0, iters=3, metrics_every=0)):
        assert h.status == "ok" and all(math.isfinite(v) and v < 1e-25 for v in h.loss)
        assert _tensor_dist(M, h.x, x0) < 1e-12
    g = torch.zeros(5, dtype=torch.float64)
    gn = torch.tensor([1e-20, 0.0, -2e-20, 0.0, 1e-20], dtype=torch.float64)
    for rule in ("pr+", "fr"):
        eta, restarted = cg_direction(g, gn, g, g, 1, beta_rule=rule, restart_tol=0.1,
                                      restart_every=None)
        assert restarted and torch.equal(eta, -gn)


def test_init_from_env_serves_cpu_tensors(monkeypatch):
    """Collectives of this module send CPU tensors (the metrics, counts, control error),
    and ``ttmanifold complete`` builds its problem on the CPU; the default backend with
    CUDA available was "nccl" alone, which serves CUDA tensors only ("No backend type
    associated with device type cpu", reported as a PeerFailure). Now CPU tensors go to
    gloo and CUDA tensors to nccl."""
    import torch.distributed as dist

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, timeout: seen.update(backend=backend))
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert init_from_env(timeout=5.0)
        devices = dist.distributed_c10d.BackendConfig(
            dist.Backend(seen["backend"])).get_device_backend_map()
        assert devices["cpu"] == "gloo", seen
        assert devices.get("cuda") == ("nccl" if cuda else "gloo"), seen
