"""The kernel seam (:mod:`ttmanifold.kernels`): the predicate, the dispatch decorator, the
build machinery (background build in a separate process, locks, failures) and the
agreement of the compiled and torch paths.

Everything that builds, kills or waits runs in subprocesses with timeouts; every cache
used here is a temporary directory (the real builds happen once per session, in
``built_cache``)."""
from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ttmanifold import FixedTTRank, TT, kernels
from ttmanifold.kernels import _cache

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None


def run_py(code: str, cache: str, timeout: float, **env):
    """Run ``code`` in a fresh interpreter with the kernel cache at ``cache``."""
    e = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=ROOT, **env)
    e.pop("TTMANIFOLD_NATIVE", None)
    e.pop("TTMANIFOLD_BUILD", None)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def kill_builder(cache: str, name: str, wait: float = 20.0) -> None:
    """End the background build (and its compiler) that a test's subprocess started."""
    s = _spec_in(cache, name)
    t = time.monotonic() + wait
    while time.monotonic() < t:
        rec = _cache.read_lock(s.lock_path)
        if rec and rec.get("pid"):
            try:
                os.killpg(int(rec["pid"]), signal.SIGKILL)
            except OSError:
                pass
            return
        if _cache.read_status(s) is not None:
            return
        time.sleep(0.1)


def _spec_in(cache, name):
    old = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(cache)
    try:
        return _cache.spec(name)
    finally:
        if old is None:
            del os.environ["TORCH_EXTENSIONS_DIR"]
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = old


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Fresh per-process kernel state over an empty cache in ``tmp_path``; returns a
    function giving the fresh state of a set."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for name in ("dense", "sampled"):
        monkeypatch.setitem(kernels._SETS, name, kernels._KernelSet(name))
    monkeypatch.setitem(kernels._config, "enabled", True)
    monkeypatch.setitem(kernels._config, "auto_build", True)
    return lambda name: kernels._SETS[name]


class Spy:
    """A compiled module that records which of its functions were called."""

    def __init__(self, mod):
        self._mod = mod
        self.calls = []

    def __getattr__(self, attr):
        f = getattr(self._mod, attr)
        if not callable(f):
            return f

        def call(*a, **k):
            self.calls.append(attr)
            return f(*a, **k)

        return call


# ---------------------------------------------------------------------------------------
# the predicate and the decorator (no build: a stand-in module)
# ---------------------------------------------------------------------------------------

@pytest.fixture
def loaded(fresh):
    """Both sets 'loaded' (a stand-in module object): usable() decides on the arguments."""
    for name in ("dense", "sampled"):
        fresh(name).module = object()
    return fresh


def test_usable_plain_cpu_float_tensors(loaded):
    a, b = torch.randn(3, dtype=F64), torch.randn(2, 2, dtype=F64)
    assert kernels.usable("dense", a, [b, None, (a,)], 3, "x")
    assert kernels.usable("dense", a.float(), [b.float()])
    assert kernels.usable("dense")  # no tensors: the module decides
    assert not kernels.usable("dense", a, [b.float()])  # two dtypes
    assert not kernels.usable("dense", a.half())
    assert not kernels.usable("dense", torch.arange(3))
    assert not kernels.usable("dense", a.to_sparse())
    assert not kernels.usable("dense", torch.empty(3, device="meta", dtype=F64))
    kernels.set_enabled(False)
    assert not kernels.usable("dense", a)


def test_usable_not_with_gradients_to_propagate(loaded):
    a = torch.randn(3, dtype=F64, requires_grad=True)
    assert not kernels.usable("dense", [torch.randn(3, dtype=F64), a])
    with torch.no_grad():
        assert kernels.usable("dense", a)


def test_usable_not_for_functorch_wrapped_tensors(loaded):
    seen = []

    def f(x):
        seen.append(kernels.usable("dense", [x]))
        return x * 2

    x = torch.randn(4, 3, dtype=F64)
    torch.func.vmap(f)(x)
    torch.func.grad(lambda x: f(x).sum())(x)
    with torch.no_grad():
        torch.func.vmap(f)(x)
    assert seen == [False, False, False]
    assert kernels.usable("dense", x)


def test_usable_not_for_fake_tensors_or_while_compiling(loaded, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(3, dtype=F64)) if hasattr(mode, "from_tensor") \
            else torch.randn(3, dtype=F64)
        assert not kernels.usable("dense", fake)
    monkeypatch.setattr(kernels, "_is_compiling", lambda: True)
    assert not kernels.usable("dense", torch.randn(3, dtype=F64))


