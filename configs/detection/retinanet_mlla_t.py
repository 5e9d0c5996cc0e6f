# RetinaNet + FPN with MLLA-T on COCO, 1x schedule (12 epochs).
#
# There is NO published MLLA recipe for RetinaNet (and no published accuracy).
# This config inherits mmdet's own Swin-T RetinaNet 1x config and keeps all of
# it except what the backbone needs:
#   kept from mmdet's Swin-T config: three pyramid levels from the backbone,
#     out_indices=(1, 2, 3) (strides 8, 16, 32; stage 0 is computed but not
#     returned, so it has no output norm), FPN start_level 0 with two extra
#     levels (P6, P7) from its input, RetinaHead, 1333x800 single-scale
#     training with flip, 500-iteration warm-up, lr x0.1 at epochs 8 and 11,
#     batch 16 (8 GPUs x 2 images);
#   changed (OUR CHOICES):
#     - backbone MLLA-T with drop_path 0.1 (MLLA's published Mask R-CNN 1x value);
#     - FPN in_channels [128, 256, 512];
#     - optimizer: AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 with
#       none on norm layers (MLLA's published Mask R-CNN optimizer) instead of
#       mmdet's SGD lr 0.01 of the Swin-T RetinaNet config.
_base_ = [
    'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py',
    '../_base_/mlla_runtime.py',
]

# Published ImageNet weights (MLLA_T.pth). Missing file: a warning and random init.
pretrained = 'data/pretrained/MLLA_T.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, if_missing='warn')),
    neck=dict(in_channels=[128, 256, 512]))

# norm_decay_mult=0 covers every norm layer by type (MLLA's LayerNorms and BatchNorms).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.))
