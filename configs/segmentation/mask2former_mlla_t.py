# Mask2Former with MLLA-T on ADE20K, 512x512 crops, 160k iterations.
#
# There is NO published MLLA recipe for Mask2Former (and no published
# accuracy). This config inherits mmseg's own Swin-T Mask2Former ADE20K config
# and keeps all of it except what the backbone needs:
#   kept from mmseg's Swin-T config: the Mask2Former head (multi-scale
#     deformable-attention pixel decoder over the 3 coarser levels, 9 decoder
#     layers, 100 queries), large-scale jitter 0.5-2.0 with 512x512 crops,
#     AdamW lr 1e-4, weight decay 0.05, gradient clipping at 0.01, poly decay
#     (power 0.9) over 160k iterations, batch 16 (8 GPUs x 2 images), the
#     backbone at 0.1 x the lr, no weight decay on norms and embeddings;
#   changed:
#     - backbone MLLA-T with drop_path 0.2 (OUR CHOICE: MLLA-T's
#       classification value; mmseg's Swin-T config uses 0.3);
#     - head in_channels [64, 128, 256, 512];
#     - the per-parameter keys name MLLA's norm layers instead of Swin's.
_base_ = ['mmseg::mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py']

# mlla-mm's runtime (../_base_/mlla_runtime.py), stated here: mmseg's
# Mask2Former config already sets custom_imports (mmdet.models, kept below),
# and mmengine refuses a key that two files of one `_base_` list both define,
# so that file cannot be listed above. tests/test_configs/test_zoo_configs.py
# checks these equal its settings.
custom_imports = dict(imports=['mlla_mm', 'mmdet.models'], allow_failed_imports=False)
runner_type = 'SafeRunner'
custom_hooks = [
    dict(type='RandomStateHook'),
    dict(type='PreemptionHook'),
    dict(type='ValidationResumeHook'),
    dict(type='FiniteLossHook'),
    dict(type='CheckpointGuardHook'),
]

# Published ImageNet weights (MLLA_T.pth). Missing file: a warning and random init.
pretrained = 'data/pretrained/MLLA_T.pth'
depths = [2, 4, 8, 4]
model = dict(
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, if_missing='warn')),
    decode_head=dict(in_channels=[64, 128, 256, 512]))

# The backbone at 0.1 x the lr; its norm layers (stem and downsample BatchNorms,
# block and output LayerNorms) also without weight decay, as mmseg's Swin config.
backbone_norm_multi = dict(lr_mult=0.1, decay_mult=0.0)
embed_multi = dict(lr_mult=1.0, decay_mult=0.0)
mlla_custom_keys = {
    'backbone': dict(lr_mult=0.1, decay_mult=1.0),
    'backbone.norm': backbone_norm_multi,
    'query_embed': embed_multi,
    'query_feat': embed_multi,
    'level_embed': embed_multi,
}
mlla_custom_keys.update({f'backbone.patch_embed.{conv}.norm': backbone_norm_multi
                    for conv in ('conv1', 'conv2.0', 'conv2.1', 'conv3.0', 'conv3.1')})
mlla_custom_keys.update({f'backbone.layers.{i}.blocks.{j}.norm': backbone_norm_multi
                    for i, n in enumerate(depths) for j in range(n)})
mlla_custom_keys.update({f'backbone.layers.{i}.downsample.conv.2.norm': backbone_norm_multi
                    for i in range(len(depths) - 1)})
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(_delete_=True, **mlla_custom_keys), norm_decay_mult=0.0))
