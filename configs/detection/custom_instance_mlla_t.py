# TEMPLATE: Mask R-CNN MLLA-T (the published recipe, see mask_rcnn_mlla_t.py)
# on YOUR instance-segmentation data set in COCO format. Edit the block below
# (class names and paths) and nothing else; docs/custom_data.md walks through it.
#
#   python tools/train.py configs/detection/custom_instance_mlla_t.py
#   python tools/train.py configs/detection/custom_instance_mlla_t.py --epochs 24   # schedule scaled to 24 epochs
#   python tools/test.py configs/detection/custom_instance_mlla_t.py \
#       work_dirs/custom_instance_mlla_t/epoch_12.pth
#   python tools/infer.py configs/detection/custom_instance_mlla_t.py \
#       work_dirs/custom_instance_mlla_t/epoch_12.pth my_images/ --out predictions/

# ==== EDIT HERE: your data ====================================================
# Category names, spelled exactly as the "name"s of the "categories" in your
# annotation files and in their order there (a list, also for one class: ['cat']).
classes = ['circle', 'triangle', 'rectangle']
data_root = 'data/my_instances/'            # the folder that holds all of the below
train_ann_file = 'annotations/train.json'   # COCO-format JSON, relative to data_root
train_img_dir = 'images/train/'             # its images[].file_name are relative to this
val_ann_file = 'annotations/val.json'
val_img_dir = 'images/val/'
# ==============================================================================

_base_ = ['./mask_rcnn_mlla_t.py']

metainfo = dict(classes=classes)
train_dataloader = dict(
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file=train_ann_file,
                 data_prefix=dict(img=train_img_dir)))
val_dataloader = dict(
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file=val_ann_file,
                 data_prefix=dict(img=val_img_dir)))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + val_ann_file)  # box and mask AP
test_evaluator = val_evaluator
model = dict(
    roi_head=dict(bbox_head=dict(num_classes=len(classes)), mask_head=dict(num_classes=len(classes))))
