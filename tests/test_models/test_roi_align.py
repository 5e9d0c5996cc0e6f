"""SparseRoIAlign against mmcv's RoIAlign (outputs and feature gradients), and SparseRoIExtractor in mmdet."""
import pytest
import torch

from mlla_mm.models import SparseRoIAlign, sparse_roi_align

ops = pytest.importorskip('mmcv.ops')


def random_rois(n, batch, image, seed, min_size=0.1, outside=0.05):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * image * (1 + 2 * outside) - image * outside
    wh = torch.rand(n, 2, generator=g) * image * 0.4 + min_size
    return torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(), xy, xy + wh], 1)


CASES = [  # (B, C, H, W, stride, rois, output, sampling_ratio, aligned)
    (2, 8, 32, 40, 4, 60, 7, 0, True),
    (1, 5, 17, 9, 8, 30, (7, 5), 0, True),
    (2, 4, 16, 16, 4, 25, 14, 2, True),
    (2, 6, 13, 11, 4, 40, 7, 0, False),
    (1, 3, 1, 6, 4, 12, 7, 0, True),  # a one-pixel-high map
    (3, 4, 7, 7, 32, 20, 3, 3, False),
]


@pytest.mark.parametrize('case', CASES)
def test_matches_mmcv_outputs_and_gradients(case):
    b, c, h, w, stride, n, out, sr, aligned = case
    torch.manual_seed(0)
    feat = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    rois = random_rois(n, b, max(h, w) * stride, seed=n).double()
    rois[0, 1:] = torch.tensor([-900., -900., -600., -750.])  # more than a pixel outside: zeros
    rois[1, 3:] = rois[1, 1:3]  # a degenerate box
    mine, theirs = SparseRoIAlign(out, 1 / stride, sr, aligned=aligned), ops.RoIAlign(out, 1 / stride, sr,
                                                                                        aligned=aligned)
    want = theirs(feat.float(), rois.float()).double()
    got = mine(feat, rois)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    grad_out = torch.randn_like(want)
    (g_mine, ) = torch.autograd.grad((got * grad_out).sum(), feat)
    f32 = feat.detach().float().requires_grad_()
    (g_theirs, ) = torch.autograd.grad((theirs(f32, rois.float()) * grad_out.float()).sum(), f32)
    torch.testing.assert_close(g_mine.float(), g_theirs, atol=2e-5, rtol=1e-4)
    assert got[0].abs().max() == 0


def test_a_changed_feature_pixel_changes_only_the_bins_that_sample_it():
    feat = torch.zeros(1, 1, 20, 20)
    rois = torch.tensor([[0., 0., 0., 40., 40.], [0., 40., 40., 80., 80.]])  # top-left and bottom-right quarters
    feat[0, 0, 3, 3] = 1.0  # inside the first box only (stride 4)
    out = sparse_roi_align(feat, rois, (7, 7), 0.25)
    assert out[0].abs().sum() > 0 and out[1].abs().sum() == 0
    torch.testing.assert_close(out, ops.RoIAlign(7, 0.25, 0)(feat, rois))


def test_bf16_features_and_empty_rois():
    feat = torch.randn(2, 4, 12, 12)
    rois = random_rois(10, 2, 48, seed=3)
    got = sparse_roi_align(feat.bfloat16(), rois, (7, 7), 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ops.RoIAlign(7, 0.25, 0)(feat.bfloat16().float(), rois),
                               atol=2e-2, rtol=2e-2)
    assert sparse_roi_align(feat, rois[:0], (7, 7), 0.25).shape == (0, 4, 7, 7)


