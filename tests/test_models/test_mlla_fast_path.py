"""Both code paths of MLLA against a plain reference written from the spec, and the rule between them.

``tests/test_models/mlla_reference.py`` is an independent, slow implementation
(tokens as (B, N, C), NCHW convs, RoPE from explicit cos/sin per channel
pair, the attention head by head). It reproduces the golden outputs of the
published code on its own; here the plain autograd path of ``mlla.py`` and
the in-place inference path of ``fast_inference.py`` must match it in
outputs (and the plain path in gradients) on small, odd shapes. Also: the
one rule that picks the inference path, and bf16 autocast.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import mlla_mm.models.mlla as mlla_module
from mlla_mm.models import MLLA
from mlla_mm.models import fast_inference
from mlla_mm.models.ops import use_fast_inference
from tests.helpers import randomize_norms, small_backbone_pair
from tests.test_models.mlla_reference import MLLAReference, RefMLLABlock

# Outputs of a block are O(1); fp32 rounding differs between the paths.
ATOL, RTOL = 2e-5, 1e-4
BF16_TOL = 0.08  # max |bf16 - fp32| / max |fp32| over every output map (measured ~0.02)


def make_pair(dim, heads, seed=0):
    torch.manual_seed(seed)
    block = mlla_module.MLLABlock(dim, heads)
    ref = RefMLLABlock(dim, heads)
    # Non-trivial values everywhere (biases are zero at init).
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ref.load_state_dict(block.state_dict(), strict=True)
    return block, ref


def seeded_mlla(seed, embed_dims, depths, **kwargs):
    """An MLLA (heads 1, 2, 4, 8) built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return MLLA(dict(embed_dims=embed_dims, depths=depths, num_heads=[1, 2, 4, 8]), **kwargs)


def ref_block(ref, x):
    b, h, w, c = x.shape
    return ref(x.reshape(b, h * w, c), h, w).reshape(b, h, w, c)


def plain_block(block, x):
    _, h, w, c = x.shape
    return block(x, *mlla_module.rope_cos_sin(h, w, c, x.device))


def fast_block(block, x):
    _, h, w, c = x.shape
    with torch.no_grad():
        return fast_inference.block_forward(block, x, torch.complex(*mlla_module.rope_cos_sin(h, w, c, x.device)))


SHAPES = [  # (batch, H, W, dim, heads)
    (1, 1, 1, 8, 1),
    (2, 3, 5, 16, 2),
    (1, 7, 4, 24, 3),
    (2, 9, 13, 16, 4),
    (1, 11, 6, 32, 8),
]


@pytest.mark.parametrize('shape', SHAPES)
def test_block_outputs_match_reference(shape):
    b, h, w, c, heads = shape
    block, ref = make_pair(c, heads)
    block.eval(), ref.eval()
    x = torch.randn(b, h, w, c)
    x_before = x.clone()
    with torch.no_grad():
        want = ref_block(ref, x)
        got_plain = plain_block(block, x)
    got_fast = fast_block(block, x)
    torch.testing.assert_close(got_plain, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_fast, want, atol=ATOL, rtol=RTOL)
    assert torch.equal(x, x_before), 'a block must not modify its input'


def assert_same_gradients(x1, model, x2, ref):
    """The input and parameter gradients of ``model`` (input ``x1``) and ``ref`` (input ``x2``) agree (each
    parameter's relative to the reference's largest entry)."""
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-3)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[name]
        scale = q.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(p.grad / scale, q.grad / scale, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize('shape', SHAPES)
def test_block_gradients_match_reference(shape):
    b, h, w, c, heads = shape
    block, ref = make_pair(c, heads, seed=1)
    block.train(), ref.train()  # no dropout or drop_path in the block: same maths
    x = torch.randn(b, h, w, c)
    g = torch.randn(b, h, w, c)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (plain_block(block, x1) * g).sum().backward()
    (ref_block(ref, x2) * g).sum().backward()
    assert_same_gradients(x1, block, x2, ref)


@pytest.mark.parametrize('hw', [(33, 47), (13, 9)])
def test_backbone_matches_reference_outputs_and_grads(hw, monkeypatch):
    model, ref = small_backbone_pair()
    model.eval(), ref.eval()
    calls = []
    real = fast_inference.forward_blocks
    monkeypatch.setattr(fast_inference, 'forward_blocks', lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = ref(x)
        got = model(x)
    assert len(calls) == 4, 'eval + no_grad must run the inference path in every stage'
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    gs = [torch.randn_like(o) for o in want]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    outs = model(x1)  # with gradients: the plain path
    assert len(calls) == 4
    for a, b in zip(outs, want):
        torch.testing.assert_close(a.detach(), b, atol=1e-4, rtol=1e-4)
    sum((o * g).sum() for o, g in zip(outs, gs)).backward()
    sum((o * g).sum() for o, g in zip(ref(x2), gs)).backward()
    assert_same_gradients(x1, model, x2, ref)


def test_reference_matches_golden(golden, golden_arch, golden_dir):
    model = MLLA(golden_arch, init_cfg=dict(type='Pretrained',
                                            checkpoint=str(golden_dir / 'mlla_small_official_det.pth')))
    model.init_weights()
    ref = MLLAReference(golden_arch).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    for case in list(golden['cases'].values())[:2]:
        with torch.no_grad():
            outs = ref(case['x'])
        for a, b in zip(outs, case['ys']):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_inference_and_plain_paths_agree_on_tiny():
    model = MLLA(dict(embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])).eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        a = model(x)
    b = model(x)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q.detach(), atol=1e-5, rtol=1e-4)


