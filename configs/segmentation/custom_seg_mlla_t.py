# TEMPLATE: UperNet MLLA-T (the recipe of upernet_mlla_t.py) on YOUR semantic
# segmentation data set in mmseg's folder layout. Edit the block below (class
# names and paths) and nothing else; docs/custom_data.md walks through it.
#
#   python tools/train.py configs/segmentation/custom_seg_mlla_t.py
#   python tools/train.py configs/segmentation/custom_seg_mlla_t.py --iters 20000
#
# --iters N changes the length of the run and scales the schedule to it (warm-up,
# poly decay, validation and checkpoint intervals); see docs/custom_data.md, "Schedules".
#
# Layout: one image folder and one label folder per split; every image
# <name><img_suffix> has a label map <name><seg_map_suffix> (a single-channel
# PNG) in the label folder. A pixel value k in a label map is classes[k];
# 255 is ignored.

# ==== EDIT HERE: your data ====================================================
# Class names in the order of their pixel values (0, 1, 2, ...), background
# included if your label maps have one.
classes = ['background', 'circle', 'triangle', 'rectangle']
data_root = 'data/my_segmentation/'         # the folder that holds all of the below
train_img_dir = 'images/training'           # relative to data_root
train_ann_dir = 'annotations/training'
val_img_dir = 'images/validation'
val_ann_dir = 'annotations/validation'
img_suffix = '.jpg'
seg_map_suffix = '.png'
# ==============================================================================

_base_ = ['./upernet_mlla_t.py']

# mmseg's ADE20K pipelines (512x512 crops from 0.5-2x of 2048x512), but label
# value k is class k (ADE20K's own files shift their labels by one).
crop_size = (512, 512)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
_dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=dict(classes=classes),
                reduce_zero_label=False, img_suffix=img_suffix, seg_map_suffix=seg_map_suffix)
train_dataloader = dict(
    dataset=dict(_delete_=True, **_dataset, data_prefix=dict(img_path=train_img_dir, seg_map_path=train_ann_dir),
                 pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(_delete_=True, **_dataset, data_prefix=dict(img_path=val_img_dir, seg_map_path=val_ann_dir),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
model = dict(decode_head=dict(num_classes=len(classes)), auxiliary_head=dict(num_classes=len(classes)))
