"""The tests' one shared helper module.

- paths and running the tools (in a subprocess or in-process);
- tiny models: ``TINY_ARCH`` (the one tiny MLLA every test builds unless it needs a particular shape), the tiny
  detection and segmentation configs on top of it, a backbone pair against the reference implementation;
- weights that make every parameter matter (:func:`randomize_norms`, :func:`spread_weights`);
- user errors: the one ``error:`` line, a disk that fills up at a chosen file;
- small COCO / label files with one defect each, for the data checks;
- training runs of ``tools/train.py`` in subprocesses, stopped at chosen points.

Test modules import shared things from here only (never from another test module).
"""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ----------------------------------------------------------------------------------------------------------------
# Running the tools
# ----------------------------------------------------------------------------------------------------------------
def tool_env(**extra):
    """The environment for a tool subprocess: one thread, the repository importable, no trusted checkpoints."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    env.pop('MLLA_MM_TRUST_CHECKPOINTS', None)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous or torchrun's master)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_tool(*args, env=None, timeout=300, cwd=ROOT):
    """Run tools/<script> to completion; returns the CompletedProcess (text)."""
    return subprocess.run([PY, *map(str, args)], cwd=cwd, env=env or tool_env(), capture_output=True,
                          text=True, timeout=timeout)


def load_tool(name: str, folder: str = 'tools'):
    """Import ``tools/<name>.py`` (or ``<folder>/<name>.py``) as a module (tools/ is not a package)."""
    prefix = 'mlla_mm_tool' if folder == 'tools' else f'mlla_mm_{folder}'
    spec = importlib.util.spec_from_file_location(f'{prefix}_{name}', ROOT / folder / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_dev(name: str):
    """Import the maintainer script ``dev/<name>.py`` as a module."""
    return load_tool(name, folder='dev')


def exit_code(main, argv):
    """``main(argv)``'s return value, or the code of the SystemExit an argparse error raises."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


# ----------------------------------------------------------------------------------------------------------------
# Tiny models and configs
# ----------------------------------------------------------------------------------------------------------------
#: The tiny MLLA (channels 16, 32, 64, 128; one block per stage).
TINY_ARCH = dict(embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])
#: ``TINY_ARCH`` with stages of different depths (7 blocks): for the per-block and per-stage rules.
UNEVEN_ARCH = dict(TINY_ARCH, depths=[2, 1, 3, 1])
#: ``TINY_ARCH`` as config keyword text (``embed_dims=16, depths=[...], num_heads=[...]``; no braces).
TINY_ARCH_TEXT = ', '.join(f'{k}={v!r}' for k, v in TINY_ARCH.items())
#: ``--cfg-options`` that put ``TINY_ARCH`` into a config's backbone.
TINY_ARCH_OPTIONS = (['model.backbone.arch._delete_=True']
                     + [f'model.backbone.arch.{k}={v!r}'.replace(' ', '') for k, v in TINY_ARCH.items()]
                     + ['model.backbone.init_cfg=None'])
#: A config's backbone with ``TINY_ARCH`` and no pretrained weights (text for the config templates below).
TINY_BACKBONE = f'backbone=dict(arch=dict(_delete_=True, {TINY_ARCH_TEXT}),\n                  init_cfg=None)'
NUM_CLASSES = 5

TINY_CONFIG = '''
_base_ = [{base!r}]
data_root = {root!r}
synthetic_data = dict(kind='coco-shapes', root=data_root, seed=0, num_train=4, num_val=2, size=64)
_train = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs'),
]
_test = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=_train))
test_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                       dataset=dict(data_root=data_root, pipeline=_test))
test_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric=['bbox'])
val_dataloader = None
val_cfg = None
val_evaluator = None
model = dict(
    ''' + TINY_BACKBONE + ''',
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=64), rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=64)))
max_epochs = {epochs}
train_cfg = dict(max_epochs=max_epochs, val_interval=1000)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=3))
randomness = dict(seed=0, deterministic=True)
'''


def write_tiny_config(folder: Path, data_root: Path, epochs: int = 6, extra: str = '') -> Path:
    """A detection config (tiny MLLA, small heads, 4 images of 64x64, 2 per batch)."""
    path = folder / 'tiny_det.py'
    base = str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t_demo.py')
    path.write_text(TINY_CONFIG.format(base=base, root=str(data_root) + '/', epochs=epochs) + extra)
    return path


