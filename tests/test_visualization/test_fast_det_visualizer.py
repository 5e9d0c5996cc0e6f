"""FastDetVisualizer: what it draws where, what it leaves out, the registry, errors, and mmdet's fallback."""
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import VISUALIZERS, DefaultScope
from mmengine.structures import InstanceData, PixelData

from tests.helpers import ROOT

GREY = 100
PALETTE = [(220, 20, 60), (0, 160, 80), (30, 80, 220)]
CLASSES = ('circle', 'triangle', 'rectangle')


def make_visualizer(name, **kwargs):
    from mlla_mm.visualization import FastDetVisualizer
    vis = FastDetVisualizer(name=name, **kwargs)
    vis.dataset_meta = dict(classes=CLASSES, palette=PALETTE)
    return vis


def instances(squares, labels, scores=None, size=100):
    """Instances with square masks and boxes; ``squares`` are (x1, y1, x2, y2) in pixels."""
    data = InstanceData()
    masks = torch.zeros(len(squares), size, size, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(squares):
        masks[i, y1:y2, x1:x2] = True
    data.masks = masks
    data.bboxes = torch.tensor(squares, dtype=torch.float32).reshape(-1, 4)
    data.labels = torch.tensor(labels, dtype=torch.long)
    if scores is not None:
        data.scores = torch.tensor(scores, dtype=torch.float32)
    return data


def sample():
    from mmdet.structures import DetDataSample
    s = DetDataSample()
    s.gt_instances = instances([(10, 50, 40, 80)], [0])
    # one confident prediction (class 1), one below the threshold (class 2)
    s.pred_instances = instances([(60, 50, 90, 80), (60, 5, 90, 30)], [1, 2], scores=[0.9, 0.1])
    return s


def blended(colour, alpha=0.45):
    return np.round(np.float32(GREY) * (1 - alpha) + np.float32(colour) * alpha)


def grey_image(h=100, w=100):
    return np.full((h, w, 3), GREY, np.uint8)


def test_draws_ground_truth_left_and_confident_predictions_right(tmp_path):
    vis = make_visualizer('t-draw', min_size=200)  # the 100-pixel image enlarged twice
    out = tmp_path / 'sub' / 'pic.png'
    vis.add_datasample('pic', grey_image(), sample(), out_file=str(out), pred_score_thr=0.3)
    drawn = cv2.imread(str(out))[..., ::-1]
    assert drawn.shape == (200, 400, 3)
    left, right = drawn[:, :200], drawn[:, 200:]
    # ground-truth mask interior (x 20..79, y 100..159 once enlarged): blended towards class 0's colour
    np.testing.assert_array_equal(left[130, 50], blended(PALETTE[0]))
    # ...and not on the right panel, where no prediction covers it
    np.testing.assert_array_equal(right[130, 50], [GREY] * 3)
    # the confident prediction (x 120..179, y 100..159): class 1's colour, on the right only
    np.testing.assert_array_equal(right[130, 150], blended(PALETTE[1]))
    np.testing.assert_array_equal(left[130, 150], [GREY] * 3)
    # the prediction below pred_score_thr (x 120..179, y 10..59) is not drawn at all
    assert (right[10:60, 120:180] == GREY).all()
    # box outline in the class colour, and a filled label above the ground-truth box
    assert (right[98:104, 118:182] == PALETTE[1]).all(axis=-1).sum() > 50
    assert (left[80:100, 20:80] == PALETTE[0]).all(axis=-1).sum() > 100
    np.testing.assert_array_equal(vis.get_image(), drawn)


def test_threshold_zero_draws_the_weak_prediction(tmp_path):
    vis = make_visualizer('t-thr', min_size=200)
    out = tmp_path / 'pic.png'
    vis.add_datasample('pic', grey_image(), sample(), out_file=str(out), pred_score_thr=0.0)
    drawn = cv2.imread(str(out))[..., ::-1]
    np.testing.assert_array_equal(drawn[35, 200 + 150], blended(PALETTE[2]))


def test_no_enlargement_at_min_size(tmp_path):
    vis = make_visualizer('t-native', min_size=100)
    vis.add_datasample('pic', grey_image(), sample(), out_file=str(tmp_path / 'p.png'))
    drawn = cv2.imread(str(tmp_path / 'p.png'))[..., ::-1]
    assert drawn.shape == (100, 200, 3)
    np.testing.assert_array_equal(drawn[65, 100 + 75], blended(PALETTE[1]))


def test_draw_pred_only_and_backend_without_out_file(tmp_path):
    vis = make_visualizer('t-backend', min_size=100, vis_backends=[dict(type='LocalVisBackend')],
                          save_dir=str(tmp_path))
    vis.add_datasample('pic', grey_image(), sample(), draw_gt=False, step=3)
    files = list(tmp_path.rglob('*.png'))
    assert len(files) == 1 and files[0].name == 'pic_3.png'
    assert cv2.imread(str(files[0])).shape == (100, 100, 3)


def test_masks_of_another_size_and_classes_beyond_the_palette(tmp_path):
    from mmdet.structures import DetDataSample
    from mlla_mm.visualization import _colour
    vis = make_visualizer('t-size', min_size=0)
    s = DetDataSample()
    s.pred_instances = instances([(30, 20, 45, 28)], [7], scores=[0.8], size=60)  # 60x60 masks, class 7
    vis.add_datasample('pic', grey_image(30, 50), s, out_file=str(tmp_path / 'p.png'))
    drawn = cv2.imread(str(tmp_path / 'p.png'))[..., ::-1]
    assert drawn.shape == (30, 50, 3)  # no ground truth in the sample: the predictions' panel alone
    np.testing.assert_array_equal(drawn[24, 37], blended(_colour(7, PALETTE)))


def test_bad_image_and_bad_settings_are_clear_errors(tmp_path):
    vis = make_visualizer('t-bad')
    with pytest.raises(ValueError, match=r'HxWx3 RGB image, got shape \(100, 100\)'):
        vis.add_datasample('pic', np.zeros((100, 100), np.uint8), sample(), out_file=str(tmp_path / 'x.png'))
    assert not (tmp_path / 'x.png').exists()
    with pytest.raises(ValueError, match='alpha'):
        make_visualizer('t-bad-alpha', alpha=2)
    with pytest.raises(ValueError, match='min_size'):
        make_visualizer('t-bad-size', min_size=-1)
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(OSError, match='x.png'):
        vis.add_datasample('pic', grey_image(), sample(), out_file=str(blocker / 'x.png'))
    with pytest.raises(ValueError, match=r"cannot encode a picture as '\.xyz'"):
        vis.add_datasample('pic', grey_image(), sample(), out_file=str(tmp_path / 'pic.xyz'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file']  # nothing half-written, no temporary file


def test_masks_that_do_not_match_the_instances_are_an_error(tmp_path):
    from mmdet.structures import DetDataSample
    vis = make_visualizer('t-mismatch')
    s = DetDataSample()
    s.pred_instances = instances([(10, 10, 20, 20)], [0], scores=[0.9])
    s.pred_instances.masks = torch.zeros(1, 100, dtype=torch.bool)  # one row per instance, but 2-D
    with pytest.raises(ValueError, match=r'expected masks of shape \(1, H, W\) for 1 instances, got \(1, 100\)'):
        vis.add_datasample('pic', grey_image(), s, out_file=str(tmp_path / 'x.png'))
    assert not (tmp_path / 'x.png').exists()


def test_semantic_segmentation_is_drawn_here_and_panoptic_goes_to_mmdet(tmp_path):
    vis = make_visualizer('t-fallback', min_size=200)
    vis.add_datasample('first', grey_image(), sample(), out_file=str(tmp_path / 'first.png'))
    assert vis.get_image().shape == (200, 400, 3)
    s = sample()
    del s.gt_instances, s.pred_instances
    s.pred_sem_seg = PixelData(data=torch.zeros(1, 100, 100, dtype=torch.long))
    vis.add_datasample('seg', grey_image(), s, out_file=str(tmp_path / 'seg.png'), draw_gt=False)
    assert cv2.imread(str(tmp_path / 'seg.png')).shape == (200, 200, 3)  # drawn here: enlarged like the rest
    s = sample()
    s.pred_panoptic_seg = PixelData(sem_seg=torch.zeros(1, 100, 100, dtype=torch.long))
    out = tmp_path / 'pic.png'
    vis.add_datasample('pic', grey_image(), s, out_file=str(out))
    # mmdet draws at the image's own size (no enlargement): the fallback ran
    assert cv2.imread(str(out)).shape[:2] == (100, 200)
    assert vis.get_image().shape[:2] == (100, 200)  # mmdet's picture, not the previous one


def test_registry_finds_it_from_mmdets_scope_and_the_demo_uses_it():
    with DefaultScope.overwrite_default_scope('mmdet'):
        vis = VISUALIZERS.build(dict(type='mlla_mm.FastDetVisualizer', name='t-registry'))
    assert type(vis).__name__ == 'FastDetVisualizer'
    cfg = Config.fromfile(str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t_demo.py'))
    assert cfg.visualizer.type == 'mlla_mm.FastDetVisualizer'
    assert cfg.visualizer.vis_backends  # mmdet's base settings kept


def test_importing_mlla_mm_does_not_import_the_visualizer():
    code = 'import sys, mlla_mm; print("mlla_mm.visualization" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'False'
