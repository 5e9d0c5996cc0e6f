"""Gradients of the plain (autograd) path of MLLA, checked without another implementation.

torch 2.14's CPU BatchNorm backward is wrong at batch size 1 when the input is
NCHW-contiguous and the gradient arrives channels-last (stack-notes). So
gradients are checked with batch 1 against batch 2 of the same image (the loss
halved: BatchNorm in eval mode or with batch statistics gives identical
gradients), and against float64 finite differences.
"""
import pytest
import torch

from mlla_mm.models import MLLA
from tests.helpers import TINY_ARCH, randomize_norms


def randomized(arch):
    torch.manual_seed(0)
    return randomize_norms(MLLA(arch, drop_path_rate=0.), biases=True)


def gradients(model, x, gs, weight):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    outs = model(x)
    (sum((o * g).sum() for o, g in zip(outs, gs)) * weight).backward()
    return x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_close_scaled(a, b, msg=''):
    scale = b.abs().max().clamp_min(1.0)
    torch.testing.assert_close(a / scale, b / scale, atol=5e-5, rtol=0, msg=msg)


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_batch1_gradients_equal_batch2_of_the_same_image(mode):
    model = randomized(TINY_ARCH).train(mode == 'train')
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        gs = [torch.randn_like(o) for o in model(x)]
    gx1, g1 = gradients(model, x, gs, 1.0)
    gx2, g2 = gradients(model, x.expand(2, -1, -1, -1), [g.expand(2, -1, -1, -1) for g in gs], 0.5)
    # float32 rounding (with batch statistics amplified where a map has few pixels) stays below
    # 1e-5 of the largest gradient (measured 6e-6 against float64); the torch bug gives errors of 1-100x.
    assert_close_scaled(gx2[0] * 2, gx1[0])
    assert_close_scaled(gx2[1] * 2, gx1[0])
    for name, g in g1.items():
        if mode == 'train' and name.endswith('.conv.bias') and name[:-len('conv.bias')] + 'norm.weight' in g1:
            continue  # a bias right before batch statistics: gradient 0 up to rounding in both
        assert_close_scaled(g2[name], g, msg=name)
    # The stem's and the downsamples' BatchNorms get gradients (they are where the trap was).
    assert g1['patch_embed.conv1.norm.weight'].abs().sum() > 0
    assert g1['layers.0.downsample.conv.2.norm.weight'].abs().sum() > 0


def test_float64_finite_differences():
    model = randomized(dict(embed_dims=8, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])).double().eval()
    x = torch.randn(1, 3, 11, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: model(t), (x, ), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    # And a parameter of the attention and of the stem's BatchNorm.
    for name in ['layers.1.blocks.0.attn.qk.weight', 'patch_embed.conv3.1.norm.weight']:
        value = dict(model.named_parameters())[name].detach().clone().requires_grad_()
        fn = lambda v, name=name: torch.func.functional_call(model, {name: v}, (x.detach(), ))  # noqa: E731
        assert torch.autograd.gradcheck(fn, (value, ), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True), name
