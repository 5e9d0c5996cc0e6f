"""MLLA in timm: registry, published classifier (golden logits), timm's model checks, weights to and from mm."""
import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn as nn

import mlla_mm  # noqa: F401  (registers the timm models)
from mlla_mm.checkpoint import CheckpointError, load_file
from mlla_mm.models import MLLA, MLLAClassifier, checkpoint_filter_fn
from tests.helpers import ROOT, TINY_ARCH
from tests.test_reliability.evil_pickles import CfgNode, YacsPickle

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
NAMES = ['mlla_tiny', 'mlla_small', 'mlla_base']


def tiny(**kwargs):
    """The registered ``mlla_tiny`` built through timm with a tiny arch."""
    return timm.create_model('mlla_tiny', **dict(TINY, **kwargs))


def ceil_div(a, b):
    return -(-a // b)


def save(obj, path):
    torch.save(obj, path)
    return str(path)


# --------------------------------------------------------------------------
# Registry and pretrained_cfg.
# --------------------------------------------------------------------------
def test_import_mlla_mm_registers_the_models():
    code = ('import timm, mlla_mm; m = timm.create_model("mlla_tiny.in1k", embed_dim=16, depths=(1, 1, 1, 1), '
            'num_heads=(1, 2, 2, 4)); print(type(m).__module__, type(m).__name__, sorted(timm.list_models("mlla*")))')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mlla_mm.models.timm_mlla MLLAClassifier ['mlla_base', 'mlla_small', 'mlla_tiny']" in res.stdout
    assert isinstance(tiny(), MLLAClassifier)


def test_models_are_registered_with_a_truthful_cfg():
    assert set(NAMES) <= set(timm.list_models('mlla_*'))
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg['architecture'] == name and cfg['tag'] == 'in1k'
        assert cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (7, 7)
        assert cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 0.875 and cfg['crop_mode'] == 'center'
        assert tuple(cfg['mean']) == timm.data.IMAGENET_DEFAULT_MEAN
        assert tuple(cfg['std']) == timm.data.IMAGENET_DEFAULT_STD
        assert cfg['num_classes'] == 1000
        assert cfg['first_conv'] == 'patch_embed.conv1.conv' and cfg['classifier'] == 'head'
        assert cfg['paper_ids'] == 'arXiv:2405.16605' and 'Linear Attention' in cfg['paper_name']
        assert cfg['license'] == 'unknown' and cfg['custom_load'] is True
        assert not timm.models.get_pretrained_cfg(name).has_weights  # nothing to download
    assert not timm.list_pretrained('mlla_*')
    # the eval transform timm derives from it is the published one: resize 256 bicubic, centre crop 224
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model('mlla_tiny', **TINY))
    transform = timm.data.create_transform(**data_cfg)
    text = repr(transform)
    assert 'size=256' in text and 'bicubic' in text and 'CenterCrop(size=(224, 224))' in text


def test_parameter_counts_equal_the_published_classifiers(golden_dir):
    counts = json.loads((golden_dir / 'param_counts.json').read_text())
    for name, short in zip(NAMES, 'tsb'):
        with torch.device('meta'):  # shapes only: fast
            model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == counts[f'cls_{short}_params'], name
    # the classifier is the mm backbone's stem and stages plus norm and head
    backbone = MLLA('tiny')
    model = timm.create_model('mlla_tiny')
    shared = {k: v.shape for k, v in backbone.state_dict().items() if not k.startswith('norm')}
    assert shared == {k: v.shape for k, v in model.state_dict().items() if not k.startswith(('norm.', 'head.'))}
    assert type(model.patch_embed) is type(backbone.patch_embed)
    assert type(model.layers[0]) is type(backbone.layers[0])


def test_parameter_names_are_the_published_ones(golden_dir, golden_cls_kwargs):
    published = torch.load(golden_dir / 'mlla_small_official_cls.pth', weights_only=True)['model']
    model = timm.create_model('mlla_tiny', **golden_cls_kwargs)
    assert set(model.state_dict()) == {k for k in published if not k.endswith('attn.rope.rotations')}


