"""All Householder frames of equal shape across a model, evaluated in one batched call.

A converted network holds many frames of the same size (every ``3x3`` convolution of a
stage has the same cores); evaluating them one by one costs a few small kernels each.
:func:`batched_cores` stacks the parameters of equal-shaped frames of many chart-mode
STTP/SVDP weights, evaluates each shape once (``frame_from_full`` / ``frame_from_reduced``
take batches) and assembles every layer's cores; :func:`batched_frames` pins them on the
layers for the forward passes inside a ``with`` block.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..householder import frame_from_full, frame_from_reduced
from .base import FactorizedLayer

__all__ = ["batched_cores", "batched_frames"]


def _frame_jobs(layer: FactorizedLayer):
    """``[(key, params, placement)]`` of one chart-mode layer: ``key = (kind, m, r)``,
    ``params`` a 1-D view, ``placement`` how the frame becomes a core."""
    wp = layer.weight_param
    if layer.method == "svdp":
        ukind = "reduced" if wp.spectrum == "identity" else "full"
        return [((ukind, wp.d_out, wp.r), wp.u_params, ("U", 0)),
                (("full", wp.d_in, wp.r), wp.v_params, ("V", 1))]
    ch, theta = wp.chart, wp.theta
    jobs = []
    for b in ch.layout:
        if b.kind in ("full", "reduced"):
            side = "U" if b.name[0] == "U" else "V"
            jobs.append(((b.kind, b.m, b.r), theta[b.start:b.start + b.size], (side, b.core)))
    return jobs


def _assemble(layer: FactorizedLayer, frames: Dict[Tuple[str, int], Tensor]) -> List[Tensor]:
    wp = layer.weight_param
    s = wp.singular_values()
    if layer.method == "svdp":
        U, V = frames[("U", 0)], frames[("V", 1)]
        return [U.reshape(1, wp.d_out, wp.r),
                (s.unsqueeze(0) * V).transpose(0, 1).reshape(wp.r, wp.d_in, 1)]
    ch = wp.chart
    n, r, c = ch.shape, ch.ranks, ch.center
    cores = []
    for k in range(ch.d):
        shape = (r[k], n[k], r[k + 1])
        if k < c:
            core = frames[("U", k)].reshape(shape)
            if k == c - 1:
                core = core * s
        else:
            core = frames[("V", k)].transpose(-2, -1).reshape(shape)
        cores.append(core)
    return cores


def batched_cores(layers: Sequence[FactorizedLayer]) -> List[List[Tensor]]:
    """The cores of every layer (as ``layer.weight_param.cores()`` would return them),
    with all frames of equal ``(form, m, r)`` (and dtype, device) evaluated in one call per
    shape.

    Args:
        layers: chart-mode STTP/SVDP layers (``ValueError`` otherwise, e.g. for
            manifold-mode layers); frames are batched per dtype and device.

    Returns:
        one list of cores per layer, differentiable in the layers' parameters.

    Cost: the same flops as per-layer evaluation, one compact-WY evaluation per distinct
    frame shape instead of one per frame (plus a stack and a split).
    """
    groups: Dict[tuple, list] = {}
    for i, layer in enumerate(layers):
        if not isinstance(layer, FactorizedLayer):
            raise TypeError(f"layers: expected STTP/SVDP layers, got {type(layer).__name__}")
        if layer.param != "chart" or (layer.method == "sttp" and layer.chart.d == 1):
            raise ValueError(f"layers: layer {i} is not a chart-mode STTP/SVDP layer with a "
                             f"bond; evaluate it on its own")
        for key, params, place in _frame_jobs(layer):
            # one stack per dtype and device: torch.stack would promote float32 to float64
            key = key + (params.dtype, params.device)
            groups.setdefault(key, []).append((i, place, params))
    frames: List[Dict[Tuple[str, int], Tensor]] = [{} for _ in layers]
    for (kind, m, r, _, _), items in groups.items():
        P = torch.stack([p for _, _, p in items])  # (B, n)
        make = frame_from_full if kind == "full" else frame_from_reduced
        F = make(P, m, r)  # (B, m, r)
        for j, (i, place, _) in enumerate(items):
            frames[i][place] = F[j]
    return [_assemble(layer, fr) for layer, fr in zip(layers, frames)]


@contextlib.contextmanager
def batched_frames(model: nn.Module):
    """Inside the block, every chart-mode STTP/SVDP layer of ``model`` uses cores computed
    by one :func:`batched_cores` call at entry (so change no parameter inside the block;
    a training step is ``with batched_frames(model): loss = f(model(x))`` followed by
    ``loss.backward()`` and ``opt.step()``, inside or after it). Other layers are
    untouched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, FactorizedLayer)
              and m.param == "chart" and not (m.method == "sttp" and m.chart.d == 1)]
    for layer, cores in zip(layers, batched_cores(layers)):
        layer.pin_cores(cores)
    try:
        yield layers
    finally:
        for layer in layers:
            layer.unpin_cores()
