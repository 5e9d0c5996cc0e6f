"""The model-zoo configs beyond Mask R-CNN / UperNet, and the own-data templates.

Each builds with MLLA, its feature channels fit the neck or head at full size,
and with a tiny MLLA it runs one training iteration (finite loss) and one
inference call on 64x64 images.
"""
import ast
import math

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import mlla_mm  # noqa: F401
from mlla_mm.models import MLLA
from tests.helpers import ROOT, TINY_ARCH, ZOO_CONFIGS, load_tool, weight_decay_of_params

RUNTIME = '../_base_/mlla_runtime.py'
RUNTIME_STATED = ('cascade_mask_rcnn_mlla_t_3x', 'mask2former_mlla_t')
CKPT = {'tiny': 'MLLA_T', 'small': 'MLLA_S', 'base': 'MLLA_B'}


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models


def path(name):
    return ROOT / 'configs' / ZOO_CONFIGS[name][0] / f'{name}.py'


def load(name):
    return Config.fromfile(str(path(name)))


def bases(name):
    """The ``_base_`` list of a config file, read without running it."""
    tree = ast.parse(path(name).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', '') == '_base_' for t in node.targets):
            value = ast.literal_eval(node.value)
            return [value] if isinstance(value, str) else list(value)
    raise AssertionError(f'{name} has no _base_')


def neck_channels(cfg):
    """The channels the neck (or, without a neck, the decode head) expects from the backbone."""
    if 'neck' in cfg.model:
        return list(cfg.model.neck.in_channels)
    return list(cfg.model.decode_head.in_channels)


@pytest.mark.parametrize('name', sorted(ZOO_CONFIGS))
def test_inherits_the_mm_config_and_our_runtime_last(name):
    parent = ZOO_CONFIGS[name][3]
    got = bases(name)
    cfg = load(name)
    if name in RUNTIME_STATED:
        # The mm parent sets custom_imports, so mmengine refuses the runtime file as a second
        # base (duplicate key): the config states the runtime's settings, which must be the same.
        assert got == [parent]
        runtime = Config.fromfile(str(ROOT / 'configs' / '_base_' / 'mlla_runtime.py'))
        for key, value in runtime.items():
            if key == 'custom_imports':
                assert cfg.custom_imports.imports[:len(value.imports)] == value.imports
            else:
                assert cfg[key] == value, key
    elif parent.startswith(('mmdet::', 'mmseg::')):
        assert got == [parent, RUNTIME]
    else:
        assert got == [parent]  # the runtime comes with our parent config
    text = path(name).read_text()
    if not name.startswith('custom_') and not name.endswith(('_s_3x', '_b_3x', '_s', '_b')):
        assert 'NO published MLLA recipe' in text and 'OUR CHOICE' in text
    assert cfg.custom_imports.imports[0] == 'mlla_mm'


@pytest.mark.parametrize('name', sorted(ZOO_CONFIGS))
def test_full_size_backbone_channels_match_the_neck(name):
    _, arch, drop_path, _ = ZOO_CONFIGS[name]
    cfg = load(name)
    bb = dict(cfg.model.backbone)
    assert bb.pop('type') == 'MLLA'
    assert (bb['arch'], bb['drop_path_rate']) == (arch, drop_path)
    assert bb['init_cfg'] == dict(type='Pretrained', checkpoint=f'data/pretrained/{CKPT[arch]}.pth',
                                  if_missing='warn')
    bb['init_cfg'] = None
    backbone = MLLA(**bb)
    assert sum(p.numel() for p in backbone.parameters()) > 20e6
    feats = [backbone.channels[i] for i in backbone.out_indices]
    assert neck_channels(cfg) == feats
    if 'auxiliary_head' in cfg.model:
        assert cfg.model.auxiliary_head.in_channels == backbone.channels[cfg.model.auxiliary_head.in_index]
    if cfg.model.get('neck', {}).get('type') == 'FPN' and cfg.default_scope == 'mmdet':
        heads = [cfg.model.get('rpn_head'), cfg.model.get('bbox_head')]
        assert all(h.in_channels == cfg.model.neck.out_channels for h in heads if h)


def test_cascade_recipe():
    cfg = load('cascade_mask_rcnn_mlla_t_3x')
    heads = cfg.model.roi_head.bbox_head
    assert len(heads) == 3
    for h in heads:
        assert (h.type, h.num_shared_convs, h.num_shared_fcs, h.loss_bbox.type, h.reg_decoded_bbox) == \
            ('ConvFCBBoxHead', 4, 1, 'GIoULoss', True)
    aug = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomChoice'][0]
    assert aug.transforms[1][1].type == 'RandomCrop'
    assert cfg.train_cfg.max_epochs == 36
    assert list(cfg.param_scheduler[1].milestones) == [27, 33]
    ow = cfg.optim_wrapper
    assert (ow.type, ow.constructor) == ('OptimWrapper', 'MLLALayerDecayOptimizerConstructor')
    assert dict(ow.paramwise_cfg) == dict(decay_rate=0.9, decay_type='layer_wise')
    assert (ow.optimizer.type, ow.optimizer.lr, ow.optimizer.weight_decay) == ('AdamW', 2e-4, 0.05)
    for name in ('cascade_mask_rcnn_mlla_s_3x', 'cascade_mask_rcnn_mlla_b_3x'):
        assert load(name).optim_wrapper == ow


def test_retinanet_recipe():
    cfg = load('retinanet_mlla_t')
    assert tuple(cfg.model.backbone.out_indices) == (1, 2, 3)
    assert (cfg.model.neck.start_level, cfg.model.neck.num_outs) == (0, 5)
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-4, 0.05) and 'momentum' not in opt
    assert cfg.optim_wrapper.paramwise_cfg.norm_decay_mult == 0.
    assert cfg.train_cfg.max_epochs == 12


