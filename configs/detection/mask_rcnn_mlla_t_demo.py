# The embedded demo: Mask R-CNN MLLA-T on a small synthetic shapes data set in
# COCO format (made on first use under data/shapes_coco/). Only the data, the
# image scale, the classes, the width of the FPN and heads, the schedule and the
# visualizer differ from mask_rcnn_mlla_t.py.
_base_ = ['./mask_rcnn_mlla_t.py']

# ---- data --------------------------------------------------------------
data_root = 'data/shapes_coco/'
synthetic_data = dict(kind='coco-shapes', root=data_root, seed=0, num_train=240, num_val=60, size=160)
classes = ('circle', 'triangle', 'rectangle')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 160, 80), (30, 80, 220)])
# The 160x160 images are trained and tested at 128x128: the backbone, FPN and RPN
# see 0.64x the pixels. Seeds 0, 1, 2 reached box mAP 0.563, 0.583, 0.565 (0.564,
# 0.598, 0.596 at 160x160) in 481-538 s of training instead of 589-638 s on a
# 2-core AMD EPYC (docs/benchmarks.md, "AMD EPYC, Zen 2 (session 9)"). Boxes and
# masks are evaluated and drawn at the images' own 160x160.
image_scale = (128, 128)

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# Batch 2: twice the updates of batch 4 in about the same time per epoch (0.66 s vs 1.18 s per
# iteration on a 2-core Xeon); seed 1 went from box mAP 0.429 to 0.541 (docs/benchmarks.md, "Demo").
train_dataloader = dict(
    batch_size=2,
    num_workers=1,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# ---- classes, proposal counts scaled to 160-pixel images with <= 4 objects,
# and 128-channel FPN and heads.
# 32 sampled RoIs per image (8 positive at most): every positive RoI also goes
# through the mask head's four 3x3 convolutions, so with 128 (mmdet's 512
# scaled down) a trained model's iteration took 2x as long (9.2 s vs 4.5 s on a
# 2-core AMD EPYC, docs/benchmarks.md).
# The FPN, RPN and RoI heads have 128 channels instead of mmdet's 256 (the
# backbone is the full MLLA-T): on a 2-core AMD EPYC (Zen 2), at 160x160, iterations took
# 0.71-0.82 s instead of 1.05-1.28 s and seed 0 reached box mAP 0.564 instead of 0.560
# (docs/benchmarks.md, "AMD EPYC, Zen 2").
heads = 128
model = dict(
    neck=dict(out_channels=heads),
    rpn_head=dict(in_channels=heads, feat_channels=heads),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=heads),
        bbox_head=dict(in_channels=heads, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=heads),
        mask_head=dict(in_channels=heads, conv_out_channels=heads, num_classes=len(classes))),
    train_cfg=dict(rpn_proposal=dict(nms_pre=1000, max_per_img=300), rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)))

# ---- schedule ----------------------------------------------------------
max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[5], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=4e-4, fused=True))  # torch's one-kernel AdamW step
# A fixed seed: the demo repeats (tools/demo.py --seed N for another run).
randomness = dict(seed=0)
# Pictures drawn with OpenCV (mlla_mm/visualization.py) instead of matplotlib, as every
# tool draws them: ground truth | predictions, each at the image's own size.
visualizer = dict(type='mlla_mm.FastDetVisualizer')
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=2))
