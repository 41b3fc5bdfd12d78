"""Tangent vectors of the fixed-TT-rank manifold as structured TTs.

A tangent vector at ``X`` (left-orthogonal cores ``U_k``, right-orthogonal cores ``V_k``)
is ``xi = sum_k U_<k dU_k V_>k``; as a TT it has rank ``2r`` and block cores
``[dU_1, U_1]``, ``[[V_k, 0], [dU_k, U_k]]``, ``[[V_d], [dU_d]]``. :class:`TangentTT` keeps
the factors ``(U, V, dU)`` and builds the block cores only when an operation needs them:
inner products with another tangent TT of the same point (O(d n r^2)) or with any TT of
rank R (one projection sweep, O(d n r R (r + R))), norms, scalar multiples and entries
at sampled indices run at rank r; everything else on the rank-2r cores. All of it is
differentiable in the deltas. The mathematics: ``docs/autodiff.md``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import kernels
from .._checks import functorch_wrapped
from ..kernels import dense as compiled_dense
from ..kernels import memory
from ..kernels.memory import empty_for_output, packed_dot
from ..tt import TT, IndexSet
from ..tt.tensor_train import (fro_norm, mark_tangent_block_cores, per_point_scalars,
                                tangent_block_deltas)
from .retraction import block_cores
from .sweeps import batched_dot, project_small, project_tt, small_project_module

__all__ = ["TangentTT", "WRITTEN_CORES_MIN_BYTES"]

#: A CPU batch whose rank-2r middle block core holds at least this many bytes builds its
#: block cores by writing each block into one fresh output per core (no graph needed):
#: at d = 10, n = 20, 256 points, 52-73 -> 17-20 ms (r = 10, float64), 11 -> 10 ms (r = 4)
#: against the concatenations. Smaller batches keep the concatenations (fewer launches).
WRITTEN_CORES_MIN_BYTES = 1 << 20


class TangentTT(TT):
    """The rank-2r TT of a tangent vector ``sum_k U_<k dU_k V_>k``, kept as its factors.

    Built by :class:`~ttmanifold.FixedTTRank` (``unpack_tensor``, ``riemannian_grad``,
    ``tangent_to_tt``); it is a :class:`~ttmanifold.TT` (shape, ranks ``2r``, cores), and
    :func:`~ttmanifold.inner`, :meth:`norm` and scalar multiples use the structure (see
    the module docstring). ``gauged=True`` promises that the deltas satisfy the gauge
    conditions ``(U_k^L)^T dU_k^L = 0`` (k < d) in value, and that gradients with respect
    to them are used only after the gauge projection (as the manifold does); then inner
    products of two such TTs of one point reduce to the packed deltas. ``flat``, if
    given, is the deltas packed (``(*batch, size)``, the deltas its views); then
    ``deltas`` may be None (split from it on first use) and the block cores are built from
    it under Riemannian autodiff (one autograd node). ``canonical=True`` promises that
    ``V`` are the canonical right cores of ``U`` (``diag(L_k) >= 0``, as
    :func:`~.sweeps.right_cores` returns them): then :func:`~ttmanifold.inner` with a
    batch of TTs may project on the compiled small-rank kernel, which recomputes them.
    """

    __slots__ = ("_U", "_V", "_dl", "_flat", "_gauged", "_dense", "_canonical")

    def __init__(self, U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                 deltas: Optional[Sequence[torch.Tensor]], *, flat: Optional[torch.Tensor] = None,
                 gauged: bool = False, check: bool = True, canonical: bool = False):
        # the general-loss path never needs the deltas themselves: they are split lazily
        if len(U) < 2:
            raise ValueError("TangentTT needs d >= 2 cores")
        if deltas is None and flat is None:
            raise ValueError("TangentTT: expected the deltas or their packed form (flat)")
        self._U = U
        self._V = V
        self._dl = None if deltas is None else list(deltas)
        self._flat = flat
        if check:
            size = sum(u.shape[-3] * u.shape[-2] * u.shape[-1] for u in U)
            if flat is not None and (flat.dim() == 0 or flat.shape[-1] != size):
                raise ValueError(f"TangentTT: flat must have {size} entries per point (the "
                                 f"packed deltas), got shape {tuple(flat.shape)}")
            _check_factors(U, V, self._deltas)
        self._gauged = bool(gauged)
        self._canonical = bool(canonical)
        self._dense: Optional[List[torch.Tensor]] = None

    def __reduce__(self):  # copy / deepcopy / pickle (deltas stay views of the flat tensor)
        if self._flat is not None:
            return (_rebuild_tangent, (list(self._U), list(self._V), None, self._flat, self._gauged,
                                       self._canonical))
        return (_rebuild_tangent, (list(self._U), list(self._V), self._deltas, None, self._gauged,
                                   self._canonical))

    @property
    def _deltas(self) -> List[torch.Tensor]:
        if self._dl is None:
            self._dl = _split_flat(self._U, self._flat)
        return self._dl

    # the block cores, built on first use ----------------------------------------------
    @property
    def _cores(self) -> List[torch.Tensor]:  # type: ignore[override]
        if self._dense is None:
            with torch.enable_grad():  # cached: keep the graph even when first read under no_grad
                self._dense = self._block_cores()
        return self._dense

    def _block_cores(self) -> List[torch.Tensor]:
        U, V, flat = self._U, self._V, self._flat
        d = len(U)
        bs = self.batch_shape
        if (not bs and torch.is_grad_enabled() and self._deltas_require_grad()
                and not torch.compiler.is_compiling()
                and not any(c is not None and c.requires_grad for c in U + V)
                and not functorch_wrapped(self._deltas if flat is None else flat)):
            # Riemannian autodiff: gradients reach the packed deltas only, by one node
            if flat is None:
                flat = torch.cat([c.reshape(-1) for c in self._deltas])
            cores = list(_BlockCores.apply(flat, tuple(U), tuple(V)))
            # lets a Riemannian gradient's reverse pass skip the cores' other blocks
            mark_tangent_block_cores(cores, flat)
            return cores
        dU = self._deltas
        if bs:  # leading batch dimensions (broadcast between U, V and the deltas)
            U = [u.expand(bs + u.shape[-3:]) for u in U]
            V = [None] + [v.expand(bs + v.shape[-3:]) for v in V[1:]]
            dU = [c.expand(bs + c.shape[-3:]) for c in dU]
            # a CPU-kernel-path choice (with the kernels off: the torch path a GPU runs)
            if (U[1].device.type == "cpu" and kernels.enabled()
                    and not torch.compiler.is_compiling()
                    and 4 * U[1].numel() * U[1].element_size() >= WRITTEN_CORES_MIN_BYTES
                    and (torch.is_inference_mode_enabled()  # (no graph: _cores enables grad)
                         or not (torch.is_grad_enabled() and self.requires_grad))
                    and not functorch_wrapped(dU)):
                return _written_block_cores(U, V, dU)
            cores = [torch.cat([dU[0], U[0]], dim=-1)]
            for k in range(1, d - 1):
                a, n, _ = V[k].shape[-3:]
                top = torch.cat([V[k], U[k].new_zeros(bs + (a, n, U[k].shape[-1]))], dim=-1)
                cores.append(torch.cat([top, torch.cat([dU[k], U[k]], dim=-1)], dim=-3))
            cores.append(torch.cat([V[d - 1], dU[d - 1]], dim=-3))
            return cores
        return _plain_block_cores(U, V, dU)

    # metadata without building the cores ----------------------------------------------
    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(u.shape[-2]) for u in self._U)

    @property
    def ranks(self) -> Tuple[int, ...]:
        return (1,) + tuple(2 * int(u.shape[-1]) for u in self._U[:-1]) + (1,)

    @property
    def batch_shape(self) -> Tuple[int, ...]:
        """Leading batch dimensions: the broadcast of those of the point and the deltas."""
        u = self._U[0]
        cb = self._flat.shape[:-1] if self._dl is None else self._dl[0].shape[:-3]
        if u.dim() == 3 and not cb:
            return ()
        ub = u.shape[:-3]
        if ub == cb or not ub:  # the usual cases, without broadcast_shapes (~5 us a call)
            return tuple(cb)
        if not cb:
            return tuple(ub)
        return tuple(torch.broadcast_shapes(ub, cb))

    @property
    def ndim(self) -> int:
        return len(self._U)

    @property
    def dtype(self) -> torch.dtype:
        return self._U[0].dtype

    @property
    def device(self) -> torch.device:
        return self._U[0].device

    @property
    def requires_grad(self) -> bool:
        return self._deltas_require_grad() or any(u.requires_grad for u in self._U)

    def _deltas_require_grad(self) -> bool:
        if self._dl is None:
            return self._flat.requires_grad
        return any(c.requires_grad for c in self._dl)

    @property
    def point_cores(self) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """``(U, V)``: the point's left- and right-orthogonal cores (``V[0]`` None)."""
        return list(self._U), list(self._V)

    @property
    def deltas(self) -> List[torch.Tensor]:
        """The delta cores ``dU_k`` (shapes of the point's cores)."""
        return list(self._deltas)

    def __repr__(self) -> str:
        return "Tangent" + super().__repr__()

    # structure-aware operations -------------------------------------------------------
    def _same_gauged_point(self, other) -> bool:
        return (isinstance(other, TangentTT) and self._gauged and other._gauged
                and (other._U is self._U or all(a is b for a, b in zip(other._U, self._U))))

    def _delta_dot(self, other: "TangentTT") -> torch.Tensor:
        if self.batch_shape or other.batch_shape:  # one value per point
            if self._flat is not None and other._flat is not None:
                return _flat_dot(self._flat, other._flat)
            return sum((a * b).sum((-3, -2, -1)) for a, b in zip(self._deltas, other._deltas))
        if self._flat is not None and other._flat is not None:
            return torch.dot(self._flat, other._flat)
        return sum((a * b).sum() for a, b in zip(self._deltas, other._deltas))

    def structured_inner(self, other: TT) -> Optional[torch.Tensor]:
        if self._same_gauged_point(other):
            return self._delta_dot(other)
        if self.batch_shape or other.batch_shape:  # one value per point (batches broadcast)
            if self._flat is not None:
                return _flat_dot(self._flat, self._project_batch(other.cores))
            D = project_tt(self._U, self._V, other.cores)
            return sum((a * b).sum((-3, -2, -1)) for a, b in zip(self._deltas, D))
        if self._flat is not None:
            return torch.dot(self._flat, project_tt(self._U, self._V, other.cores, packed=True))
        D = project_tt(self._U, self._V, other.cores)
        return sum((a * b).sum() for a, b in zip(self._deltas, D))

    def _project_batch(self, Z: Sequence[torch.Tensor]) -> torch.Tensor:
        """``project_tt(U, V, Z, packed=True)`` for a batch: with canonical ``V`` on the
        compiled small-rank kernel where it takes the call (given ``V``, it skips its LQ
        sweep: at d = 10, n = 20, r = 4, 256 points, 2.5x faster than torch's batched
        products even with its own sweep), else on torch."""
        if self._canonical and self._U[0].device.type == "cpu" and self._U[0].dim() > 3:
            mod = small_project_module(self._U, Z, gauge=False)
            if mod is not None:  # (no gradient reaches U, V or Z: the dispatch checks)
                V = None if any(v is not None and v.requires_grad for v in self._V) else self._V
                return project_small(mod, self._U, Z, gauge=False, check="", V=V)
        return project_tt(self._U, self._V, Z, packed=True)

    def values_at(self, index_set: IndexSet) -> torch.Tensor:
        """Entries at the samples of ``index_set``. When only the deltas require grad
        (Riemannian autodiff of a completion loss) they are evaluated at rank r from the
        point's left and right sample vectors, and the backward is the scatter of one
        Riemannian CG iteration; otherwise on the rank-2r block cores. O(N d r^2)."""
        if self.batch_shape:
            raise ValueError("index_set: sampled entries of a batch of tangent TTs are not "
                             "supported; use gather(indices) for the same indices in every TT")
        if (torch.is_grad_enabled() and any(c.requires_grad for c in self._deltas)
                and self.device.type != "meta"
                and not any(functorch_wrapped(c) for c in self._deltas)
                and not any(c is not None and c.requires_grad for c in self._U + self._V)):
            index_set.check_cores(self._U, "tt")
            return _TangentGather.apply(index_set, self._U, self._V, *self._deltas)
        return index_set.gather_cores(self._cores)

    def norm(self) -> torch.Tensor:
        """Frobenius norm; for a gauged tangent TT, the norm of the deltas."""
        if not self._gauged:
            return super().norm()
        # scaled (fro_norm): vector_norm squares, inf beyond ~1e154 in float64 (~1e19 float32)
        if self.batch_shape:  # one norm per point
            if self._flat is not None:
                return fro_norm(self._flat, self._flat.dim() - 1)
            flat = torch.cat([c.flatten(-3) for c in self._deltas], -1)
            return fro_norm(flat, flat.dim() - 1)
        if self._flat is not None:
            return fro_norm(self._flat)
        return fro_norm(torch.cat([c.reshape(-1) for c in self._deltas]))

    def scaled(self, a) -> TT:
        """``a * self``, still structured (the deltas scaled); for a batch ``a`` may be a
        tensor of shape ``batch_shape`` (one scalar per point)."""
        bs = self.batch_shape
        ac = per_point_scalars(a, bs, self._U[0])  # checked (also for a single point)
        if bs:
            af = ac.flatten(-3) if isinstance(ac, torch.Tensor) and ac.dim() > 0 else ac
            if self._flat is not None:
                flat = self._flat * af
                sizes = [c.shape[-3] * c.shape[-2] * c.shape[-1] for c in self._deltas]
                deltas = [c.unflatten(-1, tuple(s.shape[-3:]))
                          for c, s in zip(torch.split(flat, sizes, -1), self._deltas)]
            else:
                flat, deltas = None, [c * ac for c in self._deltas]
            return TangentTT(self._U, self._V, deltas, flat=flat, gauged=self._gauged,
                             check=False, canonical=self._canonical)
        flat = None if self._flat is None else self._flat * a
        if flat is not None:
            sizes = [c.numel() for c in self._deltas]
            deltas = [c.view(s.shape) for c, s in zip(torch.split(flat, sizes), self._deltas)]
        else:
            deltas = [c * a for c in self._deltas]
        return TangentTT(self._U, self._V, deltas, flat=flat, gauged=self._gauged, check=False,
                         canonical=self._canonical)


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The per-point inner products of two packed batches (``batched_dot``); where
    :func:`~ttmanifold.kernels.memory.dot_in_slices` (large CPU batches) and not under
    functorch through :class:`_PackedDot` (no full-size temporary forward, each gradient
    written in one pass backward)."""
    if not memory.dot_in_slices(a, b) or functorch_wrapped(a) or functorch_wrapped(b):
        return batched_dot(a, b)
    return _PackedDot.apply(a, None if b is a else b)


class _PackedDot(torch.autograd.Function):
    """``(a * b).sum(-1)`` of two ``(B, n)`` CPU batches (``b`` None: ``a`` with itself).
    Forward: :func:`~ttmanifold.kernels.memory.packed_dot` (products in cache-sized
    slices). Backward: ``g * b`` (``2 g * a`` for ``a`` with itself) written once into
    a fresh output (huge pages: :func:`~ttmanifold.kernels.memory.empty_for_output`),
    where autograd's ``MulBackward`` wrote ``g * b`` and ``g * a`` and added them;
    under ``create_graph`` with differentiable products."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return packed_dot(a, a if b is None else b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        gl = g.unsqueeze(-1)
        # differentiable products under create_graph or for batched g (vectorized
        # jacobians), otherwise written into fresh outputs
        plain = torch.is_grad_enabled() or functorch_wrapped(g)

        def times(x, s):
            if plain or not memory.big_cpu_output(x):  # (small, off the CPU or kernels off)
                return s * x
            return torch.mul(x, s, out=empty_for_output(x.shape, x.dtype, x.device))

        if b is None:  # <a, a>: d/da = 2 g a (as the two products added: 2 (g a) exactly)
            return times(a, gl * 2), None
        return (times(b, gl) if ctx.needs_input_grad[0] else None,
                times(a, gl) if ctx.needs_input_grad[1] else None)


