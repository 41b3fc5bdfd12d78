"""Tests for ttmanifold.householder (Householder parameterization of orthonormal frames)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ttmanifold.householder as hh
from ttmanifold.householder import (
    HAVE_TORCH_HOUSEHOLDER,
    frame_from_full,
    frame_from_reduced,
    full_dim,
    full_from_frame,
    reduced_dim,
    reduced_from_frame,
)

F64 = torch.float64
F32 = torch.float32
TOL = {F64: 1e-12, F32: 1e-5}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")),
]

SHAPES = [(1, 1), (2, 1), (5, 1), (2, 2), (3, 3), (4, 2), (5, 3), (6, 6), (7, 4), (8, 1), (8, 8)]

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers
def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=F64, device="cpu"):
    return torch.randn(*shape, generator=gen(seed), dtype=F64).to(dtype=dtype, device=device)


def eye_r(r, dtype=F64, device="cpu"):
    return torch.eye(r, dtype=dtype, device=device)


def err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def orth_err(Q):
    r = Q.shape[-1]
    return err(Q.mT @ Q, eye_r(r, Q.dtype, Q.device).expand(Q.shape[:-2] + (r, r)))


def reference_frame(params, m, r, reduced):
    """Dense float64 reference: explicit m x m reflections built from the documented packing
    with plain Python loops (independent of the module's index arithmetic and of orgqr)."""
    p = params.detach().to(F64).cpu().tolist()
    V = torch.zeros(m, r, dtype=F64)
    k = 0
    for j in range(r):
        V[j, j] = 1.0
        for i in range(r if reduced else j + 1, m):
            V[i, j] = p[k]
            k += 1
    assert k == len(p)
    H = torch.eye(m, dtype=F64)
    for j in range(r):
        v = V[:, j : j + 1]
        v = v / v.abs().max()  # same reflection; |v|^2 stays finite for |w| ~ 1e300
        H = H @ (torch.eye(m, dtype=F64) - 2.0 * (v @ v.T) / (v.T @ v))
    return H[:, :r]


def column_blocks(params, m, r, reduced):
    """Split packed params (last dim) into per-column blocks w_j."""
    sizes = [m - r] * r if reduced else [m - 1 - j for j in range(r)]
    return list(torch.split(params, sizes, dim=-1))


def params_with_column_norms(m, r, norms, reduced, seed=0, dtype=F64):
    """Parameters whose column blocks w_j have the given Euclidean norms (where non-empty)."""
    n = reduced_dim(m, r) if reduced else full_dim(m, r)
    p = randn(n, seed=seed)
    blocks = column_blocks(p, m, r, reduced)
    out = []
    for b, s in zip(blocks, norms):
        out.append(b / b.norm() * s if b.numel() else b)
    return torch.cat(out).to(dtype)


def embed_reduced_in_full(p, m, r):
    """Full-form params with rows j+1..r-1 of column j set to 0 and rows r.. from p."""
    blocks = column_blocks(p, m, r, reduced=True)
    full = [torch.cat([p.new_zeros(r - 1 - j), b]) for j, b in enumerate(blocks)]
    return torch.cat(full)


def nasty_frame(kind, m, r, seed, dtype=F64):
    g = gen(seed)
    if kind == "identity":
        Q = torch.eye(m, r, dtype=F64)
    elif kind == "neg_identity":
        Q = -torch.eye(m, r, dtype=F64)
    elif kind == "mixed_signs_identity":  # some columns +e_i, some -e_i
        s = torch.where(torch.rand(r, generator=g) < 0.5, -1.0, 1.0).to(F64)
        Q = torch.eye(m, r, dtype=F64) * s
    elif kind == "signed_permutation":
        rows = torch.randperm(m, generator=g)[:r]
        s = torch.where(torch.rand(r, generator=g) < 0.5, -1.0, 1.0).to(F64)
        Q = torch.zeros(m, r, dtype=F64)
        Q[rows, torch.arange(r)] = s
    elif kind == "qr":
        Q = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
    elif kind == "qr_native":  # QR computed in the target dtype itself (float32 LAPACK for F32)
        return torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64).to(dtype))[0]
    elif kind == "forward":
        Q = frame_from_full(torch.randn(full_dim(m, r), generator=g, dtype=F64) * 2, m, r)
    else:
        raise AssertionError(kind)
    return Q.to(dtype)


FRAME_KINDS = ["identity", "neg_identity", "mixed_signs_identity", "signed_permutation", "qr", "qr_native", "forward"]


@st.composite
def sizes(draw):
    m = draw(st.integers(1, 8))
    r = draw(st.integers(1, m))
    return m, r


# ----------------------------------------------------------------------------- dimensions
@pytest.mark.parametrize("m,r", SHAPES)
def test_parameter_counts(m, r):
    # dim St(m, r) = m r - r (r + 1) / 2 and dim Gr(m, r) = r (m - r)
    assert full_dim(m, r) == m * r - r * (r + 1) // 2
    assert reduced_dim(m, r) == r * (m - r)
    # the number of free slots of the documented packing
    assert full_dim(m, r) == sum(m - 1 - j for j in range(r))
    assert full_dim(m, r) - reduced_dim(m, r) == r * (r - 1) // 2  # = dim O(r): the gauge


