"""Whole-model tools: convert torch layers to STTP/SVDP layers (with a report), export
back to plain torch layers, count compression (the paper's Z, eq. 11) and the paper's
D-optimal spectral penalty. ``docs/sttp.md``, sections "Compression" and "Spectrum".
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import FactorizedLayer
from .conv import (
    STTPConv1d, STTPConv2d, STTPConv3d, STTPConvTranspose1d, STTPConvTranspose2d,
    STTPConvTranspose3d, SVDPConv1d, SVDPConv2d, SVDPConv3d, SVDPConvTranspose1d,
    SVDPConvTranspose2d, SVDPConvTranspose3d,
)
from .embedding import STTPEmbedding, SVDPEmbedding
from .linear import STTPLinear, SVDPLinear
from .parametrization import INITS

__all__ = [
    "KINDS",
    "LAYER_TYPES",
    "ConversionReport",
    "convert_model",
    "replace_layers",
    "export_model",
    "compression_ratio",
    "compression_z",
    "spectral_penalty",
    "PAPER_PENALTY_EPS",
    "module_paths",
    "swap_module",
]

#: torch type -> (kind name, STTP class, SVDP class): every layer type that converts
LAYER_TYPES = {
    nn.Linear: ("linear", STTPLinear, SVDPLinear),
    nn.Conv1d: ("conv1d", STTPConv1d, SVDPConv1d),
    nn.Conv2d: ("conv2d", STTPConv2d, SVDPConv2d),
    nn.Conv3d: ("conv3d", STTPConv3d, SVDPConv3d),
    nn.ConvTranspose1d: ("conv_transpose1d", STTPConvTranspose1d, SVDPConvTranspose1d),
    nn.ConvTranspose2d: ("conv_transpose2d", STTPConvTranspose2d, SVDPConvTranspose2d),
    nn.ConvTranspose3d: ("conv_transpose3d", STTPConvTranspose3d, SVDPConvTranspose3d),
    nn.Embedding: ("embedding", STTPEmbedding, SVDPEmbedding),
}
#: every kind :func:`convert_model` knows
KINDS = tuple(v[0] for v in LAYER_TYPES.values())
#: ``eps`` of the reference's penalty: floor of ``max|s|`` and of each normalized value
PAPER_PENALTY_EPS = 1e-7


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")


def module_paths(model: nn.Module) -> Dict[int, List[str]]:
    """``{id(module): [qualified names]}`` over every submodule of ``model`` (``model``
    itself excluded), with every name under which a shared (tied) module is reachable, in
    module order. Cost O(number of module paths)."""
    paths: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if n:
            paths.setdefault(id(m), []).append(n)
    return paths


def swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> List[str]:
    """Put ``new`` in ``model`` wherever ``old`` is (every name of a shared module, so a
    module used twice stays shared). Returns those names. Cost O(number of module paths)."""
    names = module_paths(model).get(id(old), [])
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return names


class ConversionReport(NamedTuple):
    """What :func:`convert_model` did: ``converted`` (qualified names, module order) and
    ``skipped`` (``{name: reason}`` for every layer of a requested kind left dense)."""

    converted: List[str]
    skipped: Dict[str, str]

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s): {', '.join(self.converted) or '-'}"]
        for n, why in self.skipped.items():
            lines.append(f"kept dense {n!r}: {why}")
        return "\n".join(lines)


def _reason_not_convertible(m: nn.Module) -> Optional[str]:
    if getattr(m, "groups", 1) != 1:
        return f"grouped convolution (groups={m.groups}) is not factorized as one matrix"
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
        return "max_norm / sparse embeddings are not supported"
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) \
            and m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    return None


def convert_model(model: nn.Module, rank: int, *, method: str = "sttp",
                  kinds: Sequence[str] = KINDS, ignore: Sequence[str] = (),
                  names: Optional[Sequence[str]] = None, init: str = "from_dense",
                  **kw) -> ConversionReport:
    """Replace torch layers of ``model`` in place by STTP/SVDP layers.

    Args:
        model: the model (``nn.Module``).
        rank: the rank cap of every converted layer (clamped per bond, never an error).
        method: ``"sttp"`` | ``"svdp"``.
        kinds: subset of :data:`KINDS`; exact types only (subclasses of ``nn.Linear`` such
            as ``NonDynamicallyQuantizableLinear`` are left alone unless named).
        ignore: qualified names (or prefixes ending in ``"."``) to keep dense, e.g. the
            first convolution, as the paper's generators do.
        names: convert exactly these (``ValueError`` for unknown or unconvertible ones).
        init: ``"from_dense"`` (TT-SVD / SVD of the current weight) or a layer ``init``
            (:data:`~ttmanifold.nn.parametrization.INITS`: ``"orthogonal"``,
            ``"near_identity"``, ``"random"``, ``"identity"``; a fresh weight; biases are
            copied in every case).
        **kw: keyword arguments of the new layers (``spectrum``, ``param``,
            ``tensorization``, ``contraction``, ...).

    A module reachable under several names (shared, e.g. ``self.b = self.a``) is converted
    once, reported under its first name, and stays shared; it is ignored if any of its
    names is. A layer whose weight is the parameter of another module too (tied weights)
    is kept dense (``ValueError`` if named).

    Returns:
        a :class:`ConversionReport`. Cost: one TT-SVD / SVD per layer for ``"from_dense"``.
    """
    _check_model(model)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds: expected a subset of {KINDS}, got {kinds!r}")
    if method not in ("sttp", "svdp"):
        raise ValueError(f"method: expected 'sttp' or 'svdp', got {method!r}")
    if init != "from_dense" and init not in INITS:
        raise ValueError(f"init: expected 'from_dense' or one of {INITS}, got {init!r}")
    ignore = tuple(ignore)
    # every name, also the second name of a shared module (converted once, kept shared)
    modules = dict(model.named_modules(remove_duplicate=False))
    paths = module_paths(model)
    for n in ignore:
        if n not in modules and not n.endswith("."):
            raise ValueError(f"ignore: model has no submodule {n!r}")
    skipped: Dict[str, str] = {}
    if names is not None:
        names = list(names)
        for n in names:
            if n not in modules:
                raise ValueError(f"names: model has no submodule {n!r}")
            if n == "":
                raise ValueError("names: cannot replace the model itself")
            if type(modules[n]) not in LAYER_TYPES and not any(
                    isinstance(modules[n], t) for t in LAYER_TYPES):
                raise ValueError(f"names: {n!r} is a {type(modules[n]).__name__}, not one of "
                                 f"the kinds {kinds}")
        targets = names
    else:
        targets = []
        for n, m in model.named_modules():
            if n == "":
                continue
            sub = next((t for t in LAYER_TYPES if isinstance(m, t) and type(m) is not t), None)
            if sub is not None and LAYER_TYPES[sub][0] in kinds:
                # a subclass may change the forward (e.g. attention's output projection)
                skipped[n] = (f"{type(m).__name__} is a subclass of {sub.__name__}, not the "
                              f"layer itself: name it to convert it")
                continue
            if type(m) not in LAYER_TYPES or LAYER_TYPES[type(m)][0] not in kinds:
                continue
            if any(a in ignore or any(a.startswith(p) for p in ignore if p.endswith("."))
                   for a in paths[id(m)]):
                skipped[n] = "in the ignore list"
                continue
            targets.append(n)
    holders: Dict[int, List[str]] = {}  # id(parameter) -> names of the modules holding it
    for n, m in modules.items():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(n)
    converted, done = [], set()
    for name in targets:
        m = modules[name]
        if id(m) in done:  # another name of a module converted already
            continue
        done.add(id(m))
        entry = next((v for t, v in LAYER_TYPES.items() if isinstance(m, t)), None)
        why = _reason_not_convertible(m)
        tied = [a for a in holders.get(id(m.weight), ()) if a not in paths[id(m)]]
        if why is None and tied:
            # two factorized copies would train apart: the tie would be silently lost
            why = f"its weight is tied to {tied[0]!r}'s (shared parameter)"
        if why is not None:
            if names is not None:
                raise ValueError(f"{name}: {why}")
            skipped[name] = why
            continue
        cls = entry[1] if method == "sttp" else entry[2]
        if init == "from_dense":
            new = cls.from_dense(m, rank, **kw)
        else:
            kw2 = dict(kw)
            kw2.setdefault("device", m.weight.device)
            kw2.setdefault("dtype", m.weight.dtype)
            new = cls(**cls._config_of(m), rank=rank, init=init, **kw2)
            if getattr(m, "bias", None) is not None:
                with torch.no_grad():
                    new.bias.copy_(m.bias)
        new.train(m.training)
        swap_module(model, m, new)
        converted.append(name)
    return ConversionReport(converted, skipped)


def replace_layers(model: nn.Module, rank: int, kinds: Sequence[str] = ("linear", "conv2d"),
                   names: Optional[Sequence[str]] = None, method: str = "sttp",
                   init: str = "from_dense", **kw) -> List[str]:
    """:func:`convert_model` returning the converted names; every layer of the requested
    kinds that stays dense is reported with a ``UserWarning`` naming it and the reason."""
    report = convert_model(model, rank, method=method, kinds=kinds, names=names, init=init,
                           **kw)
    for n, why in report.skipped.items():
        warnings.warn(f"replace_layers: skipping {n!r}: {why}", UserWarning, stacklevel=2)
    return report.converted


def export_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Every STTP/SVDP layer replaced by the plain torch layer with its current dense weight
    (each layer's ``decompress()``), for deployment. ``inplace=False`` works on a deep copy. Returns
    the model. Cost: one dense weight per layer."""
    _check_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, FactorizedLayer):
        return model.decompress()
    for _, m in list(model.named_modules()):
        if isinstance(m, FactorizedLayer):
            new = m.decompress()
            new.train(m.training)
            swap_module(model, m, new)
    return model