def _rebuild_tangent(U, V, deltas, flat, gauged, canonical=False):
    return TangentTT(U, V, deltas, flat=flat, gauged=gauged, check=False, canonical=canonical)


def _split_flat(U, flat: torch.Tensor) -> List[torch.Tensor]:
    """The delta cores (views) of the packed deltas ``flat`` (``(*batch, size)``)."""
    sizes = [u.shape[-3] * u.shape[-2] * u.shape[-1] for u in U]
    if flat.dim() == 1:
        return [c.view(u.shape[-3:]) for c, u in zip(torch.split(flat, sizes), U)]
    return [c.unflatten(-1, tuple(u.shape[-3:])) for c, u in zip(torch.split(flat, sizes, -1), U)]


def _check_factors(U, V, deltas) -> None:
    """U: TT cores (left-orthogonal for the meaning), V: cores of the same shapes from
    index 1 on (V[0] unused, may be None), deltas: cores of U's shapes; one dtype/device."""
    d = len(U)
    if len(V) != d or len(deltas) != d:
        raise ValueError(f"TangentTT: expected {d} cores in U, V and deltas, got "
                         f"{len(U)}, {len(V)} and {len(deltas)}")
    ref = U[0]
    for name, cores, first in (("U", U, 0), ("V", V, 1), ("deltas", deltas, 0)):
        for k in range(first, d):
            c = cores[k]
            if not isinstance(c, torch.Tensor) or c.dim() < 3:
                raise ValueError(f"TangentTT: {name}[{k}] must be a 3-D tensor (or a batch of "
                                 f"them, (*batch, r, n, r'))")
            if tuple(c.shape[-3:]) != tuple(U[k].shape[-3:]):
                raise ValueError(f"TangentTT: {name}[{k}] has shape {tuple(c.shape)}, "
                                 f"expected U[{k}]'s {tuple(U[k].shape)}")
            try:
                torch.broadcast_shapes(c.shape[:-3], U[0].shape[:-3])
            except RuntimeError:
                raise ValueError(f"TangentTT: {name}[{k}]'s batch shape {tuple(c.shape[:-3])} "
                                 f"does not broadcast with U's {tuple(U[0].shape[:-3])}") from None
            if c.dtype != ref.dtype or c.device != ref.device:
                raise TypeError(f"TangentTT: {name}[{k}] is {c.dtype} on {c.device}, "
                                f"expected {ref.dtype} on {ref.device}")
    if U[0].shape[-3] != 1 or U[-1].shape[-1] != 1 or any(
            U[k].shape[-1] != U[k + 1].shape[-3] for k in range(d - 1)):
        raise ValueError("TangentTT: U's ranks must chain with r_0 = r_d = 1")


