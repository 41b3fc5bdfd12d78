"""STTP layers trained data-parallel under torch.nn.parallel.DistributedDataParallel (two
gloo processes on 127.0.0.1, in a subprocess with a hard timeout): chart mode (theta, a
plain parameter) and manifold mode (a geoopt.ManifoldParameter on FixedTTRank) with
RiemannianSGD (momentum) and RiemannianAdam. The replicas start different (DDP broadcasts
rank 0's parameters), end bitwise identical, and equal one process trained on the full
batches (each process holds half of every batch: the mean of the halves' gradients is the
full batch's)."""
import os
import pathlib
import socket
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import distributed_worker as W  # noqa: E402


def test_ddp_replicas_identical_and_equal_to_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([sys.executable, str(HERE / "distributed_worker.py"), "ddp",
                          str(tmp_path), str(port)], capture_output=True, text=True,
                         timeout=150, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "exitcodes [0, 0]" in res.stdout, res.stdout + res.stderr
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0[("manifold", "rsgd", "type")] == "ManifoldParameter"
    for param in ("chart", "manifold"):
        for opt in ("rsgd", "radam"):
            a, b = r0[(param, opt)], r1[(param, opt)]
            assert all(torch.equal(a[k], b[k]) for k in a), (param, opt)
            start = W.ddp_model(param).state_dict()
            ref = W.ddp_train(W.ddp_model(param), opt, W.ddp_batches(6))
            for k in ref:
                assert float((a["module." + k] - ref[k]).abs().max()) < 1e-10, (param, opt, k)
            # and training moved the weights (the comparison is not vacuous)
            assert max(float((ref[k] - start[k]).abs().max()) for k in ref) > 1e-2
