"""Segmentation configs: they build, have the published size and recipe, and decay no norm."""
import pytest
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mlla_mm  # noqa: F401
from mlla_mm.engine.launch import prepare_config
from mlla_mm.models import MLLA
from tests.helpers import ROOT, ZOO_CONFIGS, weight_decay_of_params

SEG = ROOT / 'configs' / 'segmentation'
ARCH = {'upernet_mlla_t': ('tiny', 0.2, 'MLLA_T'), 'upernet_mlla_s': ('small', 0.3, 'MLLA_S'),
        'upernet_mlla_b': ('base', 0.5, 'MLLA_B')}


def load(name):
    return Config.fromfile(str(SEG / f'{name}.py'))


def build(cfg):
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    return MODELS.build(cfg.model)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_every_segmentation_config_is_tested():
    names = {p.stem for p in SEG.glob('*.py')}
    # upernet_timm_mlla_t (mmseg's TIMMBackbone) is tested in tests/test_models/test_timm_mlla.py
    # Semantic FPN, Mask2Former and the own-data template: tests/test_configs/test_zoo_configs.py
    zoo = {n for n, (folder, *_) in ZOO_CONFIGS.items() if folder == 'segmentation'}
    assert names == set(ARCH) | {'upernet_mlla_t_demo', 'upernet_timm_mlla_t'} | zoo


@pytest.mark.parametrize('name', sorted(ARCH) + ['upernet_mlla_t_demo'])
def test_config_builds_through_mmseg(name):
    cfg = load(name)
    assert cfg.default_scope == 'mmseg'
    assert cfg.custom_imports.imports == ['mlla_mm']
    model = build(cfg)
    assert type(model).__name__ == 'EncoderDecoder'
    assert isinstance(model.backbone, MLLA)
    assert list(cfg.model.decode_head.in_channels) == model.backbone.channels
    assert cfg.model.auxiliary_head.in_channels == model.backbone.channels[2]


def test_upernet_b_has_the_published_size():
    model = build(load('upernet_mlla_b'))
    assert n_params(model.backbone) == 95_216_304
    total = n_params(model)
    assert abs(total - 128e6) < 1e6, f'{total / 1e6:.2f}M'


@pytest.mark.parametrize('name', sorted(ARCH))
def test_published_recipe(name):
    cfg = load(name)
    arch, drop_path, ckpt = ARCH[name]
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, bb.drop_path_rate, tuple(bb.out_indices)) == ('MLLA', arch, drop_path, (0, 1, 2, 3))
    assert bb.init_cfg == dict(type='Pretrained', checkpoint=f'data/pretrained/{ckpt}.pth', if_missing='warn')
    assert cfg.model.get('pretrained') is None
    # Heads: UPerHead on all four stages, FCN auxiliary head on stage 2 (weight 0.4), 150 classes.
    dec, aux = cfg.model.decode_head, cfg.model.auxiliary_head
    assert (dec.type, dec.channels, tuple(dec.pool_scales), list(dec.in_index)) == \
        ('UPerHead', 512, (1, 2, 3, 6), [0, 1, 2, 3])
    assert (aux.type, aux.in_index, aux.loss_decode.loss_weight) == ('FCNHead', 2, 0.4)
    assert dec.num_classes == aux.num_classes == 150
    assert dec.norm_cfg.type == aux.norm_cfg.type == 'SyncBN'
    # 512x512 crops, batch 2 per GPU (x 8 GPUs = 16).
    assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
    crop = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomCrop'][0]
    assert tuple(crop.crop_size) == (512, 512)
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.train_dataloader.dataset.type == 'ADE20KDataset'
    assert cfg.train_dataloader.dataset.data_root == 'data/ade/ADEChallengeData2016'
    # AdamW 6e-5, betas (0.9, 0.999), weight decay 0.01.
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, tuple(opt.betas), opt.weight_decay) == ('AdamW', 6e-5, (0.9, 0.999), 0.01)
    assert 'momentum' not in opt
    # 1500-iteration linear warm-up from 1e-6, then poly power 1.0 to 0 at 160k.
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.begin, warmup.end, warmup.by_epoch) == \
        ('LinearLR', 1e-6, 0, 1500, False)
    assert (poly.type, poly.power, poly.eta_min, poly.begin, poly.end, poly.by_epoch) == \
        ('PolyLR', 1.0, 0.0, 1500, 160000, False)
    assert cfg.train_cfg.type == 'IterBasedTrainLoop' and cfg.train_cfg.max_iters == 160000
    # Slide inference over 512x512 windows, stride 341; multi-scale + flip for --tta.
    tc = cfg.model.test_cfg
    assert (tc.mode, tuple(tc.crop_size), tuple(tc.stride)) == ('slide', (512, 512), (341, 341))
    tta = cfg.tta_pipeline[1]
    assert tta.type == 'TestTimeAug'
    assert [t.scale_factor for t in tta.transforms[0]] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert [t.prob for t in tta.transforms[1]] == [0., 1.]
    assert cfg.tta_model.type == 'SegTTAModel'
    assert cfg.val_evaluator.type == 'IoUMetric'