class _TangentGather(torch.autograd.Function):
    """Entries of the tangent TT ``sum_k U_<k dU_k V_>k`` at the samples, as a function
    of the deltas (``U``, ``V`` constant), at rank r: ``sum_k l_k(e) dU_k[:, i_k(e), :]
    rho_{k+1}(e)`` with the left vectors of ``U`` and the right vectors of ``V``.

    Forward: one sampled point (left and right sweeps) and its tangent evaluation;
    backward: its scatter, i.e. the kernels of one Riemannian CG iteration. The map is
    linear in the deltas, so a backward with ``create_graph=True`` (Hessian-vector
    products) only needs to be differentiable in the incoming gradient: then (and for
    batched functorch gradients) the per-mode kernels are differentiated."""

    @staticmethod
    def forward(ctx, iset, U, V, *dU):
        point = iset.sampled_point(list(U), list(V))
        ctx.iset, ctx.U, ctx.V = iset, list(U), list(V)
        ctx.point = point  # (its buffers go back to the pool when the graph is freed)
        return point.to_samples(point.tangent(dU))

    @staticmethod
    def backward(ctx, g):
        create = torch.is_grad_enabled()
        if create or functorch_wrapped(g):  # differentiable in g / batched g
            iset, U, V = ctx.iset, ctx.U, ctx.V
            with torch.no_grad():
                left = iset.left_vectors(U)
                rights = iset.right_vectors([U[0]] + V[1:], downto=1)
            with torch.enable_grad():
                dU = [u.new_zeros(u.shape).requires_grad_() for u in U]
                e = sum((iset.left_step(k, left[k], dU[k]) * rights[k + 1]).sum(1)
                        for k in range(len(U)))
                D = torch.autograd.grad(e, dU, g, create_graph=create)
        else:
            point = ctx.point
            D = point.project(point.from_samples(g.contiguous()))
        return (None, None, None, *D)


