"""The fast MLLA code paths against a plain reference written from the spec.

``mlla_mm.models.mlla_reference`` is an independent, slow implementation
(tokens as (B, N, C), NCHW convs, RoPE from explicit cos/sin per channel
pair, the attention head by head). It reproduces the golden outputs of the
published code on its own; here the fast paths of ``MLLA`` (the in-place
inference path and the autograd path) must match it in outputs and
gradients on small, odd shapes. Also: bf16 autocast runs without NaN and
stays close to fp32.
"""
import pytest
import torch

import mlla_mm.models.mlla as mlla_module
from mlla_mm.models import MLLA
from mlla_mm.models.mlla_reference import MLLAReference, RefMLLABlock, ref_rope

# Outputs of a block are O(1); fp32 rounding differs between the two paths.
ATOL, RTOL = 2e-5, 1e-4
BF16_TOL = 0.08  # max |bf16 - fp32| / max |fp32| over every output map (measured ~0.02)


def make_pair(dim, heads, seed=0):
    torch.manual_seed(seed)
    fast = mlla_module.MLLABlock(dim, heads)
    ref = RefMLLABlock(dim, heads)
    # Non-trivial values everywhere (biases are zero at init).
    with torch.no_grad():
        for p in fast.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def ref_block(ref, x):
    b, h, w, c = x.shape
    return ref(x.reshape(b, h * w, c), h, w).reshape(b, h, w, c)


def fast_block(fast, x):
    _, h, w, c = x.shape
    if mlla_module.fast_path(x):
        return fast(x, mlla_module.rope_table(h, w, c, x.device))
    return fast(x, mlla_module.rope_cos_sin(h, w, c, x.device))


SHAPES = [  # (batch, H, W, dim, heads)
    (1, 1, 1, 8, 1),
    (2, 3, 5, 16, 2),
    (1, 7, 4, 24, 3),
    (2, 9, 13, 16, 4),
    (1, 11, 6, 32, 8),
]


def test_ref_rope_is_the_complex_table():
    x = torch.randn(2, 3 * 5, 8)
    table = mlla_module.rope_table(3, 5, 8, torch.device('cpu')).reshape(15, 4)
    want = torch.view_as_real(torch.view_as_complex(x.reshape(2, 15, 4, 2)) * table).reshape(2, 15, 8)
    torch.testing.assert_close(ref_rope(x, 3, 5), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('shape', SHAPES)
def test_block_outputs_match_reference(shape):
    b, h, w, c, heads = shape
    fast, ref = make_pair(c, heads)
    fast.eval(), ref.eval()
    x = torch.randn(b, h, w, c)
    with torch.no_grad():
        want = ref_block(ref, x)
        got_inplace = fast_block(fast, x)  # in-place inference path
    x_before = x.clone()
    got_grad = fast_block(fast, x)  # autograd path
    torch.testing.assert_close(got_inplace, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_grad, want, atol=ATOL, rtol=RTOL)
    assert torch.equal(x, x_before), 'the block must not modify its input'


@pytest.mark.parametrize('shape', SHAPES)
def test_block_gradients_match_reference(shape):
    b, h, w, c, heads = shape
    fast, ref = make_pair(c, heads, seed=1)
    fast.train(), ref.train()  # no dropout or drop_path in the block: same maths
    x = torch.randn(b, h, w, c)
    g = torch.randn(b, h, w, c)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (fast_block(fast, x1) * g).sum().backward()
    (ref_block(ref, x2) * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-3)
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        q = ref_params[name]
        scale = q.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(p.grad / scale, q.grad / scale, atol=1e-4, rtol=1e-3, msg=name)


def small_backbone_pair():
    arch = dict(embed_dims=8, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4])
    torch.manual_seed(2)
    fast = MLLA(arch, drop_path_rate=0.)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if name.endswith('bias'):
                p.copy_(torch.randn_like(p) * 0.1)
        for name, buf in fast.named_buffers():
            if name.endswith('running_var'):
                buf.uniform_(0.5, 1.5)
            elif name.endswith('running_mean'):
                buf.normal_(0, 0.1)
    ref = MLLAReference(arch)
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


