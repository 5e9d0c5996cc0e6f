"""Helpers for the infer and own-data tests: a tiny UperNet config, tiny checkpoints, template copies."""
import re
from pathlib import Path
from typing import Dict

from tests.helpers import ROOT

TINY_ARCH_OPTIONS = ['model.backbone.arch._delete_=True', 'model.backbone.arch.embed_dims=16',
                     'model.backbone.arch.depths=[1,1,1,1]', 'model.backbone.arch.num_heads=[1,2,2,4]',
                     'model.backbone.init_cfg=None']

# 64x64 segmentation pipelines (label value k = class k; no braces: used in str.format templates).
SEG_PIPELINES_64 = '''
crop_size = (64, 64)
_train = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='PackSegInputs'),
]
_test = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
'''

TINY_SEG_CONFIG = '''
_base_ = [{base!r}]
data_root = {root!r}
''' + SEG_PIPELINES_64 + '''
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=_train))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=_test))
test_dataloader = val_dataloader
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch=dict(_delete_=True, embed_dims=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
                  init_cfg=None),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=16),
    auxiliary_head=dict(in_channels=64, channels=16))
'''


def write_tiny_seg_config(folder: Path, data_root: Path) -> Path:
    """UperNet (the segmentation demo config) with a tiny MLLA and 16-channel heads, 64x64 images."""
    path = folder / 'tiny_seg.py'
    base = str(ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t_demo.py')
    path.write_text(TINY_SEG_CONFIG.format(base=base, root=str(data_root) + '/'))
    return path


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
