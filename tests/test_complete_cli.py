"""``ttmanifold complete``: the three input formats give the same run, the outputs (TT file,
report, predictions) against a dense float64 reference, malformed files raise errors naming
the file and the entry, nothing is overwritten without --force, Ctrl-C keeps the finished
iterations, checkpoints resume, --method selects CG, L-BFGS, the trust region or ALS, and the same
command under torchrun (2 gloo processes on 127.0.0.1, in a subprocess with a hard timeout)
gives the single-process result."""
import csv
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import ttmanifold as tm
from ttmanifold.__main__ import main as cli_main
from ttmanifold.experiments import complete as C
from ttmanifold.experiments import distributed as D
from ttmanifold.experiments.problems import sample_distinct_indices

SHAPE = (8, 9, 7, 6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    truth = tm.TT.random(SHAPE, 3, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    idx = sample_distinct_indices(SHAPE, 1500, generator=1).numpy()
    full = truth.full().numpy()
    vals = full[tuple(idx.T)]
    np.savez(root / "d.npz", indices=idx, values=vals)
    with open(root / "d.csv", "w") as f:
        f.write("i,j,k,l,value\n# a comment\n")
        for r, v in zip(idx.tolist(), vals.tolist()):
            f.write(",".join(map(str, r)) + f",{v!r}\n")
    dense = np.full(SHAPE, np.nan)
    dense[tuple(idx.T)] = vals
    np.save(root / "dense.npy", dense)
    q = np.array([[0, 0, 0, 0], [7, 8, 6, 5], [3, 1, 4, 1]])
    np.savetxt(root / "q.csv", q, fmt="%d", delimiter=",")
    return root, full, idx, vals, q


def _report(path):
    with open(path) as f:
        lines = f.read().splitlines()
    header = [l[2:] for l in lines if l.startswith("# ")]
    rows = list(csv.DictReader([l for l in lines if not l.startswith("#")]))
    return header, rows


def test_complete_recovers_a_low_rank_tensor_from_each_format(data, tmp_path, capsys):
    root, full, idx, vals, q = data
    finals = []
    for name in ("d.csv", "d.npz", "dense.npy"):
        out = tmp_path / name.replace(".", "_")
        args = [str(root / name), "--rank", "3", "--validation", "0.1", "--iters", "40",
                "--out", str(out), "--no-progress"]
        if name == "d.csv":
            args += ["--query", str(root / "q.csv")]
        assert cli_main(["complete"] + args) == 0
        x = tm.load(out / "completed.npz")
        assert x.shape == SHAPE and x.ranks == (1, 3, 3, 3, 1)
        X = x.full().numpy()
        assert np.linalg.norm(X - full) / np.linalg.norm(full) < 1e-6
        header, rows = _report(out / "report.csv")
        assert "status: converged" in header and "ranks: [1, 3, 3, 3, 1] (fixed)" in header
        assert int(rows[0]["iter"]) == 0 and float(rows[-1]["train_err"]) < 1e-9
        assert float(rows[-1]["val_err"]) < 1e-6
        finals.append(X)
    # the same entries, the same split and start: the same run, whatever the format
    np.testing.assert_allclose(finals[1], finals[0], rtol=0, atol=1e-13)
    np.testing.assert_allclose(finals[2], finals[0], rtol=0, atol=1e-13)
    with open(tmp_path / "d_csv" / "predictions.csv") as f:
        pred = list(csv.reader(f))
    assert pred[0] == ["i1", "i2", "i3", "i4", "prediction"]
    got = np.array([float(r[-1]) for r in pred[1:]])
    np.testing.assert_allclose(got, finals[0][tuple(q.T)], rtol=0, atol=1e-14)
    np.testing.assert_allclose(got, full[tuple(q.T)], rtol=0, atol=1e-8)
    out = capsys.readouterr().out
    assert "1500 observed entries" in out and "(fixed;" in out and "wrote" in out


def _err(args, capsys=None):
    with pytest.raises(SystemExit) as exc:
        cli_main(["complete"] + [str(a) for a in args])
    return str(exc.value)


def test_malformed_files_name_the_file_and_the_entry(data, tmp_path):
    root, full, idx, vals, q = data
    out = ["--out", tmp_path / "o", "--no-progress", "--rank", "2"]
    f = tmp_path / "empty.csv"
    f.write_text("")
    assert "empty.csv: the file is empty" in _err([f] + out)
    f = tmp_path / "header.csv"
    f.write_text("i,j,value\n")
    assert "header.csv: no entries" in _err([f] + out)
    f = tmp_path / "dup.csv"
    f.write_text("0,1,1.0\n2,2,3.0\n0,1,2.0\n")
    assert "dup.csv: the index (0, 1) appears more than once (entries 0 and 2)" in \
        _err([f] + out)
    f = tmp_path / "nan.csv"
    f.write_text("0,1,1.0\n1,1,nan\n")
    assert "nan.csv: entry 1 at index (1, 1) has value nan" in _err([f] + out)
    f = tmp_path / "neg.csv"
    f.write_text("0,1,1.0\n-1,1,2.0\n")
    assert "neg.csv: entry 1: index (-1, 1) is negative in mode 0" in _err([f] + out)
    f = tmp_path / "frac.csv"
    f.write_text("0,1.5,1.0\n")
    assert "frac.csv: line (data) row 0, column 1: index 1.5 is not an integer" in \
        _err([f] + out)
    f = tmp_path / "ragged.csv"
    f.write_text("0,1,1.0\n1,1\n")
    assert "ragged.csv: line 2: 2 columns, the first row has 3" in _err([f] + out)
    f = tmp_path / "range.csv"
    f.write_text("0,1,1.0\n3,1,2.0\n")
    assert "range.csv: entry 1: index (3, 1) is out of range in mode 0 for shape (3, 2)" in \
        _err([f, "--shape", "3,2"] + out)
    assert "--shape has 3 modes" in _err([f, "--shape", "4x2x2"] + out)
    f = tmp_path / "allnan.npy"
    np.save(f, np.full((3, 4), np.nan))
    assert "allnan.npy: no observed entries" in _err([f] + out)
    f = tmp_path / "int.npy"
    np.save(f, np.zeros((3, 4), dtype=np.int64))
    assert "int.npy: a dense array must be floating point" in _err([f] + out)
    f = tmp_path / "keys.npz"
    np.savez(f, a=np.zeros(2), b=np.zeros(2))
    assert "keys.npz: expected arrays 'indices' and 'values'" in _err([f] + out)
    f = tmp_path / "complex.npz"  # (the imaginary parts were dropped with a warning)
    np.savez(f, indices=np.array([[0, 0], [1, 1]]), values=np.array([1 + 1j, 2.0]))
    assert "complex.npz: values must be real numbers" in _err([f] + out)
    f = tmp_path / "huge.csv"  # (reported as a negative index)
    f.write_text("0,0,1.0\n99999999999999999999,1,2.0\n")
    assert "huge.csv: line (data) row 1, column 0: index 1e+20 is too large" in _err([f] + out)
    f = tmp_path / "junk.npz"
    f.write_bytes(b"junk")
    assert "junk.npz: cannot read it" in _err([f] + out)
    assert "missing.csv: no such file" in _err([tmp_path / "missing.csv"] + out)
    f = tmp_path / "q_bad.csv"
    f.write_text("0,0,0,9\n")
    assert "q_bad.csv: query 0: index (0, 0, 0, 9) is out of range in mode 3" in \
        _err([root / "d.npz", "--query", f] + out)
    assert "--validation: expected a fraction" in _err([root / "d.npz", "--validation", "1"]
                                                       + out)
    assert "--rank: expected a positive int" in _err([root / "d.npz", "--rank", "0",
                                                      "--out", tmp_path / "o"])
    for bad in ("nan", "-1"):  # NaN or a negative tolerance: the run could never stop early
        assert "--tol: expected a non-negative number" in _err([root / "d.npz", "--tol", bad]
                                                               + out)
    for bad in ("0", "nan", "inf"):  # refused in one process too, not only under torchrun
        assert "--timeout: expected a positive number" in _err(
            [root / "d.npz", "--timeout", bad] + out)
    assert not (tmp_path / "o" / "completed.npz").exists()


def test_nothing_is_overwritten_without_force(data, tmp_path):
    root = data[0]
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.csv").write_text("keep me")
    msg = _err([root / "d.npz", "--rank", "2", "--iters", "1", "--out", out, "--no-progress"])
    assert "report.csv' exists; pass --force" in msg
    assert (out / "report.csv").read_text() == "keep me"
    f = tmp_path / "file"
    f.write_text("")
    assert "exists and is not a directory" in _err([root / "d.npz", "--rank", "2", "--out", f])
    assert cli_main(["complete", str(root / "d.npz"), "--rank", "2", "--iters", "1",
                     "--out", str(out), "--no-progress", "--force"]) == 0
    assert (out / "report.csv").read_text().startswith("# status")


def test_an_unwritable_out_is_refused_before_the_run(data, tmp_path, monkeypatch):
    root = data[0]
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses it
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("needs a directory that root cannot write in")
        target = "/sys/kernel"
    # os.access can say yes when a write fails (root, ACLs, network file systems): the
    # check must write, not ask
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    msg = _err([root / "d.npz", "--rank", "2", "--iters", "1", "--out", target,
                "--no-progress"])
    assert "--out: cannot write in" in msg
    # an output name taken by a directory cannot be replaced, even with --force
    out = tmp_path / "o"
    (out / "report.csv").mkdir(parents=True)
    msg = _err([root / "d.npz", "--rank", "2", "--iters", "1", "--out", out, "--force",
                "--no-progress"])
    assert "report.csv' is a directory" in msg


def test_ctrl_c_keeps_the_finished_iterations_and_resume_continues(data, tmp_path,
                                                                   monkeypatch, capsys):
    root = data[0]
    out = tmp_path / "o"
    real = D.ShardedCompletion.grad
    calls = {"n": 0}

    def grad(self, p):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, p)

    monkeypatch.setattr(D.ShardedCompletion, "grad", grad)
    args = ["complete", str(root / "d.npz"), "--rank", "3", "--iters", "12", "--out",
            str(out), "--checkpoint-every", "2", "--no-progress", "--tol", "0"]
    assert cli_main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    header, rows = _report(out / "report.csv")
    # iterations 0..2 finished, the 4th gradient evaluation (of iterate 4) was interrupted:
    # the files hold iterate 3 with its row; the checkpoint is that of iteration 2
    assert header[0] == "status: incomplete (interrupted)" and len(rows) == 4
    assert tm.load(out / "completed.npz").shape == SHAPE
    assert D.load_checkpoint(out / "checkpoint.pt")["iteration"] == 2
    monkeypatch.setattr(D.ShardedCompletion, "grad", real)
    assert cli_main(args + ["--resume"]) == 0
    header, rows = _report(out / "report.csv")
    assert header[0] == "status: ok" and [int(r["iter"]) for r in rows] == list(range(13))
    # the same as an uninterrupted run
    assert cli_main(["complete", str(root / "d.npz"), "--rank", "3", "--iters", "12",
                     "--no-progress", "--tol", "0", "--out", str(tmp_path / "straight")]) == 0
    a = tm.load(out / "completed.npz").full()
    b = tm.load(tmp_path / "straight" / "completed.npz").full()
    assert torch.equal(a, b)
    assert "--resume: no checkpoint" in _err([root / "d.npz", "--rank", "3", "--resume",
                                              "--out", tmp_path / "none"])


def test_ctrl_c_before_the_solver_exits_with_130_and_a_message(data, tmp_path, monkeypatch,
                                                              capsys):
    def stop(*a, **k):  # Ctrl-C while the start is computed (a traceback before)
        raise KeyboardInterrupt

    monkeypatch.setattr(D.ShardedCompletion, "initial_point", stop)
    assert cli_main(["complete", str(data[0] / "d.npz"), "--rank", "3", "--out",
                     str(tmp_path / "o"), "--no-progress"]) == 130
    assert "interrupted before the solver ran" in capsys.readouterr().err
    assert not (tmp_path / "o" / "completed.npz").exists()


def test_progress_bar_and_help(capsys):
    import io

    s = io.StringIO()
    p = C.Progress(20, enabled=True, stream=s)
    for t in range(1, 21):
        p.update(t, {"train_err": 0.5 / t})
    p.close()
    lines = s.getvalue().splitlines()
    assert 5 <= len(lines) <= 12 and lines[-1].startswith("[" + "#" * 24 + "] 20/20")
    with pytest.raises(SystemExit):
        cli_main(["complete", "--help"])
    assert "with --rank-adaptive the cap of every bond" in " ".join(
        capsys.readouterr().out.split())


def test_method_lbfgs_and_trust_region(data, tmp_path):
    root, full, idx, vals, q = data
    base = [str(root / "d.npz"), "--rank", "3", "--validation", "0.1", "--no-progress"]
    # L-BFGS to convergence; the trust region (seconds per iteration: its inner CG makes up
    # to dim M Hessian products) for two iterations
    for method, iters in (("rlbfgs", 40), ("rtr", 2), ("als", 30)):
        out = tmp_path / method
        assert cli_main(["complete"] + base + ["--method", method, "--iters", str(iters),
                                               "--out", str(out), "--checkpoint-every",
                                               "2"]) == 0
        header, rows = _report(out / "report.csv")
        assert f"method: {method}" in header
        assert D.load_checkpoint(out / "checkpoint.pt")["method"] == method
        X = tm.load(out / "completed.npz").full().numpy()
        err = np.linalg.norm(X - full) / np.linalg.norm(full)
        if method in ("rlbfgs", "als"):
            assert err < 1e-6 and "status: converged" in header, (method, err, header)
        else:
            loss = [float(r["loss"]) for r in rows]
            assert len(loss) == 3 and loss[2] < loss[1] < loss[0]
    # a checkpoint of another method is refused with a clear message
    assert "has method = 'rtr', this run has 'rlbfgs'" in _err(
        base + ["--method", "rlbfgs", "--resume", "--out", tmp_path / "rtr"])
    assert "--method rtr: --rank-adaptive" in _err(
        base + ["--method", "rtr", "--rank-adaptive", "--out", tmp_path / "ra"])


def _torchrun_complete(args, out):
    """``ttmanifold complete`` with ``args`` on two gloo processes (torchrun on a free port
    of 127.0.0.1), writing to ``out``; the workers import this checkout's package (not
    another installed copy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
                           ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port",
                           str(port), "-m", "ttmanifold", "complete"] + args +
                          ["--out", str(out), "--timeout", "30"],
                          capture_output=True, text=True, timeout=120, env=env)


def test_torchrun_two_processes_equal_one(data, tmp_path):
    root, full, idx, vals, q = data
    # L-BFGS: the CG path under torchrun is the same code (tests/test_distributed.py runs
    # both with two processes)
    args = [str(root / "d.csv"), "--rank", "3", "--validation", "0.1", "--iters", "15",
            "--tol", "0", "--query", str(root / "q.csv"), "--no-progress",
            "--method", "rlbfgs"]
    res = _torchrun_complete(args, tmp_path / "two")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "on each of 2 processes" in res.stdout and res.stdout.count("wrote") == 1
    assert cli_main(["complete"] + args + ["--out", str(tmp_path / "one")]) == 0
    a = tm.load(tmp_path / "two" / "completed.npz").full()
    b = tm.load(tmp_path / "one" / "completed.npz").full()
    assert float((a - b).abs().max()) < 1e-12
    h2, r2 = _report(tmp_path / "two" / "report.csv")
    h1, r1 = _report(tmp_path / "one" / "report.csv")
    assert "processes: 2" in h2 and "processes: 1" in h1 and "method: rlbfgs" in h2
    np.testing.assert_allclose([float(r["val_err"]) for r in r2],
                               [float(r["val_err"]) for r in r1], rtol=1e-9)


def test_rank_adaptive_finds_the_rank(tmp_path, capsys):
    shape = (7, 6, 5, 4)
    truth = tm.TT.random(shape, 2, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(3))
    idx = sample_distinct_indices(shape, 450, generator=2).numpy()
    np.savez(tmp_path / "d.npz", indices=idx, values=truth.full().numpy()[tuple(idx.T)])
    out = tmp_path / "o"
    # (seed 2: the hash control split of seed 0 leaves this tiny problem's CG at ranks
    # (1, 2, 2, 2) stalled in a poor fit within 25 iterations, so the search overshoots)
    assert cli_main(["complete", str(tmp_path / "d.npz"), "--rank", "3", "--rank-adaptive",
                     "--iters", "25", "--out", str(out), "--no-progress",
                     "--validation", "0.1", "--seed", "2"]) == 0
    x = tm.load(out / "completed.npz")
    assert x.ranks == (1, 2, 2, 2, 1)
    full = truth.full()
    assert float((x.full() - full).norm() / full.norm()) < 1e-6
    header, rows = _report(out / "report.csv")
    assert "ranks: [1, 2, 2, 2, 1] (rank-adaptive, cap 3)" in header
    assert header[9].startswith("attempt: start ranks [1, 1, 1, 1, 1]")
    assert any(h.startswith("attempt: bond ") for h in header)
    assert "control_err" in rows[-1] and "val_err" in rows[-1]
    assert header[8] == "init: rank 1, spectral (--init auto)"  # the control set chose
    said = capsys.readouterr().out
    assert "rank-adaptive: ranks from 1 up to 3" in said
    assert "rank-1 start spectral kept (control error after the fit: means " in said
    assert "--init means: the slice-means start" in _err([tmp_path / "d.npz", "--rank", "3",
                                                          "--init", "means", "--out",
                                                          tmp_path / "o3"])
    assert "--method rlbfgs: --rank-adaptive" in _err([tmp_path / "d.npz", "--rank", "3",
                                                       "--rank-adaptive", "--method", "rlbfgs",
                                                       "--out", tmp_path / "o2"])


def test_rank_adaptive_under_torchrun_equals_one_process_and_resumes(tmp_path):
    shape = (7, 6, 5, 4)
    truth = tm.TT.random(shape, 2, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(3))
    idx = sample_distinct_indices(shape, 450, generator=2).numpy()
    np.savez(tmp_path / "d.npz", indices=idx, values=truth.full().numpy()[tuple(idx.T)])
    q = np.array([[0, 0, 0, 0], [6, 5, 4, 3]])
    np.savetxt(tmp_path / "q.csv", q, fmt="%d", delimiter=",")
    args = [str(tmp_path / "d.npz"), "--rank", "3", "--rank-adaptive", "--iters", "25",
            "--validation", "0.1", "--seed", "2", "--query", str(tmp_path / "q.csv"),
            "--no-progress"]
    res = _torchrun_complete(args, tmp_path / "two")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(2 processes)" in res.stdout and res.stdout.count("wrote") == 1
    assert cli_main(["complete"] + args + ["--out", str(tmp_path / "one")]) == 0
    a = tm.load(tmp_path / "two" / "completed.npz")
    b = tm.load(tmp_path / "one" / "completed.npz")
    assert a.ranks == b.ranks == (1, 2, 2, 2, 1)
    assert float((a.full() - b.full()).norm() / b.full().norm()) < 1e-12
    h2, r2 = _report(tmp_path / "two" / "report.csv")
    h1, r1 = _report(tmp_path / "one" / "report.csv")
    assert "processes: 2" in h2 and "processes: 1" in h1
    attempts = [h.rsplit(" control_err", 1)[0] for h in h1 if h.startswith("attempt:")]
    assert attempts == [h.rsplit(" control_err", 1)[0] for h in h2 if h.startswith("attempt:")]
    assert [r["iter"] for r in r2] == [r["iter"] for r in r1]
    p2 = np.loadtxt(tmp_path / "two" / "predictions.csv", delimiter=",", skiprows=1)
    p1 = np.loadtxt(tmp_path / "one" / "predictions.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(p2, p1, rtol=1e-10, atol=1e-12)
    # checkpoints at accepted stages; --resume continues to the same result
    assert cli_main(["complete"] + args + ["--out", str(tmp_path / "ck"),
                                           "--checkpoint-every", "1"]) == 0
    ck = D.load_checkpoint(tmp_path / "ck" / "checkpoint.pt")
    assert ck["method"] == "rank_adaptive" and ck["ranks"] == [1, 2, 2, 2, 1]
    assert cli_main(["complete"] + args + ["--out", str(tmp_path / "ck"), "--resume"]) == 0
    c = tm.load(tmp_path / "ck" / "completed.npz")
    assert c.ranks == b.ranks and torch.equal(c.full(), b.full())
    hc, _ = _report(tmp_path / "ck" / "report.csv")
    assert "init: checkpoint" in hc
    # a fixed-rank run refuses the rank-adaptive checkpoint, naming the mismatch
    assert "method" in _err([tmp_path / "d.npz", "--rank", "3", "--resume",
                             "--out", tmp_path / "ck"])