def test_usable_not_under_a_dispatch_mode(loaded):
    """A compiled kernel is one call no TorchDispatchMode sees (make_fx, FlopCounterMode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    a = torch.randn(3, dtype=F64)
    with Passthrough():
        assert not kernels.usable("dense", a)
    assert kernels.usable("dense", a)


def test_usable_false_and_no_build_when_not_loaded(fresh, monkeypatch):
    monkeypatch.setitem(kernels._config, "auto_build", False)
    assert kernels.module("dense") is None
    assert not kernels.usable("dense", torch.randn(3, dtype=F64))
    assert fresh("dense").proc is None


def test_dispatch_keeps_signature_kwargs_and_torch_impl(loaded):
    calls = []

    def compiled(mod, x, y=None, *, scale=1.0):
        calls.append(("compiled", scale))
        return x * scale

    def applies(x, y=None, *, scale=1.0):
        return x.numel() > 2

    @kernels.dispatch("dense", compiled, when=applies)
    def op(x: torch.Tensor, y=None, *, scale: float = 1.0) -> torch.Tensor:
        """doc of op"""
        calls.append(("torch", scale))
        return x * scale

    assert str(inspect.signature(op)) == str(inspect.signature(op.torch_impl))
    assert op.__name__ == "op" and op.__doc__ == "doc of op"
    x = torch.randn(3, dtype=F64)
    op(x, scale=2.0)
    op(x=x, y=None, scale=3.0)
    op(torch.randn(2, dtype=F64), scale=4.0)  # `when` says no
    op(x.requires_grad_(), scale=5.0)  # usable says no
    op.torch_impl(x, scale=6.0)
    assert calls == [("compiled", 2.0), ("compiled", 3.0), ("torch", 4.0), ("torch", 5.0),
                     ("torch", 6.0)]


def test_dispatch_decided_once_and_grad_free(loaded):
    """``module_for`` is the decision of a call (when + usable), ``call_with`` follows a
    given decision without checking again; ``grad_free`` kernels take inputs requiring
    grad (their results carry no gradient)."""
    calls = []

    def compiled(mod, x):
        calls.append("compiled")
        return bool(x.sum() >= 0)

    @kernels.dispatch("dense", compiled, when=lambda x: x.numel() > 1)
    def op(x):
        calls.append("torch")
        return bool(x.sum() >= 0)

    free = kernels.dispatch("dense", compiled, grad_free=True)(op.torch_impl)
    x = torch.randn(3, dtype=F64)
    xg = x.clone().requires_grad_()
    mod = kernels._SETS["dense"].module
    assert op.module_for(x) is mod and op.module_for(xg) is None
    assert op.module_for(x[:1]) is None  # `when` says no
    op.call_with(mod, xg)  # trusted: compiled without a check
    op.call_with(None, x)
    op(xg)
    free(xg)
    assert free.module_for(xg) is mod
    assert calls == ["compiled", "torch", "torch", "compiled"]


def test_dispatch_when_is_asked_first(fresh, monkeypatch):
    """A call that ``when`` rejects never touches the cache nor starts a build."""
    probed = []
    monkeypatch.setattr(kernels, "_probe", lambda ks: probed.append(ks.name))
    op = kernels.dispatch("sampled", lambda mod, x: x, when=lambda x: False)(lambda x: x)
    op(torch.randn(3, dtype=F64))
    assert probed == []
    op = kernels.dispatch("sampled", lambda mod, x: x)(lambda x: x)
    op(torch.randn(3, dtype=F64))
    assert probed == ["sampled"]
    with pytest.raises(ValueError, match="unknown kernel set"):
        kernels.dispatch("nope", lambda mod: None)


# ---------------------------------------------------------------------------------------
# module(): never blocks, one background build, cheap re-checks
# ---------------------------------------------------------------------------------------

def test_module_starts_one_background_build_and_never_blocks(fresh, monkeypatch, capsys):
    started = []

    class Running:
        def poll(self):
            return None  # "still building"

    def start(cmd, env):
        started.append((cmd, env))
        return Running()

    monkeypatch.setattr(kernels, "_start_background", start)
    t0 = time.monotonic()
    for _ in range(200):
        assert kernels.module("dense") is None
    assert time.monotonic() - t0 < 1.0
    assert len(started) == 1
    cmd, env = started[0]
    assert cmd[0] == sys.executable and "ttmanifold.kernels._builder" in cmd[2]
    assert cmd[3:] == ["dense", "--background"]
    assert env["MAX_JOBS"] == "1"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ttmanifold build-kernels" in err and "usually" in err
    # the cache is checked at most once a second: later calls see the built artifact
    ks = fresh("dense")
    assert ks.next_check > time.monotonic()
    ks.next_check = 0.0
    assert kernels.module("dense") is None and len(started) == 1  # still building


def test_build_process_builds_where_this_process_looks(fresh, monkeypatch, tmp_path):
    # (a relative TORCH_EXTENSIONS_DIR and a chdir after the first look: the child built
    # into another directory and the build was reported as "ended without a result")
    started = []

    class Running:
        def poll(self):
            return None

    monkeypatch.setattr(kernels, "_start_background",
                        lambda cmd, env: started.append(env) or Running())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "relcache")
    where = kernels.status()["dense"]["path"]
    assert where.startswith(str(tmp_path / "a"))
    monkeypatch.chdir(tmp_path / "b")
    assert kernels.module("dense") is None and len(started) == 1
    root = started[0]["TORCH_EXTENSIONS_DIR"]
    assert os.path.isabs(root) and os.path.join(root, os.path.basename(where)) == where

def test_detached_build_process_is_not_waited_for(tmp_path):
    """The background build's process: own session, null stdio, its exit seen by poll()."""
    flag = tmp_path / "sid"
    code = ("import os, sys; open(sys.argv[1], 'w').write(str(os.getsid(0) == os.getpid()) + "
            "str(sys.stdin.read() == ''))")
    child = kernels._start_background([sys.executable, "-c", code, str(flag)], dict(os.environ))
    t = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < t:
        time.sleep(0.05)
    assert child.poll() == 0 and flag.read_text() == "TrueTrue"