# The project's UperNet MLLA-T config with a tiny backbone and heads. Its heads keep SyncBN: the exporter
# turns it into BatchNorm.
TINY_UPERNET = '''
_base_ = [{base!r}]
model = dict(
    ''' + TINY_BACKBONE + ''',
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=16, num_classes={n}),
    auxiliary_head=dict(in_channels=64, channels=8, num_classes={n}))
'''

_TINY_MASK_RCNN_MODEL = '''
_base_ = [{base!r}]
model = dict(
    ''' + TINY_BACKBONE + ''',
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16), bbox_head=dict(in_channels=16, fc_out_channels=32),
                  mask_roi_extractor=dict(out_channels=16), mask_head=dict(in_channels=16, conv_out_channels=16))'''
TINY_MASK_RCNN = _TINY_MASK_RCNN_MODEL + ')\n'
# A tiny Mask R-CNN with the demo's 3 classes and a tiny RetinaNet (3 classes): whole-detector export tests.
TINY_DEMO_MASK_RCNN = (_TINY_MASK_RCNN_MODEL
                       + ',\n    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=64), rcnn=dict(max_per_img=20)))\n')
TINY_RETINANET = '''
_base_ = [{base!r}]
model = dict(
    ''' + TINY_BACKBONE + ''',
    neck=dict(in_channels=[32, 64, 128], out_channels=16),
    bbox_head=dict(num_classes=3, in_channels=16, feat_channels=16, stacked_convs=1),
    test_cfg=dict(nms_pre=100, max_per_img=20))
'''

#: A config whose model is the bare backbone (``model = dict(type='mlla_mm.MLLA', ...)``).
BARE_BACKBONE = (f"model = dict(type='mlla_mm.MLLA', arch=dict({TINY_ARCH_TEXT}))\n"
                 "custom_imports = dict(imports=['mlla_mm'], allow_failed_imports=False)\n")


