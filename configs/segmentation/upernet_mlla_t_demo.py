# The embedded demo (`make demo-seg`): UperNet MLLA-T on a small synthetic
# shapes data set in ADE20K layout (made on first use under data/shapes_ade/).
# Only the data, the crop size, the classes and the schedule differ from
# upernet_mlla_t.py; the backbone and both heads keep the recipe's sizes
# (UPerHead channels 512, FCN auxiliary head 256) and starts from random weights.
_base_ = ['./upernet_mlla_t.py']

# ---- data --------------------------------------------------------------
data_root = 'data/shapes_ade/'
image_size = 128
synthetic_data = dict(kind='ade-shapes', root=data_root, seed=0, num_train=200, num_val=50, size=image_size)
classes = ('background', 'circle', 'triangle', 'rectangle')
metainfo = dict(classes=classes, palette=[(0, 0, 0), (220, 20, 60), (0, 160, 80), (30, 80, 220)])
crop_size = (image_size, image_size)
dataset_type = 'BaseSegDataset'

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
_dataset = dict(type=dataset_type, data_root=data_root, metainfo=metainfo, reduce_zero_label=False,
                img_suffix='.jpg', seg_map_suffix='.png')
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(**_dataset, data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    dataset=dict(**_dataset, data_prefix=dict(img_path='images/validation',
                                              seg_map_path='annotations/validation'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
# --tta keeps the published ratios 0.5..1.75 and flips (tta_pipeline of mmseg's ade20k base).

# ---- crop size and classes ---------------------------------------------
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=len(classes)),
    auxiliary_head=dict(num_classes=len(classes)),
    test_cfg=dict(_delete_=True, mode='whole'))

# ---- schedule: short, iteration-based, validation at the end -------------
# 240 iterations x 4 images (about 5 passes over the 200 training images);
# a higher lr than the recipe's 6e-5, as the backbone starts from random weights.
max_iters = 240
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=20, end=max_iters, by_epoch=False),
]
optim_wrapper = dict(optimizer=dict(lr=4e-4))
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
randomness = dict(seed=0)
