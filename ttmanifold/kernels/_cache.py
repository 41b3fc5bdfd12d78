"""Where a kernel set is built and how builds coordinate (no torch extension imports here).

A kernel set ``name`` (``"dense"``, ``"sampled"``) is built into
``<cache root>/<build name>/`` where the build name ``ttmanifold_<name>_<hash>`` hashes
everything the shared object depends on: the C++ source, the compiler flags and ``$CXX``,
the CPU features (``-march=native``), the torch installation (its directory and version)
and the Python version. Two environments sharing a cache therefore never rebuild each
other's module. The cache root is ``$TORCH_EXTENSIONS_DIR``, else
``${XDG_CACHE_HOME:-~/.cache}/torch_extensions``.

Files in a build directory:

- ``<build name>.so``: the artifact (written by ``torch.utils.cpp_extension.load``);
- ``build.json``: the result of the last build, ``{"status": "ok" | "failed", "reason", ...}``;
  a module is loaded only when it says ``ok`` and the artifact exists with the recorded
  ``size``;
- ``build.log``: the compiler's output of the last build;
- ``ttmanifold.lock``: held by the process that builds, a JSON record of its pid, host and
  process start time. A lock whose owner is gone (same host, pid not running, or running
  but started at another time) is stale and may be removed; there is no age limit (a slow
  build is not a dead one).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (source file, OpenMP, what it computes)
SETS = {
    "dense": ("dense.cpp", False,
              "dense sweeps (right-orthogonal cores, projection of a TT, retraction)"),
    "sampled": ("sampled.cpp", True, "sampled-entry sweeps (IndexSet, project_sampled)"),
}

LOCK = "ttmanifold.lock"
STATUS = "build.json"
LOG = "build.log"


def check_name(name: str) -> str:
    if name not in SETS:
        raise ValueError(f"unknown kernel set {name!r}; expected one of {sorted(SETS)}")
    return name


def cpu_tag() -> str:
    """The CPU features the build targets (``-march=native``)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = line.strip()
                    break
    except OSError:
        pass
    return platform.machine() + " " + flags


def cflags(openmp: bool):
    flags = ["-O3"] + (["-fopenmp"] if openmp else [])
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        flags.append("-march=native")
    elif machine in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    return flags


def ldflags(openmp: bool):
    return ["-fopenmp"] if openmp else []


def cache_root() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "torch_extensions")
    return os.path.abspath(root)


@dataclass(frozen=True)
class Spec:
    """One kernel set in the current environment."""

    name: str
    source: str
    openmp: bool
    build_name: str
    build_dir: str

    @property
    def artifact(self) -> str:
        return os.path.join(self.build_dir, self.build_name + (".pyd" if os.name == "nt" else ".so"))

    @property
    def status_path(self) -> str:
        return os.path.join(self.build_dir, STATUS)

    @property
    def lock_path(self) -> str:
        return os.path.join(self.build_dir, LOCK)

    @property
    def log_path(self) -> str:
        return os.path.join(self.build_dir, LOG)


def build_name(name: str, *, torch_dir: Optional[str] = None, torch_version: Optional[str] = None,
               python: Optional[str] = None, cpu: Optional[str] = None) -> str:
    """``ttmanifold_<name>_<hash>`` of the source, flags, compiler, CPU, torch install and
    Python (the keyword arguments override the current environment's values)."""
    check_name(name)
    src, openmp, _ = SETS[name]
    if torch_dir is None or torch_version is None:
        import torch

        torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) if torch_dir is None else torch_dir
        torch_version = torch.__version__ if torch_version is None else torch_version
    h = hashlib.sha1()
    with open(os.path.join(HERE, src), "rb") as fh:
        h.update(fh.read())
    for part in (" ".join(cflags(openmp) + ldflags(openmp)), os.environ.get("CXX", ""),
                 cpu_tag() if cpu is None else cpu, torch_dir, torch_version,
                 sys.version if python is None else python):
        h.update(b"\0" + str(part).encode())
    return f"ttmanifold_{name}_{h.hexdigest()[:12]}"