def write_tiny_upernet(folder: Path, name: str = 'tiny_upernet.py', num_classes: int = NUM_CLASSES) -> Path:
    """The project's UperNet MLLA-T config with ``TINY_ARCH`` and narrow heads."""
    path = Path(folder) / name
    base = str(ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t.py')
    path.write_text(TINY_UPERNET.format(base=base, n=num_classes))
    return path


def write_tiny_mask_rcnn(folder: Path, name: str = 'tiny_mask_rcnn.py') -> Path:
    """The project's Mask R-CNN MLLA-T config with ``TINY_ARCH`` and narrow heads."""
    path = Path(folder) / name
    base = str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py')
    path.write_text(TINY_MASK_RCNN.format(base=base))
    return path


def write_tiny_detector(folder: Path, kind: str = 'mask_rcnn') -> Path:
    """A tiny 3-class Mask R-CNN (the demo's config) or RetinaNet config in ``folder``."""
    if kind == 'mask_rcnn':
        text, base = TINY_DEMO_MASK_RCNN, 'mask_rcnn_mlla_t_demo.py'
    else:
        text, base = TINY_RETINANET, 'retinanet_mlla_t.py'
    path = Path(folder) / f'tiny_{kind}.py'
    path.write_text(text.format(base=str(ROOT / 'configs' / 'detection' / base)))
    return path


def tiny_model(scope: str, arch: Optional[dict] = None) -> torch.nn.Module:
    """Mask R-CNN (``scope='mmdet'``) or UperNet (mmseg) from the project's configs with a tiny MLLA
    (``arch``, default ``TINY_ARCH``; its stages must have 16, 32, 64, 128 channels), plain BatchNorm."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope
    if scope == 'mmdet':
        cfg = Config.fromfile(str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py'))
        cfg.model.neck.update(in_channels=[16, 32, 64, 128], out_channels=16)
    else:
        cfg = Config.fromfile(str(ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t.py'))
        cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=16)
        cfg.model.auxiliary_head.update(in_channels=64, channels=16)
    cfg.model.backbone.update(arch=arch or TINY_ARCH, init_cfg=None)
    init_default_scope(scope)
    return revert_sync_batchnorm(MODELS.build(cfg.model))


# 64x64 segmentation pipelines (label value k = class k; no braces: used in str.format templates).
_SEG_TEST_PIPELINE_64 = '''_test = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
'''
SEG_PIPELINES_64 = '''
crop_size = (64, 64)
_train = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='PackSegInputs'),
]
''' + _SEG_TEST_PIPELINE_64

_SEG_LOADERS = '''
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=_train))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=_test))
test_dataloader = val_dataloader
'''

TINY_SEG_CONFIG = '''
_base_ = [{base!r}]
data_root = {root!r}
''' + SEG_PIPELINES_64 + _SEG_LOADERS + '''model = dict(
    data_preprocessor=dict(size=crop_size),
    ''' + TINY_BACKBONE + ''',
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=16),
    auxiliary_head=dict(in_channels=64, channels=16))
'''

# The segmentation demo as a short training run (2 iterations, data made by the run itself).
TINY_SEG_RUN = '''
_base_ = [{base!r}]
data_root = {root!r}
synthetic_data = dict(kind='ade-shapes', root=data_root, seed=0, num_train=4, num_val=2, size=64)
crop_size = (64, 64)
_train = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
''' + _SEG_TEST_PIPELINE_64 + _SEG_LOADERS + '''model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch=dict(_delete_=True, **{arch!r}), init_cfg=None),
    decode_head=dict(in_channels={channels!r}, channels=32),
    auxiliary_head=dict(in_channels={channels[2]!r}, channels=16))
max_iters = 2
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=max_iters))
randomness = dict(seed=0)
'''


def write_tiny_seg_config(folder: Path, data_root: Path) -> Path:
    """UperNet (the segmentation demo config) with a tiny MLLA and 16-channel heads, 64x64 images."""
    path = folder / 'tiny_seg.py'
    base = str(ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t_demo.py')
    path.write_text(TINY_SEG_CONFIG.format(base=base, root=str(data_root) + '/'))
    return path


def write_tiny_seg_run(folder: Path, data_root: Path, arch: Optional[dict] = None) -> Path:
    """The segmentation demo config as a 2-iteration run on 4 + 2 images of 64x64 (made by the run) with a
    tiny MLLA (``arch``, default ``TINY_ARCH``) and narrow heads."""
    arch = arch or TINY_ARCH
    channels = [arch['embed_dims'] * 2**i for i in range(4)]
    path = folder / 'tiny_seg.py'
    base = str(ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t_demo.py')
    path.write_text(TINY_SEG_RUN.format(base=base, root=str(data_root) + '/', arch=arch, channels=channels))
    return path


def small_backbone_pair(seed: int = 2):
    """An MLLA (embed_dims 8, depths 1, 2, 1, 1) with random norms and biases, and the reference
    implementation (tests/test_models/mlla_reference.py) with the same weights."""
    from mlla_mm.models import MLLA
    from tests.test_models.mlla_reference import MLLAReference
    arch = dict(embed_dims=8, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4])
    torch.manual_seed(seed)
    model = randomize_norms(MLLA(arch, drop_path_rate=0.), biases=True)
    ref = MLLAReference(arch)
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------
def randomize_norms(model: torch.nn.Module, biases: bool = False) -> torch.nn.Module:
    """Random BatchNorm statistics, BatchNorm and LayerNorm affine terms (and, with ``biases``, every other
    layer's bias too), so that every weight matters; in place, returns ``model``."""
    from torch.nn.modules.batchnorm import _BatchNorm
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.)
            if isinstance(m, (_BatchNorm, torch.nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
            elif biases and isinstance(getattr(m, 'bias', None), torch.nn.Parameter):
                m.bias.uniform_(-0.2, 0.2)
    return model


def spread_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every conv and linear layer re-initialised with torch's default (mmdet's heads start at std 0.01,
    which makes all scores nearly equal): a random detector whose detections are well separated."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
                m.reset_parameters()
    return randomize_norms(model)


def save_random_checkpoint(config: Path, out: Path, classes=None) -> Path:
    """Build the config's model (random weights) and save it as an mmengine-style checkpoint."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from mlla_mm.checkpoint import save_atomic
    cfg = Config.fromfile(str(config))
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    model.init_weights()
    meta = {'dataset_meta': {'classes': list(classes)}} if classes else {}
    save_atomic({'state_dict': model.state_dict(), 'meta': meta}, str(out))
    return out


def weight_decay_of_params(model, optim_wrapper_cfg):
    """Build the config's optimizer for ``model``; return ({param name: weight decay}, norm param names).

    Also checks that every ``custom_keys`` entry matches a real parameter name.
    """
    import torch.nn as nn
    from mmengine.optim import build_optim_wrapper
    names = [n for n, _ in model.named_parameters()]
    for key in (optim_wrapper_cfg.get('paramwise_cfg') or {}).get('custom_keys', {}):
        assert any(key in n for n in names), f'custom key {key!r} matches no parameter'
    wrapper = build_optim_wrapper(model, optim_wrapper_cfg)
    by_id = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    decay = {n: by_id[id(p)] for n, p in model.named_parameters()}
    norm_types = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
    norms = {f'{mn}.{pn}' if mn else pn for mn, m in model.named_modules() if isinstance(m, norm_types)
             for pn, _ in m.named_parameters(recurse=False)}
    return decay, norms


# ----------------------------------------------------------------------------------------------------------------
# User errors: one ``error:`` line; a full disk
# ----------------------------------------------------------------------------------------------------------------
def error_lines(text: str) -> List[str]:
    """The ``error: ...`` lines of a tool's output."""
    return [line for line in text.splitlines() if line.startswith('error: ')]


def one_error_line(text: str, *names) -> str:
    """``text`` (a tool's stderr) is exactly one ``error:`` line naming each of ``names``, no traceback."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), text
    assert 'Traceback' not in text
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def final_error_line(text: str) -> str:
    """The single ``error:`` line of a tool's stderr, which is also its last line (log lines may come before
    it); no traceback."""
    assert 'Traceback' not in text
    errors = error_lines(text)
    assert len(errors) == 1, text[-2000:]
    assert text.strip().splitlines()[-1] == errors[0]
    return errors[0]


def assert_one_error_line(capsys, *names):
    """stderr (from ``capsys``) is exactly one ``error:`` line naming each of ``names``, no traceback; returns it."""
    return one_error_line(capsys.readouterr().err, *names)


def fill_disk_on_rename(monkeypatch, suffix):
    """Make the atomic writer's final rename of a ``*suffix`` file fail as a full disk does (ENOSPC)."""
    import mlla_mm.utils.io as io_mod
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(suffix):
            raise OSError(28, 'No space left on device')
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, 'replace', failing_replace)


