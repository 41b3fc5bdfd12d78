"""Householder parameterization of orthonormal frames (Shepard, Brozell, Gidofalvi 2015).

A frame ``Q`` (``(..., m, r)``, ``Q^T Q = I_r``) is written ``H_1 .. H_r I_{m x r}`` with
exact reflections ``H_i = I - 2 v_i v_i^T / |v_i|^2``; the reflector vectors are stored
LAPACK-style (unit diagonal, zeros above). *Full* form: every entry below the diagonal is
free (:func:`full_dim` ``= m r - r(r+1)/2``); *reduced* form: the top ``r x r`` block is
the identity (:func:`reduced_dim` ``= r (m - r)``). Forwards evaluate the product in
compact-WY form (matmuls and one triangular solve, cheap backward) or with
:func:`torch.linalg.householder_product`; inverses run Householder QR and return column
signs. Packing, the stereographic view of a column, the inverses' sign conventions,
accuracy and backends: ``docs/sttp.md``, section 1.

float32/float64 only, any device including ``meta``; every tensor is created on the
inputs' device and dtype. Costs ``O(m r^2)`` per frame.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

__all__ = [
    "HAVE_TORCH_HOUSEHOLDER",
    "full_dim",
    "reduced_dim",
    "frame_from_full",
    "frame_from_reduced",
    "full_from_frame",
    "reduced_from_frame",
    "full_from_frame_unsigned",
    "reduced_in_full",
]

try:  # optional accelerated orgqr; never required
    from torch_householder import torch_householder_orgqr as _th_orgqr  # type: ignore

    HAVE_TORCH_HOUSEHOLDER = True
except Exception:  # ImportError, or a failing JIT build inside the package  # pragma: no cover
    _th_orgqr = None
    HAVE_TORCH_HOUSEHOLDER = False

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_BACKENDS = ("auto", "wy", "torch", "torch_householder")


# ----------------------------------------------------------------------------- validation
def _check_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def _check_sizes(m, r) -> Tuple[int, int]:
    m = _check_int(m, "m")
    r = _check_int(r, "r")
    if r < 1:
        raise ValueError(f"r must be >= 1, got r={r}")
    if m < r:
        raise ValueError(f"m must be >= r (a frame has at least as many rows as columns), got m={m}, r={r}")
    return m, r


def _check_float_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype torch.float32 or torch.float64, got {x.dtype}")


def _check_params(params, n: int, form: str, m: int, r: int) -> None:
    _check_float_tensor(params, "params")
    if params.dim() < 1 or params.shape[-1] != n:
        raise ValueError(
            f"params must have shape (..., {n}) for the {form} form with m={m}, r={r}, "
            f"got shape {tuple(params.shape)}"
        )


def _check_frame(Q) -> Tuple[int, int]:
    _check_float_tensor(Q, "Q")
    if Q.dim() < 2:
        raise ValueError(f"Q must have shape (..., m, r) with m >= r >= 1, got shape {tuple(Q.shape)}")
    m, r = Q.shape[-2], Q.shape[-1]
    if r < 1 or m < r:
        raise ValueError(f"Q must have shape (..., m, r) with m >= r >= 1, got shape {tuple(Q.shape)}")
    return m, r


def _check_backend(backend) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch_householder" and not HAVE_TORCH_HOUSEHOLDER:
        raise ImportError("backend='torch_householder' requested but the package torch_householder is not importable")
    return backend


# ----------------------------------------------------------------------------- dimensions
def full_dim(m: int, r: int) -> int:
    """Number of full-form parameters, ``m r - r (r + 1) / 2`` = dim St(m, r).

    ``m``, ``r``: ints with ``m >= r >= 1`` (``TypeError`` / ``ValueError`` otherwise).
    """
    m, r = _check_sizes(m, r)
    return m * r - r * (r + 1) // 2


def reduced_dim(m: int, r: int) -> int:
    """Number of reduced-form parameters, ``r (m - r)`` = dim of the Grassmannian Gr(m, r).

    ``m``, ``r``: ints with ``m >= r >= 1`` (``TypeError`` / ``ValueError`` otherwise).
    """
    m, r = _check_sizes(m, r)
    return r * (m - r)


# ----------------------------------------------------------------------------- packing
def _packing_positions(m: int, r: int, reduced: bool, device) -> torch.Tensor:
    """Flat positions ``i * r + j`` in an ``m x r`` matrix of the packed parameters, in
    packing order (column by column, top to bottom).  int64 tensor on ``device``."""
    if reduced:
        j = torch.arange(r, device=device).repeat_interleave(m - r)
        i = torch.arange(r, m, device=device).repeat(r)
    else:
        # strictly upper part of an r x m matrix in row-major order = strictly lower
        # part of the m x r matrix column by column.
        j, i = torch.triu_indices(r, m, offset=1, device=device)
    return i * r + j


def _strict_part(params: torch.Tensor, m: int, r: int, reduced: bool) -> torch.Tensor:
    """Scatter packed parameters into the ``(..., m, r)`` strictly-lower part ``W`` of the
    reflector matrix (``V = W + I_{m x r}``)."""
    pos = _packing_positions(m, r, reduced, params.device)
    flat = params.new_zeros(params.shape[:-1] + (m * r,)).index_copy(-1, pos, params)
    return flat.reshape(params.shape[:-1] + (m, r))


def _column_scales(W: torch.Tensor) -> torch.Tensor:
    """``d_j = 1 / max(1, max_i |W_ij|)`` (shape ``(..., r)``): scaling reflector ``j`` by
    ``d_j`` leaves ``H_j`` unchanged and keeps ``|v_j|^2`` finite for any finite ``W``
    (LAPACK's dnrm2 scales for the same reason). Exactly 1 for ``|w| <= 1``, so the usual
    parameters round exactly as without it. Detached: the product does not depend on it."""
    if W.shape[-2] == 0:
        return W.new_ones(W.shape[:-2] + W.shape[-1:])
    return W.detach().abs().amax(dim=-2).clamp_min_(1.0).reciprocal_()


def _norm(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` over the last dimension without overflow/underflow of ``sum x_i^2`` (scaled
    by ``max |x_i|`` first, as LAPACK's dnrm2). Differentiable; 0 for ``x = 0``."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    s = x.detach().abs().amax(dim=-1, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))  # norm = s |x / s| for any s > 0: detached
    return s.squeeze(-1) * torch.linalg.vector_norm(x / s, dim=-1)


def _wy_product(W: torch.Tensor) -> torch.Tensor:
    """``H_1 ... H_r I_{m x r}`` in compact-WY form from the strictly-lower part ``W``.

    Reflector ``i`` is ``v_i = d_i (w_i + e_i)``, ``d`` from :func:`_column_scales` (the
    reflection does not depend on the length of ``v_i``; the scaling keeps ``|v_i|^2`` from
    overflowing for ``|w_i|`` beyond ``sqrt(max float)``). With ``V = W' + E D``,
    ``W' = W D``: ``H_1 ... H_r = I - V T V^T``, ``T`` upper triangular with
    ``T^{-1} = diag(|v_i|^2 / 2) + striu(V^T V)``, hence ``Q = I_{m x r} - V X`` with
    ``X = T V_top^T`` from the triangular solve ``T^{-1} X = V_top^T`` (``V_top = V[:r]``,
    lower triangular; no explicit inverse). ``G = W'^T V`` has the strictly upper part of
    ``V^T V`` and the diagonal ``|w'_i|^2``, so ``|v_i|^2 = d_i^2 + |w'_i|^2`` is summed
    without the ``d_i^2`` entry (which would swallow small ``|w_i|^2`` in the accumulation
    over ``m`` rows).  Only matmuls and one ``r x r`` triangular solve: their backward is
    fast (unlike ``householder_product``'s), and they have meta kernels.
    """
    m, r = W.shape[-2], W.shape[-1]
    E = torch.eye(m, r, dtype=W.dtype, device=W.device)
    d = _column_scales(W).unsqueeze(-2)  # (..., 1, r)
    Ws = W * d
    V = Ws + E * d
    G = Ws.mT @ V  # (..., r, r)
    half_norms = 0.5 * torch.addcmul(G.diagonal(dim1=-2, dim2=-1), d.squeeze(-2), d.squeeze(-2))
    Tinv = torch.triu(G, 1) + torch.diag_embed(half_norms)
    X = torch.linalg.solve_triangular(Tinv, V[..., :r, :].mT, upper=True)  # = T V_top^T
    return E - V @ X


def _resolve_backend(backend: str) -> str:
    """``"auto"`` -> ``"wy"`` (the fastest backend measured; see ``docs/sttp.md``, section 1)."""
    return "wy" if backend == "auto" else backend


def _orgqr(W: torch.Tensor, backend: str) -> torch.Tensor:
    """``H_1 ... H_r I_{m x r}`` with ``H_i = I - 2 v_i v_i^T / |v_i|^2``, ``v_i = V[..., i]``,
    ``V = W + I_{m x r}`` (``W`` the strictly-lower part of the reflector matrix)."""
    backend = _resolve_backend(backend)
    if backend == "wy":
        return _wy_product(W)
    m, r = W.shape[-2], W.shape[-1]
    batch = W.shape[:-2]
    V = W + torch.eye(m, r, dtype=W.dtype, device=W.device)
    if backend == "torch_householder" and V.numel() > 0:
        # torch_householder takes (B, m, r) and normalizes the columns itself, which is
        # the same reflection as tau = 2 / |v|^2.
        out = _th_orgqr(V.reshape((-1, m, r)))
        return out.reshape(batch + (m, r))
    # tau = 2 / |v|^2 = 2 d^2 / |d v|^2 (scaled: no overflow of |v|^2). LAPACK's storage
    # keeps v's unit diagonal, so a reflector with |v|^2 beyond the float range has no
    # normal tau: NaN there rather than the identity that tau = 0 would silently give.
    d = _column_scales(W)
    tau = 2.0 * (d * d) / ((V * d.unsqueeze(-2)) ** 2).sum(dim=-2)
    tau = torch.where(tau >= torch.finfo(V.dtype).tiny, tau, torch.full_like(tau, float("nan")))
    return torch.linalg.householder_product(V, tau)


# ----------------------------------------------------------------------------- forwards
def frame_from_full(params: torch.Tensor, m: int, r: int, *, backend: str = "auto") -> torch.Tensor:
    """Frame ``Q = H_1 ... H_r I_{m x r}`` from full-form Householder parameters.

    Args:
        params: ``(..., full_dim(m, r))`` float32/float64 tensor, the strictly-below-diagonal
            entries of the unit-lower-trapezoidal ``m x r`` reflector matrix packed column by
            column (column ``j`` contributes rows ``j+1 .. m-1``, in order).
        m, r: frame size, ``m >= r >= 1``.
        backend: ``"auto"`` (= ``"wy"``), ``"wy"`` (compact WY: matmuls and one ``r x r``
            triangular solve, fast backward; each reflector scaled, so any finite ``params``
            works), ``"torch"`` (:func:`torch.linalg.householder_product`; NaN for a column
            with ``|w|`` beyond ~1e154 in float64, ~1e19 in float32, whose ``tau`` is not a
            normal float) or ``"torch_householder"`` (``ImportError`` if unavailable); see
            ``docs/sttp.md``, section 1.

    Returns:
        ``Q`` of shape ``(..., m, r)``, same dtype/device as ``params``, ``Q^T Q = I`` to
        rounding for every ``params``.  ``params = 0`` gives ``-I_{m x r}``.
        Differentiable in ``params``.

    Cost: ``O(m r^2)`` flops per frame (plus an ``O(m r)`` scatter).
    """
    m, r = _check_sizes(m, r)
    _check_params(params, full_dim(m, r), "full", m, r)
    backend = _check_backend(backend)
    return _orgqr(_strict_part(params, m, r, reduced=False), backend)


def frame_from_reduced(params: torch.Tensor, m: int, r: int, *, backend: str = "auto") -> torch.Tensor:
    """Frame from reduced-form parameters (leading ``r x r`` block of the reflectors = I).

    Args:
        params: ``(..., reduced_dim(m, r))`` float32/float64 tensor, rows ``r .. m-1`` (0-based)
            of the reflector matrix packed column by column:
            ``params[..., j * (m - r) + t] = V[..., r + t, j]``.
        m, r: frame size, ``m >= r >= 1``; for ``m == r`` there are no parameters and the
            result is ``-I_r``.
        backend: as in :func:`frame_from_full`.

    Returns:
        ``Q`` of shape ``(..., m, r)`` with ``Q^T Q = I`` and an exactly upper-triangular
        leading ``r x r`` block whose diagonal is ``(|w_j|^2 - 1) / (|w_j|^2 + 1)``, ``w_j``
        the parameters of column ``j``.  Differentiable in ``params``.

    Cost: ``O(m r^2)`` flops per frame.
    """
    m, r = _check_sizes(m, r)
    _check_params(params, reduced_dim(m, r), "reduced", m, r)
    backend = _check_backend(backend)
    return _orgqr(_strict_part(params, m, r, reduced=True), backend)


# ----------------------------------------------------------------------------- inverses
def _householder_qr_differentiable(Q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Householder QR of ``Q`` with LAPACK's sign choice, written with differentiable torch
    ops.  Returns ``(params, signs)`` in full-form packing; always uses true reflections (a
    column already equal to ``alpha e_j`` gets ``v = e_j`` and sign ``-sign(alpha)``), so it
    agrees with the geqrf path of :func:`full_from_frame`."""
    r = Q.shape[-1]
    Y = Q  # trailing block still to be reduced
    ws, signs = [], []
    for _ in range(r):
        x = Y[..., :, 0]
        alpha = x[..., 0]
        positive = alpha >= 0
        norm = _norm(x)
        beta = torch.where(positive, -norm, norm)  # -sign(alpha) |x|
        w = x[..., 1:] / (alpha - beta).unsqueeze(-1)  # |alpha - beta| = |alpha| + |x| > 0
        ws.append(w)
        signs.append(torch.where(positive, -torch.ones_like(alpha), torch.ones_like(alpha)))
        rest = Y[..., :, 1:]
        if rest.shape[-1] == 0:
            break
        v = torch.cat([torch.ones_like(alpha).unsqueeze(-1), w], dim=-1)
        tau = 2.0 / (v * v).sum(dim=-1)
        proj = (v.unsqueeze(-2) @ rest) * tau[..., None, None]  # (..., 1, cols)
        Y = (rest - v.unsqueeze(-1) * proj)[..., 1:, :]
    return torch.cat(ws, dim=-1), torch.stack(signs, dim=-1)


def _use_differentiable_path(Q: torch.Tensor) -> bool:
    return Q.device.type == "meta" or (torch.is_grad_enabled() and Q.requires_grad)


def _householder_qr(Q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(params, signs)`` in full-form packing for any ``(..., m, r)`` full-rank ``Q``."""
    m, r = Q.shape[-2], Q.shape[-1]
    if _use_differentiable_path(Q):
        return _householder_qr_differentiable(Q)
    a, tau = torch.geqrf(Q)
    pos = _packing_positions(m, r, False, Q.device)
    params = a.flatten(-2).index_select(-1, pos)
    # LAPACK returns tau = 0 (H_j = I) for a column that is already alpha e_j. Replace it
    # by the reflection v = e_j: its below-diagonal entries are zero (they are zero in
    # ``a`` already, we make it explicit) and it flips the sign of column j.
    identity = tau == 0
    col_of_param = pos % r  # column index j of each packed entry
    params = torch.where(identity.index_select(-1, col_of_param), torch.zeros_like(params), params)
    diag = a.diagonal(dim1=-2, dim2=-1)
    one = torch.ones_like(diag)
    sign_r = torch.where(diag < 0, -one, one)
    signs = torch.where(identity, -sign_r, sign_r)
    return params, signs


def full_from_frame(Q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`frame_from_full` up to column signs.

    Args:
        Q: ``(..., m, r)`` float32/float64 frame, ``m >= r >= 1``, ``Q^T Q = I``.

    Returns:
        ``(params, signs)``: ``params`` of shape ``(..., full_dim(m, r))`` (packing of
        :func:`frame_from_full`) and ``signs`` of shape ``(..., r)`` with entries ``+1.``/``-1.``
        (dtype of ``Q``) such that ``frame_from_full(params, m, r) * signs.unsqueeze(-2) == Q``
        to rounding.  ``signs[j] = sign(R_jj)`` for the ``geqrf`` factor ``R``, negated where
        LAPACK returned ``tau_j = 0`` (column already ``+-e_j``; see ``docs/sttp.md``, section 1).
        E.g. ``Q = I_{m x r}`` gives ``params = 0``, ``signs = -1``; ``Q = -I`` gives ``signs = +1``.
        For ``Q = frame_from_full(p)`` with every column block ``|w_j| < 1`` the result is
        exactly ``(p, +1)`` (to rounding).  For a non-orthonormal full-column-rank ``Q`` it
        parameterizes the Q-factor of ``Q`` with positive ``diag(R)``.

    Differentiable only through the fallback path used when ``Q.requires_grad`` (grad mode
    on) or on the meta device (``torch.geqrf`` has no derivative / meta kernel).
    Cost: ``O(m r^2)`` flops (one Householder QR).
    """
    _check_frame(Q)
    return _householder_qr(Q)


def reduced_from_frame(
    Q: torch.Tensor, *, tol: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced-form parameters of ``Q`` after a right rotation into ``St_U``.

    Args:
        Q: ``(..., m, r)`` float32/float64 frame (``Q^T Q = I``), ``m >= r >= 1``, whose leading
            ``r x r`` block ``B = Q[..., :r, :r]`` is nonsingular (the chart's domain).
        tol: singularity threshold on the smallest singular value of ``B``; ``None`` means
            ``100 * eps(dtype)``.  ``tol=0`` skips the check (and its host synchronisation).

    Returns:
        ``(params, signs, rotation)`` with ``params`` ``(..., reduced_dim(m, r))``, ``signs``
        ``(..., r)`` and ``rotation`` ``(..., r, r)`` orthogonal, such that
        ``frame_from_reduced(params, m, r) * signs.unsqueeze(-2) == Q @ rotation`` to rounding.

        ``rotation`` is the unique orthogonal ``O`` for which ``B O`` is upper triangular with
        a strictly **negative** diagonal (RQ decomposition of ``B``, computed by a QR of the
        doubly flipped ``B^T``).  Hence, for ``Q`` already in ``St_U`` (``B`` upper
        triangular), ``rotation = diag(-sign(B_jj))``: the identity iff ``diag(B) < 0``, which
        is the case for ``frame_from_reduced(p)`` when every ``|w_j| < 1``; for such ``p`` the
        output is ``(p, +1, I)``.  With the negative-diagonal convention ``signs`` is always
        all ``+1`` when the check passes (it is kept for symmetry with
        :func:`full_from_frame` and for the unchecked ``tol=0`` singular case).
        Callers absorb ``rotation^T`` into the neighbouring core.

    Raises:
        ValueError: if ``sigma_min(B) < tol`` for some batch element (``Q`` outside St_U's
            chart domain: the rotation is then not unique and the chart degenerates).

    Differentiable under the same conditions as :func:`full_from_frame` (the rotation always
    is, through :func:`torch.linalg.qr`).  Cost: ``O(m r^2 + r^3)``.
    """
    m, r = _check_frame(Q)
    if tol is None:
        tol = 100.0 * torch.finfo(Q.dtype).eps
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
        raise ValueError(f"tol must be a non-negative float or None, got {tol!r}")
    B = Q[..., :r, :r]
    if tol > 0 and Q.device.type != "meta":
        with torch.no_grad():
            smin = torch.linalg.svdvals(B)[..., -1]
            bad = smin < tol
            if bool(bad.any()):
                worst = float(smin.min())
                raise ValueError(
                    f"Q's leading {r}x{r} block is singular (smallest singular value {worst:.3e} "
                    f"< tol={tol:.3e}): Q is outside the domain of the reduced Householder chart"
                )
    # RQ of B via QR of A = J B^T J (upper triangular when B is): B = (J R1^T J)(J Q1 J)^T.
    A = B.transpose(-2, -1).flip(-2, -1)
    Q1, R1 = torch.linalg.qr(A)
    d = R1.diagonal(dim1=-2, dim2=-1)
    one = torch.ones_like(d)
    fix = torch.where(d > 0, -one, one)  # make diag(R1) (= reversed diag(T)) non-positive
    rotation = (Q1 * fix.unsqueeze(-2)).flip(-2, -1)
    params_full, signs = _householder_qr(Q @ rotation)
    # keep only rows r..m-1 of each reflector (rows j+1..r-1 vanish up to rounding)
    keep = reduced_in_full(m, r, Q.device)
    return params_full.index_select(-1, keep), signs, rotation


def reduced_in_full(m: int, r: int, device) -> torch.Tensor:
    """Indices into the full packing of the reduced-form entries (rows >= r), in reduced order."""
    # full packing: column j starts at off_j = j (m - 1) - j (j - 1) / 2 and holds rows j+1..m-1
    j = torch.arange(r, device=device).repeat_interleave(m - r)
    i = torch.arange(r, m, device=device).repeat(r)
    off = j * (m - 1) - torch.div(j * (j - 1), 2, rounding_mode="floor")
    return off + (i - j - 1)


def full_from_frame_unsigned(Q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-form parameters ``p`` with ``frame_from_full(p) == Q`` exactly (no column signs).

    ``Q``: ``(..., m, r)`` float32/float64 frame.

    Householder QR where each peeled column ``x`` is reflected onto ``+|x| e_j`` (LAPACK
    uses ``-sign(alpha)|x|``, which is why :func:`full_from_frame` needs signs). The free
    part of ``v = (x - |x| e_j) / (alpha - |x|)`` is computed without cancellation:
    ``x_rest / (alpha - |x|)`` for ``alpha <= 0`` and ``-x_rest (alpha + |x|) / |x_rest|^2``
    for ``alpha > 0``. Undefined (inf/NaN) when a peeled column is exactly ``+e_j``. For a
    square frame the last reflector has no free entry (it maps ``e`` to ``-e``), so the
    last peeled entry must be ``-1`` (``det Q = (-1)^r``). Returns ``(params, ok)``, ``ok``
    a bool tensor ``(...)``: params finite and (if square) the orientation reachable.
    Differentiable, pure torch (works on meta). ``O(m r^2)``.
    """
    _check_frame(Q)
    r = Q.shape[-1]
    Y = Q
    ws = []
    for j in range(r):
        x = Y[..., :, 0]
        alpha = x[..., 0]
        xr = x[..., 1:]
        # scaled norms: for alpha > 0 the tiny |x_rest| of a column near +e_j (~1e-160)
        # gives huge but finite parameters; its square would underflow to 0.
        nr = _norm(xr)
        nrm = _norm(x)
        neg = alpha <= 0
        one = torch.ones_like(alpha)
        den = torch.where(neg, alpha - nrm, -one)
        safe_nr = torch.where(neg, one, nr)
        w = torch.where(
            neg.unsqueeze(-1),
            xr / den.unsqueeze(-1),
            -(xr / safe_nr.unsqueeze(-1)) * ((alpha + nrm) / safe_nr).unsqueeze(-1),
        )
        ws.append(w)
        if j == r - 1:
            ok = torch.isfinite(w).all(dim=-1)
            if xr.shape[-1] == 0:
                ok = ok & neg
            break
        v = torch.cat([one.unsqueeze(-1), w], dim=-1)
        u = v / _norm(v).unsqueeze(-1)  # unit reflector: |v|^2 overflows for |w| > ~1e154
        rest = Y[..., :, 1:]
        proj = 2.0 * (u.unsqueeze(-2) @ rest)
        Y = (rest - u.unsqueeze(-1) * proj)[..., 1:, :]
    params = torch.cat(ws, dim=-1)
    return params, ok & torch.isfinite(params).all(dim=-1)
