"""Multi-process scenarios of tests/test_distributed.py, run as a script in a subprocess
(the test applies a hard timeout): ``python distributed_worker.py SCENARIO OUTDIR PORT``.

Processes are started with the ``spawn`` method and joined with timeouts; the process
group is gloo on 127.0.0.1 with a short collective timeout."""
import datetime
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
SHAPE = (6, 7, 5, 6, 5)
RANK = 3
N = 2500


def data(shape=SHAPE, ranks=RANK, n=N):
    """The full data set (every process builds it, then keeps its shard)."""
    from ttmanifold import TT
    from ttmanifold.experiments.problems import sample_distinct_indices

    truth = TT.random(shape, ranks, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))
    idx = sample_distinct_indices(shape, n, generator=0)
    return idx, truth.gather(idx)


def split(idx, vals, rank, world):
    from ttmanifold.experiments.distributed import shard_mask, validation_mask

    val = torch.from_numpy(validation_mask(idx, 0.1))
    mine = torch.from_numpy(shard_mask(idx, rank, world))
    tr, va = mine & ~val, mine & val
    return idx[tr], vals[tr], (idx[va], vals[va])


def scenario_equal(rank, world, out):
    from ttmanifold.experiments.distributed import (ShardedCompletion, distributed_als,
                                                    distributed_cg, distributed_rsgd)

    idx, vals = data()
    ti, tv, val = split(idx, vals, rank, world)
    S = ShardedCompletion(ti, tv, SHAPE, RANK, validation=val)
    x0 = S.initial_point(0)
    a = distributed_cg(S, x0, iters=20)
    ck = os.path.join(out, "ck.pt")
    b = distributed_cg(S, x0, iters=12, checkpoint=ck, checkpoint_every=6)
    c = distributed_cg(S, x0, iters=20, checkpoint=ck, resume=True)
    s = distributed_rsgd(S, x0, lr=0.3, iters=10, metrics_every=0)
    als = distributed_als(S, x0, iters=4, metrics_every=0)

    def stop(t, hist):  # Ctrl-C on every process after step 3
        if t == 3:
            raise KeyboardInterrupt
        return False

    i = distributed_cg(S, x0, iters=8, callback=stop)
    torch.save({"a": a.x, "b": b.x, "c": c.x, "sgd": s.x, "als": als.x, "loss_als": als.loss,
                "interrupted": (i.status, i.iters, i.x),
                "x3": distributed_cg(S, x0, iters=3, metrics_every=0).x,
                "loss_a": a.loss,
                "loss_c": c.loss, "metrics_a": a.metrics[-1], "n_local": S.n_local,
                "n_train": S.n_train, "n_val": S.n_val, "iters_c": c.iters},
               os.path.join(out, f"rank{rank}.pt"))


def scenario_second_order(rank, world, out):
    """L-BFGS and trust region: runs, checkpoint and resume, the Hessian product of the
    sharded loss; then rank 1 crashes between two trust-region iterations (the next
    collective is a Hessian product of the inner CG)."""
    from ttmanifold.experiments.distributed import (PeerFailure, ShardedCompletion,
                                                    distributed_lbfgs,
                                                    distributed_trust_region)

    idx, vals = data()
    ti, tv, val = split(idx, vals, rank, world)
    S = ShardedCompletion(ti, tv, SHAPE, RANK, validation=val)
    x0 = S.initial_point(0)
    a = distributed_lbfgs(S, x0, iters=12)
    ck = os.path.join(out, "ck_lbfgs.pt")
    distributed_lbfgs(S, x0, iters=7, checkpoint=ck, checkpoint_every=5, metrics_every=0)
    c = distributed_lbfgs(S, x0, iters=12, checkpoint=ck, resume=True)
    tr = distributed_trust_region(S, x0, iters=5, metrics_every=0)
    ck = os.path.join(out, "ck_rtr.pt")
    distributed_trust_region(S, x0, iters=3, checkpoint=ck, checkpoint_every=2,
                             metrics_every=0)
    tr2 = distributed_trust_region(S, x0, iters=5, checkpoint=ck, resume=True,
                                   metrics_every=0)
    try:  # another method's checkpoint: every process raises rank 0's error
        distributed_trust_region(S, x0, iters=5, checkpoint=os.path.join(out, "ck_lbfgs.pt"),
                                 resume=True)
        refused = "no error"
    except ValueError as exc:
        refused = str(exc)
    _, g, hess = S.hessian(x0)
    res = {"refused": refused, "lbfgs": a.x, "lbfgs_resumed": c.x, "loss_lbfgs": a.loss,
           "loss_lbfgs_resumed": c.loss, "iters_resumed": c.iters, "info_lbfgs": a.info,
           "rtr": tr.x, "rtr_resumed": tr2.x, "loss_rtr": tr.loss,
           "loss_rtr_resumed": tr2.loss, "info_rtr": tr.info, "info_rtr_resumed": tr2.info,
           "grad": g, "hess_grad": hess(g)}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))

    def die(t, hist):
        if rank == 1 and t == 1:
            os._exit(3)
        return False

    t0 = time.time()
    try:
        distributed_trust_region(S, x0, iters=10, metrics_every=0, callback=die)
        msg = "no error"
    except PeerFailure as exc:
        msg = "PeerFailure: " + str(exc)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.time() - t0:.3f}\n{msg}\n")


