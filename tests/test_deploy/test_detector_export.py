"""The whole detector in one ONNX file: the export module against mmdet's predict, ONNX Runtime against PyTorch."""
import numpy as np
import onnx
import pytest
import torch

from mlla_mm.deploy.detector import NMSOp, RoIAlignOp, valid_rows
from mlla_mm.deploy.onnx_export import build_target, check_detector_onnx, export_bytes, make_session
from mlla_mm.errors import UsageError
from mlla_mm.models.roi_align import sparse_roi_align
from tests.helpers import spread_weights, write_tiny_detector


def detector_target(folder, kind='mask_rcnn', seed=0):
    target = build_target(str(write_tiny_detector(folder, kind)), log=lambda msg: None)
    spread_weights(target.model.detector, seed)
    return target


@pytest.fixture(scope='module')
def mask_rcnn(tmp_path_factory):
    target = detector_target(tmp_path_factory.mktemp('cfg'))
    return target, export_bytes(target, (64, 96), dynamic=True)


def images(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 64, 96, generator=gen), torch.randn(2, 3, 61, 83, generator=gen),
            torch.randn(1, 3, 96, 64, generator=gen)]


def mmdet_predict(detector, img):
    """mmdet's own test path (rescale to the same size: scale factor 1)."""
    from mmdet.structures import DetDataSample
    h, w = img.shape[2:]
    samples = [DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.),
                                           batch_input_shape=(h, w), pad_shape=(h, w))) for _ in range(len(img))]
    with torch.no_grad():
        return [s.pred_instances for s in detector.predict(img, samples, rescale=True)]


# --------------------------------------------------------------------------
# The ONNX ops.
# --------------------------------------------------------------------------
def run_one_op(fn, args, names):
    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    import io
    buf = io.BytesIO()
    torch.onnx.export(M(), tuple(args), buf, dynamo=False, input_names=names, opset_version=18,
                      dynamic_axes={n: {0: 'n'} for n in names[1:]})
    return make_session(buf.getvalue()).run(None, {n: a.numpy() for n, a in zip(names, args)})[0]


def test_roi_align_op_equals_mmcv_numbers_in_onnx_runtime():
    """ONNX RoiAlign (half_pixel, adaptive sampling) against mlla-mm's RoIAlign (mmcv's numbers): boxes inside,
    across the border, tiny, empty, large; two images."""
    feats = torch.randn(2, 3, 13, 17)
    boxes = torch.tensor([[1., 2., 30., 20.], [-5., -3., 10., 8.], [40., 30., 70., 52.], [3., 3., 3.2, 3.1],
                          [5., 5., 5., 5.], [0., 0., 68., 52.], [10.3, 7.7, 33.1, 41.9]])
    batch = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    got = run_one_op(lambda f, b, i: RoIAlignOp.apply(f, b, i, 7, 7, 0.25, 0, True), (feats, boxes, batch),
                     ['feats', 'boxes', 'batch'])
    ref = sparse_roi_align(feats, torch.cat([batch[:, None].float(), boxes], 1), (7, 7), 0.25, 0, True)
    assert np.abs(got - ref.numpy()).max() < 1e-5
    assert np.abs(ref.numpy()).max() > 0.1


def test_nms_op_equals_torchvision_in_onnx_runtime():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 60, 2, generator=gen) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(2, 60, 2, generator=gen) * 20], -1)
    scores = torch.rand(2, 1, 60, generator=gen)
    scores[0, 0, :5] = -1.  # below the threshold: never selected
    eager = NMSOp.apply(boxes, scores, 10, 0.5, -0.5)
    got = run_one_op(lambda b, s: NMSOp.apply(b, s, 10, 0.5, -0.5), (boxes, scores), ['boxes', 'scores'])
    assert np.array_equal(got, eager.numpy())
    assert (eager[:, 0] == 0).sum() == 10 and not ((eager[:, 0] == 0) & (eager[:, 2] < 5)).any()


# --------------------------------------------------------------------------
# The export module in PyTorch against mmdet's predict.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('kind', ['mask_rcnn', 'retinanet'])
def test_export_module_equals_mmdet_predict(tmp_path, kind):
    from mlla_mm.deploy.ort_model import paste_masks
    target = detector_target(tmp_path, kind)
    detector = target.model.detector
    total = 0
    for img in images():
        with torch.no_grad():
            outs = target.model(*target.example_inputs(img))
        for i, ref in enumerate(mmdet_predict(detector, img)):
            got = valid_rows(outs, i)
            total += len(ref.labels)
            assert got['labels'].tolist() == ref.labels.tolist()
            torch.testing.assert_close(got['scores'], ref.scores, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got['boxes'], ref.bboxes, rtol=1e-5, atol=1e-4)
            if kind == 'mask_rcnn':
                pasted = paste_masks(got['masks'], got['boxes'], *img.shape[2:], 0.5)
                assert torch.equal(pasted, ref.masks)
    assert total >= 10  # enough detections to compare