@pytest.mark.parametrize('name', ['fpn_mlla_t', 'fpn_mlla_s', 'fpn_mlla_b'])
def test_semantic_fpn_recipe(name):
    cfg = load(name)
    assert cfg.train_cfg.max_iters == 80000
    (poly, ) = cfg.param_scheduler
    assert (poly.type, poly.end, poly.eta_min, poly.power) == ('PolyLR', 80000, 0.0, 0.9)
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ('AdamW', 1e-4, 1e-4) and 'momentum' not in opt
    assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
    assert cfg.model.get('pretrained') is None
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 32


def test_mask2former_recipe_and_parameter_keys():
    cfg = load('mask2former_mlla_t')
    assert cfg.train_cfg.max_iters == 160000 and cfg.optim_wrapper.clip_grad.max_norm == 0.01
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    # every custom key names real parameters (checked by the helper); backbone norms: 0.1 x lr, no decay
    decay, norms = weight_decay_of_params(model, cfg.optim_wrapper)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    lr = {id(p): g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}
    for n, p in model.named_parameters():
        if n.startswith('backbone.'):
            assert lr[id(p)] == pytest.approx(1e-5), n
            if n in norms:
                assert decay[n] == 0., n
            elif p.ndim > 1:
                assert decay[n] == 0.05, n
    assert sum(n.startswith('backbone.') and n in norms for n in decay) == 96


def test_get_flops_does_not_compare_cascade_with_mask_rcnn():
    kind_and_arch = load_tool('get_flops').kind_and_arch
    assert kind_and_arch('configs/detection/cascade_mask_rcnn_mlla_s_3x.py') == ('cascade_mask_rcnn', 's')
    assert kind_and_arch('configs/detection/mask_rcnn_mlla_s_3x.py') == ('mask_rcnn', 's')


def test_get_flops_measures_mask2former():
    """mmseg's tensor mode leaves out the data samples Mask2Former's head needs; get_flops passes them."""
    res = load_tool('get_flops').measure(str(path('mask2former_mlla_t')), (64, 64))
    assert res['macs'] > 2 * res['backbone_macs'] > 0
    assert res['params'] - res['backbone_params'] > 15e6