def test_module_does_not_start_a_build_another_live_process_runs(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "_start_background", lambda *a, **k: pytest.fail("spawned"))
    s = _cache.spec("dense")
    os.makedirs(s.build_dir)
    with open(s.lock_path, "w") as fh:
        json.dump(_cache.owner_record(), fh)  # this (live) process holds it
    assert kernels.module("dense") is None
    assert fresh("dense").failed is None


def test_recorded_failure_is_reported_once_and_not_retried(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "_start_background", lambda *a, **k: pytest.fail("retried"))
    s = _cache.spec("dense")
    os.makedirs(s.build_dir)
    reason = "RuntimeError: Error building extension:\n" + "x" * 400 + "\nthe real cause at the end"
    _cache.write_status(s, status="failed", reason=reason, log=s.log_path)
    with pytest.warns(RuntimeWarning, match="the real cause at the end") as rec:
        assert not kernels.usable("dense", torch.randn(3, dtype=F64))
    assert rec[0].filename == __file__  # points at the caller's code
    assert len(rec) == 1
    fresh("dense").next_check = 0.0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.module("dense") is None
    assert "the real cause at the end" in kernels.status()["dense"]["failed"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_kernel_set_lock_held_at_fork_is_free_in_the_child(fresh):
    # (held by another thread during a cache probe at the fork: in the child module()
    # never loaded the set and build() waited forever for a thread that does not exist)
    ks = fresh("dense")
    ks.lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once
            os._exit(0 if kernels._SETS["dense"].lock.acquire(blocking=False) else 1)
        _, st = os.waitpid(pid, 0)
    finally:
        ks.lock.release()
    assert os.waitstatus_to_exitcode(st) == 0

def test_damaged_artifact_is_never_loaded(fresh, monkeypatch):
    # (a truncated .so with build.json "ok" was dlopen'ed: SIGBUS killed the process)
    monkeypatch.setattr(kernels, "_load", lambda *a: pytest.fail("loaded a damaged artifact"))
    monkeypatch.setattr(kernels, "_start_background", lambda *a, **k: pytest.fail("spawned"))
    s = _cache.spec("dense")
    os.makedirs(s.build_dir)
    with open(s.artifact, "wb") as fh:
        fh.write(b"\x7fELF" + bytes(100))  # cut short
    _cache.write_status(s, status="ok", artifact=s.artifact, size=123456, log=s.log_path)
    assert not _cache.is_built(s)
    with pytest.warns(RuntimeWarning, match="is damaged.*build-kernels"):
        assert kernels.module("dense") is None
    assert not kernels.status()["dense"]["built"]

def test_unusable_cache_is_one_warning_and_the_torch_path(fresh, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr(kernels, "_start_background", lambda *a, **k: pytest.fail("spawned"))
    with pytest.warns(RuntimeWarning, match="torch implementation serves") as rec:
        assert kernels.module("dense") is None
    assert len(rec) == 1 and str(blocker) in str(rec[0].message)
    assert fresh("dense").failed and kernels.module("dense") is None



def test_read_only_build_directory_is_named_not_an_empty_log(fresh, monkeypatch, read_only_dir):
    # (the build process failed on its lock file, unseen: "exited with status 1 without a
    # result", empty log; a background build was announced and then failed the same way)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(read_only_dir.parent))
    monkeypatch.setattr(_cache, "cache_root", lambda: str(read_only_dir.parent))
    monkeypatch.setattr(kernels, "_run_child", lambda *a: pytest.fail("started a build"))
    monkeypatch.setattr(kernels, "_start_background", lambda *a, **k: pytest.fail("spawned"))
    monkeypatch.setattr(_cache, "build_name", lambda name: read_only_dir.name)
    with pytest.warns(RuntimeWarning, match="cannot write in the kernel cache directory"):
        res = kernels.build("dense", verbose=False, timeout=5)["dense"]
    assert not res["ok"] and "TORCH_EXTENSIONS_DIR" in res["reason"]
    ks = fresh("dense")
    ks.failed, ks.warned, ks.next_check = None, False, 0.0
    with pytest.warns(RuntimeWarning, match="cannot write in the kernel cache directory"):
        assert kernels.module("dense") is None

# ---------------------------------------------------------------------------------------
# build names and locks
# ---------------------------------------------------------------------------------------

def test_two_environments_get_different_build_names():
    a = _cache.build_name("dense", torch_dir="/venv-a/site-packages/torch", torch_version="2.5.0")
    b = _cache.build_name("dense", torch_dir="/venv-b/site-packages/torch", torch_version="2.5.0")
    c = _cache.build_name("dense", torch_dir="/venv-a/site-packages/torch", torch_version="2.6.0")
    d = _cache.build_name("dense", torch_dir="/venv-a/site-packages/torch", torch_version="2.5.0",
                          python="3.12.1")
    assert len({a, b, c, d}) == 4
    assert a == _cache.build_name("dense", torch_dir="/venv-a/site-packages/torch",
                                  torch_version="2.5.0")
    assert a.startswith("ttmanifold_dense_")
    assert _cache.build_name("sampled") != _cache.build_name("dense")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_of_a_dead_or_reused_pid_is_stale(tmp_path):
    path = str(tmp_path / "ttmanifold.lock")
    host = socket.gethostname()
    with open(path, "w") as fh:
        json.dump({"pid": _dead_pid(), "host": host, "start": None}, fh)
    assert _cache.try_lock(path) is None  # taken: the stale lock was removed
    assert _cache.read_lock(path)["pid"] == os.getpid()
    assert _cache.try_lock(path) is not None  # a live owner (this process) holds it
    _cache.release_lock(path)
    assert not os.path.exists(path)
    if _cache._proc_start(os.getpid()) is not None:  # a live pid, but started at another time
        with open(path, "w") as fh:
            json.dump({"pid": os.getppid(), "host": host, "start": "1"}, fh)
        assert _cache.try_lock(path) is None
        _cache.release_lock(path)
    with open(path, "w") as fh:  # another machine's process cannot be checked: live
        json.dump({"pid": 1, "host": host + "-elsewhere"}, fh)
    assert _cache.try_lock(path) is not None


def test_build_waits_at_most_its_timeout_for_a_live_foreign_lock(fresh):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        s = _cache.spec("dense")
        os.makedirs(s.build_dir)
        with open(s.lock_path, "w") as fh:
            json.dump({"pid": sleeper.pid, "host": socket.gethostname(),
                       "start": _cache._proc_start(sleeper.pid)}, fh)
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="timed out after 1.5 s"):
            res = kernels.build("dense", verbose=False, timeout=1.5)["dense"]
        assert 1.4 <= time.monotonic() - t0 < 10
        assert not res["ok"] and "timed out" in res["reason"] and str(sleeper.pid) in res["reason"]
        assert fresh("dense").failed is None  # not a build failure: module() keeps looking
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------
# real processes: a cold cache, a failing compiler, the real builds
# ---------------------------------------------------------------------------------------

RETR_ONCE = """
    import time, torch
    from ttmanifold import FixedTTRank
    M = FixedTTRank((4, 5, 6, 5), 3)
    p = M.random(dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = M.proju(p, torch.randn(M.size, dtype=torch.float64))
    t0 = time.monotonic()
    q = M.retr(p, u)
    print("retr took", time.monotonic() - t0)
"""


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler")
def test_script_calling_retr_once_on_a_cold_cache_exits_at_once(tmp_path):
    """It announces the background build on one line and exits; after that build is killed
    with SIGKILL (its locks left behind), the next script neither hangs nor waits: it sees
    the owner gone and starts a new build."""
    pids = []
    try:
        for _ in range(2):
            p, secs = run_py(RETR_ONCE, tmp_path, timeout=120)
            assert p.returncode == 0, p.stderr
            assert float(p.stdout.split()[-1]) < 2.0  # retr did not wait for the compiler
            assert secs < 30  # the process did not either (imports included)
            notice = [ln for ln in p.stderr.splitlines() if "ttmanifold" in ln]
            assert len(notice) == 1 and "background" in notice[0], p.stderr
            assert "build-kernels" in notice[0]
            s = _spec_in(tmp_path, "dense")
            t = time.monotonic() + 60  # the new build takes the lock (the stale one first)
            rec = _cache.read_lock(s.lock_path)
            while not (rec and _cache.owner_alive(rec)) and time.monotonic() < t:
                time.sleep(0.05)
                rec = _cache.read_lock(s.lock_path)
            assert rec and _cache.owner_alive(rec)
            pids.append(rec["pid"])
            kill_builder(tmp_path, "dense")  # kill -9: the lock stays behind
            t = time.monotonic() + 10
            while _cache.owner_alive(rec) and time.monotonic() < t:
                time.sleep(0.05)
            assert os.path.exists(s.lock_path) and not _cache.owner_alive(rec)
        assert pids[0] != pids[1]
    finally:
        kill_builder(tmp_path, "dense", wait=0)


def test_failed_build_recorded_whole_and_reported_once(tmp_path):
    """A compiler that fails: build() reports the whole cause; a later process warns once
    with it (pointing at its own code) and does not retry."""
    code = """
        import json
        from ttmanifold import kernels
        print(json.dumps(kernels.build("dense", verbose=False)))
    """
    cxx = tmp_path / "broken-c++"
    cxx.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "g++ (fake) 12.2.0"; exit 0; fi\n'
                   'echo "fake-c++: error: this compiler compiles nothing" >&2\nexit 1\n')
    cxx.chmod(0o755)
    p, _ = run_py(code, tmp_path, timeout=300, CXX=str(cxx))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])["dense"]
    assert not res["ok"] and "Error building extension" in res["reason"]
    assert "this compiler compiles nothing" in res["reason"] and "build.log" in res["reason"]
    code = RETR_ONCE + """
    import warnings
    from ttmanifold import kernels
    print(kernels.status()["dense"]["building"], kernels._SETS["dense"].proc)
    """
    p, _ = run_py(code, tmp_path, timeout=120, CXX=str(cxx))
    assert p.returncode == 0, p.stderr
    assert "False None" in p.stdout  # not retried
    assert p.stderr.count("RuntimeWarning") == 1 and "this compiler compiles nothing" in p.stderr
    assert "<string>" in p.stderr.split("RuntimeWarning")[0]  # the script's line, not ours
    assert "threading.py" not in p.stderr



