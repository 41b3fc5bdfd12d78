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
    # the other presets fix their ranks: a rank is refused, not ignored
    with pytest.raises(ValueError, match="rank: only for the 'steinlechner' preset"):
        presets.build_preset("t3f-tutorial", rank=3)


def test_cli_preset_choices(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_psenka_boumal_problem_and_quick_run(tmp_path):
    spec = presets.build_preset("psenka-boumal", seed=3)
    pb = spec["problem"]
    assert pb.manifold.shape == (4,) * 9
    assert pb.manifold.ranks == (1, 3, 5, 10, 10, 10, 10, 5, 3, 1)
    assert len(pb.train) == int(0.1 * 4 ** 9) and spec["seeds"] == 10
    assert spec["key"] == "test_err" and spec["tol"] == 1e-8
    # a random start, not the target
    x0 = pb.manifold.to_tt(spec["x0"])
    assert pb.metrics(x0)["test_err"] > 0.5
    text = presets.run_preset("psenka-boumal", str(tmp_path), quick=True, budget=30.0,
                              iters=200, methods=["rcg"])
    # quick size: 30 % observed (12 x dim M), RCG recovers both seeds from random starts
    assert "| rcg | 2/2 |" in text and "2 seeds 0..1" in text


def test_exp_norm_values_against_dense_grid():
    n, d = 5, 3
    g = torch.arange(n, dtype=torch.float64) / (n - 1)
    X = torch.stack(torch.meshgrid(*([g] * d), indexing="ij"), -1)
    dense = torch.exp(-X.norm(dim=-1))
    idx = torch.tensor([[0, 0, 0], [4, 4, 4], [1, 2, 3], [4, 0, 2]])
    torch.testing.assert_close(presets.exp_norm_values(idx, n), dense[tuple(idx.t())])
    with pytest.raises(ValueError, match="n:"):
        presets.exp_norm_values(idx, 1)


def test_function_problem():
    spec = presets.build_preset("function")
    pb = spec["problem"]
    assert pb.manifold.shape == (20,) * 5 and pb.manifold.ranks == (1, 7, 7, 7, 7, 1)
    assert len(pb.train) == 49000 and len(pb.test) == 100000
    assert round(spec["ra_opts"]["control_fraction"] * 49000) == 100
    assert spec["max_rank"] == 7 and spec["methods"][0] == "rank_adaptive"
    # train and test sets are disjoint grid points, values exp(-||x||)
    both = torch.cat([pb.train.indices, pb.test.indices])
    assert torch.unique(both, dim=0).shape[0] == both.shape[0]
    x = pb.test.indices[:5].to(torch.float64) / 19
    torch.testing.assert_close(pb.a_test[:5], torch.exp(-x.norm(dim=1)))


def test_function_quick_run(tmp_path):
    text = presets.run_preset("function", str(tmp_path), quick=True, budget=30.0,
                              methods=["rank_adaptive"])
    row = next(ln for ln in text.splitlines() if ln.startswith("| rank_adaptive |"))
    best = float(row.split("|")[4])
    assert best < 0.05  # a smooth function: low ranks fit it to a few per cent at 8^4


def test_tensorize_image_bit_order():
    k = 3
    img = torch.arange(64, dtype=torch.float64).reshape(8, 8)
    T = presets.tensorize_image(img)
    assert T.shape == (4,) * k
    # reference: mode b holds 2 * (bit b of the row) + (bit b of the column), MSB first
    for i in range(8):
        for j in range(8):
            m = tuple(2 * ((i >> (k - 1 - b)) & 1) + ((j >> (k - 1 - b)) & 1)
                      for b in range(k))
            assert T[m] == img[i, j]
    torch.testing.assert_close(presets.untensorize_image(T), img)
    with pytest.raises(ValueError, match="img"):
        presets.tensorize_image(torch.zeros(6, 6))
    with pytest.raises(ValueError, match="t:"):
        presets.untensorize_image(torch.zeros(4, 2))


def test_psnr():
    ref = torch.full((4, 4), 0.5, dtype=torch.float64)
    assert abs(presets.psnr(ref + 0.1, ref) - 20.0) < 1e-9
    assert presets.psnr(ref, ref) == math.inf
    assert abs(presets.psnr(ref + 2.0, ref) - presets.psnr(torch.ones(4, 4), ref)) < 1e-12
    with pytest.raises(ValueError, match="shape"):
        presets.psnr(ref, torch.zeros(3))


def test_image_preset_quick_cli(tmp_path):
    pytest.importorskip("matplotlib")
    img = presets.sample_image(32)
    assert img.shape == (32, 32) and 0.0 <= float(img.min()) < float(img.max()) <= 1.0
    spec = presets.build_preset("image", quick=True)
    assert [r for r, _ in spec["problems"]] == [0.1, 0.2, 0.3]
    for rate, pb in spec["problems"]:
        assert pb.manifold.shape == (4,) * 5 and len(pb.train) == int(rate * 1024)
        # the observed values are the image's pixels at the tensorized indices
        full = presets.tensorize_image(img)
        torch.testing.assert_close(pb.a_train, full[tuple(pb.train.indices.t())])
    text = main(["--preset", "image", "--quick", "--time-budget", "20",
                 "--out", str(tmp_path)])
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "%" in ln]
    assert len(rows) == 3
    psnrs = [float(r.split("|")[5]) for r in rows]
    svd = [float(r.split("|")[7]) for r in rows]
    assert all(a <= b + 1e-9 for a, b in zip(psnrs, svd))  # TT-SVD sees every pixel
    grey = presets.psnr(torch.full_like(img, float(img.mean())), img)  # 13.2 dB
    assert psnrs[-1] > grey + 1.0, (psnrs, grey)  # 30 % observed: better than the mean
    assert (tmp_path / "image_completion.png").stat().st_size > 1000