def scenario_dead(rank, world, out):
    """First one process's bad shard (every process raises its error), then rank 1
    crashes at iteration 3."""
    from ttmanifold.experiments.distributed import (PeerFailure, ShardedCompletion,
                                                    distributed_cg)

    scenario_bad_shard(rank, world, out)
    idx, vals = data()
    ti, tv, val = split(idx, vals, rank, world)
    S = ShardedCompletion(ti, tv, SHAPE, RANK, validation=val)
    x0 = S.initial_point(0)

    def die(t, hist):
        if rank == 1 and t == 3:
            os._exit(3)  # a crash: no exception, no cleanup
        return False

    t0 = time.time()
    try:
        distributed_cg(S, x0, iters=50, callback=die)
        msg = "no error"
    except PeerFailure as exc:
        msg = "PeerFailure: " + str(exc)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.time() - t0:.3f}\n{msg}\n")


RA_SHAPE = (7, 6, 5, 6, 5)
RA_RANKS = [1, 2, 3, 3, 2, 1]
RA_N = 2000


def ra_data():
    """Data of the rank-adaptive scenario (unequal ranks, found from rank 1)."""
    return data(RA_SHAPE, RA_RANKS, RA_N)


class _Stop(Exception):
    pass


def scenario_rank_adaptive(rank, world, out):
    """The data-parallel rank-adaptive search; an interrupted run resumed from its last
    checkpoint; then rank 1 crashes during the search."""
    from ttmanifold.experiments.distributed import (PeerFailure, ShardedCompletion,
                                                    distributed_rank_adaptive)

    idx, vals = ra_data()
    ti, tv, val = split(idx, vals, rank, world)
    S = ShardedCompletion(ti, tv, RA_SHAPE, 1, validation=val)
    a = distributed_rank_adaptive(S, max_rank=4)
    ck = os.path.join(out, "ck_ra.pt")

    def stop(t, hist):  # an interruption after the second stage's checkpoint
        if len(hist.iters) == 3:
            raise _Stop
        return False

    try:
        distributed_rank_adaptive(S, max_rank=4, checkpoint=ck, checkpoint_every=1,
                                  callback=stop)
    except _Stop:
        pass
    c = distributed_rank_adaptive(S, max_rank=4, checkpoint=ck, resume=True)
    torch.save({"x": a.x, "ranks": a.info["ranks"], "iters": a.iters, "loss": a.loss,
                "history": a.info["rank_history"], "metrics": a.metrics,
                "x_resumed": c.x, "iters_resumed": c.iters, "loss_resumed": c.loss,
                "resumed_from": c.info.get("resumed_from_stage"), "status": a.status},
               os.path.join(out, f"rank{rank}.pt"))

    def die(t, hist):
        if rank == 1 and len(hist.iters) == 2:
            os._exit(3)
        return False

    t0 = time.time()
    try:
        distributed_rank_adaptive(S, max_rank=4, callback=die)
        msg = "no error"
    except PeerFailure as exc:
        msg = "PeerFailure: " + str(exc)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.time() - t0:.3f}\n{msg}\n")


def scenario_silent(rank, world, out):
    """Rank 1 stops answering (alive, asleep): rank 0 fails after the group's timeout."""
    from ttmanifold.experiments.distributed import (PeerFailure, ShardedCompletion,
                                                    distributed_cg)

    idx, vals = data()
    ti, tv, _ = split(idx, vals, rank, world)
    S = ShardedCompletion(ti, tv, SHAPE, RANK)
    x0 = S.initial_point(0)

    def hang(t, hist):
        if rank == 1 and t == 2:
            time.sleep(60)
            os._exit(4)
        return False

    t0 = time.time()
    try:
        distributed_cg(S, x0, iters=50, callback=hang)
        msg = "no error"
    except PeerFailure as exc:
        msg = "PeerFailure: " + str(exc)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.time() - t0:.3f}\n{msg}\n")
    if rank == 0:
        os._exit(0)  # do not wait for the sleeping peer at exit