def _written_block_cores(U, V, dU) -> List[torch.Tensor]:
    """The batched block cores, each block written into its core's one fresh output (huge
    pages when large): a large CPU batch without a graph (the transport's). The
    concatenations wrote each middle core's data twice more (the top and bottom halves,
    and the zero block) into fresh temporaries."""
    d = len(U)
    cores = []
    for k in range(d):
        a, n, c = U[k].shape[-3:]
        rows, cols = (2 * a if k > 0 else a), (2 * c if k < d - 1 else c)
        out = empty_for_output(U[k].shape[:-3] + (rows, n, cols), U[k].dtype, U[k].device)
        if k == 0:
            out[..., :c].copy_(dU[0])
            out[..., c:].copy_(U[0])
        elif k == d - 1:
            out[..., :a, :, :].copy_(V[k])
            out[..., a:, :, :].copy_(dU[k])
        else:
            out[..., :a, :, :c].copy_(V[k])
            out[..., :a, :, c:].zero_()
            out[..., a:, :, :c].copy_(dU[k])
            out[..., a:, :, c:].copy_(U[k])
        cores.append(out)
    return cores


def _plain_block_cores(U, V, dU) -> List[torch.Tensor]:
    """``[dU_1, U_1]``, ``[[V_k, 0], [dU_k, U_k]]``, ``[[V_d], [dU_d]]`` (single TTs)."""
    d = len(U)
    cores = [torch.cat([dU[0], U[0]], dim=2)]
    for k in range(1, d - 1):  # built without in-place writes
        a, n, _ = V[k].shape
        top = torch.cat([V[k], U[k].new_zeros(a, n, U[k].shape[2])], dim=2)
        cores.append(torch.cat([top, torch.cat([dU[k], U[k]], dim=2)], dim=0))
    cores.append(torch.cat([V[d - 1], dU[d - 1]], dim=0))
    return cores