# --------------------------------------------------------------------------
# ONNX Runtime against PyTorch.
# --------------------------------------------------------------------------
def test_mask_rcnn_onnx_matches_torch_at_other_sizes_and_batch_2(mask_rcnn):
    target, data = mask_rcnn
    proto = onnx.load_from_string(data)
    assert [i.name for i in proto.graph.input] == ['img', 'img_shape']
    assert [o.name for o in proto.graph.output] == ['boxes', 'scores', 'labels', 'masks']
    ops = {n.op_type for n in proto.graph.node}
    assert {'NonMaxSuppression', 'RoiAlign'} <= ops
    modes = {a.s.decode() for n in proto.graph.node if n.op_type == 'RoiAlign' for a in n.attribute
             if a.name == 'coordinate_transformation_mode'}
    assert modes == {'half_pixel'}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta['mlla_mm_kind'] == 'detector' and meta['classes'] == '["circle", "triangle", "rectangle"]'
    rows = check_detector_onnx(data, target, [], images=images(1))
    bad = [r.line() for r in rows if not r.passed]
    assert not bad, '\n'.join(bad)
    assert len(rows) == 4 * 3  # boxes, scores, masks for each of 4 images
    assert sum(int(r.note.split()[0]) for r in rows if r.output.startswith('boxes')) >= 10


def test_mask_rcnn_onnx_boxes_are_clipped_to_img_shape(mask_rcnn):
    """``img_shape`` is the unpadded size: boxes stay inside it, as mmdet clips them."""
    target, data = mask_rcnn
    img = images(2)[0]
    sess = make_session(data)
    boxes, scores, labels, masks = sess.run(None, {'img': img.numpy(), 'img_shape': np.array([[40, 50]])})
    keep = labels[0] >= 0
    assert keep.sum() > 0
    assert boxes[0][keep][:, [0, 2]].max() <= 50 and boxes[0][keep][:, [1, 3]].max() <= 40
    padding = ~keep
    assert (scores[0][padding] == 0).all() and (masks[0][padding] == 0).all()


def test_retinanet_onnx_matches_torch(tmp_path):
    target = detector_target(tmp_path, 'retinanet')
    assert target.output_names == ['boxes', 'scores', 'labels']
    data = export_bytes(target, (64, 64), dynamic=True)
    rows = check_detector_onnx(data, target, [], images=images(3))
    bad = [r.line() for r in rows if not r.passed]
    assert not bad, '\n'.join(bad)
    assert sum(int(r.note.split()[0]) for r in rows if r.output.startswith('boxes')) >= 10


def test_a_changed_weight_fails_the_check(mask_rcnn):
    target, data = mask_rcnn
    with torch.no_grad():
        target.model.detector.roi_head.bbox_head.fc_cls.bias[0] += 2.
    try:
        rows = check_detector_onnx(data, target, [], images=images(1)[:1])
    finally:
        with torch.no_grad():
            target.model.detector.roi_head.bbox_head.fc_cls.bias[0] -= 2.
    assert not all(r.passed for r in rows)


def test_detector_needs_opset_16(tmp_path):
    target = build_target(str(write_tiny_detector(tmp_path)), log=lambda msg: None)
    with pytest.raises(UsageError, match='opset 16'):
        export_bytes(target, (64, 64), opset=15)


def test_features_flag_keeps_the_backbone_and_neck_export(tmp_path):
    target = build_target(str(write_tiny_detector(tmp_path)), log=lambda msg: None, features=True)
    assert target.kind == 'detector-features' and target.output_names == [f'fpn{i}' for i in range(5)]


def test_tied_scores_may_come_in_either_order_and_nothing_else_may():
    """PyTorch and ONNX Runtime may order two detections of equal score either way (seen with random weights): the
    check puts each tie in one order; a real difference, or a swap of detections whose scores differ, still fails."""
    from mlla_mm.deploy.onnx_export import ties_in_one_order
    ref = dict(boxes=np.array([[0, 0, 9, 9], [1, 2, 50, 20], [3, 1, 40, 30], [5, 5, 8, 8.]]),
               scores=np.array([0.9, 0.3087112, 0.3087112, 0.1]), labels=np.array([1, 0, 2, 0]),
               masks=np.arange(4.)[:, None, None] * np.ones((4, 2, 2)))
    swap = [0, 2, 1, 3]
    got = {k: v[swap] for k, v in ref.items()}
    r, o = ties_in_one_order(ref, got)
    assert all(np.array_equal(r[k], o[k]) for k in ref)
    assert np.array_equal(ref['labels'], [1, 0, 2, 0])  # the inputs are left as they were
    moved = dict(got, boxes=got['boxes'] + np.array([[0, 0, 0, 0], [0, 0, 1.5, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    r, o = ties_in_one_order(ref, moved)
    assert np.abs(r['boxes'] - o['boxes']).max() == 1.5  # a box that moved is still a difference
    untied = dict(ref, scores=np.array([0.9, 0.31, 0.30, 0.1]))
    r, o = ties_in_one_order(untied, {k: v[swap] for k, v in untied.items()})
    assert not np.array_equal(r['labels'], o['labels'])  # no tie: the order is the order
