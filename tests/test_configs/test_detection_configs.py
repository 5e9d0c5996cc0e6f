"""Detection configs: they build, have the published sizes and recipe, and decay no norm."""
import re

import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mlla_mm  # noqa: F401
from mlla_mm.models import MLLA
from tests.helpers import ROOT, weight_decay_of_params

DET = ROOT / 'configs' / 'detection'
SIZES = {'mask_rcnn_mlla_t': 44e6, 'mask_rcnn_mlla_t_3x': 44e6, 'mask_rcnn_mlla_s': 63e6,
         'mask_rcnn_mlla_s_3x': 63e6, 'mask_rcnn_mlla_b': 115e6}


def build(name):
    cfg = Config.fromfile(str(DET / f'{name}.py'))
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    return cfg, MODELS.build(cfg.model)


@pytest.mark.parametrize('name', sorted(SIZES))
def test_config_builds_with_published_size(name):
    cfg, model = build(name)
    assert isinstance(model.backbone, MLLA)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - SIZES[name]) < 1e6, f'{name}: {n / 1e6:.2f}M'
    assert list(cfg.model.neck.in_channels) == model.backbone.channels
    # The recipe.
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, tuple(opt.betas), opt.weight_decay) == ('AdamW', 1e-4, (0.9, 0.999), 0.05)
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch, warmup.start_factor) == ('LinearLR', 500, False, 0.001)
    three_x = name.endswith('3x')
    assert cfg.train_cfg.max_epochs == (36 if three_x else 12)
    assert list(steps.milestones) == ([27, 33] if three_x else [8, 11])
    assert cfg.model.backbone.drop_path_rate == (0.3 if three_x else 0.1)
    assert cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.model.backbone.init_cfg.checkpoint.startswith('data/pretrained/MLLA_')
    test_resize = [t for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize'][0]
    assert tuple(test_resize.scale) == (1333, 800)
    aug = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomChoice'][0]
    assert len(aug.transforms) == 2 and aug.transforms[1][1].type == 'RandomCrop'


def test_configs_inherit_instead_of_copying():
    tiny = (DET / 'mask_rcnn_mlla_t.py').read_text()
    assert re.search(r"'mmdet::_base_/models/mask-rcnn_r50_fpn.py'", tiny)
    for name in ['mask_rcnn_mlla_t_3x', 'mask_rcnn_mlla_s', 'mask_rcnn_mlla_b', 'mask_rcnn_mlla_t_demo']:
        text = (DET / f'{name}.py').read_text()
        assert "_base_ = ['./mask_rcnn_mlla_t" in text, name
        assert 'optimizer=dict(_delete_' not in text


def test_no_weight_decay_on_norm_layers():
    cfg, model = build('mask_rcnn_mlla_t')
    decay, norms = weight_decay_of_params(model, cfg.optim_wrapper)
    assert len(norms) == 96  # 18 blocks x 2 LayerNorms, 4 output norms, 8 BatchNorms; x2
    for name, wd in decay.items():
        assert wd == (0 if name in norms else 0.05), name
