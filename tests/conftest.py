"""Shared pytest configuration for the ttmanifold test suite."""
import os
import shutil
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests run on small dense references; keep them quick and free of
# timing-dependent failures (the first call of a torch kernel can be slow).
settings.register_profile(
    "ttmanifold",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ttmanifold"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module whose tensors are tiny: more threads only contend
    (several times slower steps on a loaded 2-core machine). Restored after the module.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write in (chmod for a user; root needs chattr +i)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
            pytest.skip("root without chattr: no read-only directory")
    else:
        d.chmod(0o500)
    try:
        yield d
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        d.chmod(0o700)



@pytest.fixture(scope="module")
def dense_module():
    """The compiled dense kernel set, built (in the foreground) and loaded for the module;
    skipped without a C++ compiler."""
    from ttmanifold import kernels

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the compiled kernels cannot be built here")
    was = kernels.enabled()
    kernels.set_enabled(True)
    kernels.build(["dense"], verbose=False)
    mod = kernels.module("dense")
    assert mod is not None, "the compiled dense kernels failed to build"
    yield mod
    kernels.set_enabled(was)


class _Recorder:
    """A loaded kernel module that records its calls of the functions ``names``: the name,
    or with ``shapes`` the name and the first argument's shape."""

    def __init__(self, mod, names, shapes):
        self._mod, self._names, self._shapes = mod, tuple(names), shapes
        self.calls = []

    def __getattr__(self, attr):
        f = getattr(self._mod, attr)
        if attr not in self._names:
            return f

        def call(*a, **k):
            self.calls.append((attr, tuple(a[0].shape)) if self._shapes else attr)
            return f(*a, **k)

        return call


@pytest.fixture
def record_dense(dense_module, monkeypatch):
    """``record_dense(names, shapes=False)``: for this test the dense set's module is a
    recorder of the calls of ``names`` (its ``calls`` list), with the kernels enabled."""
    from ttmanifold import kernels

    def install(names, shapes=False):
        rec = _Recorder(dense_module, names, shapes)
        monkeypatch.setattr(kernels._SETS["dense"], "module", rec)
        monkeypatch.setitem(kernels._config, "enabled", True)
        return rec

    return install