def test_full_mlla_tiny_small_forward():
    model = timm.create_model('mlla_tiny', num_classes=1000).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 48))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# --------------------------------------------------------------------------
# The published classifier: golden logits through the pretrained_cfg_overlay file path.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'autograd'])
def test_golden_logits(golden_dir, golden_cls, golden_cls_kwargs, grad):
    model = timm.create_model('mlla_tiny', pretrained=True, **golden_cls_kwargs,
                              pretrained_cfg_overlay=dict(file=str(golden_dir / 'mlla_small_official_cls.pth')))
    model.eval()
    assert len(golden_cls['cases']) >= 2
    for name, case in golden_cls['cases'].items():
        with torch.set_grad_enabled(grad):
            pre = model.forward_head(model.forward_features(case['x']), pre_logits=True)
            logits = model(case['x'])
        torch.testing.assert_close(pre.detach(), case['pre_logits'], atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(logits.detach(), case['logits'], atol=1e-4, rtol=0, msg=name)


# --------------------------------------------------------------------------
# The checks timm applies to every model in its registry (tiny arch for speed).
# --------------------------------------------------------------------------
def test_forward_and_default_cfg_checks():
    """timm's test_model_default_cfgs, on the tiny arch at the cfg's input size."""
    model = tiny().eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == 1000 and model.num_features == 128 and model.head_hidden_size == 128
    x = torch.randn(2, *cfg['input_size'])
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model(x)
        assert model.output_fmt == 'NHWC'
        assert feats.shape == (2, *cfg['pool_size'], model.num_features)
        assert pre.shape == (2, model.head_hidden_size) and logits.shape == (2, 1000)
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == pre.shape
        torch.testing.assert_close(pooled, pre)
        model.reset_classifier(0, '')
        assert model(x).shape == (2, 7, 7, 128)
        model2 = tiny(num_classes=0, global_pool='').eval()
        assert model2(x).shape == (2, 7, 7, 128)
        model.reset_classifier(5, 'avg')
        assert model(x).shape == (2, 5)
    state_dict = model.state_dict()
    assert cfg['classifier'] + '.weight' in state_dict and cfg['first_conv'] + '.weight' in state_dict
    with pytest.raises(ValueError, match='global_pool'):
        tiny(global_pool='median')


def test_backward_reaches_every_parameter():
    model = tiny(num_classes=42).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 42)
    out.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert not torch.isnan(out).any()


@pytest.mark.parametrize('hw', [(1, 1), (33, 47), (65, 31), (96, 160)])
def test_any_input_size(hw):
    model = tiny(num_classes=7).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    h, w = ceil_div(hw[0], 4), ceil_div(hw[1], 4)
    for i, f in enumerate(feats):
        assert f.shape == (1, 16 * 2**i, h, w)
        h, w = ceil_div(h, 2), ceil_div(w, 2)


def test_inference_path_equals_autograd_path():
    model = tiny(num_classes=10).eval()
    x = torch.randn(2, 3, 61, 45)
    with torch.no_grad():
        fast = model(x)
    slow = model(x)
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)


def test_features_only():
    model = tiny(features_only=True).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(2, 3, 77, 50)
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == 4
    for c, r, o in zip(model.feature_info.channels(), model.feature_info.reduction(), outs):
        assert o.shape[:2] == (2, c) and o.shape[2:] == (math.ceil(77 / r), math.ceil(50 / r))
        assert o.is_contiguous() and not torch.isnan(o).any()
    # no unused parameters: neither the classifier parts nor anything after the last stage
    assert not any(k.startswith(('head.', 'norm.')) for k, _ in model.named_parameters())


@pytest.mark.parametrize('out_indices,expected', [((1, 2), [1, 2]), ((-1, ), [3]), ((-2, -1), [2, 3]),
                                                  ((0, -3), [0, 1]), (2, [2, 3])])
