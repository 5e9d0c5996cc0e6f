# Cascade Mask R-CNN + FPN with MLLA-B on COCO, 3x schedule. No published MLLA
# recipe: the MLLA-T config (mmdet's ConvNeXt cascade recipe, see there) with the
# base backbone. OUR CHOICES: drop_path 0.3 (MLLA-B was published with Mask R-CNN
# 1x only, drop_path 0.1; 0.3 is the published 3x value of MLLA-T and MLLA-S);
# layer-wise decay 0.9 over MLLA-B's 38 layer ids, as for MLLA-S.
_base_ = ['./cascade_mask_rcnn_mlla_t_3x.py']

pretrained = 'data/pretrained/MLLA_B.pth'
model = dict(
    backbone=dict(arch='base', init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
