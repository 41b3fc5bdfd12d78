"""The one seam between the torch implementations and the compiled CPU kernels.

Two kernel sets, small C++ extensions compiled with ``torch.utils.cpp_extension``:
``"dense"`` (``dense.cpp``: right-orthogonal cores, projection of a TT, retraction;
adapters in :mod:`ttmanifold.kernels.dense`) and ``"sampled"`` (``sampled.cpp``: the
sampled-entry sweeps). They compute what the torch implementations compute; the torch
implementations serve every case the compiled ones do not (see :func:`usable`).

- :func:`usable` is the only predicate, :func:`dispatch` the decorator that applies it;
- :func:`module` never blocks and never compiles in this process: it loads a built set from
  the cache, or starts one background build in a separate low-priority process (announced
  on one line on stderr) and returns None until the build is there;
- :func:`build` (``ttmanifold build-kernels``) builds in the foreground with progress;
  :func:`status` (``ttmanifold info``) tells built / in use / failed (whole reason).

Environment: ``TTMANIFOLD_NATIVE=0`` never uses (nor builds) the compiled kernels;
``TTMANIFOLD_BUILD=0`` never starts a build automatically (:func:`build` still does);
``TORCH_EXTENSIONS_DIR`` moves the cache (see :mod:`ttmanifold.kernels._cache`).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from typing import Callable, Dict, Iterable, Optional, Union

import torch

from .._checks import check_positive_float, ensure_writable_dir
from . import _cache

__all__ = ["enabled", "set_enabled", "set_auto_build", "set_serial_small_ops",
           "serial_small_ops", "module", "usable", "dispatch", "build", "status"]

PROBE_INTERVAL = 1.0  # seconds between two cache checks while a set is not loaded
USUAL_TIME = "usually 0.5-2 minutes"
_BUSY = 3  # _builder's exit status when another process holds the lock


def _env_flag(var: str) -> bool:
    return os.environ.get(var, "1").strip().lower() not in ("0", "false", "no", "off")


_config = {"enabled": _env_flag("TTMANIFOLD_NATIVE"), "auto_build": _env_flag("TTMANIFOLD_BUILD"),
           "serial": _env_flag("TTMANIFOLD_SERIAL_SMALL_OPS")}
# kernel sets whose calls are small per-core matrix work (r x n r, (r n) x 2r): their
# dispatched calls, compiled or torch, run with one intra-op thread (see dispatch)
_SMALL_SETS = frozenset({"dense"})


def enabled() -> bool:
    """Whether the compiled kernels may be used (``TTMANIFOLD_NATIVE=0`` turns them off)."""
    return bool(_config["enabled"])


def set_enabled(flag: bool) -> None:
    """Use (``True``, the default) or never use nor build (``False``) the compiled kernels."""
    _config["enabled"] = bool(flag)


def set_serial_small_ops(flag: bool) -> None:
    """Run the dispatched calls of the small-matrix set ``dense`` with one intra-op thread
    (``True``, the default unless ``TTMANIFOLD_SERIAL_SMALL_OPS=0``) or with torch's
    thread count (``False``). With a competing busy process on the machine, OpenMP/BLAS
    workers of a small call wait for a core and a 1 ms retraction can take 0.1-1 s;
    serial, it stays within about 1.2x (``benchmarks/bench_load.py``)."""
    _config["serial"] = bool(flag)


class serial_small_ops:
    """Context manager: one intra-op thread for the block (``torch.set_num_threads(1)``,
    restored on exit; per calling thread for OpenMP and MKL), for callers whose whole
    operation is small per-core matrix work (a manifold's per-step methods), so that none
    of its parts waits for a core another process holds. A no-op when
    :func:`set_serial_small_ops` turned this off, when torch already runs one thread, or
    while ``torch.compile`` traces (enter it outside traced code: dynamo may not trace a
    context manager)."""

    __slots__ = ("_n",)

    def __enter__(self):
        self._n = 0
        if _config["serial"] and not _is_compiling():
            n = torch.get_num_threads()
            if n > 1:
                torch.set_num_threads(1)
                self._n = n
        return self

    def __exit__(self, *exc):
        if self._n:
            torch.set_num_threads(self._n)
        return False


def set_auto_build(flag: bool) -> None:
    """Start a background build on first use (``True``, the default unless
    ``TTMANIFOLD_BUILD=0``) or only load what :func:`build` built (``False``)."""
    _config["auto_build"] = bool(flag)


class _KernelSet:
    """Per-process state of one kernel set."""

    def __init__(self, name: str):
        self.name = name
        self.spec: Optional[_cache.Spec] = None
        self.module = None
        self.failed: Optional[str] = None  # the whole reason; not retried automatically
        self.warned = False
        self.proc = None  # our background build (poll() -> exit status or None)
        self.spawned = False
        self.told_remote = False  # said once that another host holds the build lock
        self.next_check = 0.0
        self.lock = threading.Lock()

    def get_spec(self) -> _cache.Spec:
        if self.spec is None:
            self.spec = _cache.spec(self.name)
        return self.spec


_SETS: Dict[str, _KernelSet] = {n: _KernelSet(n) for n in _cache.SETS}


def _after_fork_in_child() -> None:
    # a lock another thread held at the fork stays held in the child, whose copy of that
    # thread does not exist: module() would never load there and build() would hang
    for ks in _SETS.values():
        ks.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _set(name: str) -> _KernelSet:
    ks = _SETS.get(name)
    if ks is None:
        _cache.check_name(name)
    return ks


# ---------------------------------------------------------------------------------------
# module(): load from the cache, or start a background build; never blocks
# ---------------------------------------------------------------------------------------

def module(name: str):
    """The loaded compiled module of kernel set ``name``, or None.

    Never blocks and never compiles in this process. A set built in the cache for this
    environment is loaded (a few ms, once). Otherwise, unless auto-build is off or a build
    failed, one build starts in a separate low-priority process (one line on stderr says
    so) and later calls load its result; the cache is checked at most once a second."""
    ks = _set(name)
    if not _config["enabled"]:
        return None
    mod = ks.module
    if mod is not None or ks.failed is not None:
        return mod
    now = time.monotonic()
    if now < ks.next_check or not ks.lock.acquire(blocking=False):
        return None
    try:
        if ks.module is None and ks.failed is None and now >= ks.next_check:
            ks.next_check = now + PROBE_INTERVAL
            _probe(ks)
    finally:
        ks.lock.release()
    return ks.module


def _probe(ks: _KernelSet) -> None:
    try:
        s = ks.get_spec()
        rc = ks.proc.poll() if ks.proc is not None else None  # before reading its result
        st = _cache.read_status(s)
        if st is not None and st.get("status") == "ok" and os.path.exists(s.artifact):
            if _cache.damaged(s, st):  # never dlopen it (SIGBUS)
                _fail(ks, f"the built module {s.artifact} is damaged (not the size recorded "
                      f"by its build); `ttmanifold build-kernels` rebuilds it")
                return
            why = _load(ks, s)
            if why is not None:
                _fail(ks, why)
            return
        if ks.proc is not None:
            if rc is None:
                return  # still building
            ks.proc = None
            if rc == _BUSY:
                return  # another process builds it: its result will appear
            if st is not None and st.get("status") == "failed":
                _fail(ks, _failure_text(s, st))
            else:
                _fail(ks, f"the build process exited with status {rc} without a result"
                      + _log_text(s))
            return
        if st is not None and st.get("status") == "failed":
            owner = _cache.read_lock(s.lock_path)
            if owner is None or not _cache.owner_alive(owner):  # not being rebuilt now
                _fail(ks, _failure_text(s, st))
            return
        if not _config["auto_build"] or ks.spawned:
            return  # one automatic build per process at most
        owner = _cache.read_lock(s.lock_path)
        if owner is not None and _cache.owner_alive(owner):
            if owner.get("host") != socket.gethostname() and not ks.told_remote:
                # (a build on this machine announced itself; one on another host sharing
                # the cache may be gone, and nothing here can tell)
                ks.told_remote = True
                print(f"ttmanifold: the {ks.name} kernels are being built by "
                      f"{_cache.describe_owner(owner)}, another machine sharing the kernel "
                      f"cache (build lock {s.lock_path}); the torch implementation serves "
                      f"until they appear. If no build runs there, remove the lock.",
                      file=sys.stderr, flush=True)
            return  # another process builds it
        _spawn(ks, s)
    except Exception as exc:  # noqa: BLE001  (unreadable cache, no Python to run, ...)
        _fail(ks, f"{type(exc).__name__}: {exc}")


def _child_cmd(s: _cache.Spec, background: bool):
    """The command and environment of a build process for ``s``: this interpreter, importing
    this ttmanifold (its directory first on ``sys.path``, whatever the working directory),
    building into ``s``'s cache root (absolute: a relative ``TORCH_EXTENSIONS_DIR`` after a
    ``chdir``, or a changed one, made the child build where this process never looked)."""
    name = s.name
    if not sys.executable:
        raise RuntimeError("no Python executable (sys.executable is empty) to run the build")
    pkg_parent = os.path.dirname(os.path.dirname(_cache.HERE))  # the directory of ttmanifold/
    boot = (f"import sys; sys.path.insert(0, {pkg_parent!r}); "
            "from ttmanifold.kernels._builder import main; sys.exit(main(sys.argv[1:]))")
    if background:  # lowest priority from the start (the imports too), where there is nice
        boot = "import os\nif hasattr(os, 'nice'): os.nice(19)\n" + boot
    cmd = [sys.executable, "-c", boot, name]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=os.path.dirname(s.build_dir))
    if background:
        cmd.append("--background")
        env["MAX_JOBS"] = "1"
        env["OMP_NUM_THREADS"] = "1"
    return cmd, env


class _Detached:
    """A background build process started with ``os.posix_spawn`` in its own session: no
    ``Popen`` object, so nothing waits for it or warns about it when this process exits."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored, ...)
                try:
                    os.kill(self.pid, 0)
                    return None
                except OSError:
                    self.returncode = _BUSY  # unknown: the cache tells
                    return self.returncode
            if pid:
                self.returncode = (os.waitstatus_to_exitcode(st)
                                   if hasattr(os, "waitstatus_to_exitcode") else st >> 8)
        return self.returncode