def test_features_only_out_indices(out_indices, expected):
    full = tiny().eval()
    model = tiny(features_only=True, out_indices=out_indices).eval()
    model.load_state_dict({'model.' + k: v for k, v in full.state_dict().items()
                           if 'model.' + k in model.state_dict()})
    assert model.feature_info.channels() == [16 * 2**i for i in expected]
    assert model.feature_info.reduction() == [4 * 2**i for i in expected]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        ref = full.forward_intermediates(x, indices=expected, intermediates_only=True)
    assert len(outs) == len(expected)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r)
    # stages after the last one taken (and its downsample) are gone
    assert len(model.model.layers) == max(expected) + 1
    assert model.model.layers[-1].downsample is None
    loss = sum(o.mean() for o in model(x))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_forward_intermediates_semantics():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [tuple(t.shape) for t in inters] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 64, 4, 6), (1, 128, 2, 3)]
        # an int takes the last n; negative indices count from the end
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        neg = model.forward_intermediates(x, indices=[-2, -1], intermediates_only=True)
        for a, b, c in zip(last2, neg, inters[2:]):
            torch.testing.assert_close(a, c)
            torch.testing.assert_close(b, c)
        # norm=True applies the final norm to the last stage's map only
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[3], final.permute(0, 3, 1, 2))
        torch.testing.assert_close(normed[0], inters[0])
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inters[0].permute(0, 2, 3, 1))
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inters[1])
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NLC')


def test_stop_early_runs_no_later_stage():
    model = tiny().eval()
    calls = []
    for i, stage in enumerate(model.layers):
        stage.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    with torch.no_grad():
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[1], stop_early=True,
                                    intermediates_only=True)
    assert calls == [0, 1]


def test_prune_intermediate_layers():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)
    taken = model.prune_intermediate_layers([-3, -2])
    assert taken == [1, 2]
    assert len(model.layers) == 3 and model.layers[2].downsample is None
    # as timm's Swin/ConvNeXt: with stages gone, the final norm and the head go too
    assert model.num_classes == 0 and isinstance(model.head, nn.Identity) and model.global_pool == ''
    assert isinstance(model.norm, nn.Identity) and model.num_features == model.head_hidden_size == 64
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=taken, intermediates_only=True)
        final, _ = model.forward_intermediates(x, indices=taken)
        assert model(x).shape == (1, 4, 4, 64) == final.shape  # the last kept stage, NHWC
    for a, b in zip(got, ref[1:3]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(final.permute(0, 3, 1, 2), ref[2])
    # all stages kept: the norm stays unless asked, the head goes unless asked
    model2 = tiny()
    assert model2.prune_intermediate_layers(1, prune_head=False) == [3]
    assert not isinstance(model2.norm, nn.Identity) and model2.num_classes == 1000 and len(model2.layers) == 4
    assert model2.layers[3].downsample is None and model2.layers[2].downsample is not None
    model2.prune_intermediate_layers(1, prune_norm=True)
    assert isinstance(model2.norm, nn.Identity) and model2.num_classes == 0


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny(num_classes=5, drop_path_rate=0.0)
    x = torch.randn(2, 3, 48, 48)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model.train()
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_group_matcher_orders_every_parameter():
    from timm.models import group_parameters
    model = tiny()
    groups = group_parameters(model, model.group_matcher())
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    order = {n: gid for gid, g in groups.items() for n in g}
    # timm's convention (Swin, ConvNeXt): a downsample shares the group of the first block of the
    # stage it feeds; in MLLA's layout it is a child of the stage before
    assert order['layers.0.blocks.0.norm1.weight'] < order['layers.0.downsample.conv.0.conv.weight'] \
        == order['layers.1.blocks.0.norm1.weight']
    assert order['patch_embed.conv1.conv.weight'] < order['layers.0.blocks.0.norm1.weight']
    # the final norm joins the last stage's group, the head comes last
    assert order['norm.weight'] == order['layers.3.blocks.0.norm1.weight'] < order['head.weight']
    # one group per block, plus the stem and the head: layer decay has no level of its own per downsample
    assert len(groups) == 1 + sum(TINY['depths']) + 1
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    corder = {n: gid for gid, g in coarse.items() for n in g}
    assert len(coarse) == 1 + len(TINY['depths']) + 1
    assert corder['layers.2.downsample.conv.0.conv.weight'] == corder['layers.3.blocks.0.norm1.weight']


def test_layer_decay_scales_follow_the_groups():
    from timm.optim import create_optimizer_v2
    model = tiny(depths=(2, 2, 2, 2))
    opt = create_optimizer_v2(model, 'adamw', lr=1.0, layer_decay=0.5)
    scale = {id(p): g['lr_scale'] for g in opt.param_groups for p in g['params']}
    named = dict(model.named_parameters())
    layers = 1 + 8 + 1  # stem, eight blocks, head
    assert scale[id(named['head.weight'])] == 1.0
    assert scale[id(named['patch_embed.conv1.conv.weight'])] == pytest.approx(0.5 ** (layers - 1))
    assert scale[id(named['layers.0.downsample.conv.0.conv.weight'])] == \
        scale[id(named['layers.1.blocks.0.norm1.weight'])] == pytest.approx(0.5 ** (layers - 1 - 3))


def test_timm_factory_device_and_dtype():
    meta = tiny(device='meta')
    assert {p.device.type for p in meta.parameters()} == {'meta'}
    meta.reset_classifier(7)
    assert meta.head.weight.device.type == 'meta' and meta.head.out_features == 7
    bf16 = tiny(dtype=torch.bfloat16, num_classes=3)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    bf16.reset_classifier(10)  # the new head follows the model's dtype, so the model still runs
    assert bf16.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert bf16.eval()(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 10)
    with pytest.raises(ValueError, match='dtype'):
        tiny(dtype=torch.int8)
    with pytest.raises(ValueError, match='num_classes'):
        tiny().reset_classifier(-1)


@pytest.mark.parametrize('pool', ['max', 'avgmax', 'catavgmax', 'avg'])
def test_global_pool_options(pool):
    torch.manual_seed(0)
    model = tiny(num_classes=5, global_pool=pool).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)  # NHWC
        pre = model.forward_head(feats, pre_logits=True)
        logits = model(x)
    avg, mx = feats.mean(dim=(1, 2)), feats.amax(dim=(1, 2))
    want = {'avg': avg, 'max': mx, 'avgmax': (avg + mx) / 2, 'catavgmax': torch.cat([avg, mx], 1)}[pool]
    torch.testing.assert_close(pre, want)
    torch.testing.assert_close(logits, model.head(want))
    assert model.head.in_features == (256 if pool == 'catavgmax' else 128)
    # changing the pooling through reset_classifier resizes the head
    model.reset_classifier(4, 'catavgmax' if pool != 'catavgmax' else 'avg')
    with torch.no_grad():
        assert model(x).shape == (2, 4)
    model.reset_classifier(0, '')
    with torch.no_grad():
        assert model(x).shape == feats.shape  # no pooling, no head: the NHWC maps


