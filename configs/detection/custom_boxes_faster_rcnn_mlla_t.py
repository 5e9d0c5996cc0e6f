# TEMPLATE: Faster R-CNN MLLA-T on YOUR object-detection data set (boxes only)
# in COCO format. Edit the block below (class names and paths) and nothing
# else; docs/custom_data.md walks through it.
#
#   python tools/train.py configs/detection/custom_boxes_faster_rcnn_mlla_t.py
#   python tools/train.py configs/detection/custom_boxes_faster_rcnn_mlla_t.py --epochs 24
#
# --epochs N changes the length of the run and scales the schedule to it (steps
# at 2/3 and 11/12 of the run, the warm-up at most a tenth of it); see
# docs/custom_data.md, "Schedules".
#
# There is no published MLLA Faster R-CNN recipe. This config inherits mmdet's
# own Faster R-CNN R-50 FPN 1x config (1333x800 training with flip, 12 epochs,
# lr x0.1 at 8 and 11) and changes what the backbone needs, as our Mask R-CNN
# configs do: MLLA-T with drop_path 0.1, FPN in_channels, AdamW lr 1e-4,
# weight decay 0.05 with none on norm layers (MLLA's published Mask R-CNN
# optimizer; our choice for Faster R-CNN).

# ==== EDIT HERE: your data ====================================================
# Category names, spelled exactly as the "name"s of the "categories" in your
# annotation files and in their order there (a list, also for one class: ['cat']).
classes = ['circle', 'triangle', 'rectangle']
data_root = 'data/my_boxes/'                # the folder that holds all of the below
train_ann_file = 'annotations/train.json'   # COCO-format JSON (bbox only is fine), relative to data_root
train_img_dir = 'images/train/'             # its images[].file_name are relative to this
val_ann_file = 'annotations/val.json'
val_img_dir = 'images/val/'
# ==============================================================================

_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    '../_base_/mlla_runtime.py',
]

# Published ImageNet weights (MLLA_T.pth). Missing file: a warning and random init.
pretrained = 'data/pretrained/MLLA_T.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='MLLA',
        arch='tiny',
        drop_path_rate=0.1,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, if_missing='warn')),
    neck=dict(in_channels=[64, 128, 256, 512]),
    # mmdet's RoIAlign settings; on the CPU mlla-mm's multi-threaded RoIAlign (same numbers), on a GPU mmcv's.
    roi_head=dict(bbox_roi_extractor=dict(type='SparseRoIExtractor'), bbox_head=dict(num_classes=len(classes))))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.))

metainfo = dict(classes=classes)
train_dataloader = dict(
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file=train_ann_file,
                 data_prefix=dict(img=train_img_dir)))
val_dataloader = dict(
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file=val_ann_file,
                 data_prefix=dict(img=val_img_dir)))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + val_ann_file)  # box AP
test_evaluator = val_evaluator