def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return _cache._proc_state(pid) not in (None, "Z")


def _slow_compiler(tmp_path):
    """A fake ``c++`` that answers ``--version`` and otherwise writes its pid to the
    returned marker file and sleeps (a build that stays in its compiler)."""
    marker = tmp_path / "compiler.pid"
    cxx = tmp_path / "slow-c++"
    cxx.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then echo "g++ (fake) 12.2.0"; exit 0; fi\n'
                   f'echo $$ > "{marker}"\nexec sleep 120\n')
    cxx.chmod(0o755)
    return cxx, marker


def _wait_for_compiler(p, marker) -> int:
    """The fake compiler's pid, once the build ``p`` started it (asserting ``p`` lives)."""
    t = time.monotonic() + 120
    while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < t:
        assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    return int(marker.read_text())


def _end_processes(p, pid) -> None:
    """Cleanup: the build process and the fake compiler, if still running."""
    if p.poll() is None:
        p.kill()
        p.wait()
    if pid is not None and _running(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
def test_interrupted_build_kernels_exits_130_and_stops_the_compiler(tmp_path):
    """Ctrl-C during ``ttmanifold build-kernels``: one line, exit status 130, the build lock
    released and no compiler left running (a traceback, and ninja and the compiler
    orphaned, before)."""
    cxx, marker = _slow_compiler(tmp_path)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), PYTHONPATH=ROOT,
               CXX=str(cxx))
    env.pop("TTMANIFOLD_NATIVE", None)
    p = subprocess.Popen([sys.executable, "-m", "ttmanifold", "build-kernels", "dense"], env=env,
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid = None
    try:
        pid = _wait_for_compiler(p, marker)
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=30)[0]
        assert p.returncode == 130, out
        assert "interrupted" in out and "Traceback" not in out
        t = time.monotonic() + 5
        while _running(pid) and time.monotonic() < t:
            time.sleep(0.05)
        assert not _running(pid)
        s = _spec_in(tmp_path / "cache", "dense")
        assert not os.path.exists(s.lock_path)
    finally:
        _end_processes(p, pid)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
