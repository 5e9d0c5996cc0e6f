"""The numpy-only mask pasting of mlla_mm/deploy/postprocess.py against mmdet's own pasting."""
import numpy as np
import torch

from mlla_mm.deploy.ort_model import paste_masks
from mlla_mm.deploy.postprocess import detections, paste_mask


def test_paste_mask_equals_mmdet():
    rng = np.random.default_rng(0)
    boxes = np.array([[3.2, 4.7, 40.1, 30.9], [-5., 10., 20., 61.5], [50., 2., 79.9, 20.], [10., 10., 11.5, 12.],
                      [0., 0., 80., 64.]], np.float32)
    probs = rng.random((len(boxes), 28, 28)).astype(np.float32)
    ref = paste_masks(torch.from_numpy(probs), torch.from_numpy(boxes), 64, 80, 0.5).numpy()
    got = np.stack([paste_mask(p, b, 64, 80, 0.5) for p, b in zip(probs, boxes)])
    assert got.shape == ref.shape and got.sum() > 1000
    assert (got != ref).mean() < 1e-3  # a value exactly at the threshold may round the other way
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
    soft, _ = _do_paste_mask(torch.from_numpy(probs)[:, None], torch.from_numpy(boxes), 64, 80, skip_empty=False)
    full = np.stack([paste_mask(p, b, 64, 80, None) for p, b in zip(probs, boxes)])
    assert np.abs(full - soft.numpy()).max() < 1e-5


def test_detections_drops_padding_and_rescales():
    boxes = np.array([[[10., 20., 30., 40.], [0., 0., 0., 0.]]], np.float32)
    outs = [boxes, np.array([[0.9, 0.]], np.float32), np.array([[2, -1]]), np.ones((1, 2, 28, 28), np.float32)]
    det = detections(outs, 0, scale_factor=(2., 4.), ori_shape=(20, 30))
    assert det['labels'].tolist() == [2] and det['scores'].tolist() == [np.float32(0.9)]
    assert det['boxes'].tolist() == [[5., 5., 15., 10.]]
    mask = det['masks'][0]
    assert mask.shape == (20, 30) and mask[5:10, 5:15].all() and mask.sum() == 50
