# Semantic FPN with MLLA-T on ADE20K, 512x512 crops, 80k iterations.
#
# There is NO published MLLA recipe for Semantic FPN (and no published
# accuracy; only UperNet MLLA-B was published for segmentation). This config
# inherits mmseg's own Semantic FPN ADE20K config (FPN neck, FPNHead with 128
# channels, ADE20K 512x512 pipeline, whole-image test at 2048x512) and changes
# what the backbone needs and the schedule:
#   - backbone MLLA-T with drop_path 0.2 (MLLA-T's classification value, as the
#     UperNet configs of tiny and small use);
#   - FPN in_channels [64, 128, 256, 512];
#   - OUR CHOICE of schedule, the 80k Semantic FPN recipe of mmseg's configs for
#     transformer backbones (Twins): 80k iterations, 8 GPUs x 4 images (batch
#     32), AdamW lr 1e-4, weight decay 1e-4, poly decay (power 0.9) to 0
#     (mmseg's sem_fpn ADE20K config itself is SGD, 160k x batch 16, for ResNet);
#   - no weight decay on norm layers.
_base_ = [
    'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py',
    '../_base_/mlla_runtime.py',
]

# Published ImageNet weights (MLLA_T.pth). Missing file: a warning and random init.
pretrained = 'data/pretrained/MLLA_T.pth'
model = dict(
    pretrained=None,  # the base names a ResNet checkpoint; MLLA loads through init_cfg
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, if_missing='warn')),
    neck=dict(in_channels=[64, 128, 256, 512]))

# norm_decay_mult=0 covers every norm layer by type (MLLA's LayerNorms and
# BatchNorms, the head's BatchNorms).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.))

max_iters = 80000
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=8000)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=8000))

# 8 GPUs x 4 images (the 4 per GPU come with mmseg's ADE20K base).
train_dataloader = dict(batch_size=4)
auto_scale_lr = dict(enable=False, base_batch_size=32)
