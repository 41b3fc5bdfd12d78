"""Named presets: their problems are what docs/comparison.md#presets says, and a preset
runs end to end (tiny budget) and writes its summary."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from ttmanifold.experiments import presets
from ttmanifold.experiments import solvers as S
from ttmanifold.experiments.compare import main


def test_t3f_tutorial_problem():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = presets.build_preset("t3f-tutorial")
    pb = spec["problem"]
    assert pb.manifold.shape == (3, 4, 4, 5, 7, 5)
    assert pb.manifold.ranks == (1, 3, 5, 5, 5, 5, 1)
    total = math.prod(pb.manifold.shape)
    assert len(pb.train) == int(0.25 * total) and len(pb.test) == total - len(pb.train)
    # entries of unit mean square plus noise of std 1e-2
    ms = float((pb.a_test ** 2).mean())
    assert 0.5 < ms < 2.0
    assert spec["key"] == "test_mse" and abs(spec["tol"] - 1.3e-4) < 1e-12
    assert set(spec["methods"]) <= set(S.ALL_METHODS)


def test_steinlechner_quick_problem_and_run(tmp_path):
    spec = presets.build_preset("steinlechner", rank=2, quick=True)
    pb = spec["problem"]
    d, n, r = 6, 10, 2
    assert pb.manifold.shape == (n,) * d and len(pb.train) == 10 * d * n * r * r
    text = presets.run_preset("steinlechner", str(tmp_path), rank=2, quick=True,
                              budget=0.5, iters=3, methods=["rcg"])
    assert "| rcg |" in text and (tmp_path / "summary.md").read_text() == text
    with pytest.raises(ValueError, match="methods"):
        presets.run_preset("steinlechner", str(tmp_path), quick=True, methods=["rsgd"])
    with pytest.raises(ValueError, match="preset"):
        presets.build_preset("nope")


def test_cli_preset_choices(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])
    assert "invalid choice" in capsys.readouterr().err