def test_the_rule_for_the_inference_path(monkeypatch):
    stage = mlla_module.MLLAStage(16, 1, 2, downsample=False).eval()
    x = torch.zeros(1, 4, 4, 16)
    with torch.no_grad():
        assert use_fast_inference(stage, x)
        with torch.autocast('cpu', dtype=torch.bfloat16):  # runs in bf16 (test_fast_path_under_bf16_autocast)
            assert use_fast_inference(stage, x)
            assert fast_inference.compute_dtype(x) == torch.bfloat16
        assert fast_inference.compute_dtype(x) == torch.float32
        stage.blocks[0].drop_path.train()  # any submodule in training mode
        assert not use_fast_inference(stage, x)
        stage.eval()
        stage.train()
        assert not use_fast_inference(stage, x)
        stage.eval()
        for name in ['torch.jit.is_tracing', 'torch.onnx.is_in_onnx_export', 'torch.compiler.is_compiling']:
            with monkeypatch.context() as m:
                m.setattr(name, lambda: True)
                assert not use_fast_inference(stage, x), name
        assert use_fast_inference(stage, x)
        stage.fast_inference = False  # the model's switch (test_fast_inference_switch.py)
        assert not use_fast_inference(stage, x)
        stage.fast_inference = True
    assert not use_fast_inference(stage, x)  # gradients recorded


def test_stage_dispatch_follows_the_rule(monkeypatch):
    """MLLAStage.forward is the one caller: the inference path exactly when the rule holds."""
    taken = []
    real = fast_inference.forward_blocks
    monkeypatch.setattr(fast_inference, 'forward_blocks', lambda *a: taken.append('fast') or real(*a))
    stage = mlla_module.MLLAStage(16, 2, 2, downsample=False).eval()
    x = torch.randn(1, 5, 7, 16)
    with torch.no_grad():
        want = stage(x)
        assert taken == ['fast']
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        got = stage(x)  # the plain code is traced under torch.compile
    assert taken == ['fast']
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_inference_path_follows_weight_updates():
    block, ref = make_pair(16, 2)
    block.eval(), ref.eval()
    x = torch.randn(1, 5, 6, 16)
    fast_block(block, x)
    with torch.no_grad():
        block.in_proj.weight.add_(0.5)
        block.act_proj.bias.sub_(0.3)
    ref.load_state_dict(block.state_dict())
    with torch.no_grad():
        want = ref_block(ref, x)
    torch.testing.assert_close(fast_block(block, x), want, atol=ATOL, rtol=RTOL)
    assert set(block.state_dict()) == set(ref.state_dict())


class LayerNormDtypes(TorchFunctionMode):
    """Records (input dtype, weight dtype) of every ``F.layer_norm`` call."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.layer_norm:
            weight = args[2] if len(args) > 2 else (kwargs or {}).get('weight')
            self.seen.append((args[0].dtype, weight.dtype))
        return func(*args, **(kwargs or {}))


# Normalising in float32: a float32 input, or a bf16 one with float32 weights (PyTorch's
# mixed-dtype kernel, which computes the statistics in float32: test_mixed_layer_norm_is_float32_maths).
FLOAT32_NORM = {(torch.float32, torch.float32), (torch.bfloat16, torch.float32)}


def test_mixed_layer_norm_is_float32_maths():
    """The fast path's bf16 LayerNorm equals normalising a float32 copy, rounded to bf16."""
    torch.manual_seed(4)
    norm = mlla_module.LayerNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
        x = (torch.randn(5000, 64) * 3 + 40).bfloat16()  # a large mean: bf16 statistics would be far off
        got = fast_inference._norm(norm, x)
        want = norm(x.float()).bfloat16()
    assert got.dtype == torch.bfloat16
    # At most one bf16 rounding step apart (where the float32 sums round differently), rarely.
    diff = (got.float() - want.float()).abs()
    assert (diff <= want.float().abs() * 2 ** -7 + 2 ** -9).all(), float(diff.max())
    assert (got != want).float().mean() < 0.01