def _start_background(cmd, env):
    """Start ``cmd`` detached: own session, stdin/stdout/stderr on the null device, never
    waited for (the build writes its own log once it holds the lock)."""
    if hasattr(os, "posix_spawn") and hasattr(os, "POSIX_SPAWN_OPEN"):
        null = os.devnull
        actions = [(os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, null, os.O_WRONLY, 0)]
        return _Detached(os.posix_spawn(cmd[0], cmd, env, file_actions=actions, setsid=True))
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, close_fds=True,
                            start_new_session=True)


def _make_build_dir(s: _cache.Spec) -> None:
    """Create ``s``'s build directory and check it is writable, in this process: the build
    process's own error (its lock or log not writable) reached no terminal, and the build
    was reported as "exited with status 1 without a result" with an empty log."""
    try:
        ensure_writable_dir(s.build_dir)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write in the kernel cache directory {s.build_dir} "
                      f"({exc.strerror or exc}); set TORCH_EXTENSIONS_DIR to a writable "
                      f"directory") from None


def _spawn(ks: _KernelSet, s: _cache.Spec) -> None:
    _make_build_dir(s)
    cmd, env = _child_cmd(s, background=True)
    ks.spawned = True
    ks.proc = _start_background(cmd, env)
    what = _cache.SETS[ks.name][2]
    print(f"ttmanifold: compiling the {ks.name} kernels ({what}) in a background process at low "
          f"priority, once per machine and torch install ({USUAL_TIME}; log {s.log_path}); the "
          f"torch implementation serves meanwhile. Build now: `ttmanifold build-kernels`; "
          f"never build automatically: TTMANIFOLD_BUILD=0; no compiled kernels: "
          f"TTMANIFOLD_NATIVE=0.", file=sys.stderr, flush=True)


