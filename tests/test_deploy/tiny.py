"""Tiny models for the deployment tests: an MLLA arch dict and a small UperNet config."""
from pathlib import Path

import torch

from tests.helpers import ROOT

TINY_ARCH = dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])
NUM_CLASSES = 5

# The project's UperNet MLLA-T config with a tiny backbone and heads. Its heads
# keep SyncBN: the exporter turns it into BatchNorm.
TINY_UPERNET = '''
_base_ = [{base!r}]
model = dict(
    backbone=dict(arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
                  init_cfg=None),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=16, num_classes={n}),
    auxiliary_head=dict(in_channels=64, channels=8, num_classes={n}))
'''

TINY_MASK_RCNN = '''
_base_ = [{base!r}]
model = dict(
    backbone=dict(arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
                  init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16), bbox_head=dict(in_channels=16, fc_out_channels=32),
                  mask_roi_extractor=dict(out_channels=16), mask_head=dict(in_channels=16, conv_out_channels=16)))
'''


def write_tiny_upernet(folder: Path, name: str = 'tiny_upernet.py', num_classes: int = NUM_CLASSES) -> Path:
    path = Path(folder) / name
    base = str(ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t.py')
    path.write_text(TINY_UPERNET.format(base=base, n=num_classes))
    return path


def write_tiny_mask_rcnn(folder: Path, name: str = 'tiny_mask_rcnn.py') -> Path:
    path = Path(folder) / name
    base = str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py')
    path.write_text(TINY_MASK_RCNN.format(base=base))
    return path


def nontrivial_norms(model: torch.nn.Module, linear_bias: bool = False) -> torch.nn.Module:
    """Random BatchNorm statistics and LayerNorm affines (and Linear biases), so every weight matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if linear_bias and isinstance(m, torch.nn.Linear):
                m.bias.uniform_(-0.2, 0.2)
    return model


# A tiny Mask R-CNN with the demo's 3 classes and a tiny RetinaNet (3 classes): whole-detector export tests.
TINY_DEMO_MASK_RCNN = '''
_base_ = [{base!r}]
model = dict(
    backbone=dict(arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
                  init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16), bbox_head=dict(in_channels=16, fc_out_channels=32),
                  mask_roi_extractor=dict(out_channels=16), mask_head=dict(in_channels=16, conv_out_channels=16)),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=64), rcnn=dict(max_per_img=20)))
'''

TINY_RETINANET = '''
_base_ = [{base!r}]
model = dict(
    backbone=dict(arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
                  init_cfg=None),
    neck=dict(in_channels=[32, 64, 128], out_channels=16),
    bbox_head=dict(num_classes=3, in_channels=16, feat_channels=16, stacked_convs=1),
    test_cfg=dict(nms_pre=100, max_per_img=20))
'''


def write_tiny_detector(folder: Path, kind: str = 'mask_rcnn') -> Path:
    """A tiny 3-class Mask R-CNN (the demo's config) or RetinaNet config in ``folder``."""
    if kind == 'mask_rcnn':
        text, base = TINY_DEMO_MASK_RCNN, 'mask_rcnn_mlla_t_demo.py'
    else:
        text, base = TINY_RETINANET, 'retinanet_mlla_t.py'
    path = Path(folder) / f'tiny_{kind}.py'
    path.write_text(text.format(base=str(ROOT / 'configs' / 'detection' / base)))
    return path


def spread_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every conv and linear layer re-initialised with torch's default (mmdet's heads start at std 0.01,
    which makes all scores nearly equal): a random detector whose detections are well separated."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                m.reset_parameters()
    return nontrivial_norms(model)