@pytest.mark.parametrize('hw', [(33, 47), (13, 9)])
def test_backbone_matches_reference_outputs_and_grads(hw):
    fast, ref = small_backbone_pair()
    fast.eval(), ref.eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = ref(x)
        got = fast(x)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    gs = [torch.randn_like(o) for o in want]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    sum((o * g).sum() for o, g in zip(fast(x1), gs)).backward()
    sum((o * g).sum() for o, g in zip(ref(x2), gs)).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-3)
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        q = ref_params[name]
        scale = q.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(p.grad / scale, q.grad / scale, atol=1e-4, rtol=1e-3, msg=name)


def test_reference_matches_golden(golden, golden_arch, golden_dir):
    fast = MLLA(golden_arch, init_cfg=dict(type='Pretrained',
                                           checkpoint=str(golden_dir / 'mlla_small_official_det.pth')))
    fast.init_weights()
    ref = MLLAReference(golden_arch).eval()
    ref.load_state_dict(fast.state_dict(), strict=True)
    for case in list(golden['cases'].values())[:2]:
        with torch.no_grad():
            outs = ref(case['x'])
        for a, b in zip(outs, case['ys']):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_inplace_and_autograd_paths_agree_on_tiny():
    model = MLLA(dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])).eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        a = model(x)
    b = model(x)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q.detach(), atol=1e-5, rtol=1e-4)


def test_fused_weight_cache_follows_weight_updates():
    fast, ref = make_pair(16, 2)
    fast.eval(), ref.eval()
    x = torch.randn(1, 5, 6, 16)
    with torch.no_grad():
        fast_block(fast, x)  # fills the fused in/act weight cache
        fast.in_proj.weight.add_(0.5)
        fast.act_proj.bias.sub_(0.3)
        ref.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast_block(fast, x), ref_block(ref, x), atol=ATOL, rtol=RTOL)
    assert not any('fused' in k for k in fast.state_dict())


def test_bf16_autocast_no_nan_and_close_to_fp32():
    torch.manual_seed(3)
    model = MLLA(dict(embed_dims=32, depths=[1, 2, 2, 1], num_heads=[1, 2, 4, 8])).eval()
    x = torch.randn(1, 3, 96, 72)
    ln_dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, o: ln_dtypes.append(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            ln_dtypes.clear()
            outs = model(x)
    for h in hooks:
        h.remove()
    assert ln_dtypes and all(d == torch.float32 for d in ln_dtypes), 'LayerNorm must run in float32'
    for a, b in zip(outs, ref):
        assert torch.isfinite(a).all()
        err = (a.float() - b).abs().max() / b.abs().max()
        assert err < BF16_TOL, float(err)
    # Gradients under autocast are finite too.
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = sum(o.float().square().mean() for o in model(x))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_attention_math_stays_float32_under_autocast(monkeypatch):
    seen = []
    real = torch.bmm

    def spy(a, b, **kw):
        seen.append((a.dtype, b.dtype))
        return real(a, b, **kw)

    monkeypatch.setattr(mlla_module.torch, 'bmm', spy)
    block = mlla_module.MLLABlock(16, 2).eval()
    x = torch.randn(1, 6, 7, 16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = fast_block(block, x)
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert torch.isfinite(out).all()


def test_traced_under_torch_compile_uses_the_plain_path(monkeypatch):
    """Under torch.compile the block must not take the in-place path or cache the fused weight."""
    fast, ref = make_pair(32, 2)
    fast.eval()
    x = torch.randn(1, 5, 7, 32)
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    monkeypatch.setattr(fast, '_forward_inplace', lambda *a: pytest.fail('in-place path taken while compiling'))
    with torch.no_grad():
        out = fast_block(fast, x)
    assert fast._fused_in_act is None
    torch.testing.assert_close(out, ref_block(ref, x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_real_rope_equals_complex_rope(dtype):
    b, h, w, c = 2, 33, 47, 64
    x = torch.randn(b, h, w, c, dtype=dtype)
    angles = mlla_module.rope_angles(h, w, c, torch.device('cpu'), dtype)
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    want = torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    cos, sin = mlla_module.rope_cos_sin(h, w, c, torch.device('cpu'), dtype)
    torch.testing.assert_close(mlla_module.apply_rope(x, cos, sin), want, atol=1e-6, rtol=0)
