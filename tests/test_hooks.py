"""Adapters applied as side paths in forward hooks equal patched weights, for Linear and Conv2d
layers of every shape the UNet has."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iteris_core.adapter_hooks import HookSession, HookState, LayerOps
from iteris_core.layers import layer_info_from_module
from iteris_core.low_rank import LowRankDelta

LAYERS = {
    "linear": (nn.Linear(12, 7), (4, 5, 12)),
    "conv1x1": (nn.Conv2d(6, 5, 1), (4, 6, 8, 8)),
    "conv3x3": (nn.Conv2d(6, 5, 3, padding=1), (4, 6, 8, 8)),
    "conv3x3_stride2": (nn.Conv2d(6, 5, 3, stride=2, padding=1), (4, 6, 9, 9)),
}


def _delta(info, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(info.out_features, rank, generator=g), torch.randn(rank, info.input_dim, generator=g), 0.3)


def _patched(module, delta, x):
    weight = module.weight + delta.dense().reshape(module.weight.shape)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_side_paths_equal_patched_weights(kind):
    torch.manual_seed(0)
    module, shape = LAYERS[kind]
    info = layer_info_from_module("unet.x", module)
    first, second = _delta(info, 3, 1), _delta(info, 5, 2)
    x = torch.randn(*shape)
    session = HookSession({"unet.x": module}, {"unet.x": info}, [], {"unet.x": "unet.x"})
    with session:
        with session.active(HookState({"unet.x": first})):
            one = module(x)
        with session.active(HookState({"unet.x": second})):
            other = module(x)
        with session.active(HookState({})):
            bare = module(x)
    assert torch.allclose(one, _patched(module, first, x), atol=1e-5)
    assert torch.allclose(other, _patched(module, second, x), atol=1e-5)
    assert torch.equal(bare, module(x))
    assert not module._forward_hooks  # removed on exit


def test_each_new_delta_is_applied_even_where_a_freed_one_lived():
    """Every iteration's merged deltas replace the last ones, which are freed; a new delta can then
    get a freed one's id, and must still be applied with its own factors."""
    module = nn.Linear(8, 8)
    info = layer_info_from_module("unet.x", module)
    x = torch.randn(4, 8)
    session = HookSession({"unet.x": module}, {"unet.x": info}, [], {"unet.x": "unet.x"})
    with session:
        for round_ in range(40):
            delta = _delta(info, 2, round_)
            with session.active(HookState({"unet.x": delta})):
                out = module(x)
            assert torch.allclose(out, _patched(module, delta, x), atol=1e-5), round_
            del delta


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_ops_agree_with_unfolded_patches(kind):
    torch.manual_seed(0)
    module, shape = LAYERS[kind]
    info = layer_info_from_module("unet.x", module)
    ops = LayerOps(info)
    x = torch.randn(*shape)
    tokens = ops.tokens(x)
    weight = torch.randn(4, info.input_dim)
    assert torch.allclose(ops.project(x, weight), tokens @ weight.T, atol=1e-4)
    coefficients = torch.randn(tokens.shape[0], 4)
    assert torch.allclose(ops.back_project(x, coefficients), tokens.T @ coefficients, atol=1e-3)
    assert ops.energy(x) == pytest.approx(float(tokens.pow(2).sum()), rel=1e-5)