def test_a_killed_build_process_leaves_no_compiler_running(tmp_path, monkeypatch):
    """The build process of build() killed with SIGKILL: the failure is reported and its
    compiler ends too (ninja and the compiler kept running, orphaned, before)."""
    cxx, marker = _slow_compiler(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXX", str(cxx))  # (in the build name)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=ROOT, CXX=str(cxx))
    env.pop("TTMANIFOLD_NATIVE", None)
    code = ("import json; from ttmanifold import kernels; "
            "print(json.dumps(kernels.build('dense', verbose=False)['dense']))")
    p = subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = _wait_for_compiler(p, marker)
        builder = _cache.read_lock(_spec_in(cache, "dense").lock_path)["pid"]
        os.kill(builder, signal.SIGKILL)
        out, err = p.communicate(timeout=60)
        res = json.loads(out.strip().splitlines()[-1])
        assert not res["ok"] and "exit status -9" in res["reason"], err
        t = time.monotonic() + 5
        while _running(pid) and time.monotonic() < t:
            time.sleep(0.05)
        assert not _running(pid)
    finally:
        _end_processes(p, pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG (Linux)")
def test_a_killed_background_builder_leaves_no_compiler_and_a_reclaimable_lock(tmp_path,
                                                                              monkeypatch):
    """The detached background build (started at import, watched by no one) killed with
    SIGKILL: its ninja and compiler end too (they kept running, orphaned, in the build
    directory before), and the next build takes over its stale lock. The fake compiler
    answers torch's compiler checks (``-v``, ``-dumpversion``) with the real one, so the
    build reaches ninja: the killed builder's ninja ends and takes the compiler with it."""
    cxx, marker = _slow_compiler(tmp_path)
    real = shutil.which("c++") or shutil.which("g++")
    if real is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja")
    cxx.write_text('#!/bin/sh\ncase "$1" in -v|--version|-dumpversion|-dumpfullversion) '
                   f'exec "{real}" "$@";; esac\necho $$ > "{marker}"\nexec sleep 120\n')
    monkeypatch.setenv("CXX", str(cxx))  # (in the build name)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TTMANIFOLD_NATIVE", raising=False)
    s = _cache.spec("dense")
    cmd, env = kernels._child_cmd(s, background=True)  # what the import starts
    p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    pid = None
    try:
        pid = _wait_for_compiler(p, marker)
        assert _cache.read_lock(s.lock_path)["pid"] == p.pid
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        t = time.monotonic() + 5
        while _running(pid) and time.monotonic() < t:
            time.sleep(0.05)
        assert not _running(pid)
        assert _cache.try_lock(s.lock_path) is None  # stale: reclaimed
        _cache.release_lock(s.lock_path)
        assert not os.path.exists(s.lock_path)
    finally:
        _end_processes(p, pid)


def test_status_write_interrupted_keeps_the_old_record_and_no_temporary(tmp_path, monkeypatch):
    """Ctrl-C while build.json is written: the old record stays whole and the temporary
    file is removed (it was left in the build directory)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    s = _cache.spec("dense")
    os.makedirs(s.build_dir)
    _cache.write_status(s, status="failed", reason="before")

    def interrupted(obj, fh, *args, **kwargs):
        fh.write('{"status": "o')
        raise KeyboardInterrupt

    monkeypatch.setattr(_cache.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _cache.write_status(s, status="ok")
    monkeypatch.undo()
    assert _cache.read_status(s)["reason"] == "before"
    assert os.listdir(s.build_dir) == [_cache.STATUS]


BUILD_WITH_STALE_LOCKS = """
    import json, os, socket, subprocess, sys
    from ttmanifold import kernels
    from ttmanifold.kernels import _cache
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    for name in ("dense", "sampled"):  # what a build killed with -9 leaves behind
        s = _cache.spec(name)
        os.makedirs(s.build_dir, exist_ok=True)
        with open(s.lock_path, "w") as fh:
            json.dump({"pid": dead.pid, "host": socket.gethostname(), "start": None}, fh)
        open(os.path.join(s.build_dir, "lock"), "w").close()  # torch's baton
    print(json.dumps(kernels.build(timeout=30)))
"""


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory):
    """One real build of both sets per session, in a fresh cache with stale locks left by a
    killed build."""
    if not HAVE_CXX:
        pytest.skip("no C++ compiler: the compiled kernels cannot be built here")
    cache = tmp_path_factory.mktemp("kernel_cache")
    p, secs = run_py(BUILD_WITH_STALE_LOCKS, cache, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    return cache, p.stdout, json.loads(p.stdout.strip().splitlines()[-1])


def test_build_removes_stale_locks_and_builds_both_sets(built_cache):
    cache, out, res = built_cache
    assert out.count("removed a stale build lock") == 2, out
    for name in ("dense", "sampled"):
        assert res[name]["ok"] and res[name]["result"] == "built", res[name]
        s = _spec_in(cache, name)
        assert _cache.is_built(s) and not os.path.exists(s.lock_path)
    assert "s] dense: compiling" in out and "s] sampled: built" in out


def test_cli_info_and_build_kernels_on_a_built_cache(built_cache):
    cache = built_cache[0]
    p, _ = run_py("from ttmanifold.__main__ import main; raise SystemExit(main(['info']))",
                  cache, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "dense    built, in use" in p.stdout and "sampled  built, in use" in p.stdout
    for word in ("python", "torch", "geoopt", "numpy", "cuda"):
        assert word in p.stdout
    p, _ = run_py("from ttmanifold.__main__ import main; raise SystemExit(main(['build-kernels']))",
                  cache, timeout=120)
    assert p.returncode == 0 and p.stdout.count("already built") >= 2, p.stdout


def test_cli_build_kernels_refuses_a_nan_or_negative_timeout():
    # (NaN never timed out while another process held the build lock)
    from ttmanifold.__main__ import main

    for bad in ("nan", "-1"):
        with pytest.raises(SystemExit, match="--timeout: expected a non-negative"):
            main(["build-kernels", "--timeout", bad])
    for bad in (float("nan"), -1.0):  # the API too, before any build starts
        with pytest.raises(ValueError, match="^timeout: expected a non-negative"):
            kernels.build("dense", timeout=bad, verbose=False)



def test_cli_info_prints_a_recorded_failure_once(fresh, capsys):
    # (once as the RuntimeWarning of module() on stderr, once in the table)
    from ttmanifold.__main__ import main

    s = _cache.spec("dense")
    os.makedirs(s.build_dir)
    _cache.write_status(s, status="failed", reason="fake-c++: the real cause", log=s.log_path)
    import warnings
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert main(["info"]) == 0
    out, err = capsys.readouterr()
    text = out + err + "".join(str(w.message) for w in rec)
    assert text.count("the real cause") == 1 and "failed:" in out

def test_cli_help_of_build_kernels_and_info(capsys):
    # (--help was refused as an unknown kernel set / an argument; --timeout=S unknown)
    from ttmanifold.__main__ import main

    for argv in (["build-kernels", "--help"], ["build-kernels", "-h"], ["info", "--help"]):
        assert main(argv) == 0
        assert capsys.readouterr().out.startswith("usage: ttmanifold " + argv[0])
    with pytest.raises(SystemExit, match="--timeout: expected a non-negative .* got nan"):
        main(["build-kernels", "--timeout=nan"])
    with pytest.raises(SystemExit, match="--timeout takes a number"):
        main(["build-kernels", "dense", "--timeout"])

@pytest.fixture
def compiled(built_cache, fresh, monkeypatch):
    """The session's compiled modules loaded in this process, behind call-recording spies."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(built_cache[0]))
    spies = {}
    for name in ("dense", "sampled"):
        mod = kernels.module(name)
        assert mod is not None, kernels.status()[name]
        spies[name] = fresh(name).module = Spy(mod)
    return spies


def _both(fn):
    """``fn()`` on the compiled path and on the torch path."""
    a = fn()
    kernels.set_enabled(False)
    try:
        b = fn()
    finally:
        kernels.set_enabled(True)
    return a, b


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape,ranks", [((4, 5, 6, 5), (1, 3, 4, 3, 1)), ((3, 4), (1, 2, 1)),
                                         ((2, 3, 4, 3, 2), (1, 2, 3, 3, 2, 1))])
