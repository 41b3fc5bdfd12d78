"""Data-parallel rank-adaptive completion (distributed.distributed_rank_adaptive): the
single-process search (solvers.rank_adaptive_completion, the same code with the sums
local) on the same data and control split gives the same ranks, attempts and tensor, in
one process and with two gloo processes on 127.0.0.1 (tests/distributed_worker.py, in a
subprocess with a hard timeout); checkpoints resume to the same result; a dead peer
stops the other with PeerFailure."""
import os
import pathlib
import sys

import pytest
import torch

from ttmanifold import FixedTTRank
from ttmanifold.experiments.distributed import (ShardedCompletion, control_mask,
                                                distributed_rank_adaptive, load_checkpoint,
                                                validation_mask)
from ttmanifold.experiments.problems import Completion, random_tt, sample_distinct_indices
from ttmanifold.experiments.solvers import greedy_rank_raise, rank_adaptive_completion

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as W  # noqa: E402
from test_distributed import _launch  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    """The single-process search on the training entries (the worker's validation split
    removed) with the data-parallel version's control split."""
    idx, vals = W.ra_data()
    val = torch.from_numpy(validation_mask(idx, 0.1))
    P = Completion.from_data(idx[~val], vals[~val], W.RA_SHAPE, 1)
    mask = torch.from_numpy(control_mask(P.train.indices, 0.1, 0))
    return P, rank_adaptive_completion(P, max_rank=4, control=mask)


def _full(h):
    return FixedTTRank(W.RA_SHAPE, h["ranks"]).to_tt(h["x"]).full()


def _attempts(history):
    return [(a["bond"], tuple(a["ranks"]), a["accepted"]) for a in history]


def _same_search(got, ref):
    """Same ranks, attempts, iterations and tensor (to rounding) as the reference."""
    assert tuple(got["ranks"]) == ref.info["ranks"] == tuple(W.RA_RANKS)
    assert _attempts(got["history"]) == _attempts(ref.info["rank_history"])
    assert list(got["iters"]) == ref.iters
    X = _full({"x": ref.x, "ranks": ref.info["ranks"]})
    assert float((_full(got) - X).norm() / X.norm()) < 1e-12
    errs = [a["control_err"] for a in got["history"]]
    ref_errs = [a["control_err"] for a in ref.info["rank_history"]]
    assert errs[:2] == pytest.approx(ref_errs[:2], rel=1e-9)  # before the fit to rounding
    # the default start fits from both rank-1 starts (the spectral one from the gathered
    # samples) and keeps the same one
    got_start, ref_start = got["history"][0], ref.info["rank_history"][0]
    assert got_start["start"] == ref_start["start"]
    assert set(got_start["start_errs"]) == {"means", "spectral"}
    for s in ("means", "spectral"):
        assert got_start["start_errs"][s] == pytest.approx(ref_start["start_errs"][s],
                                                           rel=1e-9)
    assert got_start["start_t"] == pytest.approx(ref_start["start_t"], rel=1e-6, abs=1e-9)


