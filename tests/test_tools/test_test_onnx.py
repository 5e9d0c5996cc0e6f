"""tools/test.py CONFIG F.onnx: the exported whole detector evaluated like the PyTorch model; wrong files refused."""
import re

import pytest
import torch

from tests.helpers import load_tool, run_main, run_tool, spread_weights, write_tiny_config

test_tool = load_tool('test')
export_tool = load_tool('export_onnx')
SEGM = "\ntest_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json', metric=['bbox', 'segm'])\n"


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tiny_data):
    """The tiny detection config, a checkpoint with well-spread random weights and its whole-detector export."""
    from mlla_mm.deploy.onnx_export import build_target
    folder = tmp_path_factory.mktemp('onnx')
    cfg = write_tiny_config(folder, tiny_data, extra=SEGM)
    detector = spread_weights(build_target(str(cfg), log=lambda m: None).model.detector, seed=1)
    ckpt = folder / 'det.pth'
    torch.save({'state_dict': detector.state_dict(), 'meta': {}}, ckpt)
    out = folder / 'det.onnx'
    assert export_tool.main([str(cfg), str(ckpt), '--out', str(out), '--shape', '64', '64', '--dynamic']) == 0
    return cfg, ckpt, out, detector


def test_onnx_model_predicts_what_pytorch_predicts(exported):
    """OnnxRuntimeModel (preprocessor + ONNX Runtime + rescale + mask pasting) gives mmdet's own predictions."""
    from mmengine.config import Config
    from mmengine.registry import DATASETS, MODELS, init_default_scope

    from mlla_mm.deploy.ort_model import check_onnx_for_config, onnx_model_config
    cfg_path, _, onnx_path, detector = exported
    cfg = Config.fromfile(str(cfg_path))
    init_default_scope('mmdet')
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    model = MODELS.build(onnx_model_config(cfg, str(onnx_path), check_onnx_for_config(str(onnx_path), cfg)))
    batch = dict(inputs=[dataset[i]['inputs'] for i in range(len(dataset))],
                 data_samples=[dataset[i]['data_samples'] for i in range(len(dataset))])
    with torch.no_grad():
        ref = detector.eval().test_step(batch)
    batch = dict(inputs=[dataset[i]['inputs'] for i in range(len(dataset))],
                 data_samples=[dataset[i]['data_samples'] for i in range(len(dataset))])
    got = model.test_step(batch)
    count = 0
    for r, g in zip(ref, got):
        r, g = r.pred_instances, g.pred_instances
        count += len(r)
        assert g.labels.tolist() == r.labels.tolist()
        torch.testing.assert_close(g.scores, r.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g.bboxes, r.bboxes, rtol=1e-4, atol=1e-3)
        assert g.masks.shape == r.masks.shape and g.masks.dtype == torch.bool
        assert (g.masks != r.masks).float().mean() < 1e-3  # a pixel exactly at the threshold may flip
    assert count >= 5


def metrics(text):
    line = [ln for ln in text.splitlines() if ln.startswith('metrics: ')]
    assert line, text[-3000:]
    return dict(re.findall(r'(\S+)=(\S+?)(?:,|$)', line[-1][len('metrics: '):]))