def test_compiled_dense_agrees_with_torch(compiled, shape, ranks, dtype):
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(5)
    p = M.random(dtype=F64, generator=gen).to(dtype)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=gen).to(dtype))
    Z = TT.random(shape, 2, dtype=dtype, generator=gen)
    tol = 1e-11 if dtype == F64 else 2e-4

    def full(x):
        return M.to_tt(x).full().double()

    def close(a, b):
        return float((a - b).norm()) <= tol * max(1.0, float(b.norm()))

    spy = compiled["dense"]
    a, b = _both(lambda: M.retr(p, u))  # packed cores unique up to gauge: full tensors
    assert close(full(a), full(b))
    assert "retract_point" in spy.calls
    a, b = _both(lambda: M.project(p, Z))  # gauged deltas of the point: unique
    assert close(a.double(), b.double())
    assert "project" in spy.calls
    a, b = _both(lambda: M.proju(p, 3.0 * u))
    assert close(a.double(), b.double())
    q = M.retr(p, 0.1 * u)
    a, b = _both(lambda: M.transp(p, q, u))
    assert close(a.double(), b.double())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_compiled_dense_batches_in_one_call(compiled, dtype, monkeypatch):
    """Batched retr / project / transp / right cores run as one compiled call per batch and
    agree with the torch batch and with single-point calls (full tensors, gauged deltas),
    also when one side broadcasts (one point and a batch of steps or TTs)."""
    from ttmanifold.manifold import sweeps
    shape, ranks = (3, 4, 5, 3), (1, 2, 3, 2, 1)
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(11)
    x = M.random((2, M.size), dtype=dtype, generator=gen)  # below the rank bound: torch's
    M.retr(x, M.proju(x, torch.randn(2, M.size, dtype=F64, generator=gen).to(dtype)))
    assert "retract_batch" not in compiled["dense"].calls
    monkeypatch.setattr(sweeps, "COMPILED_BATCH_MIN_RANK", 1)
    p = M.random((2, 3, M.size), dtype=F64, generator=gen).to(dtype)
    u = M.proju(p, torch.randn(2, 3, M.size, dtype=F64, generator=gen).to(dtype))
    Z = TT.random(shape, 2, dtype=F64, generator=gen, batch=(2, 3)).to(dtype)
    tol = 1e-11 if dtype == F64 else 2e-4

    def full(x):
        return torch.stack([M.to_tt(q).full().double() for q in x.reshape(-1, M.size)])

    def close(a, b):
        return float((a - b).norm()) <= tol * max(1.0, float(b.norm()))

    spy = compiled["dense"]
    a, b = _both(lambda: M.retr(p, u))
    assert a.shape == (2, 3, M.size) and close(full(a), full(b))
    assert "retract_batch" in spy.calls
    single = torch.stack([M.retr(p[i, j], u[i, j]) for i in range(2) for j in range(3)])
    assert close(full(a), full(single))
    a, b = _both(lambda: M.project(p, Z))  # gauged deltas of each point: unique
    assert a.shape == (2, 3, M.size) and close(a.double(), b.double())
    assert "project_batch" in spy.calls
    q = M.retr(p, 0.1 * u)
    a, b = _both(lambda: M.transp(p, q, u))
    assert close(a.double(), b.double())
    # broadcasting: one point, a batch of steps; a batch of points, one TT
    a, b = _both(lambda: M.retr(p[0, 0], u[0]))
    assert a.shape == (3, M.size) and close(full(a), full(b))
    Z1 = TT([c[0, 0] for c in Z.cores])
    a, b = _both(lambda: M.project(p, Z1))
    assert a.shape == (2, 3, M.size) and close(a.double(), b.double())
    # the right cores of a batch, against the torch sweep's (canonical gauge: unique)
    from ttmanifold.manifold.sweeps import right_cores
    U = M.split(p, "p")
    a, b = _both(lambda: right_cores(U))
    assert a[0] is None and all(close(x.double(), y.double()) for x, y in zip(a[1:], b[1:]))
    assert "right_cores_batch" in spy.calls


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_compiled_gauge_projection_of_a_batch(compiled, dtype):
    """A batch's gauge projection (egrad2rgrad) is one compiled call and equals the torch
    batch and the per-core dense formula g_k - U_k U_k^T g_k (k < d), also for one point
    and a batch of gradients."""
    M = FixedTTRank((3, 4, 5, 3), (1, 2, 3, 2, 1))
    gen = torch.Generator().manual_seed(12)
    p = M.random((2, 3, M.size), dtype=F64, generator=gen).to(dtype)
    u = torch.randn(2, 3, M.size, dtype=F64, generator=gen).to(dtype)
    tol = 1e-12 if dtype == F64 else 1e-5
    a, b = _both(lambda: M.egrad2rgrad(p, u))
    assert "gauge_project_batch" in compiled["dense"].calls
    assert float((a - b).abs().max()) <= tol
    U, G = M.split(p.double(), "p"), M.split(u.double(), "u")
    ref = torch.cat([(g - torch.einsum("...ij,...kj,...kl->...il",
                                        u_.flatten(-3, -2), u_.flatten(-3, -2),
                                        g.flatten(-3, -2)).unflatten(-2, g.shape[-3:-1])
                      if k < M.d - 1 else g).flatten(-3) for k, (u_, g) in enumerate(zip(U, G))], -1)
    assert float((a.double() - ref).abs().max()) <= 10 * tol
    a, b = _both(lambda: M.egrad2rgrad(p[0, 0], u))  # one point, a batch of gradients
    assert a.shape == u.shape and float((a - b).abs().max()) <= tol


