"""The own-data templates: edited only in their EDIT block, they train and evaluate through tools/train.py.

The data are the bundled synthetic shapes with the classes renamed, so a
template that ignored its class names (and fell back to COCO's or ADE20K's)
would find no annotations.
"""
import json
import re

import pytest

from tests.helpers import ROOT, SEG_PIPELINES_64, TINY_ARCH_OPTIONS, edit_template, run_tool

DET = ROOT / 'configs' / 'detection'
SEG = ROOT / 'configs' / 'segmentation'
RENAMED = {'circle': 'disc', 'triangle': 'wedge', 'rectangle': 'slab'}

# Small images, few proposals, small heads, two epochs of two iterations: speed only.
DET_SPEED = '''
_base_ = [{edited!r}]
_train = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={mask}),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs'),
]
_test = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask={mask}),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(pipeline=_train))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(pipeline=_test))
test_dataloader = val_dataloader
model = dict(
    neck=dict(out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=32), bbox_head=dict(in_channels=32, fc_out_channels=64)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=64), rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=64)))
{mask_heads}
train_cfg = dict(max_epochs=2, val_interval=2)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
'''
MASK_HEADS = ("model.update(roi_head=dict(bbox_roi_extractor=dict(out_channels=32), "
              "bbox_head=dict(in_channels=32, fc_out_channels=64), mask_roi_extractor=dict(out_channels=32), "
              "mask_head=dict(in_channels=32, conv_out_channels=32)))")

SEG_SPEED = '''
_base_ = [{edited!r}]
''' + SEG_PIPELINES_64 + '''
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(pipeline=_train))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(pipeline=_test))
test_dataloader = val_dataloader
model = dict(data_preprocessor=dict(size=crop_size), test_cfg=dict(_delete_=True, mode='whole'),
             decode_head=dict(channels=16), auxiliary_head=dict(channels=16))
train_cfg = dict(max_iters=4, val_interval=4)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
'''


def coco_data(tmp_path, boxes_only=False):
    from mlla_mm.datasets import make_coco_shapes
    root = make_coco_shapes(str(tmp_path / 'data'), seed=0, num_train=4, num_val=2, size=64)
    for split in ('train', 'val'):
        ann = root / 'annotations' / f'instances_{split}.json'
        data = json.loads(ann.read_text())
        for c in data['categories']:
            c['name'] = RENAMED[c['name']]
        if boxes_only:
            for a in data['annotations']:
                a.pop('segmentation')
        ann.write_text(json.dumps(data))
    return root


def det_values(root):
    return dict(classes=list(RENAMED.values()), data_root=str(root) + '/',
                train_ann_file='annotations/instances_train.json', train_img_dir='train/',
                val_ann_file='annotations/instances_val.json', val_img_dir='val/')


def train(config, work, options):
    proc = run_tool('tools/train.py', config, '--work-dir', work, '--cfg-options', *options, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = (next(work.glob('*/vis_data/scalars.json'))).read_text().splitlines()
    return [json.loads(line) for line in scalars], proc


@pytest.mark.slow
@pytest.mark.parametrize('template,mask', [('custom_instance_mlla_t', True),
                                           ('custom_boxes_faster_rcnn_mlla_t', False)])
def test_detection_templates_train_and_evaluate_on_renamed_classes(template, mask, tmp_path):
    root = coco_data(tmp_path, boxes_only=not mask)
    edited = edit_template(DET / f'{template}.py', tmp_path / 'edited.py', det_values(root))
    config = tmp_path / 'run.py'
    config.write_text(DET_SPEED.format(edited=str(edited), mask=mask, mask_heads=MASK_HEADS if mask else ''))
    work = tmp_path / 'work'
    records, _ = train(config, work, TINY_ARCH_OPTIONS + ['model.neck.in_channels=[16,32,64,128]'])
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 4 and all(0 < v < 1e3 for v in losses)
    metrics = [r for r in records if 'coco/bbox_mAP' in r]
    assert len(metrics) == 1 and 0 <= metrics[0]['coco/bbox_mAP'] <= 1
    assert ('coco/segm_mAP' in metrics[0]) == mask
    import torch
    ckpt = torch.load(work / 'epoch_2.pth', map_location='cpu', weights_only=False)
    assert list(ckpt['meta']['dataset_meta']['classes']) == list(RENAMED.values())


@pytest.mark.slow
def test_segmentation_template_trains_and_evaluates(tmp_path):
    from mlla_mm.datasets import make_ade_shapes
    root = make_ade_shapes(str(tmp_path / 'data'), seed=0, num_train=4, num_val=2, size=64)
    classes = ['ground'] + list(RENAMED.values())
    edited = edit_template(SEG / 'custom_seg_mlla_t.py', tmp_path / 'edited.py', dict(
        classes=classes, data_root=str(root) + '/', train_img_dir='images/training',
        train_ann_dir='annotations/training', val_img_dir='images/validation',
        val_ann_dir='annotations/validation', img_suffix='.jpg', seg_map_suffix='.png'))
    config = tmp_path / 'run.py'
    config.write_text(SEG_SPEED.format(edited=str(edited)))
    records, proc = train(config, tmp_path / 'work', TINY_ARCH_OPTIONS + [
        'model.decode_head.in_channels=[16,32,64,128]', 'model.auxiliary_head.in_channels=64'])
    assert len([r for r in records if 'loss' in r]) == 4
    metrics = [r for r in records if 'mIoU' in r]
    assert len(metrics) == 1 and 0 <= metrics[0]['mIoU'] <= 100
    # the per-class table of the evaluation names the renamed classes
    for name in classes:
        assert re.search(rf'\|\s*{name}\s*\|', proc.stdout + proc.stderr), name


@pytest.mark.parametrize('template', ['custom_instance_mlla_t', 'custom_boxes_faster_rcnn_mlla_t'])
def test_a_wrong_path_is_a_one_line_error(template, tmp_path):
    values = det_values(tmp_path / 'no_such_folder')
    edited = edit_template(DET / f'{template}.py', tmp_path / 'edited.py', values)
    proc = run_tool('tools/train.py', edited, '--work-dir', tmp_path / 'work')
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'no_such_folder' in errors[0], proc.stderr[-2000:]


def test_seg_template_wrong_path_is_a_one_line_error(tmp_path):
    edited = edit_template(SEG / 'custom_seg_mlla_t.py', tmp_path / 'edited.py', dict(
        classes=['a', 'b'], data_root=str(tmp_path / 'no_such_folder') + '/', train_img_dir='images/training',
        train_ann_dir='annotations/training', val_img_dir='images/validation',
        val_ann_dir='annotations/validation', img_suffix='.jpg', seg_map_suffix='.png'))
    proc = run_tool('tools/train.py', edited, '--work-dir', tmp_path / 'work')
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'no_such_folder' in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize('path', [DET / 'custom_instance_mlla_t.py', DET / 'custom_boxes_faster_rcnn_mlla_t.py',
                                  SEG / 'custom_seg_mlla_t.py'])
def test_the_edit_block_is_first_and_holds_only_classes_and_paths(path):
    text = path.read_text()
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith('#')]
    block = text[text.index('# ==== EDIT HERE'):text.index('# =====', text.index('# ==== EDIT HERE') + 10)]
    names = re.findall(r'^(\w+) = ', block, flags=re.M)
    assert code[0].startswith(names[0] + ' = ')  # nothing to read before the block
    assert names[0] == 'classes' and all(n == 'data_root' or n.endswith(('_dir', '_file', '_suffix'))
                                         for n in names[1:])