def test_bf16_relu_on_bit_patterns_is_relu():
    x = torch.tensor([-3.5, -0.0, 0.0, 1e-30, -1e-30, 2.25, float('inf'), float('-inf')]).bfloat16()
    want = torch.relu(x)
    got = fast_inference.relu_(x.clone())
    assert torch.equal(got, want) and not torch.signbit(got).any()
    y = torch.randn(2, 5, 7, 3).bfloat16().permute(0, 2, 3, 1)  # a strided view, as conv outputs are
    assert torch.equal(fast_inference.relu_(y.clone()), torch.relu(y))


def test_bf16_autocast_no_nan_and_close_to_fp32():
    model = seeded_mlla(3, 32, [1, 2, 2, 1]).eval()
    x = torch.randn(1, 3, 96, 72)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16), LayerNormDtypes() as ln:
            outs = model(x)
    assert ln.seen and set(ln.seen) <= FLOAT32_NORM, f'LayerNorm must run in float32: {set(ln.seen)}'
    for a, b in zip(outs, ref):
        assert torch.isfinite(a).all()
        err = (a.float() - b).abs().max() / b.abs().max()
        assert err < BF16_TOL, float(err)
    # Gradients under autocast are finite too.
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = sum(o.float().square().mean() for o in model(x))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class MatmulDtypes(TorchFunctionMode):
    """Records the dtypes of every matrix product (``@``, ``matmul``, ``bmm``)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm):
            self.seen.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))


def test_attention_math_stays_float32_under_autocast():
    attn = mlla_module.LinearAttention(16, 2)
    x = torch.randn(1, 6, 7, 16)
    cos, sin = mlla_module.rope_cos_sin(6, 7, 16, x.device)
    with torch.autocast('cpu', dtype=torch.bfloat16), MatmulDtypes() as mode:
        out = attn(x, cos, sin)
    assert len(mode.seen) == 3 and all(d == (torch.float32, torch.float32) for d in mode.seen), mode.seen
    assert torch.isfinite(out).all()


class ProductDtypes(TorchFunctionMode):
    """Records the input dtypes of linear layers, convolutions and matrix products, by kind."""

    LINEAR = (torch.nn.functional.linear, torch.addmm, torch.Tensor.addmm_, torch.conv2d,
              torch.nn.functional.conv2d)
    PRODUCTS = (torch.bmm, torch.Tensor.baddbmm_, torch.mm)

    def __init__(self):
        super().__init__()
        self.linear, self.products = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LINEAR:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.linear.append(tuple(t.dtype for t in tensors))
        elif func in self.PRODUCTS:
            self.products.append((args[0].dtype, args[1].dtype))
        return func(*args, **kwargs)


def test_fast_path_under_bf16_autocast(monkeypatch):
    """Under autocast the fast path runs (not the autograd code) in bf16, with float32 attention maths."""
    model = seeded_mlla(5, 32, [1, 2, 2, 1]).eval()
    randomize_norms(model)  # non-trivial BatchNorm statistics and LayerNorm affine terms
    x = torch.randn(2, 3, 97, 75)
    taken = []
    for name in ('forward_blocks', 'stem_forward', 'downsample_forward'):
        real = getattr(fast_inference, name)
        monkeypatch.setattr(fast_inference, name, lambda *a, real=real, name=name: taken.append(name) or real(*a))
    with torch.no_grad():
        ref = model(x)
        taken.clear()
        with torch.autocast('cpu', dtype=torch.bfloat16), ProductDtypes() as mode:
            fast = model(x)
            assert torch.is_autocast_enabled('cpu')  # switched back on after the fast path
        assert sorted(set(taken)) == ['downsample_forward', 'forward_blocks', 'stem_forward']
        model.set_fast_inference(False)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            plain = model(x)
        model.set_fast_inference(True)
    assert mode.linear and all(set(d) == {torch.bfloat16} for d in mode.linear), set(mode.linear)
    assert mode.products and all(d == (torch.float32, torch.float32) for d in mode.products), set(mode.products)
    for f, p, r in zip(fast, plain, ref):
        assert f.dtype == p.dtype == torch.float32
        assert torch.isfinite(f).all()
        scale = r.abs().max()
        assert (f - r).abs().max() / scale < BF16_TOL
        # The two bf16 paths round differently, but compute the same numbers.
        assert (f - p).abs().max() / scale < BF16_TOL / 2
    # A wrong weight dtype would be caught: the fast path really reads the block weights.
    with torch.no_grad():
        model.layers[1].blocks[0].mlp.fc2.weight.mul_(30)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            changed = model(x)
    assert (changed[1] - fast[1]).abs().max() / fast[1].abs().max() > BF16_TOL


def test_bf16_model_without_autocast_runs_the_fast_path_in_bf16():
    """A model converted with ``.bfloat16()`` and bf16 images: same numbers as autocast, bf16 outputs."""
    model = seeded_mlla(6, 16, [1, 1, 1, 1]).eval()
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        ref = model(x)
        outs = model.bfloat16()(x.bfloat16())
    for o, r in zip(outs, ref):
        assert o.dtype == torch.bfloat16
        assert (o.float() - r).abs().max() / r.abs().max() < BF16_TOL


def test_bf16_training_dtypes_where_bf16_is_slow_or_wasteful():
    """Under autocast with gradients: the strided depthwise convolution of each Downsample runs in
    float32 (its bf16 backward is 6-11x slower on the CPU); the blocks' LayerNorms hand bf16 on to
    their bf16 linear layers; the output norms stay float32; gradients match fp32 closely."""
    model = seeded_mlla(7, 16, [1, 1, 1, 1], drop_path_rate=0.).train()
    seen = {}
    for name, m in model.named_modules():
        if name.endswith('downsample.conv.1.conv') or name.endswith('blocks.0.norm1') or name in ('norm0', 'norm3'):
            m.register_forward_hook(lambda m, a, out, name=name: None if name in seen else
                                    seen.update({name: (a[0].dtype, out.dtype)}))
    x = torch.randn(2, 3, 64, 48)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
    loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert seen['layers.0.downsample.conv.1.conv'] == (torch.float32, torch.float32)
    assert seen['layers.0.blocks.0.norm1'] == (torch.bfloat16, torch.bfloat16)
    assert seen['norm0'][1] == seen['norm3'][1] == torch.float32
    model.zero_grad()
    sum(o.square().mean() for o in model(x)).backward()
    bf16 = torch.cat([grads[n].flatten() for n, _ in model.named_parameters()])
    fp32 = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
    assert torch.isfinite(bf16).all() and (bf16 - fp32).norm() / fp32.norm() < 0.05


@pytest.mark.parametrize('act', ['none', 'gelu', 'silu'])
def test_fused_linear_matches_linear_and_activation(act, monkeypatch):
    """oneDNN's fused linear (bf16 on the CPU) and the fallback compute act(x W^T + b) alike."""
    torch.manual_seed(8)
    x, w, b = torch.randn(300, 24), torch.randn(40, 24) * 0.3, torch.randn(40)
    ref = torch.nn.functional.linear(x, w, b)
    ref = {'none': ref, 'gelu': torch.nn.functional.gelu(ref), 'silu': torch.nn.functional.silu(ref)}[act]
    args = [t.bfloat16() for t in (x, w, b)]
    fused = fast_inference.linear_act(*args, act)
    monkeypatch.setitem(fast_inference._FUSED_LINEAR, 'ok', False)
    fallback = fast_inference.linear_act(*args, act)
    for got in (fused, fallback):
        assert got.dtype == torch.bfloat16 and got.shape == (300, 40)
        assert ((got.float() - ref).abs() <= 0.02 * ref.abs() + 0.05).all()
    assert fast_inference.linear_act(x, w, b, act).dtype == torch.float32  # float32 never takes the fused op