def fill_disk_on_fsync(monkeypatch, name):
    """Make ``os.fsync`` of the atomic writer's temporary file for ``name`` (``.NAME.tmp-*``) fail as a full
    disk does (ENOSPC): the data is written, the flush to disk is not."""
    import errno
    real_fsync = os.fsync

    def full_disk(fd):
        if f'.{name}.tmp-' in os.readlink(f'/proc/self/fd/{fd}'):
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_fsync(fd)

    monkeypatch.setattr(os, 'fsync', full_disk)


# ----------------------------------------------------------------------------------------------------------------
# Small COCO-format data sets with one defect each, for the data-check tests
# ----------------------------------------------------------------------------------------------------------------
COCO_CLASSES = ('cat', 'dog')


def write_image(path: Path, size: Tuple[int, int] = (64, 48), seed: int = 0, exif_orientation: int = 0) -> Path:
    """A random RGB image of ``size`` (width, height); the format follows the suffix."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        extra['exif'] = exif
    Image.fromarray(pixels).save(path, **extra)
    return path


def make_coco(root: Path, num_images: int = 3, size: Tuple[int, int] = (64, 48), suffix: str = '.jpg') -> Dict:
    """Images ``img/im<i><suffix>`` under ``root`` and a clean COCO dict: one cat and one dog per image."""
    images, anns = [], []
    for i in range(num_images):
        name = f'im{i}{suffix}'
        write_image(root / 'img' / name, size, seed=i)
        images.append(dict(id=i + 1, file_name=name, width=size[0], height=size[1]))
        for cat in (1, 2):
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cat, bbox=[4.0, 5.0, 20.0, 10.0],
                             area=200.0, iscrowd=0, segmentation=[[4, 5, 24, 5, 24, 15, 4, 15]]))
    return dict(images=images, annotations=anns,
                categories=[dict(id=k + 1, name=n) for k, n in enumerate(COCO_CLASSES)])


def write_ann(root: Path, data: Dict, name: str = 'ann.json') -> Path:
    """``data`` as the JSON file ``root/name``."""
    path = root / name
    path.write_text(json.dumps(data))
    return path


def ds_cfg(root: Path, classes: Optional[Tuple[str, ...]] = COCO_CLASSES, with_mask: bool = True,
           ann: str = 'ann.json') -> Dict:
    """A CocoDataset config on ``root`` (plain dict, as check_annotations gets it)."""
    pipeline: List[Dict] = [dict(type='LoadImageFromFile'),
                            dict(type='LoadAnnotations', with_bbox=True, with_mask=with_mask)]
    cfg = dict(type='CocoDataset', data_root=str(root) + '/', ann_file=ann, data_prefix=dict(img='img/'),
               pipeline=pipeline)
    if classes is not None:
        cfg['metainfo'] = dict(classes=classes)
    return cfg


def build_coco_dataset(cfg: Dict):
    """mmdet's CocoDataset from a config made by :func:`ds_cfg` (no pipeline, no filtering)."""
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = dict(cfg, pipeline=[], filter_cfg=None)
    return DATASETS.build(cfg)