def _load(ks: _KernelSet, s: _cache.Spec) -> Optional[str]:
    """Load the built artifact into ``ks``; the reason when it does not load."""
    mod = sys.modules.get(s.build_name)
    if mod is None:
        try:
            spec = importlib.util.spec_from_file_location(s.build_name, s.artifact)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        except Exception as exc:  # noqa: BLE001
            return (f"the built module {s.artifact} does not load ({type(exc).__name__}: "
                    f"{exc}); `ttmanifold build-kernels` rebuilds it")
        sys.modules[s.build_name] = mod
    ks.module = mod
    ks.failed = None
    return None


def _log_text(s: _cache.Spec) -> str:
    tail = _cache.log_tail(s.log_path)
    return f"\nbuild log {s.log_path}" + (f", last lines:\n{tail}" if tail else " (empty)")


def _failure_text(s: _cache.Spec, st: dict) -> str:
    reason = str(st.get("reason") or "no reason recorded")
    return reason + f"\nfull build log: {st.get('log') or s.log_path}"


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PKG = os.path.dirname(_cache.HERE) + os.sep
_STDLIB_GLUE = {os.path.abspath(m.__file__) for m in (functools, threading)}


def _stacklevel() -> int:
    """The stack level of the first frame outside ttmanifold, torch, geoopt and the standard
    library's threading/functools (the user's code), or past the stack's end (no location)."""
    f = sys._getframe(1)
    level = 1
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not (fn.startswith((_PKG, _TORCH_DIR)) or os.sep + "geoopt" + os.sep in fn
                or fn in _STDLIB_GLUE):
            return level
        f = f.f_back
        level += 1
    return level