def test_bad_global_pool_and_output_stride():
    with pytest.raises(ValueError, match="'avg', 'max', 'avgmax', 'catavgmax'"):
        tiny(global_pool='mean')
    with pytest.raises(ValueError, match="global_pool"):
        tiny().reset_classifier(3, 'bogus')
    assert tiny(features_only=True, output_stride=32).feature_info.reduction()[-1] == 32
    with pytest.raises(ValueError, match='output_stride must be 32'):
        tiny(features_only=True, output_stride=16)


def test_fx_tracing_and_feature_wrappers():
    from timm.models import get_graph_node_names
    _, nodes = get_graph_node_names(tiny())
    assert {'patch_embed', 'layers.0', 'layers.0.downsample', 'layers.3', 'norm', 'head'} <= set(nodes)
    for cls in ('fx', 'dict', 'list'):  # would return the wrong (downsampled) maps or fail inside timm
        with pytest.raises(ValueError, match="feature_cls 'getter' .* or 'hook'"):
            tiny(features_only=True, feature_cls=cls)
    torch.manual_seed(0)
    getter = tiny(features_only=True).eval()
    torch.manual_seed(0)
    hook = tiny(features_only=True, feature_cls='hook').eval()
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        for a, b in zip(getter(x), hook(x)):
            torch.testing.assert_close(a, b.permute(0, 3, 1, 2))  # the hooks see the stages' NHWC maps