def _factorized(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedLayer)]


def _dense_weight_count(layer: FactorizedLayer) -> int:
    return layer.d_out * layer.d_in


def _dof(layer: FactorizedLayer) -> int:
    # degrees of freedom, whatever is stored (manifold mode stores the packed cores)
    wp = layer.weight_param
    return wp.chart.dim if hasattr(wp, "chart") else wp.num_params()


def compression_ratio(model: nn.Module) -> Dict[str, object]:
    """Parameter counts of the factorized layers against their dense equivalents.

    Returns a dict: ``"layers"`` ``{name: dense / actual}`` per STTP/SVDP layer (weight plus
    bias; actual = the stored parameters), ``"replaced"`` the same summed over them,
    ``"model"`` (all parameters if they were dense) / (all parameters), and the totals
    ``"dense_params"``, ``"params"``. 1.0 where there is no such layer.
    """
    _check_model(model)
    layers, dense_sum, actual_sum = {}, 0, 0
    for name, m in _factorized(model):
        bias = m.bias.numel() if m.bias is not None else 0
        dn = _dense_weight_count(m) + bias
        ac = sum(p.numel() for p in m.parameters())
        layers[name] = dn / ac
        dense_sum += dn
        actual_sum += ac
    total = sum(p.numel() for p in model.parameters())
    dense_total = total - actual_sum + dense_sum
    return {
        "layers": layers,
        "replaced": dense_sum / actual_sum if actual_sum else 1.0,
        "model": dense_total / total if total else 1.0,
        "dense_params": dense_total,
        "params": total,
    }