@pytest.mark.parametrize('bias', [True, False])
def test_folded_batch_norm_equals_conv_then_batch_norm(bias):
    """The stem's and downsample layers' BatchNorm folded into the convolution gives the layer's output."""
    torch.manual_seed(0)
    layer = mlla_module.ConvLayer(6, 10, 3, stride=2, padding=1, bias=bias).eval()
    with torch.no_grad():
        layer.norm.running_mean.normal_(0, 0.5)
        layer.norm.running_var.uniform_(0.2, 3.0)
        layer.norm.weight.normal_()
        layer.norm.bias.normal_()
    x = torch.randn(2, 9, 11, 6)  # (B, H, W, C)
    folded = fast_inference.fold_batch_norm(layer, torch.float32)
    assert folded.norm is None and folded.conv.out_channels == 10
    with torch.no_grad():
        want = layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        got = fast_inference.layer_rows(folded, x, 0, 5)
        unfolded = fast_inference.layer_rows(layer, x, 0, 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unfolded, want, atol=1e-5, rtol=1e-5)
    bf16 = fast_inference.fold_batch_norm(layer, torch.bfloat16)
    assert bf16.conv.weight.dtype == bf16.conv.bias.dtype == torch.bfloat16


def test_batch_norm_without_running_statistics_is_not_folded():
    layer = mlla_module.ConvLayer(4, 4, 1)
    layer.norm = torch.nn.BatchNorm2d(4, track_running_stats=False)
    assert fast_inference.fold_batch_norm(layer.eval(), torch.float32) is layer
    plain = mlla_module.ConvLayer(4, 4, 1, norm=False)
    assert fast_inference.fold_batch_norm(plain, torch.float32) is plain