def test_compile_with_grad_checkpointing_is_one_graph():
    """torch.compile(fullgraph=True) of a checkpointed model in training: same outputs, gradients and BN stats."""
    torch.manual_seed(0)
    base = tiny(num_classes=5).train()
    x = torch.randn(2, 3, 48, 48)

    def step(compiled, ckpt):
        model = __import__('copy').deepcopy(base)
        model.set_grad_checkpointing(ckpt)
        fn = torch.compile(model, backend='eager', fullgraph=True) if compiled else model
        out = fn(x)
        out.square().sum().backward()
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        return (out.detach(), [p.grad for p in model.parameters()], [b.running_var.clone() for b in bns],
                [int(b.num_batches_tracked) for b in bns])

    ref = step(False, False)
    for compiled, ckpt in ((False, True), (True, True)):
        got = step(compiled, ckpt)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(got[1], ref[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        for a, b in zip(got[2], ref[2]):
            torch.testing.assert_close(a, b)  # statistics updated once per step, not again by the recomputation
        assert got[3] == ref[3] == [1] * len(ref[3])


def test_bad_arguments():
    with pytest.raises(ValueError, match='heads'):
        tiny(num_heads=(3, 2, 2, 4))
    with pytest.raises(TypeError):
        tiny(drop_path=0.1)  # misspelt
    with pytest.raises(ValueError, match='shape'):
        tiny()(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match='use_ema'):
        tiny(use_ema=True)


# --------------------------------------------------------------------------
# Pretrained weights: layouts, EMA, the filter, clear errors.
# --------------------------------------------------------------------------
def test_published_checkpoint_loads_through_timms_own_loaders(golden_dir, golden_cls, golden_cls_kwargs):
    """checkpoint_path= and load_state_dict: the published RoPE tables are dropped on every path."""
    path = golden_dir / 'mlla_small_official_cls.pth'
    model = timm.create_model('mlla_tiny', checkpoint_path=str(path), **golden_cls_kwargs).eval()
    case = next(iter(golden_cls['cases'].values()))
    with torch.no_grad():
        torch.testing.assert_close(model(case['x']), case['logits'], atol=1e-4, rtol=0)
    ckpt = torch.load(path, weights_only=True)['model']
    assert any(k.endswith('attn.rope.rotations') for k in ckpt)
    fresh = timm.create_model('mlla_tiny', **golden_cls_kwargs)
    result = fresh.load_state_dict(ckpt)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    # anything else that is not the model's is still refused
    with pytest.raises(RuntimeError, match='layers.0.blocks.0.attn.bogus'):
        fresh.load_state_dict(dict(ckpt, **{'layers.0.blocks.0.attn.bogus': torch.zeros(1)}))


def test_safetensors_weights(tmp_path, golden_dir, golden_cls, golden_cls_kwargs):
    from safetensors.torch import save_file
    ckpt = checkpoint_filter_fn(torch.load(golden_dir / 'mlla_small_official_cls.pth', weights_only=True))
    path = tmp_path / 'mlla.safetensors'
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    model = timm.create_model('mlla_tiny', pretrained=True, **golden_cls_kwargs,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    case = next(iter(golden_cls['cases'].values()))
    with torch.no_grad():
        torch.testing.assert_close(model(case['x']), case['logits'], atol=1e-4, rtol=0)
    # a truncated file is an error naming it
    bad = tmp_path / 'cut.safetensors'
    bad.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r'safetensors file is truncated or corrupt: .*cut\.safetensors'):
        timm.create_model('mlla_tiny', pretrained=True, **golden_cls_kwargs, pretrained_cfg_overlay=dict(file=str(bad)))


def test_filter_drops_rope_tables_and_is_a_no_op_twice(golden_dir):
    ckpt = torch.load(golden_dir / 'mlla_small_official_cls.pth', weights_only=True)
    once = checkpoint_filter_fn(ckpt)
    twice = checkpoint_filter_fn(once)
    assert list(once) == list(twice) and all(once[k] is twice[k] for k in once)
    assert not any('rope' in k for k in once)
    assert 'head.weight' in once and 'norm.weight' in once
    assert len(once) == len([k for k in ckpt['model'] if 'rope' not in k])
    # the detector layout: backbone part only, output norms dropped
    det = torch.load(golden_dir / 'mlla_small_official_det.pth', weights_only=True)
    bb = checkpoint_filter_fn(det)
    assert bb and not any(k.startswith(('backbone.', 'neck.', 'norm0', 'norm3')) for k in bb)
    assert checkpoint_filter_fn(bb) == bb
    ddp = checkpoint_filter_fn({'module.' + k: v for k, v in once.items()})
    assert list(ddp) == list(once)


def test_published_training_checkpoint_and_ema(tmp_path, golden_dir, golden_cls, golden_cls_kwargs):
    published = torch.load(golden_dir / 'mlla_small_official_cls.pth', weights_only=True)['model']
    noise = OrderedDict((k, torch.randn_like(v) if v.is_floating_point() else v) for k, v in published.items())
    path = str(tmp_path / 'train.pth')
    torch.save({'model': noise, 'state_dict_ema': published, 'epoch': 3, 'max_accuracy': 1.0,
                'optimizer': {'state': {}}, 'config': CfgNode(MODEL=CfgNode(TYPE='mlla'))}, path,
               pickle_module=YacsPickle)  # its config names yacs.config.CfgNode, as the published files do
    case = next(iter(golden_cls['cases'].values()))
    ema = timm.create_model('mlla_tiny', pretrained=True, use_ema=True, pretrained_cfg_overlay=dict(file=path),
                            **golden_cls_kwargs).eval()
    plain = timm.create_model('mlla_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              **golden_cls_kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(ema(case['x']), case['logits'], atol=1e-4, rtol=0)
        assert not torch.allclose(plain(case['x']), case['logits'], atol=1e-2)
    assert torch.equal(plain.state_dict()['head.weight'], noise['head.weight'])
    # a file without EMA weights: a clear error
    path2 = save({'model': published}, tmp_path / 'no_ema.pth')
    with pytest.raises(CheckpointError, match='state_dict_ema'):
        timm.create_model('mlla_tiny', pretrained=True, use_ema=True, pretrained_cfg_overlay=dict(file=path2),
                          **golden_cls_kwargs)


def test_pretrained_without_a_file_says_where_to_put_it():
    with pytest.raises(CheckpointError) as info:
        timm.create_model('mlla_tiny', pretrained=True)
    msg = str(info.value)
    assert '\n' not in msg
    assert 'MLLA_T.pth' in msg and 'pretrained_cfg_overlay' in msg and 'github.com/LeapLabTHU/MLLA' in msg
    with pytest.raises(CheckpointError, match='MLLA_B.pth'):
        timm.create_model('mlla_base.in1k', pretrained=True)


def test_pretrained_state_dict_overlay_and_new_head(tmp_path, golden_dir, golden_cls_kwargs, caplog):
    ckpt = torch.load(golden_dir / 'mlla_small_official_cls.pth', weights_only=True)
    # timm's own state_dict source runs the filter too (rope tables dropped, strict load)
    model = timm.create_model('mlla_tiny', pretrained=True, pretrained_cfg_overlay=dict(state_dict=ckpt['model'],
                                                                                        num_classes=10),
                              **golden_cls_kwargs)
    assert torch.equal(model.state_dict()['head.weight'], ckpt['model']['head.weight'])
    # another number of classes: everything but the head is loaded, the head is new
    kwargs = dict(golden_cls_kwargs, num_classes=3)
    with caplog.at_level(logging.WARNING):
        model = timm.create_model('mlla_tiny', pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(golden_dir / 'mlla_small_official_cls.pth')),
                                  **kwargs)
    assert model.head.weight.shape == (3, 192)
    assert torch.equal(model.state_dict()['norm.weight'], ckpt['model']['norm.weight'])
    assert 'head.weight' in caplog.text
    # one input channel: the stem is adapted as timm does
    model = timm.create_model('mlla_tiny', pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(file=str(golden_dir / 'mlla_small_official_cls.pth')),
                              **golden_cls_kwargs)
    torch.testing.assert_close(model.patch_embed.conv1.conv.weight,
                               ckpt['model']['patch_embed.conv1.conv.weight'].sum(1, keepdim=True))
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def _evil_pickle(tmp_path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))

    path = tmp_path / 'evil.pth'
    torch.save({'model': {'head.weight': torch.zeros(1)}, 'x': Evil()}, path)
    assert b'system' in path.read_bytes()
    return path


def test_bad_checkpoints_are_clear_errors_naming_the_file(tmp_path, golden_dir, golden_cls_kwargs):
    marker = tmp_path / 'pwned'
    evil = _evil_pickle(tmp_path, marker)
    data = (golden_dir / 'mlla_small_official_cls.pth').read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(data[:len(data) // 2])
    other_arch = save(tiny(num_classes=10).state_dict(), tmp_path / 'other_arch.pth')
    deeper = save(timm.create_model('mlla_tiny', **dict(golden_cls_kwargs, depths=(1, 2, 2, 1))).state_dict(),
                  tmp_path / 'deeper.pth')
    not_mlla = save({'conv.weight': torch.zeros(3, 3)}, tmp_path / 'not_mlla.pth')
    for path, pattern in [(evil, 'refusing'), (truncated, 'truncated or corrupt'), (other_arch, 'wrong shape'),
                          (deeper, 'unexpected'), (not_mlla, 'missing')]:
        with pytest.raises(CheckpointError) as info:
            timm.create_model('mlla_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **golden_cls_kwargs)
        assert str(path) in str(info.value) and pattern in str(info.value), str(info.value)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        timm.create_model('mlla_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nowhere.pth')),
                          **golden_cls_kwargs)


# --------------------------------------------------------------------------
# Weights between timm and mm: one implementation.
# --------------------------------------------------------------------------
def _mm_outputs_from_timm(mm_model, timm_model, x):
    """The mm backbone's outputs computed from the timm model's stage outputs and the mm output norms."""
    inters = timm_model.forward_intermediates(x, norm=False, intermediates_only=True)
    return [getattr(mm_model, f'norm{i}')(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for i, t in enumerate(inters)]


@pytest.mark.parametrize('layout', ['plain', 'timm-train'])
def test_timm_checkpoint_loads_into_mm_backbone(tmp_path, layout):
    model = tiny(num_classes=10).eval()
    state = model.state_dict()
    trusted = None
    if layout == 'plain':
        obj = state
    else:  # what timm's train.py writes: EMA weights and an argparse.Namespace of its arguments
        obj = {'epoch': 1, 'arch': 'mlla_tiny', 'state_dict': state, 'state_dict_ema': state,
               'args': argparse.Namespace(model='mlla_tiny', lr=0.1, mean=(0.5, 0.5, 0.5)), 'version': 2}
        # the safe loader reads the Namespace inertly, as an OrderedDict carrying its attributes
        loaded = load_file(save(obj, tmp_path / 'timm_args.pth'))
        assert type(loaded['args']) is OrderedDict
        assert (loaded['args'].model, loaded['args'].lr, loaded['args'].mean) == ('mlla_tiny', 0.1, (0.5, 0.5, 0.5))
    path = save(obj, tmp_path / 'timm.pth')
    mm = MLLA(TINY_ARCH, init_cfg=dict(type='Pretrained', checkpoint=path, trusted=trusted))
    mm.init_weights()
    mm.eval()
    for k, v in mm.state_dict().items():
        if not k.startswith('norm'):
            assert torch.equal(v, state[k]), k
    x = torch.randn(1, 3, 57, 70)
    with torch.no_grad():
        for a, b in zip(mm(x), _mm_outputs_from_timm(mm, model, x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mm_checkpoint_loads_into_timm(tmp_path, golden_dir, golden, golden_arch, caplog):
    mm = MLLA(golden_arch, init_cfg=dict(type='Pretrained', checkpoint=str(golden_dir / 'mlla_small_official_det.pth')))
    mm.init_weights()
    mm.eval()
    kwargs = dict(embed_dim=golden_arch['embed_dims'], depths=golden_arch['depths'],
                  num_heads=golden_arch['num_heads'])
    # a plain backbone state dict: strict=False reports the classifier's norm and head only
    model = timm.create_model('mlla_tiny', num_classes=10, **kwargs).eval()
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn(mm.state_dict(), model), strict=False)
    assert sorted(missing) == ['head.bias', 'head.weight', 'norm.bias', 'norm.weight'] and unexpected == []
    # the published detector checkpoint through the pretrained file path; same stage outputs
    with caplog.at_level(logging.WARNING):
        model = timm.create_model('mlla_tiny', pretrained=True, num_classes=10, **kwargs,
                                  pretrained_cfg_overlay=dict(file=str(golden_dir / 'mlla_small_official_det.pth')))
    assert 'norm.weight' in caplog.text and 'head.weight' in caplog.text
    model.eval()
    feats = timm.create_model('mlla_tiny', features_only=True, **kwargs).eval()
    feats.model.load_state_dict(checkpoint_filter_fn(mm.state_dict()), strict=False)
    for name, case in list(golden['cases'].items())[:2]:
        with torch.no_grad():
            ys = _mm_outputs_from_timm(mm, model, case['x'])
            raw = feats(case['x'])
        for i, (y, ref, r) in enumerate(zip(ys, case['ys'], raw)):
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=0, msg=name)
            normed = getattr(mm, f'norm{i}')(r.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            torch.testing.assert_close(normed, ref, atol=1e-4, rtol=0, msg=name)


# --------------------------------------------------------------------------
# mmseg's TIMMBackbone in the example UperNet config.
# --------------------------------------------------------------------------
TIMM_SEG_CONFIG = 'configs/segmentation/upernet_timm_mlla_t.py'


def _tiny_seg_cfg(**backbone):
    from mmengine.config import Config
    cfg = Config.fromfile(str(ROOT / TIMM_SEG_CONFIG))
    assert cfg.model.backbone.type == 'mmseg.TIMMBackbone' and cfg.model.backbone.model_name == 'mlla_tiny'
    assert cfg.model.backbone.features_only is True
    cfg.merge_from_dict({
        'model.backbone.embed_dim': 16, 'model.backbone.depths': [1, 1, 1, 1],
        'model.backbone.num_heads': [1, 2, 2, 4], 'model.decode_head.in_channels': [16, 32, 64, 128],
        'model.decode_head.channels': 16, 'model.auxiliary_head.in_channels': 64,
        'model.auxiliary_head.channels': 16})
    for k, v in backbone.items():
        cfg.model.backbone[k] = v
    return cfg


def test_mmseg_timm_backbone_config(tmp_path):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    # as written: it asks for the published weights; when they are missing it warns and goes on with random
    # weights, as the MLLA configs do, and with if_missing='error' it says where to get them and put them
    cfg = _tiny_seg_cfg()
    assert cfg.model.backbone.pretrained is True and cfg.model.backbone.if_missing == 'warn'
    assert cfg.model.backbone.pretrained_cfg_overlay.file == 'data/pretrained/MLLA_T.pth'
    missing = str(tmp_path / 'data' / 'pretrained' / 'MLLA_T.pth')
    from mlla_mm.models.timm_mlla import MissingWeightsError
    assert MODELS.build(_tiny_seg_cfg(pretrained_cfg_overlay=dict(file=missing)).model).backbone is not None
    with pytest.raises(MissingWeightsError, match=r'not found; the published weights are not downloaded: get '
                                                  r'MLLA_T\.pth from https://github\.com/LeapLabTHU/MLLA .* and put '
                                                  r'it at ' + re.escape(missing)):
        MODELS.build(_tiny_seg_cfg(pretrained_cfg_overlay=dict(file=missing), if_missing='error').model)
    # with a (tiny) checkpoint file: built, loaded, runs
    src = tiny(num_classes=1000)
    path = save({'model': src.state_dict()}, tmp_path / 'tiny.pth')
    cfg = _tiny_seg_cfg(pretrained_cfg_overlay=dict(file=path))
    model = MODELS.build(cfg.model).eval()
    timm_model = model.backbone.timm_model
    assert torch.equal(timm_model.model.layers[2].blocks[0].attn.qk.weight, src.layers[2].blocks[0].attn.qk.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.extract_feat(x)
        out = model(x, mode='tensor')
        ref = src.eval().forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r)
    assert out.shape == (1, 150, 16, 16)