def compression_z(model: nn.Module, count_buffers: bool = False) -> float:
    """The paper's compression ``Z`` (eq. 11) in percent: the numbers the model needs
    (degrees of freedom of each STTP/SVDP weight, every other parameter) over those of the
    same model with dense weights, times 100.

    ``count_buffers=True`` adds floating-point buffers (BatchNorm running statistics) to
    both counts, as the reference code does (it skips the integer ``num_batches_tracked``);
    the paper's tables use that count. Cost O(number of tensors).
    """
    _check_model(model)
    fact = _factorized(model)
    inside = {id(p) for _, m in fact for p in m.weight_param.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    if count_buffers:
        other += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    comp = other + sum(_dof(m) for _, m in fact)
    dense = other + sum(_dense_weight_count(m) for _, m in fact)
    return 100.0 * comp / dense if dense else 100.0


def spectral_penalty(model: nn.Module, *, normalize: bool = True, reduction: str = "mean",
                     eps: float = PAPER_PENALTY_EPS) -> Tensor:
    """The D-optimal spectral penalty over every STTP/SVDP layer with a spectrum
    (``"learned"`` or ``"lipschitz"``; ``model`` itself included).

    Per layer ``a = |s|``, with ``normalize`` divided by ``max(max a, eps)``; the penalty is
    ``-log(max(a_i, eps))`` summed over all singular values of the network and, for
    ``reduction="mean"``, divided by their number. The defaults are the paper's (the
    reference code's ``eps = 1e-7``); the paper weights it 1.0 in its classifiers and
    discriminators, 0.75 in the rank-64 STTP generator (``docs/sttp.md``). Returns a 0-d
    tensor (0 without such layers). Differentiable; cost O(d n r^3) per layer.
    """
    _check_model(model)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    terms, count = [], 0
    for _, m in _factorized(model):
        if m.spectrum == "identity":
            continue
        a = m.singular_values().abs()
        if normalize:
            a = a / a.max().clamp_min(eps)
        terms.append(-torch.log(a.clamp_min(eps)).sum())
        count += a.numel()
    if not terms:
        ref = next(iter(model.parameters()), None)
        return torch.zeros((), dtype=ref.dtype if ref is not None else None,
                           device=ref.device if ref is not None else None)
    total = torch.stack(terms).sum()
    return total / count if reduction == "mean" else total
