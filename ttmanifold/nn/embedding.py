"""The embedding family: a lookup table ``(num_embeddings, embedding_dim)`` with an STTP or
SVDP weight; rows are ``d_out``, as in the reference."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FactorizedLayer
from .planner import group_matrix

__all__ = ["FactorizedEmbedding", "STTPEmbedding", "SVDPEmbedding"]


class FactorizedEmbedding(FactorizedLayer):
    """``nn.Embedding`` with a factorized table. Arguments as :class:`torch.nn.Embedding`
    (``max_norm`` is not supported: torch renormalizes the table in place, which a
    generated weight cannot take) plus those of :class:`~ttmanifold.nn.STTPLinear`.

    ``padding_idx``: that row of the table is a fixed buffer (``padding_row``), zeros for a
    new layer and the dense row for :meth:`from_dense`, and gets no gradient, as in torch.

    Forward: with ``contraction="tt"``/``"auto"`` and no ``padding_idx`` /
    ``scale_grad_by_freq`` (they change the table's gradient), the rows of the
    output-side factor ``A`` (``num_embeddings x R_c``) are gathered and multiplied by the
    input-side factor ``B`` (``R_c x embedding_dim``): cost ``N R_c dim`` plus the merges,
    never forming the table; otherwise :func:`torch.nn.functional.embedding` with
    :attr:`weight`.
    """

    has_bias_arg = False

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, max_norm=None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False, *, rank: int,
                 spectrum: str = "learned", out_modes: Optional[Sequence[int]] = None,
                 in_modes: Optional[Sequence[int]] = None, order: Optional[str] = None,
                 tensorization="reference", param: str = "chart",
                 init: str = "orthogonal", contraction: str = "auto", device=None, dtype=None):
        super().__init__()
        for v, nm in ((num_embeddings, "num_embeddings"), (embedding_dim, "embedding_dim")):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{nm}: expected a positive int, got {v!r}")
        if max_norm is not None:
            raise ValueError("max_norm: not supported for a factorized table (torch "
                             "renormalizes the weight in place)")
        if sparse:
            raise ValueError("sparse: sparse gradients do not apply to a factorized table")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if padding_idx is not None:
            if not isinstance(padding_idx, numbers.Integral) or isinstance(padding_idx, bool):
                raise TypeError(f"padding_idx: expected an int or None, got {padding_idx!r}")
            padding_idx = int(padding_idx)
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(f"padding_idx: must be within num_embeddings, got "
                                 f"{padding_idx}")
            padding_idx = padding_idx % self.num_embeddings
        self.padding_idx = padding_idx
        self.max_norm, self.norm_type = None, norm_type
        self.scale_grad_by_freq, self.sparse = bool(scale_grad_by_freq), False
        self.register_parameter("bias", None)
        self._init_weight(self.num_embeddings, self.embedding_dim, (), rank=rank,
                          spectrum=spectrum, param=param, init=init, out_modes=out_modes,
                          in_modes=in_modes, order=order, tensorization=tensorization,
                          contraction=contraction, device=device, dtype=dtype)
        if padding_idx is not None:
            # torch's fixed pad: zeros for a new table, the dense row for from_dense; the
            # generated row would be nonzero and drift with the shared cores
            like = self._cores()[0]
            self.register_buffer("padding_row", torch.zeros(
                self.embedding_dim, dtype=like.dtype, device=like.device))

    def _weight_shape(self):
        return (self.num_embeddings, self.embedding_dim)

    def _matrix_from_cores(self, cores) -> Tensor:
        W = super()._matrix_from_cores(cores)
        if self.padding_idx is None:
            return W
        row = torch.full((1,), self.padding_idx, dtype=torch.long, device=W.device)
        return W.index_copy(0, row, self.padding_row.to(W.dtype).unsqueeze(0))

    def load_weight(self, W: Tensor) -> None:
        """As :meth:`FactorizedLayer.load_weight`; with ``padding_idx`` the pad row is kept
        as given (a fixed row, as in torch)."""
        super().load_weight(W)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.padding_row.copy_(W[self.padding_idx])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "padding_row"
        if self.padding_idx is not None and key not in state_dict:
            # a checkpoint from before the fixed pad row: torch's zero pad
            state_dict[key] = torch.zeros_like(self.padding_row)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _plan_for_input(self, shape, ranks):
        return self._plan(ranks, 1, "dense"), 1

    def forward(self, idx: Tensor) -> Tensor:
        """``idx``: integer tensor of any shape -> ``(*idx.shape, embedding_dim)``; equals
        ``F.embedding(idx, self.weight, padding_idx, ...)`` to rounding."""
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input: expected an int64/int32 tensor of indices, got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)}")
        cores = self._cores()
        self._check_input_device(idx, cores[0])
        plain = self.padding_idx is None and not self.scale_grad_by_freq
        if self.contraction == "dense" or not plain:
            W = self._matrix_from_cores(cores)
            return F.embedding(idx, W, self.padding_idx, None, self.norm_type,
                               self.scale_grad_by_freq, False)
        d, c = len(cores), self.center
        split = self._plan(self._ranks_of(cores), 1, "dense").split
        A = group_matrix(cores, self.tensor_shape, c, 0, c, split)  # (num_embeddings, R_c)
        B = group_matrix(cores, self.tensor_shape, c, c, d, split, natural=self.natural)
        return F.embedding(idx, A) @ B

    def decompress(self) -> nn.Embedding:
        """A plain :class:`torch.nn.Embedding` with the current table."""
        W = self.weight.detach()
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                           None, self.norm_type, self.scale_grad_by_freq, False,
                           device=W.device, dtype=W.dtype)
        with torch.no_grad():
            emb.weight.copy_(W)
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, " + self._param_repr()

    @classmethod
    def _config_of(cls, layer) -> dict:
        if not isinstance(layer, nn.Embedding):
            raise TypeError(f"layer_or_weight: expected an nn.Embedding, got "
                            f"{type(layer).__name__}")
        return dict(num_embeddings=layer.num_embeddings, embedding_dim=layer.embedding_dim,
                    padding_idx=layer.padding_idx, max_norm=layer.max_norm,
                    norm_type=layer.norm_type, scale_grad_by_freq=layer.scale_grad_by_freq,
                    sparse=layer.sparse)

    @classmethod
    def _config_of_weight(cls, W: Tensor) -> dict:
        if W.dim() != 2:
            raise ValueError(f"weight: expected shape (num_embeddings, embedding_dim), got "
                             f"{tuple(W.shape)}")
        return dict(num_embeddings=W.shape[0], embedding_dim=W.shape[1])


class STTPEmbedding(FactorizedEmbedding):
    """``nn.Embedding`` with an STTP table."""

    method = "sttp"


class SVDPEmbedding(FactorizedEmbedding):
    """``nn.Embedding`` with an SVDP table."""

    method = "svdp"
