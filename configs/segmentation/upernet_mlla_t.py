# UperNet with MLLA-T on ADE20K, 512x512 crops, 160k iterations, batch 16
# (8 GPUs x 2 images). Inherits mmseg's own UperNet, ADE20K, runtime and
# 160k-schedule bases and states only what differs.
#
# The recipe is the published one of UperNet MLLA-B (the only published
# MLLA segmentation model). For MLLA-T the drop_path rate 0.2 is OUR CHOICE
# (the classification drop_path of MLLA-T), not a published setting.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
    '../_base_/mlla_runtime.py',  # last: mlla-mm's runtime on top of mmdet's/mmseg's
]

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
# Published ImageNet weights (MLLA_T.pth). Missing file: a warning and random init.
pretrained = 'data/pretrained/MLLA_T.pth'
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,  # the base names a ResNet checkpoint; MLLA loads through init_cfg
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.2,  # our choice for tiny (not published)
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, if_missing='warn')),
    # UPerHead (channels 512, pool scales 1, 2, 3, 6) on all four stages, and an
    # FCN auxiliary head on stage 2 with loss weight 0.4, come with the base;
    # the heads use SyncBN (plain BN on the CPU or in one process: tools/train.py).
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150),
    # Sliding-window inference over 512x512 windows (stride 341); use
    # --cfg-options model.test_cfg.mode=whole for whole-image inference.
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# AdamW, weight decay 0.01 and none on norm layers: custom_keys matches MLLA's
# norm parameters (norm1, norm2, norm0..3 and the BatchNorms "...norm.weight"),
# norm_decay_mult=0 also covers the heads' BatchNorms (named "bn").
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0., custom_keys={'norm': dict(decay_mult=0.)}))

# 1500-iteration linear warm-up from 1e-6, then poly (power 1.0) to 0 at 160k.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]

# 8 GPUs x 2 images = batch 16.
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
