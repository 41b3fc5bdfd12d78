"""Tests of the command line: ``python -m ttmanifold`` and ``ttmanifold compare``."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from ttmanifold.__main__ import main
from ttmanifold.experiments.solvers import METHODS

HAS_NN = importlib.util.find_spec("ttmanifold.nn") is not None
HAS_CHART = importlib.util.find_spec("ttmanifold.chart") is not None


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _read_csv(path):
    with open(path) as f:
        lines = f.read().splitlines()
    header = [ln for ln in lines if ln.startswith("#")]
    rows = list(csv.DictReader([ln for ln in lines if not ln.startswith("#")]))
    return header, rows


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_tour_runs(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "round(x, rel_eps=0.05): ranks (1, 7, 7, 7, 7, 1) -> (1, 3, 3, 3, 3, 1)" in out
    assert "True" in out and "riemannian_grad" in out and "retr" in out


@pytest.mark.skipif(not HAS_CHART, reason="ttmanifold.chart not available yet")
def test_compare_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    problems = "approximation,completion" + (",layer" if HAS_NN else "")
    main(["compare", "--quick", "--out", str(out), "--iters", "3", "--grid-size", "2",
          "--tune-iters", "2", "--no-progress", "--problems", problems, "--hidden", "16",
          "--seed", "1"])
    stdout = capsys.readouterr().out
    for name in ("results.csv", "summary.md", "loss_vs_iter.png", "loss_vs_time.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    assert _is_png(out / "loss_vs_iter.png") and _is_png(out / "loss_vs_time.png")
    header, rows = _read_csv(out / "results.csv")
    keys = {h.split(":")[0] for h in header}
    assert {"# device", "# torch", "# dtype", "# seed"} <= keys
    runs = {(r["problem"], r["method"]) for r in rows}
    for problem in problems.split(","):
        for method in METHODS:
            if method == "rcg" and problem == "layer":
                assert (problem, method) not in runs
            else:
                assert (problem, method) in runs
                its = [int(r["iter"]) for r in rows if (r["problem"], r["method"]) == (problem, method)]
                assert its == [0, 1, 2, 3]
    summary = (out / "summary.md").read_text()
    assert "| method | lr | final loss |" in summary and "test_err" in summary
    assert "seed: 1" in summary and f"torch: {torch.__version__}" in summary
    assert "| method | lr | final loss |" in stdout  # the table is printed


def test_compare_single_method(tmp_path):
    out = tmp_path / "one"
    main(["compare", "--problems", "approximation", "--methods", "rcg,rsgd", "--shape", "4,5,4",
          "--rank", "2", "--iters", "4", "--grid-size", "2", "--tune-iters", "1", "--out",
          str(out), "--no-progress", "--dtype", "float32", "--tol", "0.5"])
    header, rows = _read_csv(out / "results.csv")
    assert {r["method"] for r in rows} == {"rcg", "rsgd"}
    assert any("float32" in h for h in header)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "sgd,lbfgs"], "unknown method"),
        (["--problems", "regression"], "unknown problem"),
        (["--shape", "2,2", "--rank", "5", "--problems", "approximation"], "infeasible"),
        (["--iters", "-3"], "non-negative"),
        (["--dtype", "float16"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--shape", "3,a"], "comma-separated ints"),
        (["--oversampling", "0"], "positive"),
        (["--problems", "completion", "--shape", "3,3,3", "--rank", "2", "--oversampling",
          "20"], "exceeds"),
        (["--problems", "layer", "--methods", "rcg"], "quadratic"),
    ],
)
def test_bad_options_give_clear_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path / "x")] + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_absent_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--device", "cuda", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert "unknown command" in str(exc.value)


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "ttmanifold", "compare", "--help"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "--time-budget" in r.stdout and "--core-dist" in r.stdout


def _tiny_approximation():
    from ttmanifold.experiments.problems import Approximation

    return Approximation.random((4, 5, 4), 4, 2, dtype=torch.float64, seed=0)


def test_run_reports_chart_domain_error_instead_of_crashing(monkeypatch):
    from ttmanifold.experiments import solvers

    def outside(problem, method, x0, lr, opts):
        raise ValueError("frame U1: singular leading block (outside the chart's domain)")

    monkeypatch.setattr(solvers, "_make_stepper", outside)
    prob = _tiny_approximation()
    hist = solvers.run(prob, "chart_sgd", iters=3, lr=0.1)
    assert hist.status == "outside chart domain"
    assert "singular" in hist.info["error"]
    # Riemannian methods have no chart: the same error is not swallowed there
    with pytest.raises(ValueError, match="singular"):
        solvers.run(prob, "rsgd", iters=3, lr=0.1)


def test_run_reports_divergence_from_on_device_asserts(monkeypatch):
    from ttmanifold.experiments import solvers

    real = solvers._make_stepper

    def exploding(problem, method, x0, lr, opts):
        st = real(problem, method, x0, lr, opts)
        calls = {"n": 0}
        step = st.step

        def step_then_fail():
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("u: gradient contains NaN or Inf")
            return step()

        st.step = step_then_fail
        return st

    monkeypatch.setattr(solvers, "_make_stepper", exploding)
    hist = solvers.run(_tiny_approximation(), "rsgd", iters=10, lr=0.1)
    assert hist.status == "diverged"
    assert len(hist.loss) >= 2


# ---------------------------------------------------------------------------------------
# --out: checked before the first run; results kept as runs finish; Ctrl-C
# ---------------------------------------------------------------------------------------

_TINY = ["--problems", "approximation", "--shape", "4,5,4", "--rank", "2", "--grid-size", "2",
         "--tune-iters", "1", "--no-progress"]


def _cli(args, timeout=120, **kw):
    """``python -m ttmanifold compare ...`` in a subprocess (never hangs the suite)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TTMANIFOLD_BUILD="0")
    return subprocess.run([sys.executable, "-m", "ttmanifold", "compare"] + args,
                          capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_out_under_a_file_is_a_clear_error_before_any_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = blocker / "sub"  # cannot be created, even by root
    r = _cli(["--out", str(bad), "--iters", "3"] + _TINY)
    assert r.returncode == 2, r.stderr
    assert f"--out {bad}: cannot write there" in r.stderr
    assert "runs (" not in r.stderr and "Traceback" not in r.stderr  # nothing ran


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(f), "--iters", "1"] + _TINY)
    assert exc.value.code == 2
    assert f"--out {f}: is an existing file" in capsys.readouterr().err
    assert f.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_out_is_a_clear_error_before_any_run(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = _cli(["--out", str(ro), "--iters", "3"] + _TINY)
    finally:
        ro.chmod(0o755)
    assert r.returncode == 2 and f"--out {ro}: cannot write there" in r.stderr


def test_table_printed_even_when_writing_fails(tmp_path, capsys, monkeypatch):
    from ttmanifold.experiments import compare

    def fail(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compare, "_write_atomic", fail)
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path / "o"), "--iters", "2", "--methods",
              "rcg,rsgd"] + _TINY)
    assert "the table is above" in str(exc.value) and "No space left" in str(exc.value)
    out, err = capsys.readouterr()
    assert "| rcg |" in out and "| rsgd |" in out  # the finished runs are not lost
    assert err.count("cannot write") == 1  # said once, not per run


