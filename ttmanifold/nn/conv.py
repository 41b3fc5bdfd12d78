"""The convolution families (1-, 2-, 3-D; direct and transposed) with an STTP or SVDP
weight. The weight matrix is ``C_out x (C_in prod(kernel))``, torch's row-major
flattening (for a transposed convolution torch stores ``(C_in, C_out, *kernel)``; the
matrix is that of the equivalent ``(C_out, C_in, *kernel)`` layout, as in the reference).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FactorizedLayer, plan_batch
from .planner import apply_group, group_matrix

__all__ = [
    "FactorizedConv", "FactorizedConvTranspose",
    "STTPConv1d", "STTPConv2d", "STTPConv3d", "SVDPConv1d", "SVDPConv2d", "SVDPConv3d",
    "STTPConvTranspose1d", "STTPConvTranspose2d", "STTPConvTranspose3d",
    "SVDPConvTranspose1d", "SVDPConvTranspose2d", "SVDPConvTranspose3d",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TORCH_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _tuple(v, n: int, name: str) -> Tuple[int, ...]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return (int(v),) * n
    # a string is iterable: "same" must not reach int("s")
    try:
        if isinstance(v, (str, bytes)):
            raise TypeError
        t = tuple(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a tuple of {n} ints, got {v!r}") from None
    if len(t) != n or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool)
                              for a in t):
        raise ValueError(f"{name}: expected an int or a tuple of {n} ints, got {v!r}")
    return tuple(int(a) for a in t)


def _check_channels(in_channels, out_channels, groups):
    for v, nm in ((in_channels, "in_channels"), (out_channels, "out_channels")):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{nm}: expected a positive int, got {v!r}")
    if groups != 1:
        raise ValueError(f"groups: only groups=1 is supported (the weight is factorized as "
                         f"one out x (in*prod(kernel)) matrix), got groups={groups!r}")


class FactorizedConv(FactorizedLayer):
    """An N-D convolution (``N = ndim``, set by subclasses) with a factorized weight.

    Arguments as :class:`torch.nn.Conv2d` (``groups`` must be 1; ``padding`` an int, a
    tuple, ``"valid"`` or ``"same"``) plus those of :class:`~ttmanifold.nn.STTPLinear`.
    The forward runs the channel groups of cores as per-pixel GEMMs and the group holding
    the kernel modes as one small convolution (``docs/sttp.md``, "Forward and its cost").
    """

    ndim = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 *, rank: int, spectrum: str = "learned",
                 out_modes: Optional[Sequence[int]] = None,
                 in_modes: Optional[Sequence[int]] = None, order: Optional[str] = None,
                 tensorization="reference", param: str = "chart",
                 init: str = "orthogonal", contraction: str = "auto", device=None, dtype=None):
        super().__init__()
        n = self.ndim
        _check_channels(in_channels, out_channels, groups)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {_PADDING_MODES}, got "
                             f"{padding_mode!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        if min(self.kernel_size) < 1:
            raise ValueError(f"kernel_size: expected positive sizes, got {kernel_size!r}")
        self.stride = _tuple(stride, n, "stride")
        self.dilation = _tuple(dilation, n, "dilation")
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError("stride and dilation must be positive")
        self.groups = 1
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding: expected 'valid', 'same', an int or a tuple, got "
                                 f"{padding!r}")
            if padding == "same" and self.stride != (1,) * n:
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
            pads = []
            for k, dl in zip(self.kernel_size[::-1], self.dilation[::-1]):
                tot = dl * (k - 1) if padding == "same" else 0
                pads += [tot // 2, tot - tot // 2]
            self._pads = tuple(pads)
        else:
            self.padding = _tuple(padding, n, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"padding: expected non-negative sizes, got {padding!r}")
            self._pads = tuple(p for q in self.padding[::-1] for p in (q, q))  # F.pad order
        self._make_bias(bias, self.out_channels, device, dtype)
        self._init_weight(self.out_channels, self.in_channels, self.kernel_size, rank=rank,
                          spectrum=spectrum, param=param, init=init, out_modes=out_modes,
                          in_modes=in_modes, order=order, tensorization=tensorization,
                          contraction=contraction, device=device, dtype=dtype)

    def _weight_shape(self):
        return (self.out_channels, self.in_channels) + self.kernel_size

    def _kernel_range(self) -> Tuple[int, int]:
        """``(kc1, kend)``: train cores ``c..kend-1`` hold the kernel modes; the
        convolution group must contain cores ``c..kc1-1``. Reversed order: ``kend = d - p``
        with ``p`` channel modes at the end (``prod(in_modes[:p]) == in_channels``, 0 if
        no prefix matches), ``kc1 = max(kend, c + 1)``; natural order: the kernel modes
        come last, so the group reaches the last core (``(d, d)``)."""
        d = len(self.tensor_shape)
        if self.natural:
            return d, d
        E, p, acc = len(self.in_modes), 0, 1
        for q in range(E + 1):
            if acc == self.in_channels:
                p = q
            if q < E:
                acc *= self.in_modes[q]
        return max(d - p, self.center + 1), d - p

    def _out_size(self, size: Sequence[int]) -> Tuple[int, ...]:
        pads = self._pads[::-1]  # (.., back, front) per dim from the first dim: reversed pairs
        out = []
        for i, (n, k, dl, st) in enumerate(zip(size, self.kernel_size, self.dilation,
                                              self.stride)):
            lo, hi = pads[2 * i + 1], pads[2 * i]
            out.append((n + lo + hi - dl * (k - 1) - 1) // st + 1)
        return tuple(out)

    def _plan_for_input(self, shape: torch.Size, ranks):
        n = self.ndim
        B = shape[0] if len(shape) == n + 2 else 1
        size = tuple(int(v) for v in shape[-n:])
        conv = self._kernel_range() + (math.prod(size), math.prod(self._out_size(size)))
        return self._plan(ranks, max(plan_batch(B), 1), self.contraction, conv), B

    def _check_input(self, x: Tensor, ref: Tensor) -> None:
        self._check_input_tensor(x, ref)
        n = self.ndim
        if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != self.in_channels:
            sp = ", ".join("L" if n == 1 else "HW"[i] if n == 2 else "DHW"[i] for i in range(n))
            raise ValueError(f"input: expected shape (B, {self.in_channels}, {sp}) or "
                             f"({self.in_channels}, {sp}) (in_channels={self.in_channels}), "
                             f"got {tuple(x.shape)}")
        if min(self._out_size(tuple(x.shape[-n:]))) < 1:
            raise ValueError(f"input: spatial size {tuple(x.shape[-n:])} is smaller than the "
                             f"dilated kernel {self.kernel_size} (dilation {self.dilation}) after "
                             f"padding {self._pads}")

    def _conv(self, x: Tensor, kernel: Tensor) -> Tensor:
        """The torch convolution with this layer's stride/padding/dilation, no bias."""
        conv = _CONV[self.ndim]
        pads = self._pads
        sym = all(pads[2 * i] == pads[2 * i + 1] for i in range(self.ndim))
        if self.padding_mode == "zeros" and sym:
            return conv(x, kernel, None, self.stride, tuple(pads[::-2]), self.dilation)
        if any(pads):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pads, mode=mode)
        return conv(x, kernel, None, self.stride, 0, self.dilation)

    def _add_bias(self, y: Tensor) -> Tensor:
        if self.bias is None:
            return y
        return y + self.bias.reshape((-1,) + (1,) * self.ndim)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C_in, *spatial)`` or unbatched ``(C_in, *spatial)`` ->
        ``(B, C_out, *out_spatial)``; equals the torch convolution with :attr:`weight` to
        rounding. Cost: the cheaper of the dense convolution and the planner's groups."""
        cores = self._cores()
        self._check_input(x, cores[0])
        plan, _ = self._plan_for_input(x.shape, self._ranks_of(cores))
        if plan.dense or x.numel() == 0:
            return self._forward_dense(x, cores)
        return self._forward_tt(x, cores, plan)

    def _forward_dense(self, x: Tensor, cores=None) -> Tensor:
        cores = self._cores() if cores is None else cores
        W = self._matrix_from_cores(cores).reshape(self._weight_shape())
        return self._add_bias(self._conv(x, W))

    def _forward_tt(self, x: Tensor, cores=None, plan=None) -> Tensor:
        """Channel groups as per-pixel GEMMs, the kernel group as a small convolution,
        output groups as per-pixel GEMMs. Never forms W."""
        cores = self._cores() if cores is None else cores
        n = self.ndim
        unbatched = x.dim() == n + 1
        if unbatched:
            x = x.unsqueeze(0)
        if plan is None or plan.dense:
            plan = self._plan_for_input(x.shape, self._ranks_of(cores))[0]
            if plan.dense:
                size = tuple(x.shape[-n:])
                conv = self._kernel_range() + (math.prod(size),
                                               math.prod(self._out_size(size)))
                plan = self._plan(self._ranks_of(cores), x.shape[0], "tt", conv)
        B = x.shape[0]
        size = tuple(x.shape[2:])
        c, shape = self.center, self.tensor_shape
        K = math.prod(self.kernel_size)
        S = None  # state (rows, B*pixels), batch before pixels
        y = None
        after = False
        out_size = None
        for k0, k1 in plan.groups:
            holds_c = k0 <= c < k1
            Gm = group_matrix(cores, shape, c, k0, k1, plan.split,
                              natural=self.natural and holds_c)
            r0 = int(cores[k0].shape[0])
            if holds_c:  # the convolution group
                rows, cols = Gm.shape
                inp = x if S is None else S.reshape((-1, B) + size).transpose(0, 1)
                kernel = Gm.reshape((rows, cols // K) + self.kernel_size)
                y = self._conv(inp, kernel)  # (B, rows, *out)
                out_size = tuple(y.shape[2:])
                after, S = True, None
                continue
            if S is None:
                S = (y if after else x).transpose(0, 1).reshape((y if after else x).shape[1], -1)
            S = apply_group(Gm, S, r0)
            y = None
        if y is None:
            y = S.reshape((self.out_channels, B) + out_size).transpose(0, 1)
        y = self._add_bias(y)
        return y.squeeze(0) if unbatched else y

    def decompress(self) -> nn.Module:
        """The plain torch convolution with the current dense weight and bias."""
        W = self.weight.detach()
        conv = _TORCH_CONV[self.ndim](
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, 1, self.bias is not None, self.padding_mode, device=W.device,
            dtype=W.dtype)
        with torch.no_grad():
            conv.weight.copy_(W)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in ((0,) * self.ndim, "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self.ndim:
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.bias is None:
            s += ", bias=False"
        return s + ", " + self._param_repr()

    @classmethod
    def _config_of(cls, layer) -> dict:
        want = _TORCH_CONV[cls.ndim]
        if not isinstance(layer, want):
            raise TypeError(f"layer_or_weight: expected an {want.__name__}, got "
                            f"{type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"groups: only groups=1 is supported, the layer has groups="
                             f"{layer.groups}")
        return dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                    kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                    dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                    padding_mode=layer.padding_mode)

    @classmethod
    def _config_of_weight(cls, W: Tensor) -> dict:
        if W.dim() != cls.ndim + 2:
            raise ValueError(f"weight: expected shape (out, in, *kernel) with {cls.ndim} kernel "
                             f"sizes, got {tuple(W.shape)}")
        return dict(in_channels=W.shape[1], out_channels=W.shape[0],
                    kernel_size=tuple(W.shape[2:]))


class FactorizedConvTranspose(FactorizedLayer):
    """An N-D transposed convolution with a factorized weight. Arguments as
    :class:`torch.nn.ConvTranspose2d` (``groups=1``, ``padding_mode="zeros"``, torch's only
    choice) plus those of :class:`~ttmanifold.nn.STTPLinear`. The forward builds the dense
    weight and calls the torch transposed convolution (cost ``merge(W)`` plus torch's)."""

    ndim = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, groups: int = 1, bias: bool = True, dilation=1,
                 padding_mode: str = "zeros", *, rank: int, spectrum: str = "learned",
                 out_modes: Optional[Sequence[int]] = None,
                 in_modes: Optional[Sequence[int]] = None, order: Optional[str] = None,
                 tensorization="reference", param: str = "chart",
                 init: str = "orthogonal", contraction: str = "auto", device=None, dtype=None):
        super().__init__()
        n = self.ndim
        _check_channels(in_channels, out_channels, groups)
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: transposed convolutions support only 'zeros', got "
                             f"{padding_mode!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        self.stride = _tuple(stride, n, "stride")
        self.padding = _tuple(padding, n, "padding")
        self.output_padding = _tuple(output_padding, n, "output_padding")
        self.dilation = _tuple(dilation, n, "dilation")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError("kernel_size, stride and dilation must be positive")
        if min(self.padding) < 0 or min(self.output_padding) < 0:
            raise ValueError(f"padding, output_padding: expected non-negative sizes, got "
                             f"{padding!r}, {output_padding!r}")
        if any(op >= max(st, dl) for op, st, dl in zip(self.output_padding, self.stride,
                                                       self.dilation)):
            raise ValueError(f"output_padding: must be smaller than stride or dilation in each "
                             f"dimension, got {self.output_padding} (stride {self.stride}, "
                             f"dilation {self.dilation})")
        self.groups = 1
        self.padding_mode = padding_mode
        self._make_bias(bias, self.out_channels, device, dtype)
        self._init_weight(self.out_channels, self.in_channels, self.kernel_size, rank=rank,
                          spectrum=spectrum, param=param, init=init, out_modes=out_modes,
                          in_modes=in_modes, order=order, tensorization=tensorization,
                          contraction=contraction, device=device, dtype=dtype)

    def _weight_shape(self):
        return (self.in_channels, self.out_channels) + self.kernel_size

    def _matrix_to_weight(self, Wm: Tensor) -> Tensor:
        return Wm.reshape((self.out_channels, self.in_channels) + self.kernel_size).transpose(0, 1)

    def _weight_to_matrix(self, W: Tensor) -> Tensor:
        return W.transpose(0, 1).reshape(self.out_channels, -1)

    def _plan_for_input(self, shape, ranks):
        return self._plan(ranks, 1, "dense"), 1

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, *spatial)`` or unbatched -> torch's transposed convolution with
        :attr:`weight`."""
        n = self.ndim
        W = self.weight
        self._check_input_tensor(x, W)
        if x.dim() not in (n + 1, n + 2) or x.shape[-n - 1] != self.in_channels:
            raise ValueError(f"input: expected shape (B, {self.in_channels}, *spatial) with "
                             f"{n} spatial dims (in_channels={self.in_channels}), got "
                             f"{tuple(x.shape)}")
        return _CONV_T[n](x, W, self.bias, self.stride, self.padding, self.output_padding, 1,
                          self.dilation)

    def decompress(self) -> nn.Module:
        """The plain torch transposed convolution with the current weight and bias."""
        W = self.weight.detach()
        conv = _TORCH_CONV_T[self.ndim](
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.output_padding, 1, self.bias is not None, self.dilation, "zeros",
            device=W.device, dtype=W.dtype)
        with torch.no_grad():
            conv.weight.copy_(W)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, " + self._param_repr())

    @classmethod
    def _config_of(cls, layer) -> dict:
        want = _TORCH_CONV_T[cls.ndim]
        if not isinstance(layer, want):
            raise TypeError(f"layer_or_weight: expected an {want.__name__}, got "
                            f"{type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"groups: only groups=1 is supported, the layer has groups="
                             f"{layer.groups}")
        return dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                    kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                    output_padding=layer.output_padding, dilation=layer.dilation,
                    bias=layer.bias is not None)

    @classmethod
    def _config_of_weight(cls, W: Tensor) -> dict:
        if W.dim() != cls.ndim + 2:
            raise ValueError(f"weight: expected shape (in, out, *kernel) with {cls.ndim} "
                             f"kernel sizes, got {tuple(W.shape)}")
        return dict(in_channels=W.shape[0], out_channels=W.shape[1],
                    kernel_size=tuple(W.shape[2:]))


def _make(base, ndim: int, method: str, name: str, doc: str):
    return type(name, (base,), {"ndim": ndim, "method": method, "__doc__": doc,
                                "__module__": __name__})


STTPConv1d = _make(FactorizedConv, 1, "sttp", "STTPConv1d", "``nn.Conv1d`` with an STTP weight.")
STTPConv2d = _make(FactorizedConv, 2, "sttp", "STTPConv2d", "``nn.Conv2d`` with an STTP weight.")
STTPConv3d = _make(FactorizedConv, 3, "sttp", "STTPConv3d", "``nn.Conv3d`` with an STTP weight.")
SVDPConv1d = _make(FactorizedConv, 1, "svdp", "SVDPConv1d", "``nn.Conv1d`` with an SVDP weight.")
SVDPConv2d = _make(FactorizedConv, 2, "svdp", "SVDPConv2d",
                   "``nn.Conv2d`` with ``W = U diag(s) V^T`` on the ``out x (in kh kw)`` "
                   "matrix: the factored forward is a convolution with ``r`` filters and a "
                   "1x1 map.")
SVDPConv3d = _make(FactorizedConv, 3, "svdp", "SVDPConv3d", "``nn.Conv3d`` with an SVDP weight.")
STTPConvTranspose1d = _make(FactorizedConvTranspose, 1, "sttp", "STTPConvTranspose1d",
                            "``nn.ConvTranspose1d`` with an STTP weight.")
STTPConvTranspose2d = _make(FactorizedConvTranspose, 2, "sttp", "STTPConvTranspose2d",
                            "``nn.ConvTranspose2d`` with an STTP weight.")
STTPConvTranspose3d = _make(FactorizedConvTranspose, 3, "sttp", "STTPConvTranspose3d",
                            "``nn.ConvTranspose3d`` with an STTP weight.")
SVDPConvTranspose1d = _make(FactorizedConvTranspose, 1, "svdp", "SVDPConvTranspose1d",
                            "``nn.ConvTranspose1d`` with an SVDP weight.")
SVDPConvTranspose2d = _make(FactorizedConvTranspose, 2, "svdp", "SVDPConvTranspose2d",
                            "``nn.ConvTranspose2d`` with an SVDP weight.")
SVDPConvTranspose3d = _make(FactorizedConvTranspose, 3, "svdp", "SVDPConvTranspose3d",
                            "``nn.ConvTranspose3d`` with an SVDP weight.")