def png_bytes(width: int, height: int, idat: bytes, colour: int = 2, depth: int = 8) -> bytes:
    """A PNG file with the given (possibly damaged) ``IDAT`` content; every chunk has a valid CRC."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, depth, colour, 0, 0, 0))
            + chunk(b'IDAT', idat) + chunk(b'IEND', b''))


def write_label(path: Path, values: np.ndarray) -> Path:
    """A gray (8-bit) label map PNG holding ``values`` (height x width)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Training runs of tools/train.py in subprocesses, stopped at chosen points
# ----------------------------------------------------------------------------------------------------------------
#: Validation after every epoch (on the 2 held-out images), the test-only hooks and checkpoint writer of
#: tests/test_reliability/support.py (replacing the tiny config's default_hooks: a later assignment in the same
#: file wins).
WITH_VALIDATION = '''
custom_imports = dict(imports=['mlla_mm', 'tests.test_reliability.support'], allow_failed_imports=False)
custom_hooks = [dict(type='TestPauseHook')]
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval=1, max_keep_ckpts=3, backend_args=dict(backend='test_pausing_local')))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=_test))
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric=['bbox'])
val_cfg = dict(type='ValLoop')
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
'''


def tiny_config_with_validation(folder: Path, data_root: Path, epochs: int) -> Path:
    """:func:`write_tiny_config` with ``WITH_VALIDATION``."""
    return write_tiny_config(folder, data_root, epochs=epochs, extra=WITH_VALIDATION)


def start(config, work_dir, log, *extra, **env):
    """Start tools/train.py; stdout and stderr go to ``log``."""
    return subprocess.Popen([PY, 'tools/train.py', str(config), '--work-dir', str(work_dir), *map(str, extra)],
                            cwd=ROOT, env=tool_env(**env), stdout=open(log, 'w'), stderr=subprocess.STDOUT)


def wait_for(text, log, proc, timeout=600):
    """Wait until ``text`` appears in the log file (the process must still run; generous for busy CI machines)."""
    end = time.time() + timeout
    while time.time() < end:
        if text in Path(log).read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f'training ended (rc={proc.returncode}) before {text!r}:\n'
                                 + Path(log).read_text()[-3000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f'timed out waiting for {text!r}')


def finish(proc, timeout=300):
    """Wait for ``proc``; its exit status."""
    proc.wait(timeout)
    return proc.returncode


