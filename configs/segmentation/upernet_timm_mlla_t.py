# UperNet with MLLA-T taken from timm through mmseg's own TIMMBackbone: the
# second way to swap the backbone (the first is type='MLLA'). Everything else
# (data, heads, schedule, AdamW with no decay on norms) is upernet_mlla_t.py.
#
# `import mlla_mm` (custom_imports, inherited) registers mlla_tiny/small/base
# in timm. features_only=True gives the four stage maps (NCHW, strides
# 4/8/16/32, 64/128/256/512 channels) without the classifier's norm and head.
# The published ImageNet weights are read from the file below through
# mlla-mm's safe loader; without the file training warns that the backbone is
# randomly initialised and goes on, as the MLLA configs do (if_missing='warn';
# 'error' stops with one line saying where to get the file and where to put it).
_base_ = ['./upernet_mlla_t.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmseg.TIMMBackbone',
        model_name='mlla_tiny',
        features_only=True,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,  # our choice for tiny, as in upernet_mlla_t.py
        pretrained=True,
        if_missing='warn',
        pretrained_cfg_overlay=dict(file='data/pretrained/MLLA_T.pth')))