def _fail(ks: _KernelSet, reason: str, warn: bool = True) -> None:
    ks.failed = reason
    if warn and not ks.warned:
        ks.warned = True
        warnings.warn(
            f"ttmanifold: the compiled {ks.name} kernels are unavailable; the torch "
            f"implementation serves (same values, slower). Cause:\n{reason}\n"
            f"Retry with `ttmanifold build-kernels`, or set TTMANIFOLD_NATIVE=0 to silence this.",
            RuntimeWarning, stacklevel=_stacklevel())


# ---------------------------------------------------------------------------------------
# usable() and dispatch(): the one predicate
# ---------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float64)
_DEFAULT_DISPATCH = torch.Tensor.__torch_dispatch__
_plain_types = {torch.Tensor: True, torch.nn.Parameter: True}
_ft = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_ft, "is_functorch_wrapped_tensor", None) or (lambda t: False)
_is_batched = getattr(_ft, "is_legacy_batchedtensor", None) or (lambda t: False)
# functorch's wrappers (vmap, grad, jacrev: TensorWrapper, BatchedTensor) and the legacy
# batched tensors have no storage: one check (about 70 ns) covers both kinds
_has_storage = getattr(torch._C, "_has_storage", None) or (
    lambda t: not (_is_wrapped(t) or _is_batched(t)))
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)
# The number of active TorchDispatchModes (make_fx's proxy mode, FakeTensorMode,
# FlopCounterMode, a user's own mode): a compiled kernel is one opaque call that no mode
# sees, so with one active the torch implementation runs instead (under make_fx the
# kernel's result would not be traced: the graph computed garbage).
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None) or (lambda: 0)
_STRIDED = torch.strided


def _plain(tp) -> bool:
    """A tensor class without its own ``__torch_dispatch__`` (not FakeTensor, functional
    or other wrapper subclasses): its data pointer is real memory."""
    ok = _plain_types.get(tp)
    if ok is None:
        ok = _plain_types[tp] = getattr(tp, "__torch_dispatch__", _DEFAULT_DISPATCH) is _DEFAULT_DISPATCH
    return ok