def test_rank_one_start_is_near_a_unit_rank_one_tensor():
    from ttmanifold.manifold import FixedTTRank

    M = FixedTTRank((4, 5, 3, 4), (2, 3, 2))
    x = presets.rank_one_start(M, seed=1, eps=1e-6)
    full = M.to_tt(x).full()
    assert abs(float(full.norm()) - 1.0) < 1e-4
    # dense reference: the mode-1 unfolding's second singular value is O(eps)
    sv = torch.linalg.svdvals(full.reshape(4, -1))
    assert float(sv[1]) < 1e-4 * float(sv[0])
    assert not torch.equal(x, presets.rank_one_start(M, seed=2, eps=1e-6))


def test_recovery_phase_rows_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = presets.recovery_phase(4, 4, 2, [4.0], 1, iters=200, budget=60.0, test_size=100)
    assert [r["method"] for r in rows] == list(presets.PHASE_METHODS)
    for r in rows:  # 4 x dim M is above the transition at this size: all recover
        assert r["recovered"] and r["test_err"] <= 1e-6 and r["rate"] == 4.0
    rows += presets.recovery_phase(4, 4, 2, [1.5], 1, methods=["rcg_random"], iters=30,
                                   test_size=100)
    assert not rows[-1]["recovered"] and rows[-1]["test_err"] > 1e-2
    table = presets.phase_table(rows, [1.5, 4.0])
    assert table[2].startswith("| rcg_random | 0/1 | 1/1 (")
    assert table[4].startswith("| rcg_spectral | - | 1/1 (")
    assert table[5].startswith("| rank_adaptive | - | 1/1 (")
    presets.plot_phase([("d = 4", rows)], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="methods"):
        presets.recovery_phase(4, 4, 2, [4.0], 1, methods=["rsgd"])
    with pytest.raises(ValueError, match="rates"):
        presets.recovery_phase(4, 4, 2, [0.0], 1)
    with pytest.raises(ValueError, match="rates: 8 x dim M"):  # 288 samples of 256 entries
        presets.recovery_phase(4, 4, 2, [8.0], 1)
    # a large rate shrinks the test set to the entries left (200 of 256 sampled)
    rows = presets.recovery_phase(4, 4, 2, [200 / 36], 1, methods=["rcg_random"], iters=5)
    assert len(rows) == 1
