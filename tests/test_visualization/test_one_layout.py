"""One layout and one look for every tool that draws (issue 30, item 6).

Every picture is ``<image stem>.png`` at the image's own size (ground truth | predictions side by side
where there is ground truth), scores are fractions (``0.49``), boxes past the edge are clipped without
warnings, and labels are filled boxes inside the picture that do not cover each other.
"""
import warnings
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.structures import InstanceData, PixelData

from tests.helpers import ROOT, load_tool

CLASSES = ('circle', 'triangle', 'rectangle')
PALETTE = [(220, 20, 60), (0, 160, 80), (30, 80, 220)]
META = dict(classes=CLASSES, palette=PALETTE)


def det_sample(boxes, labels, scores, h=100, w=120, gt=False):
    from mmdet.structures import DetDataSample
    s = DetDataSample()
    pred = InstanceData()
    pred.bboxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    pred.labels = torch.tensor(labels)
    pred.scores = torch.tensor(scores, dtype=torch.float32)
    pred.masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    s.pred_instances = pred
    if gt:
        g = InstanceData()
        g.bboxes = torch.tensor([[10, 10, 40, 40]], dtype=torch.float32)
        g.labels = torch.tensor([0])
        s.gt_instances = g
    return s


def seg_sample(h=90, w=70):
    from mmseg.structures import SegDataSample
    s = SegDataSample()
    seg = torch.zeros(1, h, w, dtype=torch.long)
    seg[:, h // 2:, :] = 2
    s.pred_sem_seg = PixelData(data=seg)
    s.gt_sem_seg = PixelData(data=torch.zeros(1, h, w, dtype=torch.long))
    return s


def record_labels(monkeypatch):
    """The (text, box) of every label drawn."""
    from mlla_mm import visualization
    drawn = []
    original = visualization.LabelPlacer.draw

    def draw(self, text, x, y, colour):
        rect = original(self, text, x, y, colour)
        drawn.append((text, rect, self.width, self.height))
        return rect
    monkeypatch.setattr(visualization.LabelPlacer, 'draw', draw)
    return drawn


def test_infer_draws_at_the_images_size_with_fraction_scores_and_no_warnings(monkeypatch):
    labels = record_labels(monkeypatch)
    vis = load_tool('infer').make_visualizer('mmdet', dict(META))
    image = np.full((100, 120, 3), 90, np.uint8)
    # a box far past every edge, and one with a score that mmdet printed as "49.2"
    sample = det_sample([[-30, -20, 300, 250], [20, 30, 60, 70]], [1, 2], [0.9, 0.492])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # mmengine's "bbox is out of bounds" would raise here
        vis.add_datasample('prediction', image, data_sample=sample, draw_gt=False, pred_score_thr=0.3)
    drawn = vis.get_image()
    assert drawn.shape == (100, 120, 3)
    assert sorted(t for t, *_ in labels) == ['rectangle 0.49', 'triangle 0.90']
    # the clipped box is drawn along the picture's border in the class colour
    assert (drawn[0, 5:115] == PALETTE[1]).all(axis=-1).mean() > 0.5 or \
        (drawn[99, 5:115] == PALETTE[1]).all(axis=-1).mean() > 0.5


def test_infer_draws_segmentation_with_the_same_look(monkeypatch):
    labels = record_labels(monkeypatch)
    vis = load_tool('infer').make_visualizer('mmseg', dict(META))
    image = np.full((90, 70, 3), 90, np.uint8)
    vis.add_datasample('prediction', image, data_sample=seg_sample(), draw_gt=False)
    drawn = vis.get_image()
    assert drawn.shape == (90, 70, 3)
    assert sorted(t for t, *_ in labels) == ['circle', 'rectangle']  # each class named once
    blend = np.round(np.float32(90) * 0.5 + np.float32(PALETTE[2]) * 0.5)
    np.testing.assert_array_equal(drawn[88, 2], blend)


def test_overlapping_labels_are_nudged_apart_and_stay_inside(monkeypatch):
    from mlla_mm.visualization import draw_sample
    labels = record_labels(monkeypatch)
    boxes = [[2, 1, 60, 50]] * 3 + [[110, 95, 119, 99]]  # three on one spot, one in the bottom-right corner
    out = draw_sample(np.zeros((100, 120, 3), np.uint8), det_sample(boxes, [0, 1, 2, 0], [0.9, 0.8, 0.7, 0.6]),
                      META, draw_gt=False)
    assert out.shape == (100, 120, 3) and len(labels) == 4
    rects = [r for _, r, *_ in labels]
    for i, (x1, y1, x2, y2) in enumerate(rects):
        assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 100, rects[i]
        for j in range(i):
            a = rects[j]
            assert not (x1 < a[2] and a[0] < x2 and y1 < a[3] and a[1] < y2), (rects[i], a)
    # a label is a filled box: its corner pixel has the class colour
    text, (x1, y1, _, _), *_ = labels[0]
    assert tuple(out[y1, x1]) == PALETTE[0], text


def test_show_dir_hook_writes_stem_png_at_the_images_size(tmp_path):
    from mlla_mm.visualization import ShowDirHook
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    paths = [tmp_path / 'a' / 'val_1.jpg', tmp_path / 'b' / 'val_1.png', tmp_path / 'a' / 'x.y.png']
    for p in paths:
        cv2.imwrite(str(p), np.full((100, 120, 3), 90, np.uint8))
    out = tmp_path / 'show'
    hook = ShowDirHook(out_dir=str(out), score_thr=0.3)
    runner = SimpleNamespace(test_dataloader=SimpleNamespace(dataset=SimpleNamespace(metainfo=dict(META))))
    hook.before_test(runner)
    samples = []
    for p in paths:
        s = det_sample([[5, 5, 50, 50]], [0], [0.9], gt=True)
        s.set_metainfo(dict(img_path=str(p)))
        samples.append(s)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        hook.after_test_iter(runner, 0, None, samples[:2])
        hook.after_test_iter(runner, 1, None, samples[2:])
    assert sorted(p.name for p in out.iterdir()) == ['val_1.png', 'val_1_2.png', 'x.y.png']
    for p in out.iterdir():
        assert cv2.imread(str(p)).shape == (100, 240, 3)  # ground truth | predictions, each the image's size


def test_show_dir_hook_draws_segmentation_beside_its_ground_truth(tmp_path):
    from mlla_mm.visualization import ShowDirHook
    img = tmp_path / 'scene.jpg'
    cv2.imwrite(str(img), np.full((90, 70, 3), 90, np.uint8))
    hook = ShowDirHook(out_dir=str(tmp_path / 'show'))
    runner = SimpleNamespace(test_dataloader=SimpleNamespace(dataset=SimpleNamespace(metainfo=dict(META))))
    hook.before_test(runner)
    s = seg_sample()
    s.set_metainfo(dict(img_path=str(img)))
    hook.after_test_iter(runner, 0, None, [s])
    assert [p.name for p in (tmp_path / 'show').iterdir()] == ['scene.png']
    assert cv2.imread(str(tmp_path / 'show' / 'scene.png')).shape == (90, 140, 3)


@pytest.mark.parametrize('config', ['configs/detection/mask_rcnn_mlla_t_demo.py',
                                    'configs/segmentation/upernet_mlla_t_demo.py'])
def test_test_py_show_dir_uses_the_one_hook_for_both_tasks(config, tmp_path):
    cfg = Config.fromfile(str(ROOT / config))
    load_tool('test').enable_visualization(cfg, str(tmp_path / 'pics'))
    hooks = [h for h in cfg.custom_hooks if h['type'] == 'ShowDirHook']
    assert len(hooks) == 1 and hooks[0]['out_dir'] == str(tmp_path / 'pics')
    assert cfg.default_hooks.visualization.draw is False  # nothing drawn twice, nothing under vis_data/
    assert 'test_out_dir' not in cfg.default_hooks.visualization
    assert cfg.visualizer.get('save_dir') != str(tmp_path / 'pics')


def test_format_score_is_a_fraction():
    from mlla_mm.visualization import format_score
    assert format_score(0.492) == '0.49' and format_score(1) == '1.00'