def test_one_process_equals_the_single_process_search_and_resumes(reference, tmp_path):
    P, ref = reference
    S = ShardedCompletion(P.train.indices, P.a_train, W.RA_SHAPE, 1)
    h = distributed_rank_adaptive(S, max_rank=4)
    assert h.method == "rank_adaptive-dp" and h.status == ref.status == "converged"
    _same_search({"x": h.x, "ranks": h.info["ranks"], "iters": h.iters,
                  "history": h.info["rank_history"]}, ref)
    assert h.info["control_size"] == ref.info["control_size"] == int(
        control_mask(P.train.indices, 0.1, 0).sum())
    # the metrics: train_err against a dense float64 reference
    X = FixedTTRank(W.RA_SHAPE, h.info["ranks"]).to_tt(h.x).full()
    r = X[tuple(P.train.indices.t())] - P.a_train
    assert h.metrics[-1]["train_err"] == pytest.approx(float(r.norm() / P.a_train.norm()),
                                                       rel=1e-6)
    # a checkpoint at every accepted stage; an interrupted run resumes to the same result
    ck = tmp_path / "ck.pt"

    def stop(t, hist):
        if len(hist.iters) == 3:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        distributed_rank_adaptive(S, max_rank=4, checkpoint=str(ck), checkpoint_every=1,
                                  callback=stop)
    info = load_checkpoint(ck)
    assert info["method"] == "rank_adaptive" and info["stage"] == 2
    assert info["ranks"] == list(h.info["rank_history"][1]["ranks"])
    again = distributed_rank_adaptive(S, max_rank=4, checkpoint=str(ck), resume=True)
    assert again.info["resumed_from_stage"] == 2
    assert torch.equal(again.x, h.x) and again.iters == h.iters and again.loss == h.loss
    assert _attempts(again.info["rank_history"]) == _attempts(h.info["rank_history"])
    # a default given explicitly is the same run
    again = distributed_rank_adaptive(S, max_rank=4, control_fraction=0.1,
                                      checkpoint=str(ck), resume=True)
    assert torch.equal(again.x, h.x)
    # a time budget (rank 0's clock decides) stops the search after the start
    hb = distributed_rank_adaptive(S, max_rank=4, time_budget=1e-9)
    assert hb.status == "budget" and hb.info["ranks"] == (1,) * 6 and hb.iters == [1]
    # another run's checkpoint, bad arguments: clear errors naming the argument
    with pytest.raises(ValueError, match="options"):
        distributed_rank_adaptive(S, max_rank=3, checkpoint=str(ck), resume=True)
    with pytest.raises(ValueError, match="checkpoint"):
        distributed_rank_adaptive(S, max_rank=4, checkpoint_every=1)
    with pytest.raises(TypeError, match="problem"):
        distributed_rank_adaptive(P, max_rank=4)
    with pytest.raises(ValueError, match="control"):
        distributed_rank_adaptive(S, max_rank=4, control=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="control"):
        rank_adaptive_completion(P, max_rank=4, control=torch.ones(len(P.train),
                                                                    dtype=torch.bool))


def test_two_processes_equal_one_and_a_dead_peer_stops_the_other(reference, tmp_path):
    P, ref = reference
    out, res = _launch("rank_adaptive", tmp_path)
    assert "exitcodes [0, 3]" in res.stdout, res.stdout + res.stderr
    r0, r1 = (torch.load(out / f"rank{k}.pt", weights_only=False) for k in (0, 1))
    # replicas: the same point on both processes, bit for bit
    assert torch.equal(r0["x"], r1["x"]) and r0["iters"] == r1["iters"]
    _same_search(r0, ref)
    assert r0["status"] == "converged"
    assert r0["resumed_from"] == 2
    assert torch.equal(r0["x_resumed"], r0["x"]) and r0["iters_resumed"] == r0["iters"]
    assert r0["loss_resumed"] == r0["loss"]
    seconds, msg = (out / "rank0.txt").read_text().splitlines()
    assert msg.startswith("PeerFailure: rank 0 of 2") and float(seconds) < 30
    assert not os.path.exists(out / "rank1.txt")


@pytest.mark.parametrize("scale", [1e-15, 1e12])
def test_greedy_raise_is_scale_invariant(scale):
    # the "no descent left" test is relative: tiny entries (as a unit-norm tensor of 50^20
    # entries has, or the interface vectors at high order) still get the greedy direction
    shape = (4, 5, 3, 4)
    g = torch.Generator().manual_seed(7)
    A = random_tt(shape, [1, 2, 3, 2, 1], generator=g)
    x = random_tt(shape, [1, 1, 1, 1, 1], generator=g)
    idx = sample_distinct_indices(shape, 120, generator=g)
    vals = A.full()[tuple(idx.t())]
    y = greedy_rank_raise(x, [1, 2, 3], idx, vals).full()
    ys = greedy_rank_raise(x * scale, [1, 2, 3], idx, vals * scale).full()
    assert float((ys / scale - y).norm() / y.norm()) < 1e-10