def spec(name: str) -> Spec:
    check_name(name)
    src, openmp, _ = SETS[name]
    bname = build_name(name)
    return Spec(name, os.path.join(HERE, src), openmp, bname, os.path.join(cache_root(), bname))


# ---------------------------------------------------------------------------------------
# build results
# ---------------------------------------------------------------------------------------

def read_status(s: Spec) -> Optional[dict]:
    try:
        with open(s.status_path) as fh:
            st = json.load(fh)
        return st if isinstance(st, dict) else None
    except (OSError, ValueError):
        return None


def write_status(s: Spec, **fields) -> None:
    """Replace ``build.json`` atomically (a temporary file renamed over it): an interrupt
    (Ctrl-C, an error) leaves the old record whole and no temporary file behind."""
    tmp = f"{s.status_path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(dict(fields, time=time.time(), pid=os.getpid(), host=socket.gethostname()),
                      fh)
        os.replace(tmp, s.status_path)
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass  # renamed (the usual case)


def is_built(s: Spec) -> bool:
    st = read_status(s)
    return bool(st and st.get("status") == "ok" and os.path.exists(s.artifact)
                and not damaged(s, st))


def damaged(s: Spec, st: dict) -> bool:
    """Whether the artifact of a recorded build differs in size from the one recorded (cut
    short or replaced since): loading a truncated shared object can kill the process with
    SIGBUS. Records without a size (older builds) are taken as they are."""
    size = st.get("size")
    if size is None:
        return False
    try:
        return os.path.getsize(s.artifact) != int(size)
    except (OSError, TypeError, ValueError):
        return True


def log_tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------
# the build lock: owner recorded, staleness by the owner's liveness (never by age)
# ---------------------------------------------------------------------------------------

def _proc_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (Linux ``/proc``; None elsewhere): with the pid it
    identifies a process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _proc_state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _proc_start(pid), "time": time.time()}


def read_lock(path: str) -> Optional[dict]:
    """The lock's owner record; ``{}`` for an unreadable record; None when there is no lock."""
    try:
        with open(path) as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        rec = json.loads(text)
        return rec if isinstance(rec, dict) else {}
    except ValueError:
        return {}


def owner_alive(rec: dict) -> bool:
    """Whether the process recorded in a lock may still be running. Another host's process
    cannot be checked: it counts as alive (a waiter's timeout bounds the wait)."""
    try:
        pid = int(rec["pid"])
    except (KeyError, TypeError, ValueError):
        return False  # no owner recorded: nobody can release it
    if rec.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # running, as another user
    except OSError:
        return True
    if _proc_state(pid) == "Z":  # exited, not yet reaped
        return False
    start = rec.get("start")
    now = _proc_start(pid)
    if start is not None and now is not None and start != now:
        return False  # the pid was reused by another process
    return True


def try_lock(path: str) -> Optional[dict]:
    """Take the lock at ``path``: None when taken, else the live owner's record. A stale
    lock (owner gone) is removed first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rec = owner_record()
    for _ in range(3):
        tmp = f"{path}.{rec['pid']}.tmp"
        with open(tmp, "w") as fh:
            json.dump(rec, fh)
        try:
            os.link(tmp, path)  # atomic: the lock appears with its owner record
            return None
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    json.dump(rec, fh)
                return None
        finally:
            try:
                os.remove(tmp)
            except OSError:
                pass
        owner = read_lock(path)
        if owner is None:
            continue  # released meanwhile
        if owner_alive(owner):
            return owner
        remove_stale(path, owner)
    return read_lock(path) or {}


def remove_stale(path: str, owner: dict) -> bool:
    """Remove the lock at ``path`` if it still is the stale record ``owner`` (moved aside
    first, so a lock that a live process took meanwhile is put back, not lost)."""
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
    except OSError:
        return False
    if read_lock(aside) == owner:
        os.remove(aside)
        return True
    try:
        os.link(aside, path)
    except OSError:
        pass
    os.remove(aside)
    return False


def release_lock(path: str) -> None:
    rec = read_lock(path)
    if rec and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except OSError:
            pass


def describe_owner(rec: dict) -> str:
    if not rec:
        return "an unknown process"
    return f"pid {rec.get('pid')} on {rec.get('host')}"