def scenario_bad_shard(rank, world, out):
    """Errors of one process's shard and mismatched calls: every process raises the same
    error (one line per case in bad_shard{rank}.txt)."""
    from ttmanifold.experiments.distributed import (ShardedCompletion, distributed_cg,
                                                    distributed_rank_adaptive)

    idx, vals = data()
    ti, tv, _ = split(idx, vals, rank, world)
    one = rank == 1
    cases = [  # (rank 1's shard, shape, ranks, dtype) or a solver call
        lambda: ShardedCompletion(ti[:0] if one else ti, tv[:0] if one else tv, SHAPE, RANK),
        lambda: ShardedCompletion(torch.cat([ti, ti[:1]]) if one else ti,
                                  torch.cat([tv, tv[:1]]) if one else tv, SHAPE, RANK),
        lambda: ShardedCompletion(ti, tv, SHAPE, 2 if one else RANK),
        lambda: ShardedCompletion(ti, tv, SHAPE, RANK,
                                  dtype=torch.float32 if one else torch.float64),
    ]
    S = ShardedCompletion(ti, tv, SHAPE, RANK)
    x0 = S.initial_point(0)
    cases += [
        lambda: distributed_cg(S, x0, iters=8 if one else 5),
        lambda: distributed_cg(S, S.local.initial_point(rank), iters=5),
        # (a spectral start's all-reduce met the other's broadcast: a wait for the timeout)
        lambda: S.initial_point(0, kind="spectral" if one else "random"),
        # rank 0 failed at its first save, rank 1 waited for it
        lambda: distributed_cg(S, x0, iters=2, checkpoint=os.path.join(out, "no", "ck.pt"),
                               checkpoint_every=1),
        lambda: distributed_rank_adaptive(S, max_rank=3 if one else 4),
        # (rank 0's clock is broadcast when a budget is set: the others waited elsewhere)
        lambda: distributed_rank_adaptive(S, max_rank=4, time_budget=None if one else 1e6),
    ]
    lines = []
    for case in cases:
        try:
            case()
            lines.append("no error")
        except ValueError as exc:
            lines.append("ValueError: " + str(exc))
    with open(os.path.join(out, f"bad_shard{rank}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def ddp_model(param):
    from torch import nn

    from ttmanifold.nn import STTPLinear

    torch.manual_seed(0)
    return nn.Sequential(STTPLinear(16, 12, rank=3, param=param), nn.Tanh(),
                         nn.Linear(12, 4)).double()


def ddp_batches(steps):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 16, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (8,), generator=g)) for _ in range(steps)]


def ddp_train(model, opt_name, batches, part=None, world=1):
    """``steps`` optimizer steps; with ``part`` this process's half of each batch."""
    import geoopt
    from torch import nn

    opt_cls = {"rsgd": geoopt.optim.RiemannianSGD, "radam": geoopt.optim.RiemannianAdam}[opt_name]
    kw = {"lr": 0.05, "momentum": 0.9} if opt_name == "rsgd" else {"lr": 1e-2}
    opt = opt_cls(model.parameters(), **kw)
    for x, y in batches:
        if part is not None:
            half = x.shape[0] // world
            x, y = x[part * half:(part + 1) * half], y[part * half:(part + 1) * half]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scenario_ddp(rank, world, out):
    """STTP layers under DistributedDataParallel, chart and manifold modes, RiemannianSGD
    (with momentum) and RiemannianAdam: each process trains on its half of every batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = ddp_batches(6)
    res = {}
    for param in ("chart", "manifold"):
        for opt_name in ("rsgd", "radam"):
            model = ddp_model(param)
            if rank == 1:  # replicas start different: DDP broadcasts rank 0's parameters
                with torch.no_grad():
                    model[2].weight.add_(1.0)
            ddp = DDP(model)
            res[(param, opt_name)] = ddp_train(ddp, opt_name, batches, part=rank, world=world)
            res[(param, opt_name, "type")] = type(model[0].weight_param.point).__name__ \
                if param == "manifold" else "chart"
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def worker(rank, world, scenario, out, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=3 if scenario == "silent" else 20))
    try:
        globals()["scenario_" + scenario](rank, world, out)
    finally:
        # DDP wrappers are reference cycles holding the process group: collect them now,
        # or gloo's threads may abort the process during interpreter teardown
        gc.collect()
        if scenario != "silent":  # after a PeerFailure too: a clean exit (PeerFailure doc)
            dist.destroy_process_group()


def main():
    scenario, out, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, WORLD, scenario, out, port))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.time() + 100
    for p in procs[:1] if scenario == "silent" else procs:
        p.join(max(deadline - time.time(), 0.1))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
            codes.append("hung")
        else:
            codes.append(p.exitcode)
    print("exitcodes", codes)


if __name__ == "__main__":
    main()