def test_compiled_dense_steps_aside_under_vmap_and_autograd(compiled):
    M = FixedTTRank((4, 5, 6, 5), 3)
    gen = torch.Generator().manual_seed(1)
    ps = torch.stack([M.random(dtype=F64, generator=gen) for _ in range(3)])
    us = torch.stack([M.proju(p, torch.randn(M.size, dtype=F64, generator=gen)) for p in ps])
    spy = compiled["dense"]
    spy.calls.clear()
    out = torch.func.vmap(M.retr)(ps, us)
    assert spy.calls == []
    kernels.set_enabled(False)
    ref = torch.stack([M.retr(p, u) for p, u in zip(ps, us)])
    kernels.set_enabled(True)
    for a, b in zip(out, ref):
        assert float((M.to_tt(a).full() - M.to_tt(b).full()).norm()) < 1e-10
    qs = out
    a = torch.func.vmap(M.proju)(ps, 2.0 * us)
    b = torch.func.vmap(M.transp)(ps, qs, us)
    assert spy.calls == []
    kernels.set_enabled(False)
    for k in range(3):
        assert torch.allclose(a[k], M.proju(ps[k], 2.0 * us[k]), atol=1e-10)
        assert torch.allclose(b[k], M.transp(ps[k], qs[k], us[k]), atol=1e-10)
    kernels.set_enabled(True)
    v = us[0].clone().requires_grad_()
    M.retr(ps[0], v).sum().backward()  # the point's right cores need no gradient: compiled
    assert v.grad is not None and not {"retract", "retract_point"} & set(spy.calls)
    g = torch.func.grad(lambda u: M.retr(ps[0], u).pow(2).sum())(us[0])
    g2 = torch.func.grad(lambda u: M.transp(ps[0], qs[0], u).pow(2).sum())(us[0])
    assert not {"retract", "retract_point"} & set(spy.calls)
    kernels.set_enabled(False)
    assert torch.allclose(g, torch.func.grad(lambda u: M.retr(ps[0], u).pow(2).sum())(us[0]),
                          atol=1e-10)
    assert torch.allclose(g2, torch.func.grad(
        lambda u: M.transp(ps[0], qs[0], u).pow(2).sum())(us[0]), atol=1e-10)


