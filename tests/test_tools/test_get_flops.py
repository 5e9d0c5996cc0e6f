"""FLOPs of the RoI extractor counted by its real work (issue 30, item 2): bins x sampling points x 4 bilinear taps x
channels, as mmcv's RoIAlign does that work, not SparseRoIAlign's sparse product as a dense one."""
import math

import pytest
import torch

from tests.helpers import ROOT, TINY_ARCH, load_tool


def _rois(n, size_hw, scale, generator):
    """``n`` boxes (batch index, x1, y1, x2, y2) in image pixels, at least a feature pixel inside the map."""
    h, w = size_hw
    out = []
    for i in range(n):
        x1, y1 = (torch.rand(2, generator=generator) * torch.tensor([w / 2, h / 2]) + 1.5).tolist()
        bw, bh = (torch.rand(2, generator=generator) * torch.tensor([w / 2 - 3, h / 2 - 3]) + 0.3).tolist()
        out.append([i % 2, x1 / scale, y1 / scale, (x1 + bw) / scale, (y1 + bh) / scale])
    return torch.tensor(out)


def roi_align_macs(rois, channels, bins, scale, sampling_ratio=0):
    """The work of mmcv's RoIAlign (aligned, average): per RoI, bins x points per bin x 4 taps x channels."""
    total = 0
    for _, x1, y1, x2, y2 in rois.tolist():
        roi_w, roi_h = (x2 - x1) * scale, (y2 - y1) * scale
        n_h = sampling_ratio or math.ceil(roi_h / bins)
        n_w = sampling_ratio or math.ceil(roi_w / bins)
        total += bins * bins * n_h * n_w * 4 * channels
    return total


@pytest.mark.parametrize('sampling_ratio', [0, 2])
def test_sparse_roi_align_counts_bins_times_points_times_channels(sampling_ratio):
    from mlla_mm.models.roi_align import SparseRoIAlign
    from mlla_mm.utils.flops import count_flops
    g = torch.Generator().manual_seed(0)
    scale, c = 0.25, 16
    feats = torch.randn(2, c, 40, 56, generator=g)
    rois = _rois(30, (40, 56), scale, g)
    layer = SparseRoIAlign(7, spatial_scale=scale, sampling_ratio=sampling_ratio)
    report = count_flops(lambda: layer(feats, rois), depth=1)
    expected = roi_align_macs(rois, c, 7, scale, sampling_ratio)
    assert report.macs == expected
    dense = rois.shape[0] * 49 * 2 * 40 * 56 * c  # what a dense count of the product would give
    assert report.macs < dense / 20


def test_a_dense_matmul_is_still_counted_in_full():
    from mlla_mm.utils.flops import count_flops
    a, b, bias = torch.randn(5, 7), torch.randn(7, 3), torch.randn(3)
    assert count_flops(lambda: a @ b).macs == 5 * 7 * 3
    assert count_flops(lambda: torch.addmm(bias, a, b)).macs == 5 * 7 * 3


def test_the_roi_extractor_of_a_detector_is_counted_like_mmcv_roi_align():
    """The same small Mask R-CNN with SparseRoIExtractor and with mmdet's own RoIAlign: the counts differ by the
    RoIAlign work alone (which torch's counter does not see in mmcv's kernel)."""
    get_flops = load_tool('get_flops')
    from mmengine.registry import MODELS, init_default_scope

    from mlla_mm.cli import load_config
    from mlla_mm.utils.flops import count_flops
    init_default_scope('mmdet')
    cfg = load_config(str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py'))
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.arch = dict(TINY_ARCH)
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    counts = {}
    for kind in ('SparseRoIExtractor', 'SingleRoIExtractor'):
        model_cfg = cfg.model.copy()
        model_cfg.roi_head.bbox_roi_extractor.type = kind
        model_cfg.roi_head.mask_roi_extractor.type = kind
        torch.manual_seed(0)
        model = MODELS.build(model_cfg).eval()
        run = get_flops.whole_model_call(model, 'mmdet', 128, 160)
        counts[kind] = count_flops(run, depth=3)
    sparse, mmcv = counts['SparseRoIExtractor'], counts['SingleRoIExtractor']
    extra = sparse.macs - mmcv.macs
    assert extra > 0
    roi = sum(v for k, v in sparse.by_module.items() if k.endswith('roi_layers.0') or 'roi_layers' in k) // 2
    assert roi > 0
    assert extra <= roi * 2  # at most the RoIAlign work of both extractors, not a dense product
    assert sparse.macs < mmcv.macs * 1.05


@pytest.mark.slow
def test_get_flops_on_mask_rcnn_mlla_t_is_within_2_percent_of_the_published_255g(capsys):
    get_flops = load_tool('get_flops')
    assert get_flops.main([str(ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py')]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if 'published: 255G' in ln)
    ratio = float(line.rpartition('ratio ')[2])
    assert abs(ratio - 1) <= 0.02, out
