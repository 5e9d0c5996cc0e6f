# Semantic FPN with MLLA-S on ADE20K, 80k iterations. No published MLLA recipe:
# the MLLA-T config (see there) with the small backbone and drop_path 0.3
# (MLLA-S's classification value, as upernet_mlla_s.py; our choice).
_base_ = ['./fpn_mlla_t.py']

pretrained = 'data/pretrained/MLLA_S.pth'
model = dict(backbone=dict(arch='small', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)))