def kill(proc):
    """SIGKILL ``proc`` (a crash: no handler runs)."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def weights(path):
    """The ``state_dict`` of a checkpoint file."""
    from mlla_mm.checkpoint import load_file
    return load_file(path)['state_dict']


def assert_same_weights(a_path, b_path):
    """Two checkpoints hold bit-identical weights."""
    a, b = weights(a_path), weights(b_path)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}'


def val_metrics(log_text, epoch):
    """The ``coco/...`` metrics of the validation after ``epoch`` in an mmengine log."""
    lines = [line for line in log_text.splitlines() if f'Epoch(val) [{epoch}]' in line and 'coco/bbox_mAP' in line]
    assert lines, f'no metrics of the validation after epoch {epoch} in the log'
    return dict(re.findall(r'(coco/\w+): (-?[0-9.]+)', lines[-1]))


def loop_stub(cls, runner, **attrs):
    """A train loop object of ``cls`` with just the attributes ``validation_due`` reads (no dataloader is built)."""
    loop = object.__new__(cls)
    loop._runner = runner
    loop.val_begin, loop.val_interval = 1, attrs.pop('val_interval')
    loop.dynamic_milestones, loop.dynamic_intervals = [0], [loop.val_interval]
    for k, v in attrs.items():
        setattr(loop, k, v)
    return loop


# ----------------------------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------------------------
#: The model-zoo configs beyond Mask R-CNN / UperNet and the own-data templates (tests/test_configs/):
#: name: (folder, arch, drop_path, parent config: an mm config or one of ours).
ZOO_CONFIGS = {
    'cascade_mask_rcnn_mlla_t_3x': ('detection', 'tiny', 0.3,
                                    'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_'
                                    'amp-ms-crop-3x_coco.py'),
    'cascade_mask_rcnn_mlla_s_3x': ('detection', 'small', 0.3, './cascade_mask_rcnn_mlla_t_3x.py'),
    'cascade_mask_rcnn_mlla_b_3x': ('detection', 'base', 0.3, './cascade_mask_rcnn_mlla_t_3x.py'),
    'retinanet_mlla_t': ('detection', 'tiny', 0.1, 'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py'),
    'custom_instance_mlla_t': ('detection', 'tiny', 0.1, './mask_rcnn_mlla_t.py'),
    'custom_boxes_faster_rcnn_mlla_t': ('detection', 'tiny', 0.1, 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'),
    'fpn_mlla_t': ('segmentation', 'tiny', 0.2, 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'),
    'fpn_mlla_s': ('segmentation', 'small', 0.3, './fpn_mlla_t.py'),
    'fpn_mlla_b': ('segmentation', 'base', 0.5, './fpn_mlla_t.py'),
    'mask2former_mlla_t': ('segmentation', 'tiny', 0.2,
                           'mmseg::mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py'),
    'custom_seg_mlla_t': ('segmentation', 'tiny', 0.2, './upernet_mlla_t.py'),
}


def edit_template(template: Path, out: Path, values: Dict[str, object]) -> Path:
    """Copy a template config, changing only the values of the names in its EDIT block.

    The relative ``_base_`` paths are made absolute so the copy can live anywhere.
    """
    text = template.read_text()
    start, end = text.index('# ==== EDIT HERE'), text.index('# =====', text.index('# ==== EDIT HERE') + 10)
    block = text[start:end]
    names = set(re.findall(r'^(\w+) = ', block, flags=re.M))
    assert names == set(values), f'EDIT block of {template.name} has {sorted(names)}'
    for name, value in values.items():
        block = re.sub(rf'^{name} = .*?(  #.*)?$', f'{name} = {value!r}', block, flags=re.M)
    rest = text[end:]
    rest = re.sub(r"'(\.\.?/[^']+\.py)'", lambda m: repr(str((template.parent / m.group(1)).resolve())), rest)
    out.write_text(text[:start] + block + rest)
    return out


def run_main(capsys, main, *args) -> Tuple[int, List[str]]:
    """Run a tool's ``main`` here (no interpreter start-up): (exit code, non-empty stderr lines); argparse's exit
    is an exit code too, a traceback on stderr fails the test."""
    code = exit_code(main, args)
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def reference_run(folder: Path, data_root: Path, epochs: int) -> Tuple[Path, Path, str]:
    """:func:`tiny_config_with_validation` in ``folder`` and its uninterrupted tools/train.py run to the end (work
    dir ``folder/ref``, log ``folder/ref.log``): (config, work dir, log text)."""
    config = tiny_config_with_validation(folder, data_root, epochs)
    ref, log = folder / 'ref', folder / 'ref.log'
    assert finish(start(config, ref, log)) == 0, log.read_text()[-3000:]
    return config, ref, log.read_text()


def copy_work_dir(src: Path, dst: Path) -> Path:
    """A copy of a stopped training's work dir whose ``last_checkpoint`` names the copy's own file, as a run in
    ``dst`` would have left it: several tests continue one stopped run, each in its own folder."""
    import shutil
    shutil.copytree(src, dst)
    marker = dst / 'last_checkpoint'
    if marker.is_file() and marker.read_text().strip():
        marker.write_text(str(dst / Path(marker.read_text().strip()).relative_to(src)))
    return dst


def missing_data_error(config: Path, tool: str, folder: Path, monkeypatch, capsys) -> str:
    """``tools/<tool>.py`` (``train``, or ``test`` with an empty checkpoint) on ``config``, started in ``folder``
    where the config's data is not, run in this process (no interpreter start-up): it must stop with exit code 2,
    no traceback and no checkpoint under ``folder/work_dirs``; returns its stderr."""
    args = [config]
    if tool == 'test':
        torch.save({'state_dict': {}}, folder / 'ckpt.pth')
        args.append(folder / 'ckpt.pth')
    monkeypatch.chdir(folder)
    code = exit_code(load_tool(tool).main, args)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert 'Traceback' not in err
    work = folder / 'work_dirs'
    assert not work.exists() or not any(work.rglob('*.pth'))
    return err