def test_parameter_counts_known_manifolds():
    assert full_dim(5, 1) == 4  # sphere S^4
    assert full_dim(4, 4) == 6  # O(4)
    assert reduced_dim(5, 1) == 4  # RP^4
    assert reduced_dim(4, 4) == 0  # Gr(4, 4) is a point
    assert full_dim(1, 1) == 0 and reduced_dim(1, 1) == 0


# ----------------------------------------------------------------------------- forwards
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("m,r", SHAPES)
def test_forward_orthonormal_batched(m, r, dtype, device):
    for fwd, dim in ((frame_from_full, full_dim), (frame_from_reduced, reduced_dim)):
        p = randn(2, 3, dim(m, r), seed=m * 10 + r, dtype=dtype, device=device) * 1.7
        Q = fwd(p, m, r)
        assert Q.shape == (2, 3, m, r) and Q.dtype == dtype and Q.device.type == device
        assert orth_err(Q) < TOL[dtype]
        # unbatched input gives the same as one batch element
        assert err(fwd(p[1, 2], m, r), Q[1, 2]) < TOL[dtype]


@pytest.mark.parametrize("backend", ["auto", "wy", "torch"])
@pytest.mark.parametrize("m,r", SHAPES)
def test_forward_matches_dense_reference(m, r, backend):
    for seed in range(3):
        p = randn(full_dim(m, r), seed=seed) * (0.3 + seed)
        Q = frame_from_full(p, m, r, backend=backend)
        assert err(Q, reference_frame(p, m, r, reduced=False)) < 1e-12
        q = randn(reduced_dim(m, r), seed=seed + 100) * (0.3 + seed)
        Q = frame_from_reduced(q, m, r, backend=backend)
        assert err(Q, reference_frame(q, m, r, reduced=True)) < 1e-12


@pytest.mark.parametrize("backend", ["wy", "torch"])
@pytest.mark.parametrize("m,r", SHAPES)
def test_zero_params_give_minus_identity(m, r, backend):
    zf, zr = torch.zeros(full_dim(m, r), dtype=F64), torch.zeros(reduced_dim(m, r), dtype=F64)
    assert torch.equal(frame_from_full(zf, m, r, backend=backend), -torch.eye(m, r, dtype=F64))
    assert torch.equal(frame_from_reduced(zr, m, r, backend=backend), -torch.eye(m, r, dtype=F64))


@pytest.mark.parametrize("m,r", SHAPES)
def test_reduced_is_full_with_zero_block(m, r):
    q = randn(4, reduced_dim(m, r), seed=7)
    full = torch.stack([embed_reduced_in_full(qi, m, r) for qi in q])
    assert err(frame_from_reduced(q, m, r), frame_from_full(full, m, r)) < 1e-14


@pytest.mark.parametrize("backend", ["wy", "torch"])
@pytest.mark.parametrize("m,r", SHAPES)
def test_reduced_frames_have_upper_triangular_leading_block(m, r, backend):
    # Precise claim: the strictly-lower part of the leading r x r block is exactly zero and
    # its diagonal is (|w_j|^2 - 1) / (|w_j|^2 + 1) (negative iff |w_j| < 1, zero iff = 1).
    q = randn(5, reduced_dim(m, r), seed=3) * torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=F64)[:, None]
    Q = frame_from_reduced(q, m, r, backend=backend)
    B = Q[..., :r, :r]
    assert torch.count_nonzero(B.tril(-1)) == 0
    w2 = torch.stack([b.pow(2).sum(-1) for b in column_blocks(q, m, r, reduced=True)], dim=-1)
    assert err(B.diagonal(dim1=-2, dim2=-1), (w2 - 1) / (w2 + 1)) < 1e-14
    # the full form does NOT have this property in general (the claim is not vacuous)
    if r >= 2:
        Qf = frame_from_full(randn(full_dim(m, r), seed=4), m, r)
        assert Qf[:r, :r].tril(-1).abs().max() > 1e-3


def test_reduced_unit_norm_column_gives_singular_block():
    m, r = 5, 2
    q = params_with_column_norms(m, r, [1.0, 0.5], reduced=True)
    B = frame_from_reduced(q, m, r)[:r, :r]
    assert abs(B[0, 0].item()) < 1e-15
    with pytest.raises(ValueError, match="singular"):
        reduced_from_frame(frame_from_reduced(q, m, r))


# ----------------------------------------------------------------------------- inverses
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("kind", FRAME_KINDS)
@pytest.mark.parametrize("m,r", SHAPES)
def test_full_round_trip_nasty_frames(m, r, kind, dtype):
    Q = nasty_frame(kind, m, r, seed=m + 7 * r, dtype=dtype)
    params, signs = full_from_frame(Q)
    assert params.shape == (full_dim(m, r),) and signs.shape == (r,)
    assert params.dtype == dtype and signs.dtype == dtype
    assert torch.all(signs.abs() == 1)
    assert err(frame_from_full(params, m, r) * signs.unsqueeze(-2), Q) < TOL[dtype]


