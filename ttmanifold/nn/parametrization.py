"""Weight parameterizations: STTP (a TT chart) and SVDP (a compact SVD), as modules.

:class:`STTPWeight` and :class:`SVDPWeight` own the trainable numbers of one weight matrix
and return its TT cores; every layer family, the adapters and
:class:`STTPParametrization` (``torch.nn.utils.parametrize``) build on them, with one
tensorization convention (:mod:`ttmanifold.nn.tensorization`). The mathematics (frames,
spectra, initializations): ``docs/sttp.md``.
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import List, Optional

import torch
from torch import Tensor, nn

from .._checks import check_finite, check_shape, normalize_ranks
from ..householder import (
    frame_from_full,
    frame_from_reduced,
    full_dim,
    full_from_frame,
    full_from_frame_unsigned,
    reduced_dim,
    reduced_from_frame,
)
from ..manifold import FixedTTRank
from ..tt import TT, orthogonalize
from .chart import SPECTRA, STTPChart, lipschitz_normalize
from .tensorization import SCHEMES, Tensorization, check_rank, sttp_ranks, svdp_rank

__all__ = [
    "INITS",
    "STTPWeight",
    "SVDPWeight",
    "STTPParametrization",
    "register_sttp",
    "interface_singular_values",
    "near_identity_frame",
]

#: ``"orthogonal"``: orthonormal frames that give the declared TT-ranks
#: (:meth:`STTPChart.orthogonal_init`); ``"near_identity"``: the paper's recipe around
#: them, frames ``QR(F + 1e-4 * noise)``; ``"random"``: Householder parameters N(0, 1);
#: ``"identity"``: the paper-literal frames (every Householder parameter 0, frames ``-I``),
#: rank-deficient for most STTP layouts (chart mode only). For SVDP ``"identity"`` and
#: ``"orthogonal"`` coincide (frames ``-I``, full rank). ``docs/sttp.md``, section 7.
INITS = ("orthogonal", "near_identity", "random", "identity")
_DTYPES = (torch.float32, torch.float64)
#: Standard deviation of the near-identity noise (clamped to [-1, 1]) of the reference.
NEAR_IDENTITY_STD = 1e-4


def near_identity_frame(m: int, r: int, *, std: float = NEAR_IDENTITY_STD, dtype=None,
                        device=None, generator: Optional[torch.Generator] = None,
                        base: Optional[Tensor] = None) -> Tensor:
    """The Q factor of ``B + std * clamp(N(0, 1), -1, 1)``: an ``m x r`` frame near ``B``
    up to column signs (the paper's initialization perturbs ``B = I_{m x r}``, the
    default; the STTP layers perturb the frames of :meth:`STTPChart.orthogonal_frames`).

    Args:
        m, r: frame size, ``m >= r``.
        std: noise scale.
        dtype, device, generator: of the noise (``dtype``/``device`` default to ``base``'s).
        base: ``(m, r)`` orthonormal frame, default ``I_{m x r}``.

    Returns: ``(m, r)`` orthonormal frame. Cost ``O(m r^2)``.
    """
    if base is None:
        base = torch.eye(m, r, dtype=dtype, device=device)
    elif tuple(base.shape) != (m, r):
        raise ValueError(f"base: expected shape ({m}, {r}), got {tuple(base.shape)}")
    noise = torch.randn(m, r, dtype=base.dtype, device=base.device,
                        generator=generator).clamp(-1, 1)
    return torch.linalg.qr(base + std * noise)[0]


def interface_singular_values(tt: TT, point_tt: TT, c: int) -> Tensor:
    """Singular values of the c-th unfolding of ``tt``, differentiable through ``tt``.

    ``point_tt`` is a (detached) TT with the same value whose cores ``0..c-1`` are
    left-orthogonal: with right-orthogonal cores ``V`` of it, ``M = U_{<c}^T X V_{>=c}^T``
    is ``r_c x r_c`` and has the singular values of ``X``, to first order also around the
    current point, so the gradient is exact without a QR of ``tt``'s cores. Returns
    ``(r_c,)`` descending. Cost O(d n r^3).
    """
    U = point_tt.cores
    V = orthogonalize(point_tt, center=c - 1).cores
    X = tt.cores
    L = X[0].new_ones(1, 1)
    for k in range(c):
        L = torch.einsum("ab,anc,bnd->cd", L, X[k], U[k])
    R = X[-1].new_ones(1, 1)
    for k in range(len(X) - 1, c - 1, -1):
        R = torch.einsum("anc,bnd,cd->ab", X[k], V[k], R)
    return torch.linalg.svdvals(L.transpose(0, 1) @ R)


def _check_common(spectrum, init):
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum: expected one of {SPECTRA}, got {spectrum!r}")
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")


class _OwnedParams:
    """The parameters live on ``owner`` (a layer or adapter), under the names torch users
    and saved state dicts know (``theta``, ``point``, ``u_params``, ``s``, ``v_params``).

    The owner holds the weight and the weight only a weak reference back: a strong one
    would make every layer a reference cycle, freed only by the cyclic collector (memory,
    and DDP's process group, held after ``del model``). Pickling and deepcopy carry the
    owner strongly and restore the weak reference."""

    def __getattr__(self, name: str):
        if name in self._NAMES:
            return getattr(self.owner, name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._NAMES:
            setattr(self.owner, name, value)
        elif name == "owner":
            object.__setattr__(self, "_owner_ref", weakref.ref(value))
        else:
            object.__setattr__(self, name, value)

    @property
    def owner(self) -> nn.Module:
        """The module that holds this weight's parameters."""
        owner = self.__dict__["_owner_ref"]()
        if owner is None:
            raise RuntimeError("the module that held this weight's parameters was freed")
        return owner

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_owner_ref"] = self.owner
        return state

    def __setstate__(self, state) -> None:
        state = dict(state)
        if "owner" in state:  # pickled before the reference was weak
            state["_owner_ref"] = state.pop("owner")
        state["_owner_ref"] = weakref.ref(state["_owner_ref"])
        self.__dict__.update(state)

    def parameters(self):
        """The owner's parameters of this weight."""
        return [p for p in (getattr(self.owner, n) for n in self._NAMES) if p is not None]

    def after_load(self) -> None:
        """Restore what ``load_state_dict`` may have replaced (called by the owner)."""


class STTPWeight(_OwnedParams):
    """An STTP weight matrix: a point of ``FixedTTRank(tensor_shape, ranks)`` written in the
    STTP chart (``param="chart"``, parameter ``owner.theta``) or stored as a packed point
    (``param="manifold"``, a :class:`geoopt.ManifoldParameter` ``owner.point``).

    Args:
        owner: the ``nn.Module`` that holds the parameters.
        tensorization: a :class:`Tensorization` of the ``d_out x d_in`` matrix.
        rank: int >= 1, the cap ``r`` of every bond: ``R_k = min(r, R_k^max)``.
        spectrum: ``"learned"`` | ``"lipschitz"`` (``s / max|s|``) | ``"identity"``.
        param: ``"chart"`` | ``"manifold"``.
        init: one of :data:`INITS`.
        device, dtype: of the parameters (float32/float64).

    Attributes: ``tensorization``, ``rank``, ``ranks``, ``center``, ``spectrum``, ``init``,
    ``param``, ``chart`` (:class:`STTPChart`), ``manifold``, ``theta`` / ``point``.
    """

    _NAMES = ("theta", "point")

    def __init__(self, owner: nn.Module, tensorization: Tensorization, rank: int,
                 spectrum: str = "learned", param: str = "chart", init: str = "orthogonal", *,
                 device=None, dtype=None):
        if not isinstance(owner, nn.Module):
            raise TypeError(f"owner: expected an nn.Module, got {type(owner).__name__}")
        self.owner = owner
        _check_common(spectrum, init)
        if param not in ("chart", "manifold"):
            raise ValueError(f"param: expected 'chart' or 'manifold', got {param!r}")
        if not isinstance(tensorization, Tensorization):
            raise TypeError(f"tensorization: expected a Tensorization, got "
                            f"{type(tensorization).__name__}")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        self.tensorization = tensorization
        self.rank = check_rank(rank)
        self.spectrum = spectrum
        self.init = init
        self.ranks = sttp_ranks(tensorization.out_modes, tensorization.in_modes, self.rank,
                                tensorization.order)
        manifold = FixedTTRank(tensorization.tensor_shape, self.ranks)
        self.chart = STTPChart(manifold, center=tensorization.center, spectrum=spectrum)
        self.param = "chart"
        owner.theta = nn.Parameter(torch.empty(self.chart.dim, device=device, dtype=dtype))
        owner.register_parameter("point", None)
        self.reset_parameters()
        if param == "manifold":
            self._check_manifold_init()
            self.to_manifold()

    @property
    def manifold(self) -> FixedTTRank:
        return self.chart.manifold

    @property
    def center(self) -> int:
        return self.tensorization.center

    @property
    def tensor_shape(self):
        return self.tensorization.tensor_shape

    def ref(self) -> Tensor:
        """The stored parameter (``theta`` or ``point``): its dtype/device are the weight's."""
        return self.theta if self.param == "chart" else self.point

    def extra_repr(self) -> str:
        t = self.tensorization
        return (f"rank={self.rank}, spectrum={self.spectrum!r}, param={self.param!r}, "
                f"modes={t.out_modes}|{t.in_modes} ({t.order}), ranks={self.ranks}, "
                f"dof={self.chart.dim}")

    # -- initialization --------------------------------------------------------------------
    def init_theta(self, dtype, device, generator: Optional[torch.Generator] = None) -> Tensor:
        """A fresh ``theta`` for :attr:`init` (``(chart.dim,)``; ``s = 1``, the learned
        spectrum rescaled to ``||W||_F^2 = d_out / 3``, torch's default-init expectation).
        Cost ``O(d n r^3)``."""
        ch = self.chart
        if self.init == "random":
            theta = ch.random_theta(dtype=dtype, device=device, generator=generator)
        elif self.init == "identity":
            theta = ch.identity_init(dtype=dtype, device=device)
        elif self.init == "near_identity" and ch.d > 1:
            theta = self._near_identity_theta(dtype, device, generator)
        else:
            theta = ch.orthogonal_init(dtype=dtype, device=device)
        if self.spectrum == "learned" and torch.device(device or "cpu").type != "meta":
            b = next(blk for blk in ch.layout if blk.name == "s")
            s = theta[b.start:b.start + b.size]
            s = s * (math.sqrt(self.tensorization.d_out / 3.0) / torch.linalg.vector_norm(s))
            theta = torch.cat([theta[:b.start], s, theta[b.start + b.size:]])
        return theta

    def _near_identity_theta(self, dtype, device, generator) -> Tensor:
        # each block: the Householder parameters of a frame QR(F + small noise), F the
        # orthogonal init's frame; as in the reference the noise is drawn per frame, so W
        # is near the full-rank partial isometry of init="orthogonal" (the paper's F = I
        # is near a rank-deficient point for most layouts)
        frames = self.chart.orthogonal_frames(dtype=dtype, device=device)
        parts = []
        for b in self.chart.layout:
            if b.kind == "spectrum":
                parts.append(torch.ones(b.size, dtype=dtype, device=device))
                continue
            Q = near_identity_frame(b.m, b.r, generator=generator, base=frames[b.name])
            if b.kind == "full":
                p = full_from_frame(Q)[0]
            else:
                p = reduced_from_frame(Q, tol=0)[0]
            parts.append(p.reshape(-1))
        return torch.cat(parts)

    def _check_manifold_init(self) -> None:
        """``ValueError`` naming ``init`` when the manifold mode would start at a
        rank-deficient point (``init="identity"`` for most layouts)."""
        if self.init != "identity":
            return
        ref = self.ref()
        with torch.no_grad():
            try:
                self.manifold.pack_point(self.chart(self.init_theta(ref.dtype, ref.device)))
            except ValueError as e:
                raise ValueError(
                    f"init: 'identity' (the paper-literal frames) gives a TT whose true ranks "
                    f"are below the declared {self.ranks} for this layout, a point outside "
                    f"the fixed-rank manifold that param='manifold' cannot train from; use "
                    f"init='orthogonal' (full-rank orthonormal frames) or param='chart' "
                    f"({e})") from None

    def reset_parameters(self) -> None:
        """Re-initialize in the current mode (a no-op for the values on ``meta``).
        Manifold mode: ``ValueError`` for ``init="identity"`` where its TT is
        rank-deficient."""
        ref = self.ref()
        if self.param == "manifold":
            self._check_manifold_init()
        theta = self.init_theta(ref.dtype, ref.device)
        with torch.no_grad():
            if self.param == "chart":
                self.theta.copy_(theta)
            else:
                self.point.copy_(self.manifold.pack_point(self.chart(theta)))

    # -- cores -----------------------------------------------------------------------------
    def _point_tt(self) -> TT:
        return self.manifold.to_tt(self.point)

    def cores(self) -> List[Tensor]:
        """The TT cores ``(R_{k-1}, n_k, R_k)`` of the tensorized weight, differentiable in
        the stored parameter (manifold mode: through :meth:`FixedTTRank.unpack_tensor`, so
        the gradient of ``point`` is Riemannian). Cost ``O(d n r^3)``."""
        if self.param == "chart":
            return self.chart(self.theta).cores
        tt = self.manifold.unpack_tensor(self.point)
        cores = tt.cores
        if self.spectrum == "lipschitz":
            smax = interface_singular_values(tt, self._point_tt().detach(), self.center)[0]
            cores[self.center] = cores[self.center] / smax
        return cores

    def value_cores(self) -> List[Tensor]:
        """Cores with the value of :meth:`cores`, differentiable through ``point`` as a plain
        tensor (no Riemannian-autodiff structure)."""
        if self.param == "chart":
            return self.chart(self.theta).cores
        tt = self._point_tt()
        cores = tt.cores
        if self.spectrum == "lipschitz":
            smax = interface_singular_values(tt, tt.detach(), self.center)[0]
            cores[self.center] = cores[self.center] / smax
        return cores

    def singular_values(self) -> Tensor:
        """The spectrum of ``W`` (``R_c`` values): in chart mode the chart's effective signed
        ``s``, in manifold mode the singular values of the point's c-th unfolding
        (descending; divided by the largest for ``"lipschitz"``). Differentiable."""
        if self.param == "chart":
            return self.chart.singular_values(self.theta)
        tt = self.manifold.unpack_tensor(self.point)
        sv = interface_singular_values(tt, self._point_tt().detach(), self.center)
        sv = sv[: self.ranks[self.center]]
        if self.spectrum == "lipschitz":
            sv = sv / sv[0]
        return sv

    def num_params(self) -> int:
        return self.ref().numel()

    # -- modes -----------------------------------------------------------------------------
    def to_manifold(self) -> "STTPWeight":
        """Switch to manifold mode in place (same weight). ``ValueError`` for the
        "identity" spectrum and for a weight whose TT-rank is below :attr:`ranks` (not a
        point of the manifold, e.g. ``init="identity"`` or a zero spectrum entry)."""
        if self.param == "manifold":
            return self
        if self.spectrum == "identity":
            raise ValueError("to_manifold: the 'identity' spectrum is a submanifold of "
                             "FixedTTRank that the manifold mode cannot keep; use the chart "
                             "mode or spectrum='learned'/'lipschitz'")
        import geoopt

        theta = self.theta
        with torch.no_grad():
            try:
                point = self.manifold.pack_point(self.chart(theta.detach()))
            except ValueError as e:
                raise ValueError(f"to_manifold: the layer's weight has TT-ranks below "
                                 f"{self.ranks}, so it is not a point of the fixed-rank "
                                 f"manifold ({e})") from None
        self.theta = None
        self.point = geoopt.ManifoldParameter(point, manifold=self.manifold,
                                              requires_grad=theta.requires_grad)
        self.param = "manifold"
        return self

    def after_load(self) -> None:
        """``load_state_dict(..., assign=True)`` stores a plain ``Parameter`` as ``point``:
        wrap it again as a ManifoldParameter (same storage), or Riemannian optimizers
        would take Euclidean steps off the manifold."""
        import geoopt

        point = self.point if self.param == "manifold" else None
        if point is not None and not isinstance(point, geoopt.ManifoldParameter):
            self.point = geoopt.ManifoldParameter(point.detach(), manifold=self.manifold,
                                                  requires_grad=point.requires_grad)

    def to_chart(self) -> "STTPWeight":
        """Switch to chart mode in place (``theta = chart.inverse(point)``)."""
        if self.param == "chart":
            return self
        point = self.point
        with torch.no_grad():
            theta = self.chart.inverse(self.manifold.to_tt(point.detach()), project=True)
        self.point = None
        self.theta = nn.Parameter(theta.contiguous(), requires_grad=point.requires_grad)
        self.param = "chart"
        return self

    def load_matrix(self, W: Tensor) -> None:
        """Set the weight to the TT-SVD (ranks :attr:`ranks`) of the ``d_out x d_in`` matrix
        ``W``, projected onto the spectrum constraint. Cost: one TT-SVD of ``W``."""
        ref = self.ref()
        W = W.detach().to(dtype=ref.dtype, device=ref.device)
        T = self.tensorization.matrix_to_tensor(W)
        with torch.no_grad():
            x = TT.from_dense(T.contiguous(), ranks=self.ranks)
            theta = self.chart.inverse(x, project=True)
            if self.param == "chart":
                self.theta.copy_(theta)
            else:
                # unchecked: the projection of an exactly lower-rank W (a zero weight, a
                # low-rank product) is rank-deficient; the user's weight is kept as loaded
                self.point.copy_(self.manifold.pack_point(self.chart(theta), check_rank=False))


class SVDPWeight(_OwnedParams):
    """``W = U diag(s) V^T`` at rank ``r = min(rank, d_out, d_in)`` with Householder frames.

    ``U = frame_from_full(u_params)`` (``"identity"``: ``frame_from_reduced``, its rotation
    gauge moved into ``V``, so no parameter is redundant), ``V = frame_from_full(v_params)``,
    ``s`` a parameter for "learned"/"lipschitz" (absent for "identity"). Same arguments as
    :class:`STTPWeight` without ``param`` (SVDP has the chart mode only); the tensorization
    is the trivial one ``(d_out,) | (d_in,)``.
    """

    _NAMES = ("u_params", "s", "v_params")

    def __init__(self, owner: nn.Module, d_out: int, d_in: int, rank: int,
                 spectrum: str = "learned", init: str = "orthogonal", *, device=None,
                 dtype=None):
        if not isinstance(owner, nn.Module):
            raise TypeError(f"owner: expected an nn.Module, got {type(owner).__name__}")
        self.owner = owner
        _check_common(spectrum, init)
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        self.tensorization = Tensorization((d_out,), (d_in,), "natural")
        self.rank = check_rank(rank)
        r = svdp_rank(d_out, d_in, rank)
        self.r = r
        self.ranks = (1, r, 1)
        self.spectrum = spectrum
        self.init = init
        self.param = "chart"
        self.d_out, self.d_in = int(d_out), int(d_in)
        nu = reduced_dim(d_out, r) if spectrum == "identity" else full_dim(d_out, r)
        owner.u_params = nn.Parameter(torch.empty(nu, device=device, dtype=dtype))
        if spectrum == "identity":
            owner.register_parameter("s", None)
        else:
            owner.s = nn.Parameter(torch.empty(r, device=device, dtype=dtype))
        owner.v_params = nn.Parameter(torch.empty(full_dim(d_in, r), device=device,
                                                  dtype=dtype))
        self.reset_parameters()

    center = 1

    @property
    def tensor_shape(self):
        return (self.d_out, self.d_in)

    def ref(self) -> Tensor:
        return self.u_params

    def extra_repr(self) -> str:
        return f"rank={self.r}, spectrum={self.spectrum!r}, dof={self.num_params()}"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def reset_parameters(self) -> None:
        """``"orthogonal"``/``"identity"``: parameters 0 (frames ``-I``, full rank ``r``:
        an SVDP weight has no inner bond to lose); ``"near_identity"``: frames
        ``QR(I + 1e-4 noise)``; ``"random"``: N(0, 1). ``s = 1`` (``"random"``: uniform in
        [0.5, 1.5)), rescaled to ``||s|| = sqrt(d_out / 3)`` for the learned spectrum."""
        if self.u_params.device.type == "meta":
            return
        r, ident = self.r, self.spectrum == "identity"
        with torch.no_grad():
            if self.init in ("orthogonal", "identity"):
                self.u_params.zero_()
                self.v_params.zero_()
            elif self.init == "random":
                self.u_params.normal_()
                self.v_params.normal_()
            else:
                dt, dv = self.u_params.dtype, self.u_params.device
                QU = near_identity_frame(self.d_out, r, dtype=dt, device=dv)
                QV = near_identity_frame(self.d_in, r, dtype=dt, device=dv)
                self.u_params.copy_(reduced_from_frame(QU, tol=0)[0] if ident
                                    else full_from_frame(QU)[0])
                self.v_params.copy_(full_from_frame(QV)[0])
            if self.s is not None:
                if self.init == "random":
                    self.s.uniform_(0.5, 1.5)
                else:
                    self.s.fill_(1.0)
                if self.spectrum == "learned":
                    self.s.mul_(math.sqrt(self.d_out / 3.0) / torch.linalg.vector_norm(self.s))

    def frames(self):
        """``(U, V)``, ``(d_out, r)`` and ``(d_in, r)`` orthonormal frames."""
        make_u = frame_from_reduced if self.spectrum == "identity" else frame_from_full
        return (make_u(self.u_params, self.d_out, self.r),
                frame_from_full(self.v_params, self.d_in, self.r))

    def singular_values(self) -> Tensor:
        """The effective (signed) spectrum: ``s``, ``s / max|s|`` or ones."""
        if self.spectrum == "identity":
            return self.u_params.new_ones(self.r)
        if self.spectrum == "lipschitz":
            return lipschitz_normalize(self.s)
        return self.s

    def cores(self) -> List[Tensor]:
        """``[U (1, d_out, r), diag(s) V^T (r, d_in, 1)]``. Cost ``O((d_out + d_in) r^2)``."""
        U, V = self.frames()
        s = self.singular_values()
        return [U.reshape(1, self.d_out, self.r),
                (s.unsqueeze(0) * V).transpose(0, 1).reshape(self.r, self.d_in, 1)]

    value_cores = cores

    def to_manifold(self):
        raise NotImplementedError("SVDP layers have only the chart mode (use STTP layers with "
                                  "out_modes=(d_out,), in_modes=(d_in,) for the fixed-rank "
                                  "matrix manifold)")

    def to_chart(self):
        return self

    def load_matrix(self, W: Tensor) -> None:
        """Truncated SVD of ``W``; "lipschitz" keeps ``s`` (normalized in the forward),
        "identity" replaces it by ones (the polar factor of the truncation). Cost: one SVD."""
        ref = self.u_params
        W = W.detach().to(dtype=ref.dtype, device=ref.device)
        r = self.r
        with torch.no_grad():
            P, S, Qh = torch.linalg.svd(W, full_matrices=False)
            U, S, V = P[:, :r], S[:r], Qh[:r].transpose(0, 1)
            if self.spectrum == "identity":
                # U = F diag(sg) O^T: the rotation and signs move into V (W = F (V O sg)^T)
                pu, sg, O = reduced_from_frame(U, tol=0)
                pv, ok = full_from_frame_unsigned((V @ O) * sg)
                if not bool(ok):
                    raise ValueError("W: the right singular frame is outside the domain of the "
                                     "sign-free Householder inverse ('identity' spectrum); use "
                                     "spectrum='learned'")
            else:
                pu, su = full_from_frame(U)
                pv, sv = full_from_frame(V)
                self.s.copy_(su * S * sv)
            self.u_params.copy_(pu)
            self.v_params.copy_(pv)


# ---------------------------------------------------------------------------------------
# torch.nn.utils.parametrize integration
# ---------------------------------------------------------------------------------------

class STTPParametrization(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization ``theta -> W`` via STTP.

    Args:
        tensor_shape: shape of the parametrized tensor (e.g. ``(out, in)`` of ``nn.Linear``).
        rank: int (every bond capped at ``min(rank, R_k^max)``) or explicit ``d - 1`` /
            ``d + 1`` ranks (must be feasible).
        shape: a plain reshape ``(n_1, ..., n_d)`` of the tensor (row-major, no
            permutation); default ``tensor_shape`` itself. Ignored when ``tensorization``
            is given.
        spectrum: as in :class:`STTPChart`.
        center: default: the bond between output and input modes when some prefix of
            ``shape`` multiplies to ``tensor_shape[0]`` (so ``s`` are the singular values of
            ``W.reshape(out, -1)``), else :class:`STTPChart`'s default.
        tensorization: ``"reference"``/``"section8"`` or a :class:`Tensorization` of the
            matrix ``W.reshape(tensor_shape[0], -1)``: the same convention as the STTP
            layers (their :attr:`tensorization`), center at the spectral bond.

    ``forward(theta)`` returns the dense ``W`` (cost ``O(numel r)`` on top of the chart);
    ``right_inverse(W)`` is TT-SVD to the chart's ranks and :meth:`STTPChart.inverse` with
    ``project=True`` (assignment projects ``W`` onto the parametrized set).
    """

    def __init__(self, tensor_shape, rank, shape=None, *, spectrum: str = "learned",
                 center: Optional[int] = None, tensorization=None):
        super().__init__()
        tensor_shape = tuple(int(v) for v in tensor_shape)
        if len(tensor_shape) == 0 or any(v < 1 for v in tensor_shape):
            raise ValueError(f"tensor_shape: expected a non-empty shape of positive sizes, got "
                             f"{tensor_shape}")
        numel = math.prod(tensor_shape)
        self.tensorization = None
        if tensorization is not None:
            if isinstance(tensorization, str):
                if tensorization not in SCHEMES:
                    raise ValueError(f"tensorization: expected one of {SCHEMES} or a "
                                     f"Tensorization, got {tensorization!r}")
                tensorization = Tensorization.default(
                    tensor_shape[0], tensor_shape[1] if len(tensor_shape) > 1 else 1,
                    tensor_shape[2:], scheme=tensorization)
            if not isinstance(tensorization, Tensorization):
                raise TypeError(f"tensorization: expected a scheme name or a Tensorization, "
                                f"got {type(tensorization).__name__}")
            if (tensorization.d_out, tensorization.d_out * tensorization.d_in) != \
                    (tensor_shape[0], numel):
                raise ValueError(f"tensorization: {tensorization} does not describe a tensor "
                                 f"of shape {tensor_shape}")
            self.tensorization = tensorization
            shape = tensorization.tensor_shape
            if center is None and len(shape) > 1:
                center = tensorization.center
        shape = check_shape(tensor_shape if shape is None else shape, "shape")
        if math.prod(shape) != numel:
            raise ValueError(f"shape: the tensorization {shape} has {math.prod(shape)} entries "
                             f"but the tensor of shape {tensor_shape} has {numel}")
        if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
            if rank < 1:
                raise ValueError(f"rank: expected a positive int, got {rank}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ranks = normalize_ranks(shape, int(rank))
        else:
            ranks = rank
        manifold = FixedTTRank(shape, ranks)
        d = len(shape)
        if center is None and d > 1 and len(tensor_shape) >= 2:
            acc = 1
            for c in range(1, d):
                acc *= shape[c - 1]
                if acc == tensor_shape[0]:
                    center = c
                    break
                if acc > tensor_shape[0]:
                    break
        self.tensor_shape = tensor_shape
        self.shape = shape
        self.chart = STTPChart(manifold, center=center, spectrum=spectrum)

    @property
    def manifold(self) -> FixedTTRank:
        return self.chart.manifold

    def extra_repr(self) -> str:
        return f"tensor_shape={self.tensor_shape}"

    def forward(self, theta: Tensor) -> Tensor:
        T = self.chart(theta).full()
        if self.tensorization is not None:
            return self.tensorization.tensor_to_matrix(T).reshape(self.tensor_shape)
        return T.reshape(self.tensor_shape)

    def right_inverse(self, W: Tensor) -> Tensor:
        if not isinstance(W, Tensor):
            raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
        if tuple(W.shape) != self.tensor_shape:
            raise ValueError(f"W: expected shape {self.tensor_shape}, got {tuple(W.shape)}")
        if W.dtype not in _DTYPES:
            raise TypeError(f"W: expected dtype float32 or float64, got {W.dtype}")
        check_finite(W, "W")
        W = W.detach()
        if self.tensorization is not None:
            T = self.tensorization.matrix_to_tensor(W.reshape(self.tensor_shape[0], -1))
        else:
            T = W.reshape(self.shape)
        x = TT.from_dense(T.contiguous(), ranks=self.manifold.ranks)
        return self.chart.inverse(x, project=True)


def register_sttp(module: nn.Module, name: str, rank, shape=None, spectrum: str = "learned",
                  *, center: Optional[int] = None, tensorization=None) -> nn.Module:
    """Parametrize ``module.<name>`` with :class:`STTPParametrization` (in place).

    The current value is projected (TT-SVD, see ``right_inverse``) and stored as the flat
    ``theta`` in ``module.parametrizations[name].original``; ``module.<name>`` keeps its
    shape and dtype. Returns ``module``. Cost: one TT-SVD of the tensor.
    """
    from torch.nn.utils import parametrize

    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not hasattr(module, name):
        raise ValueError(f"name: module {type(module).__name__} has no tensor {name!r}")
    tensor = getattr(module, name)
    if not isinstance(tensor, Tensor):
        raise TypeError(f"name: module.{name} is not a tensor")
    if parametrize.is_parametrized(module, name):
        # torch feeds a stacked parametrization the previous one's output (the dense
        # tensor), but the chart maps flat coordinates: it can only come first
        raise ValueError(f"name: module.{name} is parametrized already; register STTP first "
                         f"(other parametrizations may be stacked on top of it)")
    P = STTPParametrization(tuple(tensor.shape), rank, shape, spectrum=spectrum, center=center,
                            tensorization=tensorization)
    parametrize.register_parametrization(module, name, P)
    return module