def _tensors_ok(args: Iterable, state: list, grad: bool) -> bool:
    """Every tensor in ``args`` (nested lists/tuples) a plain strided CPU tensor with storage,
    of float32/float64, of one dtype (``state[0]``), not requiring grad when ``grad``.
    About 0.3 us per tensor: this runs on every dispatched call (about 100 tensors per
    Riemannian gradient of a general loss), so the common case is kept short: an exact
    ``torch.Tensor`` needs no subclass test, and the layout test is implied by the storage
    test (sparse, sparse-compressed and mkldnn tensors have none)."""
    Tensor = torch.Tensor
    for a in args:
        tp = type(a)
        if tp is Tensor or isinstance(a, Tensor):
            dt = a.dtype
            if dt is not state[0]:
                if state[0] is not None or dt not in _FLOATS:
                    return False
                state[0] = dt
            if (not a.is_cpu or (grad and a.requires_grad) or not _has_storage(a)
                    or (tp is not Tensor and (a.layout is not _STRIDED
                                              or not (_plain_types.get(tp) or _plain(tp))))):
                return False
        elif tp is list or tp is tuple or isinstance(a, (list, tuple)):
            if not _tensors_ok(a, state, grad):
                return False
    return True


def usable(name: str, *args) -> bool:
    """Whether the compiled kernel set ``name`` serves a call on ``args``: enabled, loaded
    (:func:`module`, which never blocks), and every tensor among ``args`` (lists and tuples
    flattened, other values skipped) is a plain strided CPU tensor of float32 or float64,
    all of one dtype, none requiring grad while grad mode is on, none functorch-wrapped
    (vmap, grad), fake or meta; not inside ``torch.compile`` tracing, and no
    ``TorchDispatchMode`` active (``make_fx``, ``FlopCounterMode``, fake tensor modes: a
    compiled kernel is one call that a mode cannot see).

    No side effect except :func:`module`'s (which may start the background build)."""
    if not _args_ok(args, torch.is_grad_enabled()):
        return False
    return module(name) is not None


def _args_ok(args, grad: bool) -> bool:
    """:func:`usable` without the module: enabled, not tracing, and the tensors of ``args``
    fit (none requiring grad when ``grad``)."""
    if not _config["enabled"] or _is_compiling() or _dispatch_modes():
        # is_compiling first: dynamo never reaches the torch._C predicates below (which it
        # cannot trace), so the torch implementation traces without a graph break
        return False
    return _tensors_ok(args, [None], grad)


def dispatch(name: str, compiled: Callable, when: Optional[Callable[..., bool]] = None, *,
             grad_free: bool = False):
    """Decorator for a torch implementation ``fn(*args, **kwargs)``: calls
    ``compiled(mod, *args, **kwargs)`` with the loaded module of kernel set ``name`` when
    ``when(*args, **kwargs)`` (if given; evaluated first, so calls it rejects never start a
    build) and :func:`usable` on all arguments, else ``fn(*args, **kwargs)``.

    ``grad_free``: the results carry no gradient (e.g. a test returning a bool), so inputs
    requiring grad do not turn the compiled kernel down (``fn`` must then build no graph
    either).

    The wrapper keeps ``fn``'s name, docstring and signature (``inspect.signature``) and
    exposes ``fn`` as ``wrapper.torch_impl``. A caller that makes several calls on the same
    tensors (a forward and its backward) may decide once: ``wrapper.module_for(*args,
    **kwargs)`` is the module the call would use (None: the torch implementation), and
    ``wrapper.call_with(mod, *args, **kwargs)`` calls the compiled implementation with
    ``mod`` (or ``fn`` for None) without checking the arguments again.

    For the small-matrix set ``dense`` the call (either implementation) runs with one
    intra-op thread (``torch.set_num_threads(1)``, restored after; the setting is per
    calling thread for OpenMP and MKL), unless :func:`set_serial_small_ops` turned this
    off or ``torch.compile`` is tracing."""
    _cache.check_name(name)
    small = name in _SMALL_SETS

    def decorate(fn):
        def module_for(*args, **kwargs):
            if when is None or when(*args, **kwargs):
                mod = _SETS[name].module
                every = (args, tuple(kwargs.values())) if kwargs else args
                if _args_ok(every, not grad_free and torch.is_grad_enabled()):
                    # not loaded yet: module() may load it now (or start a build)
                    return mod if mod is not None else module(name)
            return None

        def call(mod, args, kwargs):
            if mod is not None:
                return compiled(mod, *args, **kwargs)
            return fn(*args, **kwargs)

        def serial(mod, args, kwargs):
            # is_compiling first: dynamo never reaches the thread calls
            if small and _config["serial"] and not _is_compiling():
                n = torch.get_num_threads()
                if n > 1:
                    torch.set_num_threads(1)
                    try:
                        return call(mod, args, kwargs)
                    finally:
                        torch.set_num_threads(n)
            return call(mod, args, kwargs)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return serial(module_for(*args, **kwargs), args, kwargs)

        def call_with(mod, *args, **kwargs):
            return serial(mod, args, kwargs)

        wrapper.torch_impl = fn
        wrapper.module_for = module_for
        wrapper.call_with = call_with
        return wrapper

    return decorate


