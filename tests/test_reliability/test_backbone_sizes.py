"""Property-based: the backbone takes any image size from 1 to 700 pixels per side."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlla_mm.models import MLLA
from tests.helpers import TINY_ARCH



@pytest.fixture(scope='module')
def backbone():
    torch.manual_seed(0)
    return MLLA(TINY_ARCH, out_indices=(0, 1, 2, 3)).eval()


def expected_shapes(h, w):
    # Stem: /4 (padded to a multiple of 4); each later stage halves, rounding up.
    h, w = math.ceil(h / 4), math.ceil(w / 4)
    out = []
    for i, c in enumerate([16, 32, 64, 128]):
        if i:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        out.append((c, h, w))
    return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(h=st.integers(1, 700), w=st.integers(1, 700), batch=st.integers(1, 2))
def test_output_shapes_and_finite(backbone, h, w, batch):
    x = torch.randn(batch, 3, h, w)
    with torch.no_grad():
        outs = backbone(x)
    assert len(outs) == 4
    for y, (c, eh, ew) in zip(outs, expected_shapes(h, w)):
        assert y.shape == (batch, c, eh, ew), (h, w, tuple(y.shape))
        assert torch.isfinite(y).all()


@pytest.mark.parametrize('hw', [(1, 1), (7, 1000), (1000, 7), (1, 700)])
def test_extreme_sizes_train_mode(backbone, hw):
    model = MLLA(TINY_ARCH).train()
    outs = model(torch.randn(2, 3, *hw))
    sum(o.sum() for o in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_odd_inputs_are_clear_errors(backbone):
    with pytest.raises(ValueError, match='shape'):
        backbone(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError):
        backbone(torch.randn(1, 3, 0, 32))
