"""Shared pytest configuration for the ttmanifold test suite."""
import os
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

