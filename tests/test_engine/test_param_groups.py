"""MergedGroupsOptimWrapperConstructor: fewer parameter groups, every parameter's settings and steps unchanged."""
import copy
from typing import Dict

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

from mlla_mm.engine.param_groups import merge_param_groups
from tests.helpers import ROOT, UNEVEN_ARCH, tiny_model


def tiny_detector() -> nn.Module:
    """The tiny Mask R-CNN of test_layer_decay.py, built from a fixed seed."""
    torch.manual_seed(0)
    return tiny_model('mmdet', UNEVEN_ARCH)


def wrapper_cfg(constructor: str, fused: bool = False, **paramwise) -> dict:
    return dict(type='OptimWrapper', constructor=constructor,
                optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, fused=fused),
                paramwise_cfg=paramwise or dict(custom_keys={'norm': dict(decay_mult=0.)}))


def settings_by_param(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, dict]:
    """{parameter name: its group's settings (every key but params)}."""
    by_id = {id(p): {k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups
             for p in g['params']}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_the_detector_config_uses_it_and_groups_by_weight_decay():
    cfg = Config.fromfile(str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py'))
    assert cfg.optim_wrapper.constructor == 'MergedGroupsOptimWrapperConstructor'
    model = tiny_detector()
    default = build_optim_wrapper(model, wrapper_cfg('DefaultOptimWrapperConstructor')).optimizer
    merged = build_optim_wrapper(model, wrapper_cfg('MergedGroupsOptimWrapperConstructor')).optimizer
    assert len(default.param_groups) == len(list(model.parameters())) > 100
    assert len(merged.param_groups) == 2
    assert {g['weight_decay'] for g in merged.param_groups} == {0.0, 0.05}
    # every parameter exactly once, with the settings the default constructor gave it
    assert sorted(id(p) for g in merged.param_groups for p in g['params']) == sorted(id(p) for p in model.parameters())
    assert settings_by_param(model, merged) == settings_by_param(model, default)


def test_different_settings_stay_apart():
    model = tiny_detector()
    paramwise = dict(custom_keys={'norm': dict(decay_mult=0.), 'backbone': dict(lr_mult=0.1),
                                  'rpn_head': dict(lr_mult=0.5, decay_mult=0.5)})
    default = build_optim_wrapper(model, wrapper_cfg('DefaultOptimWrapperConstructor', **paramwise)).optimizer
    merged = build_optim_wrapper(model, wrapper_cfg('MergedGroupsOptimWrapperConstructor', **paramwise)).optimizer
    assert settings_by_param(model, merged) == settings_by_param(model, default)
    distinct = {tuple(sorted((k, repr(v)) for k, v in g.items() if k != 'params')) for g in default.param_groups}
    assert len(merged.param_groups) == len(distinct) >= 3


def test_merge_keeps_order_and_does_not_touch_its_input():
    a, b, c, d = (nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = [dict(params=[a], lr=1.), dict(params=[b], lr=2.), dict(params=[c], lr=1.),
              dict(params=[d], lr=1., betas=(0.9, 0.99))]
    before = copy.copy(groups)
    merged = merge_param_groups(groups)
    assert [[id(p) for p in g['params']] for g in merged] == [[id(a), id(c)], [id(b)], [id(d)]]
    assert [g['lr'] for g in merged] == [1., 2., 1.]
    assert groups == before and [len(g['params']) for g in groups] == [1, 1, 1, 1]


@pytest.mark.parametrize('fused', [False, True])
def test_training_steps_are_bitwise_the_same(fused):
    """Three AdamW steps (weight decay on some parameters only) give identical weights either way."""
    model = tiny_detector()
    twin = copy.deepcopy(model)
    opt_a = build_optim_wrapper(model, wrapper_cfg('DefaultOptimWrapperConstructor', fused)).optimizer
    opt_b = build_optim_wrapper(twin, wrapper_cfg('MergedGroupsOptimWrapperConstructor', fused)).optimizer
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for (_, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), name
    # and the steps did move every parameter (the comparison is not of untouched weights)
    ref = tiny_detector()
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        assert not torch.equal(p, r), name
