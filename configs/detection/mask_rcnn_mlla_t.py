# Mask R-CNN + FPN with MLLA-T on COCO, 1x schedule (the published recipe).
# Inherits mmdet's own bases and states only what differs.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    '../_base_/mlla_runtime.py',  # last: mlla-mm's runtime on top of mmdet's/mmseg's
]

# Published ImageNet weights (MLLA_T.pth). Missing file: a warning and random init.
pretrained = 'data/pretrained/MLLA_T.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, if_missing='warn')),
    neck=dict(in_channels=[64, 128, 256, 512]),
    # mmdet's RoIAlign settings, computed on the CPU by mlla-mm's multi-threaded RoIAlign (the same
    # numbers as mmcv's, 5x faster on 2 cores: docs/benchmarks.md "RoIAlign"); on a GPU by mmcv's kernel.
    roi_head=dict(bbox_roi_extractor=dict(type='SparseRoIExtractor'),
                  mask_roi_extractor=dict(type='SparseRoIExtractor')))

# DETR-style multi-scale crop augmentation with random flip.
_scales = [(s, 1333) for s in range(480, 801, 32)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True)],
            [
                dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)], keep_ratio=True),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=_scales, keep_ratio=True),
            ],
        ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
# Testing at 1333x800 comes with mmdet's coco_instance base.

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

# AdamW; no weight decay on MLLA's norm layers (norm1, norm2, norm0..3 and
# the BatchNorms, all named "...norm..."). The constructor puts parameters with
# equal settings in one group (2 groups instead of one per parameter, the same
# numbers; mlla_mm/engine/param_groups.py).
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='MergedGroupsOptimWrapperConstructor',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))

# The published runs used 8 GPUs x 2 images.
auto_scale_lr = dict(enable=False, base_batch_size=16)
