# Mask R-CNN MLLA-B, 1x schedule.
_base_ = ['./mask_rcnn_mlla_t.py']

pretrained = 'data/pretrained/MLLA_B.pth'
model = dict(
    backbone=dict(arch='base', init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
