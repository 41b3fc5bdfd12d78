"""Spectral low-rank layers: STTP and SVDP weights for torch layers (Obukhov et al. 2021).

Modules, one concept each: :mod:`.tensorization` (modes, order, ranks, DOF counts),
:mod:`.planner` (how cores meet the input), :mod:`.chart` (the STTP chart),
:mod:`.parametrization` (STTP/SVDP weights, ``torch.nn.utils.parametrize``), the layer
families :mod:`.linear`, :mod:`.conv`, :mod:`.embedding`, :mod:`.surgery` (whole-model
conversion, export, compression, penalty), :mod:`.adapters` (``W0 + dW``), :mod:`.batched` (equal-shaped frames of a model in one
call). Mathematics and conventions: ``docs/sttp.md``.
"""
from .tensorization import (
    Tensorization,
    factorize,
    sttp_dof,
    sttp_ranks,
    svdp_dof,
)
from .planner import OP_OVERHEAD
from .chart import STTPChart, d_optimal_penalty, lipschitz_normalize
from .parametrization import STTPParametrization, STTPWeight, SVDPWeight, register_sttp
from .base import FactorizedLayer
from .linear import STTPLinear, SVDPLinear
from .conv import (
    STTPConv1d, STTPConv2d, STTPConv3d, SVDPConv1d, SVDPConv2d, SVDPConv3d,
    STTPConvTranspose1d, STTPConvTranspose2d, STTPConvTranspose3d,
    SVDPConvTranspose1d, SVDPConvTranspose2d, SVDPConvTranspose3d,
)
from .embedding import STTPEmbedding, SVDPEmbedding
from .surgery import (
    ConversionReport,
    compression_ratio,
    compression_z,
    convert_model,
    export_model,
    replace_layers,
    spectral_penalty,
)
from .adapters import SpectralAdapter, add_adapters, merge_adapters
from .batched import batched_cores, batched_frames

__all__ = [
    "Tensorization", "factorize", "sttp_ranks", "sttp_dof", "svdp_dof", "OP_OVERHEAD",
    "STTPChart", "d_optimal_penalty", "lipschitz_normalize",
    "STTPParametrization", "STTPWeight", "SVDPWeight", "register_sttp",
    "FactorizedLayer",
    "STTPLinear", "SVDPLinear",
    "STTPConv1d", "STTPConv2d", "STTPConv3d", "SVDPConv1d", "SVDPConv2d", "SVDPConv3d",
    "STTPConvTranspose1d", "STTPConvTranspose2d", "STTPConvTranspose3d",
    "SVDPConvTranspose1d", "SVDPConvTranspose2d", "SVDPConvTranspose3d",
    "STTPEmbedding", "SVDPEmbedding",
    "ConversionReport", "convert_model", "replace_layers", "export_model",
    "compression_ratio", "compression_z", "spectral_penalty",
    "SpectralAdapter", "add_adapters", "merge_adapters",
    "batched_cores", "batched_frames",
]