def test_tiny_and_small_drop_path_is_marked_as_our_choice():
    for name in ['upernet_mlla_t', 'upernet_mlla_s']:
        text = (SEG / f'{name}.py').read_text().lower()
        assert 'our choice' in text and 'not' in text and 'published' in text, name


def test_configs_inherit_mmseg_bases_instead_of_copying():
    tiny = (SEG / 'upernet_mlla_t.py').read_text()
    for base in ['models/upernet_r50.py', 'datasets/ade20k.py', 'default_runtime.py', 'schedules/schedule_160k.py']:
        assert f"'mmseg::_base_/{base}'" in tiny, base
    for name in ['upernet_mlla_s', 'upernet_mlla_b', 'upernet_mlla_t_demo']:
        text = (SEG / f'{name}.py').read_text()
        assert "_base_ = ['./upernet_mlla_t.py']" in text, name
        assert 'optimizer=dict(_delete_' not in text and "type='UPerHead'" not in text


def test_no_weight_decay_on_norm_layers():
    cfg = load('upernet_mlla_t')
    model = build(cfg)
    decay, norms = weight_decay_of_params(model, cfg.optim_wrapper)
    # Backbone: 18 blocks x 2 LayerNorms + 4 output norms + 8 BatchNorms; heads: 12 + 1 BatchNorms (x2 params).
    assert sum(n.startswith('backbone.') for n in norms) == 48 * 2
    assert sum(n.startswith(('decode_head.', 'auxiliary_head.')) for n in norms) == 13 * 2
    for name, wd in decay.items():
        assert wd == (0 if name in norms else 0.01), name

def test_demo_config_swaps_only_data_classes_crop_and_schedule():
    demo, tiny = load('upernet_mlla_t_demo'), load('upernet_mlla_t')
    classes = ('background', 'circle', 'triangle', 'rectangle')
    assert demo.synthetic_data.kind == 'ade-shapes' and demo.synthetic_data.root == 'data/shapes_ade/'
    for loader in ['train_dataloader', 'val_dataloader', 'test_dataloader']:
        ds = demo[loader].dataset
        assert ds.type in ('BaseSegDataset', 'ADE20KDataset')
        assert tuple(ds.metainfo.classes) == classes
        assert ds.reduce_zero_label is False and (ds.img_suffix, ds.seg_map_suffix) == ('.jpg', '.png')
        assert ds.data_root == demo.synthetic_data.root
        loads = [t for t in ds.pipeline if t.type == 'LoadAnnotations']
        assert loads and all(t.reduce_zero_label is False for t in loads)
    size = demo.synthetic_data.size
    assert tuple(demo.model.data_preprocessor.size) == (size, size)
    crop = [t for t in demo.train_dataloader.dataset.pipeline if t.type == 'RandomCrop'][0]
    assert tuple(crop.crop_size) == (size, size)
    assert demo.model.decode_head.num_classes == demo.model.auxiliary_head.num_classes == 4
    assert demo.train_cfg.type == 'IterBasedTrainLoop'
    assert demo.train_cfg.val_interval == demo.train_cfg.max_iters <= 1000
    # Everything else is the recipe's.
    assert demo.model.backbone == tiny.model.backbone
    for head in ['decode_head', 'auxiliary_head']:
        a, b = dict(demo.model[head]), dict(tiny.model[head])
        a.pop('num_classes'), b.pop('num_classes')
        assert a == b, head
    assert demo.optim_wrapper.optimizer.type == 'AdamW'
    assert demo.optim_wrapper.paramwise_cfg == tiny.optim_wrapper.paramwise_cfg


@pytest.mark.parametrize('launcher', ['none', 'pytorch'])
def test_syncbn_falls_back_to_bn_on_the_cpu_or_in_one_process(launcher):
    # The config says SyncBN on every machine (the published recipe); where SyncBN cannot run (no CUDA,
    # or one process) the runner reverts it with mmengine's revert_sync_batchnorm when it wraps the model
    # (SafeRunner, and mmengine's Runner in one process: tests/test_engine/test_runner.py).
    from mmengine.model import revert_sync_batchnorm
    cfg = prepare_config(load('upernet_mlla_t'), work_dir='unused', launcher=launcher)
    assert cfg.model.decode_head.norm_cfg.type == cfg.model.auxiliary_head.norm_cfg.type == 'SyncBN'
    assert cfg.runner_type == 'SafeRunner' and cfg.launcher == launcher
    assert cfg.model.data_preprocessor.type == 'SegDataPreProcessor'
    assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
    model = build(cfg)
    assert any(isinstance(m, nn.SyncBatchNorm) for n, m in model.named_modules() if n.startswith('decode_head.'))
    model = revert_sync_batchnorm(model)
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(n.startswith('decode_head.') for n in bns)
