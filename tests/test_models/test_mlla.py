"""The MLLA backbone: shapes, golden outputs, parameter counts, freezing, checkpointing."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import mlla_mm.models.mlla as mlla_module
from mlla_mm.models import MLLA
from tests.helpers import TINY_ARCH

SMALL = dict(embed_dims=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4])


def expected_sizes(h, w):
    h, w = -(-h // 4), -(-w // 4)
    sizes = [(h, w)]
    for _ in range(3):
        h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


@pytest.mark.parametrize('hw', [(224, 224), (511, 511), (112, 137), (33, 47), (1, 1)])
def test_output_shapes_tiny(hw):
    model = MLLA('tiny').eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == 4
    for i, (out, (h, w)) in enumerate(zip(outs, expected_sizes(*hw))):
        assert out.shape == (1, 64 * 2**i, h, w)
        assert out.is_contiguous()
        assert torch.isfinite(out).all()


def test_33x47_matches_spec_example():
    outs = MLLA(SMALL).eval()(torch.randn(2, 3, 33, 47))
    assert [tuple(o.shape[2:]) for o in outs] == [(9, 12), (5, 6), (3, 3), (2, 2)]
    assert [o.shape[0] for o in outs] == [2] * 4


def test_out_indices_and_feature_info():
    model = MLLA(SMALL, out_indices=(1, 3))
    assert [n for n, _ in model.named_children() if n.startswith('norm')] == ['norm1', 'norm3']
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]
    assert [f['num_chs'] for f in model.feature_info] == [32, 128]
    assert [f['reduction'] for f in model.feature_info] == [8, 32]


@pytest.mark.parametrize('path', ['inference', 'plain'])
@pytest.mark.parametrize('source', ['det', 'cls'])
def test_golden_outputs(golden, golden_arch, golden_dir, source, path, monkeypatch):
    """Both code paths reproduce the published code: the fast inference path (eval, no grad) and the
    plain autograd path with its real-valued RoPE (what training, tracing and ONNX export run)."""
    calls = []
    real_fast = mlla_module.fast_inference.forward_blocks
    monkeypatch.setattr(mlla_module.fast_inference, 'forward_blocks', lambda *a: calls.append(1) or real_fast(*a))
    if source == 'det':
        ckpt = golden_dir / 'mlla_small_official_det.pth'
    else:
        ckpt = golden_dir / 'mlla_small_official_cls.pth'
    model = MLLA(golden_arch, init_cfg=dict(type='Pretrained', checkpoint=str(ckpt)))
    model.init_weights()
    if source == 'cls':
        # The ImageNet checkpoint has no output norms; the golden data holds them.
        model.load_state_dict(golden['norms'], strict=False)
    model.eval()
    assert len(golden['cases']) >= 3
    for name, case in golden['cases'].items():
        with torch.set_grad_enabled(path == 'plain'):
            ys = [y.detach() for y in model(case['x'])]
        assert len(ys) == len(case['ys']) == 4
        for y, ref in zip(ys, case['ys']):
            assert y.shape == ref.shape, name
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=0, msg=f'case {name}')
    assert bool(calls) == (path == 'inference')


def test_parameter_counts(golden_dir):
    counts = json.loads((golden_dir / 'param_counts.json').read_text())
    for arch, short in [('tiny', 't'), ('small', 's'), ('base', 'b')]:
        model = MLLA(arch)
        n = sum(p.numel() for p in model.parameters())
        assert n == counts[f'backbone_{short}_params'], arch
        assert sum(p.numel() for p in MLLA(short).parameters()) == n
    assert counts['backbone_t_params'] == 23_880_096


def test_builds_on_the_meta_device():
    """No memory, no data (tools/test.py checks a checkpoint against a model built so): same names and shapes."""
    with torch.device('meta'):
        meta = MLLA('tiny', drop_path_rate=0.2)
    assert {t.device.type for t in meta.state_dict().values()} == {'meta'}
    real = MLLA('tiny', drop_path_rate=0.2)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


def test_parameter_names_are_the_published_ones():
    names = set(MLLA(SMALL).state_dict())
    for key in ['patch_embed.conv1.conv.weight', 'patch_embed.conv1.norm.running_var',
                'patch_embed.conv2.1.norm.weight', 'patch_embed.conv3.1.conv.weight',
                'layers.0.blocks.0.cpe1.weight', 'layers.0.blocks.0.attn.qk.bias',
                'layers.0.blocks.0.attn.lepe.weight', 'layers.0.blocks.0.mlp.fc2.weight',
                'layers.2.blocks.1.act_proj.weight', 'layers.2.downsample.conv.2.norm.weight',
                'layers.2.downsample.conv.0.conv.bias', 'norm3.weight']:
        assert key in names, key
    assert not any('rope' in k for k in names)
    assert not any(k.startswith('layers.3.downsample') for k in names)


@pytest.mark.parametrize('arch', ['huge', 'T-ny', {'embed_dims': 64, 'depths': [2, 2, 2]},
                                  {'embed_dims': 64, 'depths': [1] * 4, 'num_heads': [1] * 4, 'x': 1},
                                  {'embed_dims': 30, 'depths': [1] * 4, 'num_heads': [4, 4, 4, 4]}, 3])
def test_bad_arch_raises_value_error(arch):
    with pytest.raises(ValueError, match='MLLA'):
        MLLA(arch)


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError) as err:
        MLLA('huge')
    for name in ['tiny', 'small', 'base', 't', 's', 'b']:
        assert repr(name) in str(err.value)


def test_misspelt_argument_is_a_type_error():
    with pytest.raises(TypeError):
        MLLA('tiny', drop_path=0.2)  # the argument is drop_path_rate


@pytest.mark.parametrize('kwargs, expected', [
    (dict(drop_path_rate=1.0), r'drop_path_rate must be a number in \[0, 1\), got 1\.0'),
    (dict(drop_path_rate=-0.1), r'drop_path_rate must be a number in \[0, 1\), got -0\.1'),
    (dict(drop_path_rate=float('nan')), r'drop_path_rate must be a number in \[0, 1\)'),
    (dict(drop_path_rate='0.1'), r"drop_path_rate must be a number in \[0, 1\), got '0\.1'"),
    (dict(drop_rate=1.5), r'drop_rate must be a number in \[0, 1\), got 1\.5'),
    (dict(drop_rate=-1e-3), r'drop_rate must be a number in \[0, 1\)'),
    (dict(mlp_ratio=0), r'mlp_ratio must be a number > 0, got 0'),
    (dict(mlp_ratio=-4.), r'mlp_ratio must be a number > 0, got -4\.0'),
    (dict(mlp_ratio=float('inf')), r'mlp_ratio must be a number > 0, got inf'),
    (dict(mlp_ratio=True), r'mlp_ratio must be a number > 0, got True'),
    (dict(mlp_ratio=0.01), r'mlp_ratio 0\.01 leaves no MLP channels at embed_dims 16'),
    (dict(with_cp='yes'), r"with_cp must be True or False, got 'yes'"),
    (dict(norm_eval=1), r'norm_eval must be True or False, got 1'),
])
def test_out_of_range_hyperparameters_name_the_argument(kwargs, expected):
    with pytest.raises(ValueError, match='^MLLA: ' + expected):
        MLLA(SMALL, **kwargs)


def test_edge_hyperparameters_are_accepted():
    model = MLLA(SMALL, drop_path_rate=0.0, drop_rate=0.999, mlp_ratio=0.5)
    assert model.layers[0].blocks[0].mlp.fc1.out_features == 8
    model = MLLA(SMALL, drop_path_rate=0.99, mlp_ratio=1)
    assert model.layers[3].blocks[0].drop_path.drop_prob == pytest.approx(0.99)


def test_out_of_range_drop_path_rate_through_the_registry():
    import mlla_mm  # noqa: F401
    from mmengine.registry import MODELS
    with pytest.raises(ValueError, match=r'drop_path_rate must be a number in \[0, 1\), got 1\.2'):
        MODELS.build(dict(type='MLLA', arch=SMALL, drop_path_rate=1.2))


@pytest.mark.parametrize('bad', [torch.randn(3, 32, 32), torch.randn(1, 1, 32, 32), torch.randn(1, 4, 32, 32),
                                 torch.randn(1, 3, 0, 5)])
def test_bad_input_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)|H, W >= 1'):
        MLLA(SMALL)(bad)


def test_frozen_stages():
    model = MLLA(SMALL, frozen_stages=2)
    model.train()
    frozen = [model.patch_embed, model.layers[0], model.layers[1], model.norm0, model.norm1]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not mm.training for mm in m.modules())
    for m in [model.layers[2], model.layers[3], model.norm2, model.norm3]:
        assert all(p.requires_grad for p in m.parameters())
        assert m.training
    # The downsample that ends stage 1 belongs to stage 1 and is frozen too.
    assert not model.layers[1].downsample.conv[2].norm.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(o.sum() for o in model(torch.randn(2, 3, 40, 40))).backward()
    opt.step()
    after = model.state_dict()
    # Weights and BN statistics of frozen parts are unchanged; later stages moved.
    for k in before:
        if k.startswith(('patch_embed', 'layers.0.', 'layers.1.', 'norm0', 'norm1')):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before['layers.2.blocks.0.in_proj.weight'], after['layers.2.blocks.0.in_proj.weight'])


def test_frozen_stages_zero_freezes_only_the_stem():
    model = MLLA(SMALL, frozen_stages=0).train()
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert all(p.requires_grad for p in model.layers[0].parameters())


def test_norm_eval_keeps_batchnorm_in_eval():
    model = MLLA(SMALL, norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert model.layers[0].blocks[0].training
    stats = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(stats, bns[0].running_mean)
    assert all(m.training for m in MLLA(SMALL).train().modules() if isinstance(m, nn.BatchNorm2d))


def test_with_cp_same_outputs_gradients_and_bn_statistics(monkeypatch):
    torch.manual_seed(1)
    ref = MLLA(SMALL, drop_path_rate=0.2)
    cpm = MLLA(SMALL, drop_path_rate=0.2, with_cp=True)
    cpm.load_state_dict(ref.state_dict())
    ref.train(), cpm.train()
    x = torch.randn(2, 3, 45, 38)
    calls = []
    real = mlla_module.cp.checkpoint
    monkeypatch.setattr(mlla_module.cp, 'checkpoint', lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(3)  # the same drop-path draws in both
    outs_ref = ref(x)
    torch.manual_seed(3)
    outs_cp = cpm(x)
    assert len(calls) == sum(SMALL['depths']) + 1 + 3  # the blocks, the stem, three downsample layers
    for a, b in zip(outs_ref, outs_cp):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    g = [torch.randn_like(o) for o in outs_ref]
    sum((o * gi).sum() for o, gi in zip(outs_ref, g)).backward()
    sum((o * gi).sum() for o, gi in zip(outs_cp, g)).backward()  # recomputes, replaying drop-path
    for (n, p), q in zip(ref.named_parameters(), cpm.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
    # The recomputation must not update BatchNorm statistics a second time.
    for (n, a), b in zip(ref.named_buffers(), cpm.buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    assert any(n.endswith('num_batches_tracked') and int(b) == 1 for n, b in cpm.named_buffers())
    # No checkpointing when no gradient is needed.
    calls.clear()
    with torch.no_grad():
        cpm(x)
    assert calls == []


def test_import_needs_no_mmdet_mmseg_or_mmcv_ops():
    code = ('import sys, mlla_mm.models, mlla_mm; '
            'bad = [m for m in sys.modules if m.split(".")[0] in ("mmdet", "mmseg") or m == "mmcv._ext" '
            'or m.startswith("mmcv.ops")]; print(bad); sys.exit(1 if bad else 0)')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_feature_info_follows_the_returned_maps_for_unsorted_out_indices():
    model = MLLA(arch=TINY_ARCH, out_indices=(2, 0)).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [info['num_chs'] for info in model.feature_info]
    assert [64 // o.shape[2] for o in outs] == [info['reduction'] for info in model.feature_info]
