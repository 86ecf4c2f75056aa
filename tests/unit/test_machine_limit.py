"""The floors bench-forward sets a decode step against: weight bytes counted exactly, packed or not."""

import pytest
import torch
from torch import nn

from specserve.actors.packed_linear import pack_linear_weights
from specserve.tools import machine_limit


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96, bias=False), nn.ReLU(), nn.Linear(96, 64), nn.Linear(64, 200)).to(dtype)


@pytest.mark.parametrize("pack", [False, True])
def test_weight_bytes_are_every_linear_weight_read_once(pack):
    model = _model(torch.float32)
    if pack:
        assert pack_linear_weights(model) == 3  # float32 always packs on CPU
    limit = machine_limit.measure(model, rows=[1, 4], repeats=2, stream_mib=64)
    assert limit.weight_mb == pytest.approx((64 * 96 + 96 * 64 + 64 * 200) * 4 / 1e6)
    assert set(limit.linears_ms) == {1, 4} and min(limit.linears_ms.values()) > 0
    assert limit.stream_gb_s > 0.1  # any machine streams more than 100 MB/s
    assert limit.read_floor_ms() == pytest.approx(limit.weight_mb / limit.stream_gb_s)


def test_linears_alone_runs_each_layer_on_its_own_input_width():
    model = _model(torch.bfloat16)
    calls = []
    for m in model:
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, args, out: calls.append((args[0].shape, out.shape)))
    machine_limit.linears_ms(model, rows=3, repeats=1)
    # warm-up + one timed run, three linears each, every input [1, 3, in_features]
    assert calls[:3] == [((1, 3, 64), (1, 3, 96)), ((1, 3, 96), (1, 3, 64)), ((1, 3, 64), (1, 3, 200))]
    assert len(calls) == 6
