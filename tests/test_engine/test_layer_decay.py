"""MLLALayerDecayOptimizerConstructor: every parameter's lr and weight decay against the formula."""
from typing import Dict

import pytest
import torch
import torch.nn as nn
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import mlla_mm  # noqa: F401
from mlla_mm.engine.layer_decay import MLLALayerDecayOptimizerConstructor
from tests.helpers import UNEVEN_ARCH, tiny_model

BASE_LR, BASE_WD = 2e-4, 0.05


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models


def expected_layer_ids(model: nn.Module, decay_type: str) -> Dict[int, int]:
    """{id(param): layer id}, found by walking the backbone's modules (not by parsing names)."""
    bb = model.backbone
    ids: Dict[int, int] = {}
    top = (sum(bb.depths) if decay_type == 'layer_wise' else len(bb.depths)) + 1
    for p in model.parameters():
        ids[id(p)] = top
    for p in bb.patch_embed.parameters():
        ids[id(p)] = 0
    block_counter = 0
    for i, stage in enumerate(bb.layers):
        for block in stage.blocks:
            block_counter += 1
            for p in block.parameters():
                ids[id(p)] = block_counter if decay_type == 'layer_wise' else i + 1
        if stage.downsample is not None:
            for p in stage.downsample.parameters():
                # the first block of the next stage is block number block_counter + 1
                ids[id(p)] = block_counter + 1 if decay_type == 'layer_wise' else i + 2
    return ids


def no_decay_params(model: nn.Module) -> set:
    norms = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm)
    out = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    out |= {id(p) for n, p in model.named_parameters() if n.endswith('.bias') or p.ndim == 1}
    return out


def build(model, scope, **paramwise):
    init_default_scope(scope)
    cfg = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=BASE_LR, weight_decay=BASE_WD),
               constructor='MLLALayerDecayOptimizerConstructor', paramwise_cfg=paramwise)
    return build_optim_wrapper(model, cfg)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('decay_type,rate', [('layer_wise', 0.8), ('stage_wise', 0.6)])
def test_every_parameter_follows_the_formula(scope, decay_type, rate):
    model = tiny_model(scope, UNEVEN_ARCH)
    wrapper = build(model, scope, decay_rate=rate, decay_type=decay_type)
    groups = wrapper.optimizer.param_groups
    layer = expected_layer_ids(model, decay_type)
    no_decay = no_decay_params(model)
    top = (7 if decay_type == 'layer_wise' else 4) + 1  # sum(UNEVEN_ARCH depths) = 7, 4 stages
    seen = {}
    for g in groups:
        for p in g['params']:
            assert id(p) not in seen, 'a parameter is in two groups'
            seen[id(p)] = g
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(seen) == set(names), 'every parameter must be in exactly one group'
    used = set()
    for pid, g in seen.items():
        lid = layer[pid]
        used.add(lid)
        assert g['lr'] == pytest.approx(BASE_LR * rate ** (top - lid), rel=1e-12), names[pid]
        assert g['weight_decay'] == (0. if pid in no_decay else BASE_WD), names[pid]
    assert used == set(range(top + 1)), 'every layer id from the stem (0) to the top is used'
    # Spot checks of the documented layout (T: 7 blocks -> ids 1..7, top 8).
    by_name = {n: seen[id(p)] for n, p in model.named_parameters()}
    stem = by_name['backbone.patch_embed.conv1.conv.weight']
    head = next(g for n, g in by_name.items() if not n.startswith('backbone.') and n.endswith('.weight')
                and g['weight_decay'] > 0)
    assert stem['lr'] == pytest.approx(BASE_LR * rate ** top) and head['lr'] == pytest.approx(BASE_LR)
    assert by_name['backbone.norm3.weight']['lr'] == pytest.approx(BASE_LR)
    ds0 = by_name['backbone.layers.0.downsample.conv.0.conv.weight']
    assert ds0['lr'] == by_name['backbone.layers.1.blocks.0.in_proj.weight']['lr']
    assert ds0['lr'] != by_name['backbone.layers.0.blocks.1.in_proj.weight']['lr']
    assert by_name['backbone.layers.0.blocks.0.norm1.weight']['weight_decay'] == 0.
    assert by_name['backbone.layers.0.blocks.0.in_proj.bias']['weight_decay'] == 0.
    assert by_name['backbone.layers.0.blocks.0.in_proj.weight']['weight_decay'] == BASE_WD


def test_a_training_step_keeps_the_ratios_under_the_scheduler():
    from mmengine.optim import LinearLR
    model = tiny_model('mmdet', UNEVEN_ARCH)
    wrapper = build(model, 'mmdet', decay_rate=0.5)
    before = [g['lr'] for g in wrapper.optimizer.param_groups]
    sched = LinearLR(wrapper.optimizer, start_factor=0.1, by_epoch=False, begin=0, end=10)
    loss = sum((p.float() ** 2).sum() for p in model.parameters())
    wrapper.update_params(loss)
    sched.step()
    after = [g['lr'] for g in wrapper.optimizer.param_groups]
    ratios = [a / b for a, b in zip(after, before)]
    assert max(ratios) == pytest.approx(min(ratios)) and 0.1 < ratios[0] < 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize('paramwise,match', [
    (dict(decay_rat=0.9), r"unknown paramwise_cfg key\(s\) \['decay_rat'\]"),
    (dict(decay_rate=0.9, num_layers=12), 'taken from the model'),
    (dict(decay_rate=0.9, custom_keys={'norm': dict(decay_mult=0.)}), 'custom_keys'),
    (dict(decay_rate=0.9, decay_type='layerwise'), 'decay_type must be one of'),
    (dict(decay_rate=1.5), r'decay_rate must be a number in \(0, 1\]'),
    (dict(decay_rate='0.9'), 'decay_rate must be a number'),
    (dict(), 'decay_rate must be a number'),
])
def test_bad_paramwise_cfg_is_an_error(paramwise, match):
    with pytest.raises(ValueError, match=match):
        MLLALayerDecayOptimizerConstructor(dict(optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)),
                                           paramwise)


def test_refuses_a_model_without_an_mlla_backbone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(2, 2)

    with pytest.raises(ValueError, match='backbone is MLLA, got Linear'):
        build(Net(), 'mmdet', decay_rate=0.9)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_resolves_from_both_scopes(scope):
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS
    else:
        from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
    assert OPTIM_WRAPPER_CONSTRUCTORS.get('MLLALayerDecayOptimizerConstructor') is MLLALayerDecayOptimizerConstructor
