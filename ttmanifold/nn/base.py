"""The common base of the factorized layers: a weight parameterization, a plan cache, the
dense weight on demand, conversions. Each layer family (``linear``, ``conv``,
``embedding``) adds its one ``forward``; ``docs/sttp.md`` explains the conventions.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_finite, check_float_dtype
from ..tt import TT
from .chart import d_optimal_penalty
from .parametrization import STTPWeight, SVDPWeight
from .planner import Plan, group_matrix, make_plan
from .tensorization import Tensorization

__all__ = ["CONTRACTIONS", "METHODS", "FactorizedLayer", "plan_batch"]


#: The batch size the contraction planner assumes under ``torch.compile`` (see
#: :func:`plan_batch`).
COMPILED_PLAN_BATCH = 1024


def plan_batch(batch) -> int:
    """The batch size as the contraction planner takes it: ``batch``, or under
    ``torch.compile`` tracing :data:`COMPILED_PLAN_BATCH`. Planning on the traced batch
    size would make the graph depend on it (hashing or comparing a dynamic size specializes
    it): a recompilation for every new batch size, until torch stops compiling after 8. A
    compiled layer runs one plan, the plan for a large batch, whatever the batch."""
    if torch.compiler.is_compiling():
        return COMPILED_PLAN_BATCH
    return batch

CONTRACTIONS = ("auto", "dense", "tt")
METHODS = ("sttp", "svdp")

# attributes of the weight parameterization readable on the layer itself
_DELEGATED = frozenset({
    "theta", "point", "chart", "manifold", "ranks", "rank", "spectrum", "init", "param",
    "center", "tensor_shape", "tensorization", "u_params", "s", "v_params",
})


class FactorizedLayer(nn.Module):
    """Shared machinery of every STTP/SVDP layer.

    The weight matrix ``W`` (``d_out x d_in``) is described by ``weight_param``
    (:class:`~ttmanifold.nn.STTPWeight` or :class:`~ttmanifold.nn.SVDPWeight`), whose
    parameters (``theta`` or ``point``; ``u_params``, ``s``, ``v_params``) are the layer's
    own; its other attributes (``chart``, ``ranks``, ``spectrum``, ...) are readable on the
    layer. Subclasses set :attr:`method` and implement
    ``forward``, ``_weight_shape`` and ``decompress``.
    """

    method = "sttp"
    #: whether the torch counterpart has a ``bias`` argument
    has_bias_arg = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            wp = self.__dict__.get("weight_param")
            if wp is not None and name in _DELEGATED:
                return getattr(wp, name)
            if wp is not None and name in ("out_modes", "in_modes"):
                return getattr(wp.tensorization, name)
            raise

    def _replicate_for_data_parallel(self):
        # nn.DataParallel's replica gets its own (broadcast) parameters, but a shared
        # weight_param would keep reading the original module's: give it its own view
        replica = super()._replicate_for_data_parallel()
        wp = copy.copy(self.weight_param)
        wp.owner = replica
        replica.__dict__["weight_param"] = wp
        return replica

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.weight_param.after_load()

    # -- construction ----------------------------------------------------------------------
    def _init_weight(self, d_out: int, in_channels: int, kernel: Tuple[int, ...], *, rank,
                     spectrum, param, init, out_modes, in_modes, order, tensorization,
                     contraction, device, dtype) -> None:
        self.d_out, self.d_in = int(d_out), int(in_channels) * math.prod(kernel)
        if self.method == "sttp":
            if isinstance(tensorization, Tensorization):
                if (tensorization.d_out, tensorization.d_in) != (self.d_out, self.d_in) or \
                        out_modes is not None or in_modes is not None or order is not None:
                    raise ValueError(f"tensorization: {tensorization} does not describe a "
                                     f"{self.d_out} x {self.d_in} weight (or modes/order were "
                                     f"given as well)")
                t = tensorization
            else:
                t = Tensorization.default(d_out, in_channels, kernel, scheme=tensorization,
                                          out_modes=out_modes, in_modes=in_modes, order=order)
            self.weight_param = STTPWeight(self, t, rank, spectrum, param, init,
                                           device=device, dtype=dtype)
        else:
            if out_modes is not None or in_modes is not None or order is not None:
                raise ValueError("out_modes/in_modes/order: SVDP layers have no tensorization "
                                 "(their factors are the d_out x d_in frames)")
            if param != "chart":
                raise ValueError(f"param: SVDP layers have only the chart mode, got {param!r}")
            self.weight_param = SVDPWeight(self, self.d_out, self.d_in, rank, spectrum, init,
                                           device=device, dtype=dtype)
        self.contraction = contraction
        self._plans: Dict[tuple, Plan] = {}
        self._reset_bias()

    def _make_bias(self, bias: bool, n: int, device, dtype) -> None:
        # the bias comes first: check the dtype before torch refuses an integer Parameter
        check_float_dtype(dtype or torch.get_default_dtype(), "dtype")
        if bias:
            self.bias = nn.Parameter(torch.empty(n, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def contraction(self) -> str:
        """``"auto"`` (cheapest estimated plan), ``"dense"`` or ``"tt"`` (never forms W)."""
        return self._contraction

    @contraction.setter
    def contraction(self, value: str) -> None:
        if value not in CONTRACTIONS:
            raise ValueError(f"contraction: expected one of {CONTRACTIONS}, got {value!r}")
        self._contraction = value

    @property
    def natural(self) -> bool:
        """Whether the train holds the input digits slowest first (natural order)."""
        return self.weight_param.tensorization.order == "natural"

    # -- weight ----------------------------------------------------------------------------
    def _cores(self) -> List[Tensor]:
        pinned = self.__dict__.get("_pinned_cores")
        return list(pinned) if pinned is not None else self.weight_param.cores()

    def pin_cores(self, cores: List[Tensor]) -> None:
        """Use ``cores`` (the cores of this layer's weight, e.g. from
        :func:`ttmanifold.nn.batched_cores`) in every forward until :meth:`unpin_cores`."""
        shapes = [tuple(int(v) for v in g.shape) for g in cores]
        want = [(self.ranks[k], n, self.ranks[k + 1]) for k, n in enumerate(self.tensor_shape)]
        if shapes != want:
            raise ValueError(f"cores: expected shapes {want}, got {shapes}")
        self.__dict__["_pinned_cores"] = list(cores)

    def unpin_cores(self) -> None:
        """Back to evaluating the cores from the parameters in each forward."""
        self.__dict__.pop("_pinned_cores", None)

    def _plan(self, ranks, batch: int, mode: str, conv=None) -> Plan:
        batch = plan_batch(batch)
        key = (tuple(ranks), batch, mode, conv)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            plan = make_plan(self.tensor_shape, ranks, self.center, batch, mode, conv)
            self._plans[key] = plan
        return plan

    @staticmethod
    def _ranks_of(cores) -> Tuple[int, ...]:
        return (1,) + tuple(int(g.shape[2]) for g in cores)

    def _matrix_from_cores(self, cores) -> Tensor:
        d = len(cores)
        plan = self._plan(self._ranks_of(cores), 1, "dense")
        return group_matrix(cores, self.tensor_shape, self.center, 0, d, plan.split,
                            natural=self.natural)

    def weight_matrix(self) -> Tensor:
        """The dense ``d_out x d_in`` matrix (differentiable). Cost: the optimal
        matrix-chain merge of the cores, about ``d_out d_in r``."""
        return self._matrix_from_cores(self._cores())

    @property
    def weight(self) -> Tensor:
        """Dense weight in torch's shape for this layer type, built from the cores on each
        access (differentiable)."""
        return self._matrix_to_weight(self.weight_matrix())

    def _matrix_to_weight(self, Wm: Tensor) -> Tensor:
        return Wm.reshape(self._weight_shape())

    def _weight_to_matrix(self, W: Tensor) -> Tensor:
        return W.reshape(W.shape[0], -1)

    def tt(self) -> TT:
        """The TT of the tensorized weight (train modes ``tensor_shape``)."""
        return TT(self.weight_param.value_cores(), check=False)

    def num_weight_params(self) -> int:
        """Entries stored for the weight (bias excluded)."""
        return self.weight_param.num_params()

    def singular_values(self) -> Tensor:
        """The (signed, for the chart) spectrum of ``W``; see the parameterization."""
        return self.weight_param.singular_values()

    def spectral_penalty(self) -> Tensor:
        """``-sum log|s_i|`` of :meth:`singular_values` (:func:`d_optimal_penalty`); the
        paper's normalized, averaged form over a model is
        :func:`ttmanifold.nn.spectral_penalty`."""
        return d_optimal_penalty(self.singular_values())

    def to_manifold(self):
        """Switch to manifold mode in place (STTP only). Returns ``self``; re-create the
        optimizer afterwards."""
        self.weight_param.to_manifold()
        self._plans.clear()
        return self

    def to_chart(self):
        """Switch to chart mode in place. Returns ``self``."""
        self.weight_param.to_chart()
        self._plans.clear()
        return self

    def reset_parameters(self) -> None:
        """Re-initialize the weight (its ``init``) and the bias like torch
        (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``). A no-op for the values on ``meta``."""
        self.weight_param.reset_parameters()
        self._reset_bias()

    def _reset_bias(self) -> None:
        b = getattr(self, "bias", None)
        if b is not None and b.device.type != "meta":
            bound = 1.0 / math.sqrt(self.d_in)
            with torch.no_grad():
                b.uniform_(-bound, bound)

    def _check_input_tensor(self, x: Tensor, ref: Tensor) -> None:
        """``TypeError``/``ValueError`` unless ``x`` is a tensor of ``ref``'s dtype and
        device (the layer's). Without the device check an input on another device failed
        inside torch, or, meta against cpu, silently gave an output on the layer's device."""
        if not isinstance(x, Tensor):
            raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype != ref.dtype:
            raise TypeError(f"input: dtype {x.dtype} differs from the layer's {ref.dtype}")
        self._check_input_device(x, ref)

    def _check_input_device(self, x: Tensor, ref: Tensor) -> None:
        if x.device != ref.device:
            raise ValueError(f"input: on device {x.device}, the layer's parameters on "
                             f"{ref.device}")

    def _param_repr(self) -> str:
        return self.weight_param.extra_repr()

    def plan(self, *input_shape) -> Tuple[Tuple[int, int], ...]:
        """The groups of cores (intervals, input side first) ``forward`` would use for an
        input of ``input_shape``; ``((0, d),)`` is the dense path."""
        return self._plan_for_input(torch.Size(input_shape), self._ranks_of(self._cores()))[0].groups

    # -- construction from dense layers ----------------------------------------------------
    @classmethod
    def _config_of(cls, layer: nn.Module) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _config_of_weight(cls, W: Tensor) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_dense(cls, layer_or_weight, rank: int, **kw):
        """Build from the matching torch layer (its configuration, weight, bias, dtype and
        device are copied) or from a weight tensor in torch's shape (``bias=`` a tensor to
        copy, ``True`` for zeros, default none; other configuration in ``kw``). STTP:
        TT-SVD to the layer's ranks and the inverse chart; SVDP: truncated SVD; exact when
        the weight has those ranks. ``**kw``: the constructor's keyword arguments."""
        kw = dict(kw)
        if isinstance(layer_or_weight, nn.Module):
            cfg = cls._config_of(layer_or_weight)
            W = layer_or_weight.weight.detach()
            bias = getattr(layer_or_weight, "bias", None)
        elif isinstance(layer_or_weight, Tensor):
            W = layer_or_weight.detach()
            cfg = cls._config_of_weight(W)
            bias = kw.pop("bias", None)
            if cls.has_bias_arg:
                cfg["bias"] = bias is not None and bias is not False
            if isinstance(bias, bool):
                bias = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device) if bias else None
        else:
            raise TypeError(f"layer_or_weight: expected an nn.Module or a weight tensor, got "
                            f"{type(layer_or_weight).__name__}")
        for k in list(cfg):
            if k in kw:
                cfg[k] = kw.pop(k)
        kw.setdefault("device", W.device)
        kw.setdefault("dtype", W.dtype)
        layer = cls(**cfg, rank=rank, **kw)
        layer.load_weight(W)
        if bias is not None and layer.bias is not None:
            if tuple(bias.shape) != tuple(layer.bias.shape):
                raise ValueError(f"bias: expected shape {tuple(layer.bias.shape)}, got "
                                 f"{tuple(bias.shape)}")
            with torch.no_grad():
                layer.bias.copy_(bias.detach())
        return layer

    def load_weight(self, W: Tensor) -> None:
        """Set the factorized weight from a dense weight in torch's shape (projection:
        TT-SVD / truncated SVD, then the spectrum constraint). ``ValueError`` for a wrong
        shape or a NaN/Inf entry, ``TypeError`` for a tensor that is not real floating (a
        complex weight lost its imaginary part in the cast to the layer's dtype, with no
        more than torch's warning)."""
        if not isinstance(W, Tensor):
            raise TypeError(f"weight: expected a torch.Tensor, got {type(W).__name__}")
        if not W.is_floating_point():
            raise TypeError(f"weight: expected a real floating tensor, got dtype {W.dtype}")
        if tuple(W.shape) != tuple(self._weight_shape()):
            raise ValueError(f"weight: expected shape {tuple(self._weight_shape())}, got "
                             f"{tuple(W.shape)}")
        check_finite(W, "weight")  # else SVDP fails inside the SVD, STTP names the TT
        self.weight_param.load_matrix(self._weight_to_matrix(W))