def test_compiled_dense_steps_aside_under_make_fx_and_flop_counter(compiled):
    """make_fx traces the torch path (the compiled call's result used to be untraced: the
    graph returned garbage), and FlopCounterMode counts the operations."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    M = FixedTTRank((4, 5, 6, 5), 3)
    gen = torch.Generator().manual_seed(2)
    p = M.random(dtype=F64, generator=gen).as_subclass(torch.Tensor)
    u = M.proju(p, torch.randn(M.size, dtype=F64, generator=gen))
    spy = compiled["dense"]
    spy.calls.clear()
    g = make_fx(lambda p, u: M.retr(p, u), tracing_mode="real")(p, u)
    assert spy.calls == []
    assert torch.allclose(M.to_tt(g(p, u)).full(), M.to_tt(M.retr(p, u)).full(), atol=1e-12)
    assert spy.calls  # outside the trace the compiled kernels serve again
    with FlopCounterMode(display=False) as fc:
        M.project(p, M.to_tt(p))
    assert fc.get_total_flops() > 0


def test_compiled_sampled_agrees_with_torch(compiled):
    from ttmanifold import IndexSet

    shape, ranks = (8, 9, 10, 9), (1, 3, 4, 3, 1)
    M = FixedTTRank(shape, ranks)
    gen = torch.Generator().manual_seed(3)
    n = 20000  # above the compiled kernels' minimum index-set size
    idx = torch.stack([torch.randint(0, s, (n,), generator=gen) for s in shape], 1)
    iset = IndexSet(idx, shape)
    p = M.random(dtype=F64, generator=gen)
    vals = torch.randn(n, dtype=F64, generator=gen)
    a, b = _both(lambda: M.project_sampled(p, iset, vals))
    assert float((a - b).norm()) <= 1e-10 * max(1.0, float(b.norm()))
    assert compiled["sampled"].calls


def test_a_build_lock_of_another_host_is_told_once(fresh, monkeypatch, capsys):
    # (a live lock of another machine sharing the cache, e.g. on NFS, stopped automatic
    # builds without a word: the torch implementation served forever, unexplained)
    started = []
    monkeypatch.setattr(kernels, "_start_background", lambda cmd, env: started.append(cmd))
    s = _cache.spec("dense")
    os.makedirs(s.build_dir)
    with open(s.lock_path, "w") as fh:
        json.dump({"pid": 1, "host": socket.gethostname() + "-elsewhere"}, fh)
    ks = fresh("dense")
    for _ in range(3):
        ks.next_check = 0.0
        assert kernels.module("dense") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-elsewhere" in err and s.lock_path in err
    assert "remove the lock" in err and started == []
