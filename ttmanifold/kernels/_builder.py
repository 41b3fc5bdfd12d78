"""Compile one kernel set: ``python -m ttmanifold.kernels._builder <name> [--background]``.

Run as a separate process by :mod:`ttmanifold.kernels` (never imported by a user's
process): takes the build lock, removes torch's own ``lock`` file (we hold ours, so any
torch lock here is a leftover), compiles with ``torch.utils.cpp_extension.load`` into the
set's build directory, and records the result in ``build.json`` (the whole reason when it
fails). ``--background``: lowest CPU priority and one compile job, so the process that
asked for the build does not slow down.

Exit status: 0 built (or already built), 1 failed, 3 another live process holds the lock.

On Linux every process the build starts (ninja, which runs the compiler) gets SIGTERM when
the build process dies, even killed outright (:func:`die_with_this_process`); its lock is
then stale and the next build reclaims it (:func:`ttmanifold.kernels._cache.try_lock`).
"""
from __future__ import annotations

import os
import sys
import time
import traceback

BUSY = 3
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_this_process() -> bool:
    """Make the subprocesses this process starts from now on (``subprocess.Popen``, which
    ``torch.utils.cpp_extension`` runs ninja with) receive SIGTERM when it dies: Linux's
    ``prctl(PR_SET_PDEATHSIG)``, set in the child between fork and exec. ninja then ends
    the compiler (it runs each command in a process group of its own and passes the signal
    on), so a builder killed outright (SIGKILL, the OOM killer) leaves no orphaned compiler
    running, nor writing into a build directory whose lock the next build reclaims. For
    this build process only (it runs nothing else). Returns whether it is in effect (False
    off Linux: there a foreground build's parent still ends the build's process group)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    import signal
    import subprocess

    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the builder died before the prctl: nobody signals
            os.kill(os.getpid(), signal.SIGTERM)

    class Popen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            if kwargs.get("preexec_fn") is None:
                kwargs["preexec_fn"] = preexec
            super().__init__(*args, **kwargs)

    subprocess.Popen = Popen  # type: ignore[misc]
    return True


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    background = "--background" in argv
    names = [a for a in argv if not a.startswith("--")]
    if len(names) != 1:
        print("usage: python -m ttmanifold.kernels._builder <dense|sampled> [--background]",
              file=sys.stderr)
        return 2
    if background:
        try:
            os.nice(19)
        except (AttributeError, OSError):
            pass
        os.environ["MAX_JOBS"] = "1"
    from . import _cache

    s = _cache.spec(names[0])
    os.makedirs(s.build_dir, exist_ok=True)
    owner = _cache.try_lock(s.lock_path)
    if owner is not None:
        print(f"build lock held by {_cache.describe_owner(owner)}", flush=True)
        return BUSY
    t0 = time.monotonic()
    try:
        if _cache.is_built(s):
            return 0
        log = os.open(s.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log, 1)  # the compiler's output too
        os.dup2(log, 2)
        os.close(log)
        for stale in (os.path.join(s.build_dir, "lock"),  # torch's baton, left by a killed build
                      s.status_path,  # an earlier failure: this build replaces it
                      s.artifact):  # damaged (else built): ninja would not relink it
            try:
                os.remove(stale)
            except OSError:
                pass
        print(f"building {s.build_name} from {s.source} in {s.build_dir}", flush=True)
        die_with_this_process()
        try:
            from torch.utils import cpp_extension

            cpp_extension.load(name=s.build_name, sources=[s.source],
                               extra_cflags=_cache.cflags(s.openmp),
                               extra_ldflags=_cache.ldflags(s.openmp),
                               build_directory=s.build_dir, verbose=True)
        except Exception as exc:  # noqa: BLE001  (recorded whole; Ctrl-C is not a failure)
            sys.stdout.flush()
            reason = f"{type(exc).__name__}: {exc}".rstrip()
            output = _cache.log_tail(s.log_path, 40)  # the compiler's own words
            if output:
                reason += f"\nlast lines of the build output:\n{output}"
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
            _cache.write_status(s, status="failed", reason=reason, log=s.log_path,
                                seconds=round(time.monotonic() - t0, 1))
            return 1
        _cache.write_status(s, status="ok", artifact=s.artifact, size=os.path.getsize(s.artifact),
                            log=s.log_path, seconds=round(time.monotonic() - t0, 1))
        print(f"built in {time.monotonic() - t0:.1f} s", flush=True)
        return 0
    finally:
        _cache.release_lock(s.lock_path)


if __name__ == "__main__":
    sys.exit(main())
