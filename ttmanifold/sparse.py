"""Sampled entries of tensor trains: the kernels of tensor completion.

:class:`IndexSet` holds ``N`` multi-indices of a tensor of shape ``(n_1, ..., n_d)`` and
precomputes, once, a per-mode grouping of the samples by their k-th index. With it

- the values of a TT at the samples (:meth:`IndexSet.gather`),
- the left row vectors ``l_k = G_1[i_1] ... G_k[i_k]`` and right column vectors
  ``rho_k = G_k[i_k] ... G_d[i_d]`` (:meth:`IndexSet.left_vectors`,
  :meth:`IndexSet.right_vectors`),
- and the scatter ``D_k[:, i, :] = sum_{samples with i_k = i} z l_{k-1}^T rho_{k+1}^T``
  (:meth:`IndexSet.scatter`), the kernel of the Riemannian projection of a sparse tensor
  (Steinlechner 2016),

all cost O(N d r^2) flops and run as batched matrix products (``torch.bmm``) over the
``n_k`` groups, with the samples of each group padded to the largest group size. When the
groups are very unbalanced (padding would more than quadruple the work) a mode falls back to
per-sample batched products, processed in chunks to bound memory.

Building an :class:`IndexSet` sorts the indices once per mode (O(N d log N)) and reads the
largest group size on the host; reuse it across iterations.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ._checks import check_shape

__all__ = ["IndexSet"]

_CHUNK = 1 << 16


class _ModePlan:
    __slots__ = ("n", "maxc", "pad_map", "slot_of", "idx", "padded")

    def __init__(self, idx: torch.Tensor, n: int):
        N = idx.shape[0]
        self.n = n
        self.idx = idx
        counts = torch.bincount(idx, minlength=n)
        maxc = int(counts.max()) if N > 0 else 0  # host read, once per IndexSet
        self.maxc = maxc
        self.padded = N > 0 and n * maxc <= 4 * N + 4 * n
        if not self.padded:
            self.pad_map = None
            self.slot_of = None
            return
        order = torch.argsort(idx, stable=True)
        sorted_idx = idx[order]
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(N, device=idx.device) - offsets[sorted_idx]
        slot = sorted_idx * maxc + pos
        pad_map = torch.full((n * maxc,), N, dtype=torch.long, device=idx.device)
        pad_map[slot] = order
        slot_of = torch.empty(N, dtype=torch.long, device=idx.device)
        slot_of[order] = slot
        self.pad_map = pad_map  # slot -> sample (N = padding)
        self.slot_of = slot_of  # sample -> slot

    def pad(self, a: torch.Tensor) -> torch.Tensor:
        """(N, m) per-sample rows -> (n, maxc, m) grouped, zero padded."""
        ext = torch.cat([a, a.new_zeros(1, a.shape[1])], 0)
        return ext.index_select(0, self.pad_map).view(self.n, self.maxc, a.shape[1])

    def unpad(self, a: torch.Tensor) -> torch.Tensor:
        """(n, maxc, m) grouped -> (N, m) per sample."""
        return a.reshape(-1, a.shape[-1]).index_select(0, self.slot_of)


class IndexSet:
    """``N`` multi-indices into a tensor of shape ``shape``, grouped per mode.

    Parameters
    ----------
    indices : LongTensor of shape ``(N, d)``
        The multi-indices (duplicates allowed; they are summed in :meth:`scatter`).
    shape : sequence of ints
        The tensor's mode sizes.
    """

    def __init__(self, indices: torch.Tensor, shape: Sequence[int], *, check: bool = True):
        shape = check_shape(shape)
        if not check:  # trusted caller (already validated)
            self.indices, self.shape = indices.long(), shape
            self._plans = [None] * len(shape)
            return
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices: expected a LongTensor of shape (N, {len(shape)})")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"indices: expected an integer tensor, got dtype {indices.dtype}")
        if indices.dim() != 2 or indices.shape[1] != len(shape):
            raise ValueError(
                f"indices: expected shape (N, {len(shape)}) for a tensor of order "
                f"{len(shape)}, got {tuple(indices.shape)}"
            )
        indices = indices.long()
        if indices.device.type != "meta" and indices.numel() > 0:
            bound = torch.tensor(shape, device=indices.device)
            if bool(((indices < 0) | (indices >= bound)).any()):
                raise ValueError(f"indices: out of range for shape {shape}")
        self.indices = indices
        self.shape = shape
        self._plans: List[Optional[_ModePlan]] = [None] * len(shape)

    @classmethod
    def from_sparse(cls, z: torch.Tensor) -> "IndexSet":
        """The index set of a ``torch.sparse_coo_tensor`` (coalesced or not)."""
        return cls(z._indices().t(), tuple(z.shape))

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def plan(self, k: int) -> _ModePlan:
        if self._plans[k] is None:
            self._plans[k] = _ModePlan(self.indices[:, k], self.shape[k])
        return self._plans[k]

    def _check_cores(self, cores: Sequence[torch.Tensor]) -> None:
        if len(cores) != len(self.shape) or any(
            int(c.shape[1]) != n for c, n in zip(cores, self.shape)
        ):
            raise ValueError(
                f"tt: shape {tuple(int(c.shape[1]) for c in cores)} does not match the "
                f"index set's shape {self.shape}"
            )
        if cores[0].device != self.device:
            raise ValueError(f"tt: on device {cores[0].device}, indices on {self.device}")

    # -- grouped kernels ----------------------------------------------------------------
    def _left_step(self, k: int, a: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """a (N, r_{k-1}) -> a_e @ core[:, i_k(e), :]  (N, r_k)."""
        p = self.plan(k)
        if p.padded:
            out = torch.bmm(p.pad(a), core.permute(1, 0, 2))
            return p.unpad(out)
        return _chunked(a, core.permute(1, 0, 2), p.idx, left=True)

    def _right_step(self, k: int, b: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """b (N, r_k) -> core[:, i_k(e), :] @ b_e  (N, r_{k-1})."""
        p = self.plan(k)
        if p.padded:
            out = torch.bmm(p.pad(b), core.permute(1, 2, 0))
            return p.unpad(out)
        return _chunked(b, core.permute(1, 2, 0), p.idx, left=True)

    def left_vectors(self, cores: Sequence[torch.Tensor], upto: Optional[int] = None):
        """``[l_0, l_1, ..., l_upto]``, ``l_k`` of shape ``(N, r_k)``, ``l_0 = 1``."""
        self._check_cores(cores)
        d = len(cores)
        upto = d - 1 if upto is None else upto
        N = len(self)
        out = [cores[0].new_ones(N, 1)]
        for k in range(upto):
            out.append(self._left_step(k, out[-1], cores[k]))
        return out

    def right_vectors(self, cores: Sequence[torch.Tensor], downto: int = 1):
        """``{k: rho_k}`` for ``k = downto..d`` (0-based core k, ``rho_d = 1``).

        ``rho_k`` has shape ``(N, r_{k})`` in the 0-based convention: the product of cores
        ``k..d-1`` applied to the sample's indices, i.e. the column ``G_k[i_k]...G_{d-1}[i_{d-1}]``
        (of length ``r_k`` where ``r_k`` is the rank left of core ``k``).
        """
        self._check_cores(cores)
        d = len(cores)
        N = len(self)
        out = {d: cores[-1].new_ones(N, 1)}
        for k in range(d - 1, downto - 1, -1):
            out[k] = self._right_step(k, out[k + 1], cores[k])
        return out

    def gather(self, tt) -> torch.Tensor:
        """The ``N`` entries of a TT (or list of cores) at the samples. O(N d r^2)."""
        cores = tt.cores if hasattr(tt, "cores") else list(tt)
        self._check_cores(cores)
        a = cores[0].new_ones(len(self), 1)
        for k in range(len(cores)):
            a = self._left_step(k, a, cores[k])
        return a[:, 0]

    def scatter(self, k: int, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``D[:, i, :] = sum_{e: i_k(e) = i} left_e^T right_e`` of shape ``(a, n_k, b)``.

        ``left``: (N, a), ``right``: (N, b). O(N a b).
        """
        p = self.plan(k)
        if p.padded:
            lp, rp = p.pad(left), p.pad(right)
            out = torch.bmm(lp.transpose(1, 2), rp)  # (n, a, b)
            return out.permute(1, 0, 2)
        n = self.shape[k]
        out = left.new_zeros(n, left.shape[1] * right.shape[1])
        for s in range(0, len(self), _CHUNK):
            l, r = left[s:s + _CHUNK], right[s:s + _CHUNK]
            outer = (l.unsqueeze(2) * r.unsqueeze(1)).reshape(l.shape[0], -1)
            out.index_add_(0, p.idx[s:s + _CHUNK], outer)
        return out.view(n, left.shape[1], right.shape[1]).permute(1, 0, 2)


def _chunked(a: torch.Tensor, mats: torch.Tensor, idx: torch.Tensor, left: bool) -> torch.Tensor:
    """Per-sample ``a_e @ mats[idx_e]`` in chunks (fallback for unbalanced groups)."""
    outs = []
    for s in range(0, a.shape[0], _CHUNK):
        m = mats.index_select(0, idx[s:s + _CHUNK])
        outs.append(torch.bmm(a[s:s + _CHUNK].unsqueeze(1), m).squeeze(1))
    if not outs:
        return a.new_zeros(0, mats.shape[2])
    return torch.cat(outs, 0)
