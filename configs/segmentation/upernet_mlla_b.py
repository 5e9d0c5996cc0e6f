# UperNet with MLLA-B on ADE20K: the published recipe (drop_path 0.5;
# 51.9 mIoU single-scale, 52.5 multi-scale, 128M parameters, 1183G FLOPs).
_base_ = ['./upernet_mlla_t.py']

pretrained = 'data/pretrained/MLLA_B.pth'
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.5, init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