# ---------------------------------------------------------------------------------------
# build() and status()
# ---------------------------------------------------------------------------------------

def build(names: Union[str, Iterable[str]] = ("dense", "sampled"), *, verbose: bool = True,
          timeout: float = 600.0) -> dict:
    """Build (or load, when already built) kernel sets in the foreground and load them.

    Compiles in a child process at normal priority; with ``verbose`` prints a line per
    step with the elapsed seconds and the whole reason of a failure (without ``verbose`` a
    failure is one warning). A build that another live process runs is waited for at most
    ``timeout`` seconds; a lock left by a process that is gone is removed. Retries a set
    that failed before in this process.

    Returns ``{name: {"ok", "result" ("built" | "already built" | "failed"), "reason",
    "seconds", "path"}}``."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for n in names:
        _cache.check_name(n)
    # (a NaN timeout never ran out while another process held the build lock)
    timeout = check_positive_float(timeout, "timeout", allow_none=False)
    return {n: _build_one(_SETS[n], verbose, timeout) for n in names}


def _build_one(ks: _KernelSet, verbose: bool, timeout: float) -> dict:
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if verbose:
            print(f"[{time.monotonic() - t0:5.1f} s] {ks.name}: {msg}", flush=True)

    def result(kind: str, reason: Optional[str] = None, record: bool = True) -> dict:
        path = ks.spec.build_dir if ks.spec is not None else None
        if kind == "failed":
            say(f"FAILED. Cause:\n{reason}")
            if record:
                _fail(ks, reason, warn=not verbose)
            elif not verbose:  # not a failure of the build: module() still loads its result
                warnings.warn(f"ttmanifold: {reason}", RuntimeWarning, stacklevel=_stacklevel())
        else:
            say(f"{kind} ({path})")
        return {"ok": kind != "failed", "result": kind, "reason": reason,
                "seconds": round(time.monotonic() - t0, 1), "path": path}

    with ks.lock:
        ks.failed, ks.warned = None, False
        ks.next_check = 0.0
        try:
            s = ks.get_spec()
            if ks.module is not None:
                return result("already built")
            if _cache.is_built(s):
                if _load(ks, s) is None:
                    return result("already built")
                os.remove(s.status_path)  # does not load: rebuild it
            _make_build_dir(s)
            deadline = t0 + timeout
            announced = False
            rc = None
            while True:
                owner = _cache.read_lock(s.lock_path)
                if owner is not None:
                    if not _cache.owner_alive(owner):
                        if _cache.remove_stale(s.lock_path, owner):
                            say(f"removed a stale build lock of {_cache.describe_owner(owner)} "
                                f"(no longer running)")
                            continue
                        if os.path.exists(s.lock_path) and time.monotonic() >= deadline:
                            return result("failed", f"cannot remove the stale build lock "
                                          f"{s.lock_path} (of {_cache.describe_owner(owner)}, "
                                          f"no longer running); remove it by hand", record=False)
                        time.sleep(0.2)
                        continue
                    if _cache.is_built(s):
                        break
                    if not announced:
                        announced = True
                        say(f"waiting for the build by {_cache.describe_owner(owner)} "
                            f"(at most {timeout:g} s)")
                    if time.monotonic() >= deadline:
                        return result("failed", f"timed out after {timeout:g} s waiting for the "
                                      f"build lock {s.lock_path}, held by "
                                      f"{_cache.describe_owner(owner)}; if that process is gone "
                                      f"(another machine?), remove the file", record=False)
                    time.sleep(0.2)
                    continue
                if _cache.is_built(s):
                    break
                rc = _run_child(ks, s, say)
                if rc == _BUSY:
                    continue  # someone took the lock meanwhile: wait for them
                break
            if ks.proc is not None and ks.proc.poll() is not None:
                ks.proc = None  # our background build, waited for above: reaped
            if _cache.is_built(s):
                why = _load(ks, s)
                return result("built") if why is None else result("failed", why)
            st = _cache.read_status(s)
            if st is not None and st.get("status") == "failed":
                return result("failed", _failure_text(s, st))
            return result("failed", f"the build process ended (exit status {rc}) without a "
                          f"result" + _log_text(s))
        except Exception as exc:  # noqa: BLE001
            return result("failed", f"{type(exc).__name__}: {exc}")


def _run_child(ks: _KernelSet, s: _cache.Spec, say) -> int:
    cmd, env = _child_cmd(s, background=False)
    say(f"compiling {s.build_name} ({USUAL_TIME}; log {s.log_path})")
    # its own process group, ended as a whole on Ctrl-C: terminating only the child left
    # ninja and the compiler running (orphaned) in the build directory
    group = hasattr(os, "killpg")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, close_fds=True,
                            start_new_session=group)
    t = time.monotonic()
    next_note = t + 10.0
    try:
        while True:
            if group and _exited_unreaped(proc.pid, 0.5):
                # a builder killed outright left its ninja and compiler running: end the
                # group (SIGTERM: ninja ends the compiler, which runs in a group of its own)
                # before reaping the builder, whose pid, the group's id, stays taken till then
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except OSError:
                    pass
                return proc.wait()
            try:
                return proc.wait(timeout=0 if group else 0.5)
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= next_note:
                next_note += 10.0
                say("still compiling")
    except BaseException:
        _end_build_group(proc, group)
        raise


def _exited_unreaped(pid: int, wait: float) -> bool:
    """Whether child ``pid`` has exited, checked for up to ``wait`` seconds without reaping
    it (``waitid`` with ``WNOWAIT``; False where there is none)."""
    waitid = getattr(os, "waitid", None)
    if waitid is None or not hasattr(os, "WNOWAIT"):
        time.sleep(wait)
        return False
    end = time.monotonic() + wait
    while True:
        try:
            if waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return False  # reaped elsewhere: proc.wait() tells
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)


def _end_build_group(proc, group: bool) -> None:
    """End a foreground build and its compiler: SIGINT to the group (the builder releases
    its lock as it ends), SIGKILL after 3 s (no hang at interrupt)."""
    for sig, wait in ((signal.SIGINT, 3.0), (signal.SIGKILL, 1.0)):
        try:
            if group:
                os.killpg(proc.pid, sig)
            elif sig == signal.SIGINT:
                proc.terminate()
            else:
                proc.kill()
        except OSError:
            pass
        try:
            proc.wait(timeout=wait)
            if not group:
                return
        except subprocess.TimeoutExpired:
            continue
        except BaseException:  # a second Ctrl-C: go on ending it
            continue
        # the builder is gone; its compiler may outlive it in the group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        return


def status() -> dict:
    """Per kernel set: ``built`` (in the cache for this environment), ``loaded``, ``in_use``
    (loaded and enabled), ``building`` (a live process holds the build lock), ``failed``
    (the whole reason, or None), ``build_name``, ``path`` (the build directory)."""
    out = {}
    for name, ks in _SETS.items():
        row = {"built": False, "loaded": ks.module is not None,
               "in_use": ks.module is not None and enabled(), "building": False,
               "failed": ks.failed, "build_name": None, "path": None}
        try:
            s = ks.get_spec()
            row.update(build_name=s.build_name, path=s.build_dir, built=_cache.is_built(s))
            owner = _cache.read_lock(s.lock_path)
            row["building"] = owner is not None and _cache.owner_alive(owner)
            st = _cache.read_status(s)
            if row["failed"] is None and st is not None and st.get("status") == "failed":
                row["failed"] = _failure_text(s, st)
        except Exception as exc:  # noqa: BLE001
            row["failed"] = row["failed"] or f"{type(exc).__name__}: {exc}"
        out[name] = row
    return out