# ---------------------------------------------------------------- tiny runs
CHANNEL_KEYS = ('in_channels', 'feat_channels', 'out_channels', 'conv_out_channels', 'fc_out_channels', 'channels',
                'embed_dims', 'feedforward_channels', 'num_feats')


def shrink(node):
    """Divide the channel counts (>= 128) of the neck and heads by 8: the structure stays, the cost goes."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in CHANNEL_KEYS and isinstance(v, int) and v >= 128:
                node[k] = v // 8
            elif k in CHANNEL_KEYS and isinstance(v, (list, tuple)) and all(isinstance(c, int) for c in v):
                node[k] = [c // 8 if c >= 128 else c for c in v]
            else:
                shrink(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            shrink(v)


def tiny_cfg(name):
    cfg = load(name)
    shrink({k: v for k, v in cfg.model.items() if k != 'backbone'})
    if cfg.model.get('decode_head', {}).get('type') == 'Mask2FormerHead':
        cfg.model.decode_head.train_cfg.num_points = 256
    bb = cfg.model.backbone
    bb.arch = TINY_ARCH
    bb.init_cfg = None
    channels = [16 * 2**i for i in bb.out_indices]
    if 'neck' in cfg.model:
        cfg.model.neck.in_channels = channels
    else:
        cfg.model.decode_head.in_channels = channels
    if 'auxiliary_head' in cfg.model:
        cfg.model.auxiliary_head.in_channels = 16 * 2**cfg.model.auxiliary_head.in_index
    if cfg.default_scope == 'mmseg':
        cfg.model.data_preprocessor.size = (64, 64)
        if cfg.model.get('test_cfg', {}).get('mode') == 'slide':
            cfg.model.test_cfg = dict(mode='whole')
    # Few proposals and sampled RoIs.
    train_cfg, test_cfg = cfg.model.get('train_cfg', {}), cfg.model.get('test_cfg', {})
    if 'rpn_proposal' in train_cfg:
        train_cfg.rpn_proposal.update(nms_pre=64, max_per_img=16)
        for stage in train_cfg.rcnn if isinstance(train_cfg.rcnn, list) else [train_cfg.rcnn]:
            stage.sampler.num = 16
        test_cfg.rpn.update(nms_pre=64, max_per_img=16)
    return cfg


def det_batch(num_classes, with_mask):
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=2, image_shapes=(3, 64, 64), num_items=[2, 3], num_classes=num_classes,
                          with_mask=with_mask)


def seg_batch(num_classes):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g))
        s = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        label = torch.randint(0, num_classes, (1, 64, 64), generator=g)
        label[:, :16] = 255  # some ignored pixels
        s.gt_sem_seg = PixelData(data=label)
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('name', sorted(ZOO_CONFIGS))
def test_tiny_training_iteration_and_inference(name):
    cfg = tiny_cfg(name)
    scope = cfg.default_scope
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    model.init_weights()
    assert isinstance(model.backbone, MLLA) and model.backbone.embed_dims == 16
    if scope == 'mmdet':
        heads = cfg.model.get('roi_head', {}).get('bbox_head') or cfg.model.get('bbox_head')
        num_classes = (heads[-1] if isinstance(heads, list) else heads).num_classes
        data = det_batch(num_classes, with_mask='mask_head' in cfg.model.get('roi_head', {}))
    else:
        data = seg_batch(cfg.model.decode_head.num_classes)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.train()
    log_vars = model.train_step(data, wrapper)
    assert math.isfinite(float(log_vars['loss'])) and float(log_vars['loss']) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model.test_step(data)
    assert len(out) == 2
    if scope == 'mmdet':
        pred = out[0].pred_instances
        assert pred.bboxes.shape[1] == 4 and len(pred.scores) == len(pred.labels)
        if 'mask_head' in cfg.model.get('roi_head', {}):
            assert 'masks' in pred
    else:
        seg = out[0].pred_sem_seg.data
        assert seg.shape == (1, 64, 64)
        assert int(seg.max()) < cfg.model.decode_head.num_classes
