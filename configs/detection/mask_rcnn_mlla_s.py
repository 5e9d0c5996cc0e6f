# Mask R-CNN MLLA-S, 1x schedule.
_base_ = ['./mask_rcnn_mlla_t.py']

pretrained = 'data/pretrained/MLLA_S.pth'
model = dict(
    backbone=dict(arch='small', init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))
