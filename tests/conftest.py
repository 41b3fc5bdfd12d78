"""Shared pytest configuration for the ttmanifold test suite."""
import os

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
