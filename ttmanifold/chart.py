"""The STTP chart and its ``torch.nn.utils.parametrize`` integration.

The implementation lives in :mod:`ttmanifold.nn.chart` (:class:`STTPChart`, spectral
helpers) and :mod:`ttmanifold.nn.parametrization` (:class:`STTPParametrization`,
:func:`register_sttp`, sharing the layers' tensorization); this module keeps the names
importable from ``ttmanifold.chart``. Mathematics: ``docs/sttp.md``.
"""
from .nn.chart import SPECTRA, Block, STTPChart, d_optimal_penalty, lipschitz_normalize
from .nn.parametrization import STTPParametrization, register_sttp

__all__ = [
    "STTPChart",
    "STTPParametrization",
    "register_sttp",
    "d_optimal_penalty",
    "lipschitz_normalize",
    "Block",
    "SPECTRA",
]
