# Mask R-CNN MLLA-S, 3x schedule, drop_path 0.3.
_base_ = ['./mask_rcnn_mlla_t_3x.py']

pretrained = 'data/pretrained/MLLA_S.pth'
model = dict(backbone=dict(arch='small', init_cfg=dict(checkpoint=pretrained)))