def test_results_csv_is_complete_at_the_end(tmp_path):
    out = tmp_path / "o"
    main(["compare", "--out", str(out), "--iters", "2", "--methods", "rcg,rsgd"] + _TINY)
    header, rows = _read_csv(out / "results.csv")
    assert "# status: complete: 2 runs" in header
    assert "- status: complete: 2 runs" in (out / "summary.md").read_text()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp") or p.startswith(".write")]


def test_ctrl_c_keeps_finished_runs_and_ends_with_one_line(tmp_path):
    """SIGINT to a child process once its first run is in results.csv: exit status 130,
    one line on stderr (no traceback), the finished runs kept and marked incomplete."""
    import signal
    import time

    out = tmp_path / "o"
    env = dict(os.environ, OMP_NUM_THREADS="1", TTMANIFOLD_BUILD="0")
    args = [sys.executable, "-m", "ttmanifold", "compare", "--out", str(out), "--methods",
            "rcg,rsgd,radam", "--iters", "1000000", "--time-budget", "3"] + _TINY
    # SIGINT at its default in the child even when this suite runs with it ignored (a
    # background job of a non-interactive shell), so that Python raises KeyboardInterrupt
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        csv_path = out / "results.csv"
        while time.monotonic() < deadline and proc.poll() is None:
            if csv_path.exists() and ",rcg," in csv_path.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ttmanifold compare: interrupted; 1 of 3 runs finished"), stderr
    header, rows = _read_csv(csv_path)
    assert any(h.startswith("# status: incomplete: interrupted after 1 of 3 runs")
               for h in header), header
    assert {r["method"] for r in rows} == {"rcg"}
    summary = (out / "summary.md").read_text()
    assert "status: incomplete" in summary and "| rcg |" in summary
    assert "| rsgd |" not in summary


def test_ctrl_c_while_plotting_keeps_the_results_and_ends_with_one_line(tmp_path, capsys,
                                                                       monkeypatch):
    from ttmanifold.experiments import compare

    def stop(*a, **k):  # (a traceback before)
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "_plot", stop)
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path / "o"), "--iters", "2", "--methods", "rcg"]
             + _TINY)
    assert exc.value.code == 130
    assert "interrupted while plotting; all 1 runs" in capsys.readouterr().err
    assert "complete: 1 runs" in (tmp_path / "o" / "results.csv").read_text()


def test_preset_cli_threads_and_methods(tmp_path, capsys):
    """--preset runs at one torch thread unless --threads, and --methods picks a subset
    (rank_adaptive among them) of the preset's methods."""
    before = torch.get_num_threads()
    try:
        main(["compare", "--preset", "psenka-boumal", "--quick", "--methods", "als",
              "--iters", "2", "--threads", "2", "--out", str(tmp_path)])
        text = capsys.readouterr().out
        assert "torch threads: 2" in text and "| als |" in text and "| rcg |" not in text
        main(["compare", "--preset", "psenka-boumal", "--quick", "--methods",
              "rank_adaptive", "--time-budget", "0.01", "--out", str(tmp_path)])
        text = capsys.readouterr().out
        assert "torch threads: 1" in text and "| rank_adaptive |" in text
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
