# UperNet with MLLA-S on ADE20K: the recipe of upernet_mlla_t.py (published
# for MLLA-B). drop_path 0.3 is OUR CHOICE (MLLA-S's classification
# drop_path), not a published setting.
_base_ = ['./upernet_mlla_t.py']

pretrained = 'data/pretrained/MLLA_S.pth'
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
