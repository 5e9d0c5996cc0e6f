"""The real-valued RoPE of the model: the same numbers as the complex rotation, cached per size,
and built from the traced sizes when the model is traced (so a traced graph serves any size)."""
import pytest
import torch

import mlla_mm.models.mlla as mlla_module
from mlla_mm.models import MLLA
from mlla_mm.models.mlla import RoPE, apply_rope, rope_angles, rope_cos_sin
from tests.helpers import TINY_ARCH
from tests.test_models.mlla_reference import ref_rope

CPU = torch.device('cpu')


def complex_rope(x, angles):
    """The published formulation: channel pairs as complex numbers times ``exp(i * angle)``."""
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


@pytest.mark.parametrize('shape', [(1, 1, 1, 4), (2, 3, 5, 8), (1, 7, 4, 24), (2, 33, 47, 64)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_real_rope_equals_complex_rope(shape, dtype):
    b, h, w, c = shape
    x = torch.randn(b, h, w, c, dtype=dtype)
    cos, sin = rope_cos_sin(h, w, c, CPU, dtype)
    assert cos.shape == sin.shape == (h, w, c // 2) and cos.dtype == dtype
    want = complex_rope(x, rope_angles(h, w, c, CPU, dtype))
    torch.testing.assert_close(apply_rope(x, cos, sin), want, atol=1e-6, rtol=0)


def test_rope_angles_match_the_spec():
    angles = rope_angles(3, 5, 8, CPU)
    assert angles.shape == (3, 5, 4)
    # K = 2: pairs 0, 1 rotate by row * theta_(0, 1), pairs 2, 3 by col * theta_(0, 1); theta_j = 1e4^(-j/2)
    r, c = 2, 4
    torch.testing.assert_close(angles[r, c], torch.tensor([r * 1.0, r * 1e-2, c * 1.0, c * 1e-2]))
    cos, sin = rope_cos_sin(3, 5, 8, CPU)
    assert torch.equal(cos[0, 0], torch.ones(4)) and torch.equal(sin[0, 0], torch.zeros(4))


def test_real_rope_equals_the_reference_rope():
    """``ref_rope`` (per-pair float64 cos/sin loop of the reference model) on tokens."""
    x = torch.randn(2, 3 * 5, 8)
    cos, sin = rope_cos_sin(3, 5, 8, CPU)
    got = apply_rope(x.view(2, 3, 5, 8), cos, sin).view(2, 15, 8)
    torch.testing.assert_close(got, ref_rope(x, 3, 5), atol=1e-6, rtol=1e-5)


def test_rope_pairs_are_adjacent_channels():
    """Rotating a vector that is 1 on channel 2m only moves it into channel 2m + 1."""
    cos, sin = rope_cos_sin(2, 2, 8, CPU)
    x = torch.zeros(2, 2, 8)
    x[..., 2] = 1.0
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[..., 2], cos[..., 1])
    torch.testing.assert_close(out[..., 3], sin[..., 1])
    assert out[..., [0, 1, 4, 5, 6, 7]].abs().max() == 0


def test_rope_tables_computed_once_per_stage_and_size(monkeypatch):
    calls = []
    real = mlla_module.rope_cos_sin
    monkeypatch.setattr(mlla_module, 'rope_cos_sin', lambda *a, **k: calls.append(a[:3]) or real(*a, **k))
    model = MLLA(dict(embed_dims=16, depths=[3, 3, 3, 3], num_heads=[1, 2, 2, 4])).eval()
    x = torch.randn(1, 3, 64, 96)
    for grad in (False, True):  # the inference path and the plain path each build once per stage
        calls.clear()
        with torch.set_grad_enabled(grad):
            model(x)
            assert len(calls) == 4, calls  # once per stage, not once per block
            model(x)
            assert len(calls) == 4  # cached across forwards
            model(torch.randn(1, 3, 32, 32))
        assert len(calls) == 8 and calls[4] == (8, 8, 16)


def test_rope_cache_is_bounded_and_keyed_by_dtype():
    rope = RoPE(8, capacity=2)
    x32, x64 = torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8, dtype=torch.float64)
    cos32, _ = rope(x32)
    cos64, _ = rope(x64)
    assert cos32.dtype == torch.float32 and cos64.dtype == torch.float64
    assert rope(x32)[0] is cos32  # cached; now the most recently used
    rope(torch.zeros(1, 5, 5, 8))  # drops the float64 table, the least recently used
    assert len(rope._cache) == 2 and rope(x32)[0] is cos32
    rope(torch.zeros(1, 6, 6, 8))
    rope(torch.zeros(1, 7, 7, 8))
    assert len(rope._cache) == 2 and rope(x32)[0] is not cos32
    assert rope(torch.zeros(1, 3, 4, 8, dtype=torch.bfloat16))[0].dtype == torch.float32


def test_rope_tables_not_cached_while_tracing(monkeypatch):
    monkeypatch.setattr(torch.jit, 'is_tracing', lambda: True)
    rope = RoPE(8)
    a, _ = rope(torch.zeros(1, 3, 4, 8))
    b, _ = rope(torch.zeros(1, 3, 4, 8))
    assert a is not b and torch.equal(a, b) and not rope._cache


def test_traced_backbone_serves_other_sizes():
    """A ``torch.jit.trace`` of the backbone (the plain, real-valued path) at one size runs at others."""
    torch.manual_seed(0)
    model = MLLA(TINY_ARCH).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 96), check_trace=False)
    graph = str(traced.inlined_graph)
    assert 'complex' not in graph and 'polar' not in graph
    for hw in [(64, 96), (45, 70), (33, 47)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want = model(x)  # eager inference path
            got = traced(x)
        for a, b in zip(got, want):
            assert a.shape == b.shape, hw
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