@pytest.mark.parametrize('kwargs, match', [
    (dict(output_size=7, pool_mode='max'), 'pool_mode'),
    (dict(output_size=0), 'output_size'),
    (dict(output_size=(7, 7, 7)), 'output_size'),
    (dict(output_size=7, sampling_ratio=-1), 'sampling_ratio'),
    (dict(output_size=7, spatial_scale=0.), 'spatial_scale'),
    (dict(output_size=7, use_torchvision=True), 'use_torchvision'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseRoIAlign(**kwargs)
    with pytest.raises(ValueError, match='rois'):
        sparse_roi_align(torch.zeros(1, 2, 4, 4), torch.zeros(3, 4), (7, 7), 1.)


def test_extractor_in_mmdet_matches_single_roi_extractor():
    pytest.importorskip('mmdet')
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    import mlla_mm  # noqa: F401
    init_default_scope('mmdet')
    cfg = dict(roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0), out_channels=8,
               featmap_strides=[4, 8, 16, 32])
    theirs = MODELS.build(dict(type='SingleRoIExtractor', **cfg))
    mine = MODELS.build(dict(type='SparseRoIExtractor', **cfg))
    assert type(mine) is type(theirs) and all(isinstance(m, SparseRoIAlign) for m in mine.roi_layers)
    torch.manual_seed(0)
    feats = tuple(torch.randn(2, 8, 256 // s, 256 // s, requires_grad=True) for s in (4, 8, 16, 32))
    rois = random_rois(200, 2, 256, seed=1, min_size=4)
    want, got = theirs(feats, rois), mine(feats, rois)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    g_want = torch.autograd.grad(want.square().sum(), feats)
    g_got = torch.autograd.grad(got.square().sum(), feats)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="'RoIAlign'"):
        MODELS.build(dict(type='SparseRoIExtractor', **dict(cfg, roi_layer=dict(type='RoIPool', output_size=7))))


def test_cuda_features_go_to_mmcvs_kernel(monkeypatch):
    """On a GPU mmcv's kernel runs (checked here by pretending the CPU tensors are on one)."""
    import mlla_mm.models.roi_align as module
    calls = []
    real = ops.roi_align
    assert module.use_mmcv_kernel(torch.zeros(1)) is False  # CPU tensors: the sparse product
    monkeypatch.setattr(ops, 'roi_align', lambda *a: calls.append(a[2:]) or real(*a))
    monkeypatch.setattr(module, 'use_mmcv_kernel', lambda features: True)
    feat, rois = torch.randn(1, 2, 9, 9), random_rois(5, 1, 36, seed=2)
    out = SparseRoIAlign((7, 7), 0.25, 0)(feat, rois)
    assert calls == [((7, 7), 0.25, 0, 'avg', True)]
    torch.testing.assert_close(out, sparse_roi_align(feat, rois, (7, 7), 0.25))


def test_chunks_of_rois_give_the_same_numbers(monkeypatch):
    """A long thin box among small ones, with a tiny entry budget: many chunks, mmcv's numbers, input order kept."""
    import mlla_mm.models.roi_align as module
    torch.manual_seed(1)
    feat = torch.randn(2, 4, 40, 60, requires_grad=True)
    rois = random_rois(30, 2, 160, seed=5, min_size=2)
    rois[7] = torch.tensor([1., 0., 50., 230., 54.])  # 230 x 4 pixels: 8 points per bin across, 1 down
    want = ops.RoIAlign(7, 0.25, 0)(feat, rois)
    whole = sparse_roi_align(feat, rois, (7, 7), 0.25)
    monkeypatch.setattr(module, 'MAX_ENTRIES', 2000)  # fewer than one RoI's entries: one RoI per chunk
    chunked = sparse_roi_align(feat, rois, (7, 7), 0.25)
    torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, want, atol=1e-5, rtol=1e-4)
    (g, ) = torch.autograd.grad(chunked.sum(), feat)
    (g_want, ) = torch.autograd.grad(want.sum(), feat)
    torch.testing.assert_close(g, g_want, atol=1e-5, rtol=1e-4)


def test_bad_batch_indices_and_absurd_boxes_are_refused_nan_boxes_give_zeros():
    feat = torch.randn(2, 3, 8, 8)
    rois = random_rois(4, 2, 32, seed=0)
    for bad in (2., -1., 0.5):
        wrong = rois.clone()
        wrong[1, 0] = bad
        with pytest.raises(ValueError, match='batch indices'):
            sparse_roi_align(feat, wrong, (7, 7), 0.25)
    huge = rois.clone()
    huge[2, 3] = 1e12
    with pytest.raises(ValueError, match='2\\^20'):
        sparse_roi_align(feat, huge, (7, 7), 0.25)
    nan = rois.clone()
    nan[3, 1:] = float('nan')
    out = sparse_roi_align(feat, nan, (7, 7), 0.25)
    assert torch.isfinite(out).all() and out[3].abs().max() == 0
    torch.testing.assert_close(out[:3], sparse_roi_align(feat, rois[:3], (7, 7), 0.25))
