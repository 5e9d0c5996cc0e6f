# Cascade Mask R-CNN + FPN with MLLA-S on COCO, 3x schedule. No published MLLA
# recipe: the MLLA-T config (mmdet's ConvNeXt cascade recipe, see there) with the
# small backbone. OUR CHOICES: drop_path 0.3 (MLLA's published Mask R-CNN 3x
# value for MLLA-S); layer-wise decay 0.9 over MLLA-S's 38 layer ids (stem
# scale 0.9^37 = 0.02, ConvNeXt-S's mmdet config has 0.7^13 = 0.01).
_base_ = ['./cascade_mask_rcnn_mlla_t_3x.py']

pretrained = 'data/pretrained/MLLA_S.pth'
model = dict(backbone=dict(arch='small', init_cfg=dict(checkpoint=pretrained)))