class _BlockCores(torch.autograd.Function):
    """The block cores of a single tangent TT as a function of its packed deltas ``flat``
    alone (``U``, ``V`` constants, passed as tuples): one autograd node from the flat
    deltas (no split or view nodes), built by :func:`_tangent_block_cores`; the backward
    reads each delta's gradient off its block of the core's gradient into the flat
    gradient (:func:`_tangent_block_cores_backward`). Linear in the deltas, so the
    backward is differentiable as written (second derivatives: then slices and one
    concatenation)."""

    @staticmethod
    def forward(ctx, flat, U, V):
        # no zero gradients made up for cores nobody differentiated (a Riemannian
        # gradient's sweep hands the deltas their gradient directly: then none has one)
        ctx.set_materialize_grads(False)
        out = tuple(_tangent_block_cores(U, V, flat))
        ctx.shapes = [c.shape for c in out]
        return out

    @staticmethod
    def backward(ctx, *gs):
        if all(g is None for g in gs):
            return None, None, None
        if any(g is None for g in gs):
            ref = next(g for g in gs if g is not None)
            gs = [ref.new_zeros(sh) if g is None else g for g, sh in zip(gs, ctx.shapes)]
        if torch.is_grad_enabled():  # create_graph: differentiable slices and one cat
            return tangent_block_deltas(gs), None, None
        return _tangent_block_cores_backward(list(gs)), None, None


@kernels.dispatch("dense", compiled=compiled_dense.tangent_block_cores)
def _tangent_block_cores(U: Sequence[torch.Tensor], V: Sequence[Optional[torch.Tensor]],
                         flat: torch.Tensor) -> List[torch.Tensor]:
    """The block cores ``[dU_1, U_1]``, ``[[V_k, 0], [dU_k, U_k]]``, ``[[V_d], [dU_d]]`` of a
    single tangent TT with the deltas packed in ``flat`` (``d >= 2``): the transport's
    per-run build (:func:`~.retraction.block_cores`, a fixed number of operations per run
    of equal core shapes); compiled on the CPU (one call)."""
    return block_cores(U, V, [_split_flat(U, flat)])[0]


@kernels.dispatch("dense", compiled=compiled_dense.tangent_block_cores_backward)
def _tangent_block_cores_backward(gs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The packed gradient of the deltas from the gradients ``gs`` of the block cores of
    :func:`_tangent_block_cores` (each delta's block: the bottom rows, left columns;
    :func:`~ttmanifold.tt.tensor_train.tangent_block_deltas`), compiled on the CPU."""
    return tangent_block_deltas(gs)
