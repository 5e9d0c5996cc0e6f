# Semantic FPN with MLLA-B on ADE20K, 80k iterations. No published MLLA recipe:
# the MLLA-T config (see there) with the base backbone and drop_path 0.5 (the
# published UperNet MLLA-B value; our choice for Semantic FPN).
_base_ = ['./fpn_mlla_t.py']

pretrained = 'data/pretrained/MLLA_B.pth'
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
