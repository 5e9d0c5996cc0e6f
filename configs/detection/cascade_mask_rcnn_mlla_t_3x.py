# Cascade Mask R-CNN + FPN with MLLA-T on COCO, 3x schedule (36 epochs).
#
# There is NO published MLLA recipe for Cascade Mask R-CNN (and no published
# accuracy). This config inherits mmdet's own ConvNeXt-T Cascade Mask R-CNN 3x
# config, the closest published recipe for a modern hierarchical backbone, and
# keeps all of it except what the backbone needs:
#   kept from mmdet's ConvNeXt config: three cascade stages of 4conv1fc bbox
#     heads with GIoU loss (SyncBN in the heads, plain BN on the CPU or in one
#     process), the DETR-style multi-scale crop augmentation, AdamW lr 2e-4,
#     betas (0.9, 0.999), weight decay 0.05, 1000-iteration warm-up, 36 epochs
#     with lr x0.1 at 27 and 33, batch 16 (8 GPUs x 2 images), test at 1333x800;
#   changed (OUR CHOICES):
#     - backbone MLLA-T with drop_path 0.3 (MLLA's published Mask R-CNN 3x value);
#     - FPN in_channels [64, 128, 256, 512];
#     - layer-wise lr decay: mmdet's LearningRateDecayOptimizerConstructor only
#       knows ConvNeXt, so MLLALayerDecayOptimizerConstructor takes its place.
#       One layer per MLLA block (20 layer ids for MLLA-T) instead of ConvNeXt's
#       grouped 6; decay 0.9 per layer, picked so that the stem's lr scale,
#       0.9^19 = 0.14, is near ConvNeXt-T's 0.7^7 = 0.08. No weight decay on norm
#       layers, biases and other 1-D parameters.
#     - OptimWrapper instead of AmpOptimWrapper: mixed precision is a command-line
#       choice here (`tools/train.py --amp`: fp16 on CUDA, bf16 on the CPU).
_base_ = ['mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py']

# mlla-mm's runtime (../_base_/mlla_runtime.py), stated here: mmdet's ConvNeXt
# config already sets custom_imports, and mmengine refuses a key that two files
# of one `_base_` list both define, so that file cannot be listed above.
# tests/test_configs/test_zoo_configs.py checks these equal its settings.
custom_imports = dict(imports=['mlla_mm'], allow_failed_imports=False)
runner_type = 'SafeRunner'
custom_hooks = [
    dict(type='RandomStateHook'),
    dict(type='PreemptionHook'),
    dict(type='ValidationResumeHook'),
    dict(type='FiniteLossHook'),
    dict(type='CheckpointGuardHook'),
]

# Published ImageNet weights (MLLA_T.pth). Missing file: a warning and random init.
pretrained = 'data/pretrained/MLLA_T.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, if_missing='warn')),
    neck=dict(in_channels=[64, 128, 256, 512]),
    # mmdet's RoIAlign settings; on the CPU mlla-mm's multi-threaded RoIAlign (same numbers), on a GPU mmcv's.
    roi_head=dict(bbox_roi_extractor=dict(type='SparseRoIExtractor'),
                  mask_roi_extractor=dict(type='SparseRoIExtractor')))

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='MLLALayerDecayOptimizerConstructor',
    paramwise_cfg=dict(_delete_=True, decay_rate=0.9, decay_type='layer_wise'))