def test_full_inverse_of_identity_like_frames():
    m, r = 5, 3
    p, s = full_from_frame(torch.eye(m, r, dtype=F64))
    assert torch.equal(p, torch.zeros_like(p)) and torch.equal(s, -torch.ones(r, dtype=F64))
    p, s = full_from_frame(-torch.eye(m, r, dtype=F64))
    assert torch.equal(p, torch.zeros_like(p)) and torch.equal(s, torch.ones(r, dtype=F64))
    # e_1, -e_2, e_3 -> signs -1, +1, -1 (tau = 0 columns: the v = e_j flip is folded in)
    Q = torch.eye(m, r, dtype=F64) * torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    p, s = full_from_frame(Q)
    assert torch.equal(s, torch.tensor([-1.0, 1.0, -1.0], dtype=F64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_round_trips_batched(dtype, device):
    m, r = 7, 3
    A = randn(4, 2, m, r, seed=1, dtype=dtype, device=device)
    Q = torch.linalg.qr(A)[0]
    p, s = full_from_frame(Q)
    assert p.shape == (4, 2, full_dim(m, r)) and s.shape == (4, 2, r) and p.device.type == device
    assert err(frame_from_full(p, m, r) * s.unsqueeze(-2), Q) < TOL[dtype]
    q, s2, O = reduced_from_frame(Q)
    assert q.shape == (4, 2, reduced_dim(m, r)) and O.shape == (4, 2, r, r)
    assert torch.all(s2 == 1)
    assert err(frame_from_reduced(q, m, r), Q @ O) < 10 * TOL[dtype]


@HYP
@given(mr=sizes(), kind=st.sampled_from(FRAME_KINDS), seed=st.integers(0, 2**31 - 1), f32=st.booleans())
def test_full_round_trip_hypothesis(mr, kind, seed, f32):
    m, r = mr
    dtype = F32 if f32 else F64
    Q = nasty_frame(kind, m, r, seed, dtype=dtype)
    params, signs = full_from_frame(Q)
    assert torch.all(signs.abs() == 1)
    assert err(frame_from_full(params, m, r) * signs.unsqueeze(-2), Q) < TOL[dtype]
    # the differentiable fallback reproduces the frame too, and equals geqrf on generic frames
    p2, s2 = full_from_frame(Q.clone().requires_grad_())
    assert err(frame_from_full(p2.detach(), m, r) * s2.unsqueeze(-2), Q) < TOL[dtype]
    if kind in ("qr", "forward") and dtype == F64:
        assert err(p2.detach(), params) < 1e-12 and torch.equal(s2, signs)


@HYP
@given(mr=sizes(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_full_inverse_recovers_params_inside_unit_balls(mr, seed, data):
    # Claim: full_from_frame(frame_from_full(p)) == (p, +1) when every |w_j| < 1.
    m, r = mr
    norms = data.draw(st.lists(st.floats(0.0, 0.95), min_size=r, max_size=r))
    p = params_with_column_norms(m, r, norms, reduced=False, seed=seed)
    p_back, signs = full_from_frame(frame_from_full(p, m, r))
    assert err(p_back, p) < 1e-12
    assert torch.all(signs == 1)


@HYP
@given(mr=sizes(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_full_inverse_outside_unit_ball(mr, seed, data):
    # Claim: at the first column j0 with |w_j0| > 1 the inverse returns -w/|w|^2 and sign -1
    # (the other stereographic branch); earlier columns are recovered with sign +1.
    m, r = mr
    j0 = data.draw(st.integers(0, r - 1))
    if m - 1 - j0 == 0:  # last column of a square frame has no parameters
        return
    norms = [0.5] * j0 + [data.draw(st.floats(1.2, 5.0))] + [data.draw(st.floats(0.0, 3.0)) for _ in range(r - 1 - j0)]
    p = params_with_column_norms(m, r, norms, reduced=False, seed=seed)
    Q = frame_from_full(p, m, r)
    p_back, signs = full_from_frame(Q)
    blocks, back = column_blocks(p, m, r, False), column_blocks(p_back, m, r, False)
    for j in range(j0):
        assert err(back[j], blocks[j]) < 1e-12
    assert torch.all(signs[:j0] == 1) and signs[j0] == -1
    w = blocks[j0]
    assert err(back[j0], -w / w.pow(2).sum()) < 1e-12
    assert err(frame_from_full(p_back, m, r) * signs, Q) < 1e-12


def test_full_inverse_of_non_orthonormal_matrix_is_positive_qr_factor():
    m, r = 6, 4
    A = randn(3, m, r, seed=11)
    p, s = full_from_frame(A)
    Qf, R = torch.linalg.qr(A)
    d = torch.sign(R.diagonal(dim1=-2, dim2=-1))
    assert err(frame_from_full(p, m, r) * s.unsqueeze(-2), Qf * d.unsqueeze(-2)) < 1e-12


@HYP
@given(mr=sizes(), kind=st.sampled_from(FRAME_KINDS), seed=st.integers(0, 2**31 - 1), f32=st.booleans())
def test_reduced_round_trip_hypothesis(mr, kind, seed, f32):
    m, r = mr
    dtype = F32 if f32 else F64
    Q = nasty_frame(kind, m, r, seed, dtype=dtype)
    smin = torch.linalg.svdvals(Q[:r, :r].to(F64))[-1].item()
    if smin < 1e-2:  # outside (or too close to the edge of) the chart's domain
        with pytest.raises(ValueError, match="singular"):
            reduced_from_frame(Q, tol=1e-2)
        return
    params, signs, O = reduced_from_frame(Q)
    assert params.shape == (reduced_dim(m, r),) and O.shape == (r, r)
    assert torch.all(signs == 1)
    assert orth_err(O) < TOL[dtype]
    QO = Q @ O
    T = QO[:r, :r]
    assert err(T.tril(-1), torch.zeros_like(T)) < 10 * TOL[dtype]  # Q O is in St_U
    assert torch.all(T.diagonal() < 0)  # the documented sign convention
    assert err(frame_from_reduced(params, m, r), QO) < 10 * TOL[dtype]
    # differentiable fallback agrees
    p2, s2, O2 = reduced_from_frame(Q.clone().requires_grad_())
    assert torch.all(s2 == 1)
    assert err(frame_from_reduced(p2.detach(), m, r), Q @ O2.detach()) < 10 * TOL[dtype]


@HYP
@given(mr=sizes(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_reduced_inverse_recovers_params(mr, seed, data):
    # Claim: reduced_from_frame(frame_from_reduced(p)) == (p, +1, I) when every |w_j| < 1,
    # with the identity rotation exact (the leading block is exactly triangular).
    m, r = mr
    norms = data.draw(st.lists(st.floats(0.0, 0.95), min_size=r, max_size=r))
    q = params_with_column_norms(m, r, norms, reduced=True, seed=seed)
    q_back, signs, O = reduced_from_frame(frame_from_reduced(q, m, r))
    assert err(q_back, q) < 1e-12
    assert torch.all(signs == 1)
    assert torch.equal(O, eye_r(r))


@pytest.mark.parametrize("m,r", [(5, 3), (4, 4), (6, 1)])
def test_reduced_rotation_for_St_U_frames_is_sign_matrix(m, r):
    # For Q in St_U (upper-triangular leading block) the rotation is diag(-sign(B_jj)).
    q = params_with_column_norms(m, r, [0.3] * r, reduced=True, seed=5)
    D = torch.tensor([(-1.0) ** j for j in range(r)], dtype=F64)
    Q = frame_from_reduced(q, m, r) * D
    q_back, signs, O = reduced_from_frame(Q)
    assert torch.equal(O, torch.diag(-torch.sign(Q[:r, :r].diagonal())))
    assert torch.equal(O, torch.diag(D))
    assert err(q_back, q) < 1e-12 and torch.all(signs == 1)


def test_reduced_params_outside_unit_ball_flip_rotation():
    m, r = 6, 3
    q = params_with_column_norms(m, r, [0.5, 2.0, 0.5], reduced=True, seed=2)
    Q = frame_from_reduced(q, m, r)
    q_back, signs, O = reduced_from_frame(Q)
    assert torch.equal(O, torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=F64)))
    assert torch.all(signs == 1)
    assert err(frame_from_reduced(q_back, m, r), Q @ O) < 1e-12
    assert all(b.norm() < 1 for b in column_blocks(q_back, m, r, True))


def test_reduced_singular_leading_block():
    m, r = 5, 2
    Q = torch.zeros(m, r, dtype=F64)
    Q[0, 0] = 1.0
    Q[3, 1] = 1.0  # B = diag(1, 0): singular
    with pytest.raises(ValueError, match=r"singular.*tol"):
        reduced_from_frame(Q)
    # tol=0 skips the check; the RQ still exists, the identity still holds
    q, s, O = reduced_from_frame(Q, tol=0.0)
    assert err(frame_from_reduced(q, m, r) * s.unsqueeze(-2), Q @ O) < 1e-12
    # near-singular: passes the default tol, fails a larger one
    c = 1e-6
    Q2 = torch.zeros(m, r, dtype=F64)
    Q2[0, 0] = 1.0
    Q2[1, 1] = c
    Q2[3, 1] = math.sqrt(1 - c * c)
    reduced_from_frame(Q2)
    with pytest.raises(ValueError, match="singular"):
        reduced_from_frame(Q2, tol=1e-4)


# ----------------------------------------------------------------------------- non-redundancy
JAC_SHAPES = [(2, 1), (4, 1), (3, 2), (4, 2), (5, 3), (3, 3), (4, 4), (6, 2)]


def _jacobian(fwd, m, r, n, seed):
    p = randn(n, seed=seed) * 0.7
    J = torch.autograd.functional.jacobian(lambda x: fwd(x, m, r), p)
    return fwd(p, m, r), J.reshape(m * r, n)


def _rank(J):
    s = torch.linalg.svdvals(J)
    return int((s > 1e-8 * max(1.0, s.max().item())).sum()) if s.numel() else 0


@pytest.mark.parametrize("m,r", JAC_SHAPES)
def test_full_jacobian_has_full_rank(m, r):
    n = full_dim(m, r)
    Q, J = _jacobian(frame_from_full, m, r, n, seed=m * r)
    assert _rank(J) == n == m * r - r * (r + 1) // 2
    # columns are tangent to St(m, r): Q^T dQ is skew
    for k in range(n):
        dQ = J[:, k].reshape(m, r)
        S = Q.T @ dQ
        assert err(S, -S.T) < 1e-12
    # negative control: the horizontal (Grassmann) part only has rank r (m - r), which is
    # smaller than n when r >= 2 -- the rank computation can detect redundancy
    P = torch.eye(m, dtype=F64) - Q @ Q.T
    H = (P @ J.T.reshape(n, m, r)).reshape(n, m * r).T
    assert _rank(H) == r * (m - r)


@pytest.mark.parametrize("m,r", JAC_SHAPES)
def test_reduced_jacobian_has_full_rank_and_is_transversal_to_gauge(m, r):
    n = reduced_dim(m, r)
    Q, J = _jacobian(frame_from_reduced, m, r, n, seed=m + r)
    assert _rank(J) == n
    # non-redundant modulo the O(r) gauge: the horizontal part (I - Q Q^T) dQ keeps rank n
    P = torch.eye(m, dtype=F64) - Q @ Q.T
    H = (P @ J.T.reshape(n, m, r)).reshape(n, m * r).T
    assert _rank(H) == n


# ----------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("backend", ["wy", "torch"])
@pytest.mark.parametrize("m,r", [(1, 1), (3, 1), (4, 2), (5, 3), (3, 3), (9, 4)])
def test_gradcheck_forwards(m, r, backend):
    for fwd, dim, seed in ((frame_from_full, full_dim, 0), (frame_from_reduced, reduced_dim, 1)):
        for scale in (1.0, 30.0):  # large params: ill-conditioned T^{-1} in the WY backend
            p = (randn(2, dim(m, r), seed=seed) * scale).requires_grad_()
            if p.shape[-1] == 0:
                continue
            assert torch.autograd.gradcheck(lambda x: fwd(x, m, r, backend=backend), (p,))


@pytest.mark.parametrize("m,r", [(3, 1), (4, 2), (5, 3), (3, 3)])
def test_gradcheck_inverses(m, r):
    Q = torch.linalg.qr(randn(m, r, seed=9))[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda x: full_from_frame(x)[0], (Q,))
    assert torch.autograd.gradcheck(lambda x: reduced_from_frame(x)[0], (Q,))
    assert torch.autograd.gradcheck(lambda x: reduced_from_frame(x)[2], (Q,))


def test_inverse_no_grad_path_returns_plain_tensors():
    Q = torch.linalg.qr(randn(5, 2, seed=1))[0].requires_grad_()
    with torch.no_grad():
        p, s = full_from_frame(Q)
    assert not p.requires_grad and not s.requires_grad


# ----------------------------------------------------------------------------- meta / cuda
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("m,r", [(1, 1), (5, 3), (4, 4)])
def test_meta_device(m, r, backend):
    # householder_product, matmul and solve_triangular (the WY backend) have meta kernels in
    # this torch (checked on 2.13), backward included; torch.geqrf does not, so the
    # inverses use the torch-op fallback on meta.
    for fwd, dim in ((frame_from_full, full_dim), (frame_from_reduced, reduced_dim)):
        p = torch.empty(2, dim(m, r), device="meta", dtype=F32, requires_grad=True)
        Q = fwd(p, m, r, backend=backend)
        assert Q.device.type == "meta" and Q.shape == (2, m, r) and Q.dtype == F32
        if p.shape[-1] > 0:
            Q.sum().backward()
            assert p.grad.device.type == "meta" and p.grad.shape == p.shape
    Q = torch.empty(3, m, r, device="meta", dtype=F64)
    p, s = full_from_frame(Q)
    assert p.device.type == "meta" and p.shape == (3, full_dim(m, r)) and s.shape == (3, r)
    q, s, O = reduced_from_frame(Q)
    assert q.device.type == "meta" and q.shape == (3, reduced_dim(m, r)) and O.shape == (3, r, r)


@pytest.mark.parametrize("device", DEVICES)
def test_device_round_trip_reduced(device):
    m, r = 6, 2
    q = params_with_column_norms(m, r, [0.4, 0.8], reduced=True).to(device)
    q_back, s, O = reduced_from_frame(frame_from_reduced(q, m, r))
    assert q_back.device.type == device and O.device.type == device
    assert err(q_back, q) < 1e-12


# ----------------------------------------------------------------------------- backends
def test_backend_dispatch_to_torch_householder(monkeypatch):
    calls = []

    def fake_orgqr(param):  # mimics torch_householder_orgqr: (B, m, r) or (m, r), normalizes columns
        assert param.dim() == 3
        calls.append(tuple(param.shape))
        tau = 2.0 / (param * param).sum(-2)
        return torch.linalg.householder_product(param, tau)

    monkeypatch.setattr(hh, "HAVE_TORCH_HOUSEHOLDER", True)
    monkeypatch.setattr(hh, "_th_orgqr", fake_orgqr)
    m, r = 5, 2
    p = randn(2, 3, full_dim(m, r), seed=2)
    ref = frame_from_full(p, m, r, backend="torch")
    assert calls == []
    # auto picks the compact-WY backend even when torch_householder is importable
    frame_from_full(p, m, r)
    assert calls == []
    out = frame_from_full(p, m, r, backend="torch_householder")
    assert calls == [(6, m, r)] and out.shape == (2, 3, m, r)
    assert err(out, ref) < 1e-14
    frame_from_reduced(randn(reduced_dim(m, r), seed=3), m, r, backend="torch_householder")
    assert calls[-1] == (1, m, r)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backend_selection(monkeypatch, device):
    # auto -> compact WY on every device; "torch" -> householder_product; "wy" explicit.
    seen = []
    real_wy, real_hp = hh._wy_product, torch.linalg.householder_product

    def spy_wy(W):
        seen.append("wy")
        return real_wy(W)

    def spy_hp(V, tau):
        seen.append("torch")
        return real_hp(V, tau)

    monkeypatch.setattr(hh, "_wy_product", spy_wy)
    monkeypatch.setattr(torch.linalg, "householder_product", spy_hp)
    m, r = 6, 3
    p = torch.zeros(2, full_dim(m, r), dtype=F64, device=device)
    q = torch.zeros(2, reduced_dim(m, r), dtype=F64, device=device)
    for backend, expected in (("auto", "wy"), ("wy", "wy"), ("torch", "torch")):
        seen.clear()
        frame_from_full(p, m, r, backend=backend)
        frame_from_reduced(q, m, r, backend=backend)
        assert seen == [expected, expected], backend
    seen.clear()
    frame_from_full(p, m, r)  # default argument is auto
    assert seen == ["wy"]


def test_backend_errors(monkeypatch):
    p = torch.zeros(full_dim(4, 2), dtype=F64)
    with pytest.raises(ValueError, match="backend must be one of"):
        frame_from_full(p, 4, 2, backend="cuda")
    monkeypatch.setattr(hh, "HAVE_TORCH_HOUSEHOLDER", False)
    with pytest.raises(ImportError, match="torch_householder"):
        frame_from_full(p, 4, 2, backend="torch_householder")


@pytest.mark.skipif(not HAVE_TORCH_HOUSEHOLDER, reason="torch_householder not installed")
def test_real_torch_householder_backend():
    m, r = 6, 3
    p = randn(4, full_dim(m, r), seed=3)
    assert err(frame_from_full(p, m, r, backend="torch_householder"), frame_from_full(p, m, r, backend="torch")) < 1e-10


# ----------------------------------------------------------------------------- compact WY
# Shapes for the WY backend: m == r, r == 1, m == 1, near-square and tall frames.
WY_SHAPES = [(1, 1), (2, 1), (9, 1), (2, 2), (6, 6), (5, 3), (17, 16), (40, 5), (64, 8), (130, 12)]
SCALES = [1e-3, 1e-1, 1.0, 10.0, 1e3]


def _params(form, m, r, batch, seed, scale, dtype=F64):
    n = full_dim(m, r) if form == "full" else reduced_dim(m, r)
    return (randn(*batch, n, seed=seed) * scale).to(dtype)


def _forward(form):
    return frame_from_full if form == "full" else frame_from_reduced


@pytest.mark.parametrize("form", ["full", "reduced"])
@pytest.mark.parametrize("m,r", WY_SHAPES)
def test_wy_matches_dense_product_of_reflections(m, r, form):
    # independent reference: explicit m x m reflections multiplied in a Python loop
    for k, scale in enumerate(SCALES):
        p = _params(form, m, r, (3,), seed=100 * m + r + k, scale=scale)
        Q = _forward(form)(p, m, r, backend="wy")
        assert Q.shape == (3, m, r)
        for b in range(3):
            ref = reference_frame(p[b], m, r, reduced=form == "reduced")
            assert err(Q[b], ref) < 1e-13, (scale, b)
        assert orth_err(Q) < 1e-13


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("form", ["full", "reduced"])
@pytest.mark.parametrize("m,r", WY_SHAPES)
def test_wy_matches_householder_product(m, r, form, dtype):
    # float64 to ~1e-15, float32 to ~1e-6 (but see the near-square test below)
    tol = {F64: 1e-14, F32: 2e-6}[dtype]
    for k, scale in enumerate(SCALES):
        if dtype == F32 and form == "reduced" and m - r <= 2 and r >= 8 and scale >= 10:
            continue  # ill-conditioned T^{-1}: covered by test_wy_float32_near_square_large_params
        p = _params(form, m, r, (2, 3), seed=7 * m + r + k, scale=scale, dtype=dtype)
        wy = _forward(form)(p, m, r, backend="wy")
        ref = _forward(form)(p, m, r, backend="torch")
        assert wy.shape == ref.shape == (2, 3, m, r) and wy.dtype == dtype
        assert err(wy, ref) < tol, scale


@pytest.mark.parametrize("form", ["full", "reduced"])
@pytest.mark.parametrize("m,r", [(1, 1), (2, 1), (6, 6), (17, 16), (40, 5)])
def test_wy_gradients_match_householder_product(m, r, form):
    C = randn(2, m, r, seed=5)
    for scale in (1e-2, 1.0, 30.0):
        p0 = _params(form, m, r, (2,), seed=m + r, scale=scale)
        grads = []
        for backend in ("wy", "torch"):
            p = p0.clone().requires_grad_()
            (_forward(form)(p, m, r, backend=backend) * C).sum().backward()
            grads.append(p.grad)
        scale_g = max(1.0, grads[1].abs().max().item()) if grads[1].numel() else 1.0
        assert err(grads[0], grads[1]) < 1e-12 * scale_g, scale


def test_wy_float32_small_params_accuracy():
    # |v_i|^2 = 1 + |w_i|^2 is summed without the unit entry: with V^T V computed naively in
    # float32 the unit entry swallows |w_i|^2 ~ 1e-3 and the error on a 1024 x 16 frame
    # is ~3e-6; split, WY is more accurate than householder_product here.
    m, r = 1024, 16
    p = randn(4, full_dim(m, r), seed=1, dtype=F32) * 1e-3
    exact = frame_from_full(p.to(F64), m, r, backend="torch")  # same (rounded) parameters
    e_wy = err(frame_from_full(p, m, r, backend="wy").to(F64), exact)
    e_hp = err(frame_from_full(p, m, r, backend="torch").to(F64), exact)
    assert e_wy < 6e-7 and e_wy <= 2 * e_hp


@pytest.mark.parametrize("m,r", [(17, 16), (33, 32)])
def test_wy_float32_near_square_large_params(m, r):
    # Reduced frames with m - r small and |w| >> 1: all reflectors share the few bottom rows,
    # T^{-1} is ill-conditioned (cond ~1e3..1e7) and float32 WY loses about one digit against
    # householder_product at r <= 32 (householder_product reaches the same level at r >= 64).
    # Documented bound: still orthonormal and accurate to ~1e-5.
    for scale in (10.0, 100.0, 1e3):
        q = randn(8, reduced_dim(m, r), seed=int(scale), dtype=F32) * scale
        exact = frame_from_reduced(q.to(F64), m, r, backend="torch")
        Q = frame_from_reduced(q, m, r, backend="wy")
        assert err(Q.to(F64), exact) < 5e-5 and orth_err(Q.to(F64)) < 1e-4, scale
    # float64 is unaffected at the 1e-13 level
    q = randn(8, reduced_dim(m, r), seed=3) * 100.0
    wy, ref = (frame_from_reduced(q, m, r, backend=b) for b in ("wy", "torch"))
    assert err(wy, ref) < 1e-13


# ----------------------------------------------------------------------------- extreme magnitudes
def _mixed_magnitude_params(form, m, r, big, seed, dtype):
    """Parameters whose entries are N(0,1) times ``big``, ``1`` or ``1/big`` at random, so a
    column block mixes huge, ordinary and tiny entries."""
    n = full_dim(m, r) if form == "full" else reduced_dim(m, r)
    g = gen(seed)
    e = torch.randint(-1, 2, (3, n), generator=g).to(F64)
    return (torch.randn(3, n, generator=g, dtype=F64) * big**e).to(dtype)


@pytest.mark.parametrize("form", ["full", "reduced"])
@pytest.mark.parametrize("m,r", [(5, 1), (6, 3), (7, 5)])
def test_wy_extreme_parameters_match_dense_reference(m, r, form):
    # |w|^2 overflowed beyond ~1e154 (float64) / ~1e19 (float32): the frame was NaN
    for dtype, bigs, tol in ((F64, (1e160, 1e300), 1e-13), (F32, (1e25, 1e35), 2e-6)):
        for k, big in enumerate(bigs):
            for p in (_params(form, m, r, (3,), seed=k, scale=big, dtype=dtype),
                      _mixed_magnitude_params(form, m, r, big, seed=k, dtype=dtype)):
                Q = _forward(form)(p, m, r, backend="wy")
                assert Q.dtype == dtype and bool(torch.isfinite(Q).all()), big
                for b in range(3):
                    ref = reference_frame(p[b], m, r, form == "reduced")
                    assert err(Q[b].to(F64), ref) < tol, big


def test_torch_backend_extreme_parameters_nan_not_identity():
    # LAPACK's unit-diagonal reflectors cannot hold |v|^2 > max float: NaN, not tau = 0 (= I)
    m, r = 6, 3
    p = randn(full_dim(m, r), seed=3) * 1e150  # in range: scaled tau is exact
    assert err(frame_from_full(p, m, r, backend="torch"), reference_frame(p, m, r, False)) < 1e-13
    Q = frame_from_full(p * 1e10, m, r, backend="torch")
    assert bool(torch.isnan(Q).all())
    assert bool(torch.isfinite(frame_from_full(p * 1e10, m, r, backend="wy")).all())


def test_inverses_extreme_magnitudes():
    m, r = 6, 3
    p = randn(2, full_dim(m, r), seed=4) * 1e170
    Q = frame_from_full(p, m, r)
    for Qin in (Q, Q.clone().requires_grad_()):  # geqrf and differentiable paths
        pp, sg = full_from_frame(Qin)
        assert err(frame_from_full(pp.detach(), m, r) * sg.unsqueeze(-2), Q) < 1e-14
    # a non-orthonormal Q: the differentiable path's column norms overflowed at 1e200
    A = randn(m, r, seed=5)
    ref = full_from_frame(A)
    for s in (1e200, 1e-200):
        got = full_from_frame((A * s).requires_grad_())
        assert err(got[0].detach(), ref[0]) < 1e-13 and err(got[1], ref[1]) == 0.0


def test_unsigned_inverse_column_near_plus_e():
    # a column within 1e-170 of +e_0 has finite parameters ~1e170: |x_rest|^2 underflowed to 0
    m = 5
    y = randn(m - 1, seed=6)
    y = y / y.norm()
    for t in (1e-3, 1e-170):
        Q = torch.cat([torch.tensor([math.cos(t)], dtype=F64), math.sin(t) * y]).reshape(m, 1)
        p, ok = hh.full_from_frame_unsigned(Q)
        assert bool(ok) and bool(torch.isfinite(p).all()), t
        assert err(reference_frame(p, m, 1, False), Q) < 1e-15, t
        assert err(frame_from_full(p, m, 1), Q) < 1e-15, t
    p = randn(full_dim(m, 2), seed=7) * 1e170
    p[m - 1:] /= 1e170  # column 0 huge, column 1 ordinary
    pu, ok = hh.full_from_frame_unsigned(frame_from_full(p, m, 2))
    assert bool(ok) and err(pu / p, torch.ones_like(p)) < 1e-12


@pytest.mark.parametrize("backend", ["wy", "torch"])
def test_empty_batch(backend):
    m, r = 5, 3
    Q = frame_from_full(torch.zeros(0, full_dim(m, r), dtype=F64), m, r, backend=backend)
    assert Q.shape == (0, m, r)
    Q = frame_from_reduced(torch.zeros(2, 0, reduced_dim(m, r), dtype=F32), m, r, backend=backend)
    assert Q.shape == (2, 0, m, r) and Q.dtype == F32


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: full_dim(2, 3), ValueError, r"m must be >= r"),
        (lambda: reduced_dim(3, 0), ValueError, r"r must be >= 1"),
        (lambda: full_dim(3.0, 2), TypeError, r"m must be an int"),
        (lambda: reduced_dim(3, "2"), TypeError, r"r must be an int"),
        (lambda: full_dim(True, 1), TypeError, r"m must be an int"),
        (lambda: frame_from_full(torch.zeros(4, dtype=F64), 3, 2), ValueError, r"params must have shape \(\.\.\., 3\)"),
        (lambda: frame_from_full(torch.zeros((), dtype=F64), 1, 1), ValueError, r"params must have shape"),
        (lambda: frame_from_reduced(torch.zeros(2, 3, dtype=F64), 3, 2), ValueError, r"params must have shape \(\.\.\., 2\)"),
        (lambda: frame_from_full(torch.zeros(3, dtype=torch.int64), 3, 2), TypeError, r"params must have dtype"),
        (lambda: frame_from_full(torch.zeros(3, dtype=torch.complex128), 3, 2), TypeError, r"params must have dtype"),
        (lambda: frame_from_full(torch.zeros(3, dtype=torch.float16), 3, 2), TypeError, r"params must have dtype"),
        (lambda: frame_from_full([0.0, 0.0, 0.0], 3, 2), TypeError, r"params must be a torch.Tensor"),
        (lambda: frame_from_full(torch.zeros(3, dtype=F64), 2, 3), ValueError, r"m must be >= r"),
        (lambda: frame_from_reduced(torch.zeros(0, dtype=F64), 2, 0), ValueError, r"r must be >= 1"),
        (lambda: full_from_frame(torch.zeros(3, dtype=F64)), ValueError, r"Q must have shape \(\.\.\., m, r\)"),
        (lambda: full_from_frame(torch.zeros(2, 3, dtype=F64)), ValueError, r"Q must have shape .*got shape \(2, 3\)"),
        (lambda: full_from_frame(torch.zeros(3, 0, dtype=F64)), ValueError, r"Q must have shape"),
        (lambda: full_from_frame(torch.eye(3, dtype=torch.int32)), TypeError, r"Q must have dtype"),
        (lambda: reduced_from_frame(torch.eye(3, 2).numpy()), TypeError, r"Q must be a torch.Tensor"),
        (lambda: reduced_from_frame(torch.zeros(2, 3, dtype=F32)), ValueError, r"Q must have shape"),
        (lambda: reduced_from_frame(torch.eye(3, 2, dtype=F64), tol=-1.0), ValueError, r"tol must be"),
        (lambda: reduced_from_frame(torch.eye(3, 2, dtype=F64), tol="big"), ValueError, r"tol must be"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
