"""Test helpers: a tiny Mask R-CNN config on tiny synthetic data, and running the tools."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

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
    backbone=dict(arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
                  init_cfg=None),
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


def tool_env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    env.pop('MLLA_MM_TRUST_CHECKPOINTS', None)
    env.update(extra)
    return env


def run_tool(*args, env=None, timeout=300):
    """Run tools/<script> to completion; returns the CompletedProcess (text)."""
    return subprocess.run([PY, *map(str, args)], cwd=ROOT, env=env or tool_env(), capture_output=True,
                          text=True, timeout=timeout)


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f'mlla_mm_tool_{name}', ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def exit_code(main, argv):
    """``main(argv)``'s return value, or the code of the SystemExit an argparse error raises."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def assert_one_error_line(capsys, *names):
    """stderr (from ``capsys``) is exactly one ``error:`` line naming each of ``names``, no traceback; returns it."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert 'Traceback' not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def fill_disk_on_rename(monkeypatch, suffix):
    """Make the atomic writer's final rename of a ``*suffix`` file fail as a full disk does (ENOSPC)."""
    import mlla_mm.utils.io as io_mod
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(suffix):
            raise OSError(28, 'No space left on device')
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, 'replace', failing_replace)
