"""The export-only MLLA formulation (mlla_mm/deploy/mlla_graph.py) computes the model's numbers."""
import copy
from collections import Counter

import pytest
import torch

from mlla_mm.deploy import mlla_graph
from mlla_mm.deploy.mlla_graph import (ExportStage, count_replaced, export_friendly, rope_half_tables,
                                       rope_pair_halves_permutation)
from mlla_mm.models import MLLA
from mlla_mm.models.mlla import MLLAStage, apply_rope, rope_cos_sin
from tests.helpers import randomize_norms

ARCH = dict(embed_dims=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4])


def tiny_mlla(dtype=torch.float64) -> MLLA:
    torch.manual_seed(0)
    return randomize_norms(MLLA(ARCH, drop_path_rate=0.).eval().to(dtype), biases=True)


def max_rel_diff(a, b) -> float:
    return max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize('shape', [(2, 37, 45), (1, 5, 3)])
def test_export_friendly_equals_the_model(shape):
    model = tiny_mlla()
    friendly = export_friendly(copy.deepcopy(model)).eval()
    assert count_replaced(friendly) == (4, 0)
    assert count_replaced(model) == (0, 4)  # the original is untouched (a copy was passed)
    x = torch.randn(shape[0], 3, *shape[1:], dtype=torch.float64)
    with torch.no_grad():
        ref, got = model(x), friendly(x)
    assert [r.shape for r in ref] == [g.shape for g in got]
    assert max_rel_diff(ref, got) < 1e-12


def test_export_friendly_equals_the_model_with_gradients_path():
    """Also against the plain autograd code (not the fast inference path), in float32 within 1e-5."""
    model = tiny_mlla(torch.float32)
    friendly = export_friendly(copy.deepcopy(model)).eval()
    x = torch.randn(2, 3, 37, 53)
    ref = model(x)  # gradients enabled: the plain code of mlla.py
    with torch.no_grad():
        got = friendly(x)
    assert max_rel_diff([r.detach() for r in ref], got) < 1e-5


def test_a_wrong_channel_order_is_caught(monkeypatch):
    """Without the pair -> halves permutation (identity order) RoPE rotates the wrong channels: outputs differ."""
    model = tiny_mlla()
    monkeypatch.setattr(mlla_graph, 'rope_pair_halves_permutation', lambda c, h: torch.arange(c))
    friendly = export_friendly(copy.deepcopy(model)).eval()
    x = torch.randn(1, 3, 40, 48, dtype=torch.float64)
    with torch.no_grad():
        assert max_rel_diff(model(x), friendly(x)) > 1e-8  # the correct order: < 1e-12


@pytest.mark.parametrize('channels,heads', [(16, 1), (32, 4), (64, 2)])
def test_rope_on_halves_equals_pairwise_rope(channels, heads):
    """``RoPE(u)`` on adjacent pairs == ``u C2 + swap(u S2)`` on the halves layout, head by head."""
    h, w = 5, 7
    d = channels // heads
    u = torch.randn(h, w, channels, dtype=torch.float64)
    cos, sin = rope_cos_sin(h, w, channels, u.device, torch.float64)
    ref = apply_rope(u, cos, sin)  # (H, W, C), pairs (2m, 2m+1)
    perm = rope_pair_halves_permutation(channels, heads)
    uh = u[..., perm].reshape(h * w, heads, d).transpose(0, 1)  # (heads, N, d), halves order
    table = rope_half_tables(h, w, channels, heads, u.device, torch.float64)  # (heads, 2, 1, d/2, N)
    cos_h, sin_h = table[:, 0, 0].transpose(1, 2), table[:, 1, 0].transpose(1, 2)  # (heads, N, d/2)
    c2, s2 = torch.cat([cos_h, cos_h], dim=-1), torch.cat([sin_h, sin_h], dim=-1)
    us = uh * s2
    got = uh * c2 + torch.cat([-us[..., d // 2:], us[..., :d // 2]], dim=-1)
    got = got.transpose(0, 1).reshape(h, w, channels)[..., torch.argsort(perm)]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_permutation_keeps_each_head_and_pairs_go_to_halves():
    perm = rope_pair_halves_permutation(12, 2).tolist()
    assert perm == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]


def test_onnx_graph_of_the_export_formulation(tmp_path):
    """The exported graph has no pair Split and its token-major linear layers are 3-D MatMul + Add, which ONNX
    Runtime keeps as MatMul and fuses fc1's bias into its GELU (no Gemm with a broadcast bias); the plain code
    has the pair Split."""
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    from mlla_mm.deploy.onnx_export import ExportTarget, export_bytes
    from mlla_mm.deploy.wrappers import BackboneForExport, output_names
    model = BackboneForExport(tiny_mlla(torch.float32)).eval()
    target = ExportTarget(model, 'backbone', output_names('backbone', 4), 'tiny')
    data = {f: export_bytes(target, (32, 32), formulation=f) for f in ('onnx', 'plain')}
    ops = {f: Counter(n.op_type for n in onnx.load_from_string(d).graph.node) for f, d in data.items()}
    blocks = sum(ARCH['depths'])
    assert ops['onnx']['Split'] == 0 and ops['plain']['Split'] > 0
    assert ops['onnx']['Gemm'] == 0
    # act_proj, in_proj, out_proj, fc1, fc2 token-major, q and k weight-left (their bias added after)
    assert ops['onnx']['MatMul'] >= 7 * blocks
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / 'optimised.onnx')
    ort.InferenceSession(data['onnx'], so, providers=['CPUExecutionProvider'])
    optimised = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert optimised['Gemm'] == 0 and optimised['BiasGelu'] == blocks, optimised
    assert not any(isinstance(m, MLLAStage) for m in target.exportable('onnx').modules())
    assert any(isinstance(m, ExportStage) for m in target.exportable('onnx').modules())
    assert not any(isinstance(m, ExportStage) for m in target.exportable('plain').modules())
