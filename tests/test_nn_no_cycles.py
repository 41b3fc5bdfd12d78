"""Every layer of the zoo and an adapter are freed by
reference counting alone (no reference cycle): ``del model`` releases their memory at once,
and a DistributedDataParallel wrapper's process group is not kept alive until the cyclic
collector runs (that kept gloo's threads alive into interpreter teardown, where they
aborted the process). Copies and pickles still point the weight at their own layer.
(``register_sttp`` is left out: ``torch.nn.utils.parametrize`` itself makes a cycle, with
any parametrization.)"""
import copy
import gc
import io
import weakref

import pytest
import torch
from torch import nn

import ttmanifold.nn as tnn

LAYERS = [
    lambda p: tnn.STTPLinear(16, 12, rank=3, param=p),
    lambda p: tnn.SVDPLinear(16, 12, rank=3),
    lambda p: tnn.STTPConv1d(6, 4, kernel_size=3, rank=2, param=p),
    lambda p: tnn.STTPConv2d(6, 4, kernel_size=3, rank=2, param=p),
    lambda p: tnn.SVDPConv2d(6, 4, kernel_size=3, rank=2),
    lambda p: tnn.STTPConvTranspose2d(6, 4, kernel_size=3, rank=2, param=p),
    lambda p: tnn.STTPEmbedding(20, 8, rank=2, param=p),
    lambda p: tnn.SVDPEmbedding(20, 8, rank=2),
]


def _adapter(p):
    model = nn.Sequential(nn.Linear(8, 6))
    tnn.add_adapters(model, rank=2)
    return model


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.mark.parametrize("param", ["chart", "manifold"])
@pytest.mark.parametrize("make", LAYERS + [_adapter])
def test_freed_without_the_cyclic_collector(make, param, no_gc):
    model = make(param)
    ref = weakref.ref(model)
    del model
    assert ref() is None


@pytest.mark.parametrize("param", ["chart", "manifold"])
def test_copies_and_pickles_own_their_weight(param):
    layer = tnn.STTPLinear(16, 12, rank=3, param=param, dtype=torch.float64)
    x = torch.randn(2, 16, dtype=torch.float64)
    y = layer(x)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert other.weight_param.owner is other
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
        with torch.no_grad():  # the copy's parameters are its own
            other.weight_param.ref().mul_(0.5)
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_weight_of_a_freed_layer_says_so():
    layer = tnn.STTPLinear(16, 12, rank=3)
    weight = layer.weight_param
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match="freed"):
        weight.ref()


@pytest.mark.parametrize("param", ["chart", "manifold"])
@pytest.mark.parametrize("make", LAYERS)
def test_data_parallel_replica_reads_its_own_parameters(make, param, no_gc):
    # nn.DataParallel's replicate(): a shallow replica, then each parameter set as a plain
    # tensor (its broadcast copy). The replica's weight read the original's parameters.
    layer = make(param).double()
    x = torch.randint(0, 8, (3,)) if "Embedding" in type(layer).__name__ else \
        torch.randn((2, 16) if "Linear" in type(layer).__name__ else (2, 6, 5, 5),
                    dtype=torch.float64)
    if type(layer).__name__.endswith("1d"):
        x = x[..., 0]
    y = layer(x)
    replica = layer._replicate_for_data_parallel()
    copies = {}
    for name, p in layer._parameters.items():
        if p is not None:
            copies[name] = p.detach().clone().requires_grad_()
            setattr(replica, name, copies[name] * 1)  # non-leaf, as broadcast's
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(replica(x), y, rtol=1e-12, atol=1e-12)
    replica(x).sum().backward()
    assert all(c.grad is not None for c in copies.values())
    assert all(p.grad is None for p in layer.parameters())
    del replica
    assert layer.weight_param.owner is layer