@pytest.mark.slow
def test_tool_reports_the_same_metrics_as_pytorch(exported, tmp_path):
    cfg, ckpt, onnx_path, _ = exported
    res = run_tool('tools/test.py', cfg, onnx_path, '--work-dir', tmp_path / 'onnx', timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = metrics(res.stdout)
    res = run_tool('tools/test.py', cfg, ckpt, '--work-dir', tmp_path / 'torch', timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ref = metrics(res.stdout)
    assert 'coco/bbox_mAP' in got and 'coco/segm_mAP' in got
    assert got == ref


def run_in_process(capsys, *args):
    return run_main(capsys, test_tool.main, *args)


def test_onnx_of_another_config_is_refused(exported, tmp_path, capsys, tiny_data):
    cfg, _, onnx_path, _ = exported
    other = write_tiny_config(tmp_path, tiny_data,
                              extra=SEGM + 'model = dict(test_cfg=dict(rcnn=dict(score_thr=0.3)))\n')
    code, lines = run_in_process(capsys, other, onnx_path, '--work-dir', tmp_path / 'w')
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), lines
    assert 'another model config' in lines[0] and str(onnx_path) in lines[0]
    assert not (tmp_path / 'w').exists()


def test_a_file_that_is_not_onnx_is_refused(exported, tmp_path, capsys):
    cfg = exported[0]
    bad = tmp_path / 'bad.onnx'
    bad.write_bytes(b'\x00garbage, not a protobuf \xff' * 10)
    code, lines = run_in_process(capsys, cfg, bad, '--work-dir', tmp_path / 'w')
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and 'not an ONNX' in lines[0], lines
    code, lines = run_in_process(capsys, cfg, tmp_path / 'absent.onnx', '--work-dir', tmp_path / 'w')
    assert code == 2 and len(lines) == 1 and 'not found' in lines[0], lines


def test_a_features_export_is_refused(exported, tmp_path, capsys):
    cfg = exported[0]
    feats = tmp_path / 'feats.onnx'
    assert export_tool.main([str(cfg), '--features', '--out', str(feats), '--shape', '32', '32']) == 0
    capsys.readouterr()
    code, lines = run_in_process(capsys, cfg, feats, '--work-dir', tmp_path / 'w')
    assert code == 2 and len(lines) == 1 and 'a detector-features export' in lines[0], lines


@pytest.mark.slow
def test_onnx_segmentor_predicts_what_pytorch_predicts(tmp_path):
    """An UperNet export through OnnxRuntimeModel: mmseg's preprocessing, padding crop, resize and argmax."""
    from mmengine.config import Config
    from mmengine.registry import DATASETS, MODELS, init_default_scope

    from mlla_mm.datasets import make_ade_shapes
    from mlla_mm.deploy.onnx_export import build_target
    from mlla_mm.deploy.ort_model import check_onnx_for_config, onnx_model_config
    from tests.helpers import write_tiny_seg_run
    root = tmp_path / 'ade'
    make_ade_shapes(str(root), seed=0, num_train=2, num_val=2, size=64)
    cfg_path = write_tiny_seg_run(tmp_path, root)
    segmentor = spread_weights(build_target(str(cfg_path), log=lambda m: None).model.segmentor)
    ckpt = tmp_path / 'seg.pth'
    torch.save({'state_dict': segmentor.state_dict(), 'meta': {}}, ckpt)
    out = tmp_path / 'seg.onnx'
    assert export_tool.main([str(cfg_path), str(ckpt), '--out', str(out), '--shape', '64', '64', '--dynamic']) == 0
    cfg = Config.fromfile(str(cfg_path))
    init_default_scope('mmseg')
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    model = MODELS.build(onnx_model_config(cfg, str(out), check_onnx_for_config(str(out), cfg)))

    def batch():
        return dict(inputs=[dataset[i]['inputs'] for i in range(2)], data_samples=[dataset[i]['data_samples']
                                                                                   for i in range(2)])

    with torch.no_grad():
        ref = segmentor.eval().test_step(batch())
    got = model.test_step(batch())
    for r, g in zip(ref, got):
        assert g.pred_sem_seg.data.shape == r.pred_sem_seg.data.shape
        assert (g.pred_sem_seg.data == r.pred_sem_seg.data).float().mean() > 0.999
        torch.testing.assert_close(g.seg_logits.data, r.seg_logits.data, rtol=1e-4, atol=1e-4)
    assert float(ref[0].seg_logits.data.std(dim=(1, 2)).min()) > 1e-3  # logits that vary over the image


@pytest.mark.slow
def test_int8_detector_calibrated_on_training_images_is_evaluated_like_fp32(exported, tmp_path):
    """--int8 --calib-images 2: calibrated through the config's test pipeline; the file keeps the export's
    metadata, so tools/test.py's model accepts it, and it still detects."""
    import onnx
    from mmengine.config import Config
    from mmengine.registry import DATASETS, MODELS, init_default_scope

    from mlla_mm.deploy.ort_model import check_onnx_for_config, onnx_model_config
    cfg_path, ckpt, _, _ = exported
    out = tmp_path / 'int8.onnx'
    assert export_tool.main([str(cfg_path), str(ckpt), '--out', str(out), '--shape', '64', '64', '--dynamic',
                             '--int8', '--calib-images', '2']) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta['mlla_mm_int8_calibration_images'] == '2' and meta['mlla_mm_kind'] == 'detector'
    cfg = Config.fromfile(str(cfg_path))
    init_default_scope('mmdet')
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    model = MODELS.build(onnx_model_config(cfg, str(out), check_onnx_for_config(str(out), cfg)))
    got = model.test_step(dict(inputs=[dataset[i]['inputs'] for i in range(2)],
                               data_samples=[dataset[i]['data_samples'] for i in range(2)]))
    assert sum(len(g.pred_instances) for g in got) > 0
