"""ONNX export of tiny MLLA, UperNet and Mask R-CNN features: ONNX Runtime against PyTorch at many sizes."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlla_mm.deploy.onnx_export import (TOLERANCE, ExportTarget, build_target, check_onnx, default_check_sizes,
                                        export_bytes, make_session)
from mlla_mm.deploy.wrappers import AdaptiveAvgPool2dAnySize, BackboneForExport, make_shape_agnostic, output_names
from mlla_mm.models import MLLA
from tests.helpers import (BARE_BACKBONE, NUM_CLASSES, ROOT, TINY_ARCH, randomize_norms, write_tiny_mask_rcnn,
                           write_tiny_upernet)

# Sizes not used at export (which is traced at 64x64, batch 2): odd, not multiples of 4 or 32, batch 1 and 2.
SIZES = [(1, 64, 64), (1, 37, 53), (2, 45, 29), (1, 97, 131), (2, 33, 32), (1, 5, 3)]


def tiny_backbone() -> ExportTarget:
    torch.manual_seed(0)
    # Non-trivial BatchNorm statistics and output norms, so every weight matters.
    model = randomize_norms(BackboneForExport(MLLA(TINY_ARCH, drop_path_rate=0.)).eval())
    return ExportTarget(model, 'backbone', output_names('backbone', 4), 'tiny')


@pytest.fixture(scope='module')
def backbone_export():
    target = tiny_backbone()
    return target, export_bytes(target, (64, 64), dynamic=True)


@pytest.fixture(scope='module')
def upernet_export(tmp_path_factory):
    cfg = write_tiny_upernet(tmp_path_factory.mktemp('cfg'))
    torch.manual_seed(0)
    target = build_target(str(cfg), log=lambda msg: None)
    return target, export_bytes(target, (64, 64), dynamic=True)


def assert_all_pass(rows):
    bad = [r.line() for r in rows if not r.passed]
    assert not bad, '\n'.join(bad)


# --------------------------------------------------------------------------
# The pooling replacement.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('hw', [(16, 16), (17, 23), (5, 3), (1, 1), (2, 7), (64, 45)])
@pytest.mark.parametrize('bins', [1, 2, 3, 6])
def test_adaptive_pool_any_size_equals_torch(hw, bins):
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    got = AdaptiveAvgPool2dAnySize(bins)(x)
    torch.testing.assert_close(got, F.adaptive_avg_pool2d(x, bins), rtol=1e-12, atol=1e-12)


def test_adaptive_pool_any_size_rectangular_output():
    x = torch.randn(1, 3, 19, 11)
    torch.testing.assert_close(AdaptiveAvgPool2dAnySize((4, 2))(x), F.adaptive_avg_pool2d(x, (4, 2)))


def test_make_shape_agnostic_copies_and_replaces_only_the_pools():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(3)))
    out = make_shape_agnostic(net)
    assert isinstance(net[1][0], torch.nn.AdaptiveAvgPool2d)  # the original is untouched
    assert isinstance(out[1][0], AdaptiveAvgPool2dAnySize) and out[1][0].output_size == (3, 3)
    assert out[0] is not net[0] and torch.equal(out[0].weight, net[0].weight)


# --------------------------------------------------------------------------
# Backbone.
# --------------------------------------------------------------------------
def test_tiny_mlla_onnx_matches_torch_at_every_size(backbone_export):
    target, data = backbone_export
    rows = check_onnx(data, target.model, target.output_names, SIZES)
    assert len(rows) == 4 * len(SIZES)
    assert_all_pass(rows)
    # The ONNX outputs have the backbone's shapes (ceil(H / stride)).
    sess = make_session(data)
    outs = sess.run(None, {'img': np.zeros((2, 3, 37, 53), np.float32)})
    assert [o.shape for o in outs] == [(2, 16, 10, 14), (2, 32, 5, 7), (2, 64, 3, 4), (2, 128, 2, 2)]


def test_exported_graph_has_symbolic_batch_height_width(backbone_export):
    import onnx
    _, data = backbone_export
    model = onnx.load_from_string(data)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta['mlla_mm_kind'] == 'backbone' and meta['mlla_mm_dynamic'] == 'true'


def test_check_fails_when_the_model_differs_from_the_export(backbone_export):
    """Change one weight after export: the outputs that depend on it FAIL, the others PASS."""
    target, data = backbone_export
    bad = tiny_backbone().model  # same weights as the exported model
    with torch.no_grad():
        bad.backbone.layers[3].blocks[0].mlp.fc2.weight[0, 0] += 0.5  # only stage 3 (feat3) sees it
    rows = check_onnx(data, bad, target.output_names, [(1, 64, 64), (2, 37, 53)])
    verdicts = {(r.batch, r.output): r.passed for r in rows}
    assert verdicts == {(1, 'feat0'): True, (1, 'feat1'): True, (1, 'feat2'): True, (1, 'feat3'): False,
                        (2, 'feat0'): True, (2, 'feat1'): True, (2, 'feat2'): True, (2, 'feat3'): False}
    failed = [r for r in rows if not r.passed]
    assert all(r.max_abs_diff > TOLERANCE * r.scale for r in failed)
    assert all('FAIL' in r.line() for r in failed)


def test_check_fails_on_a_tiny_difference_above_the_tolerance(backbone_export):
    """A relative change of a few 1e-4 on one output is caught; the float error of ONNX Runtime is far below."""
    target, data = backbone_export

    class Nudged(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            outs = list(self.inner(x))
            outs[0] = outs[0] + 3 * TOLERANCE * outs[0].abs().max()
            return tuple(outs)

    rows = check_onnx(data, Nudged(target.model), target.output_names, [(1, 45, 29)])
    assert [r.passed for r in rows] == [False, True, True, True]


def test_static_export_serves_only_its_own_size():
    target = tiny_backbone()
    data = export_bytes(target, (48, 40), dynamic=False)
    assert default_check_sizes((48, 40), dynamic=False) == [(1, 48, 40)]
    assert_all_pass(check_onnx(data, target.model, target.output_names, [(1, 48, 40)]))
    rows = check_onnx(data, target.model, target.output_names, [(1, 40, 48)])
    assert len(rows) == 1 and not rows[0].passed and 'ONNX Runtime failed' in rows[0].note


def test_default_check_sizes_cover_odd_unseen_and_batch_two():
    sizes = default_check_sizes((512, 512))
    assert sizes[0] == (1, 512, 512)
    assert any(h % 2 and w % 2 for _, h, w in sizes)
    assert all((h, w) != (512, 512) for _, h, w in sizes[1:])
    assert any(b == 2 for b, _, _ in sizes)
    assert all(min(h, w) >= 1 for _, h, w in default_check_sizes((1, 1)))


# --------------------------------------------------------------------------
# UperNet and Mask R-CNN features from the project's configs.
# --------------------------------------------------------------------------
def test_tiny_upernet_onnx_matches_torch_at_every_size(upernet_export):
    target, data = upernet_export
    assert target.kind == 'segmentor' and target.output_names == ['logits']
    # SyncBN of the config's heads became BatchNorm.
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in target.model.modules())
    rows = check_onnx(data, target.model, target.output_names, SIZES)
    assert_all_pass(rows)
    out = make_session(data).run(None, {'img': np.random.rand(2, 3, 45, 29).astype(np.float32)})[0]
    assert out.shape == (2, NUM_CLASSES, 45, 29)  # logits at the input size


def test_upernet_export_equals_mmseg_encode_decode(upernet_export):
    """The exported tensor path is mmseg's own whole-image inference."""
    from mmseg.structures import SegDataSample
    target, data = upernet_export
    segmentor = target.model.segmentor
    img = torch.randn(1, 3, 45, 61)
    meta = dict(img_shape=(45, 61), ori_shape=(45, 61), pad_shape=(45, 61))
    with torch.no_grad():
        ref = segmentor.encode_decode(img, [SegDataSample(metainfo=meta).metainfo])
    got = torch.from_numpy(make_session(data).run(None, {'img': img.numpy()})[0])
    torch.testing.assert_close(got, ref, rtol=0, atol=TOLERANCE * float(ref.abs().max()))


def test_upernet_metadata_records_the_input_normalisation(upernet_export):
    import onnx
    meta = {p.key: p.value for p in onnx.load_from_string(upernet_export[1]).metadata_props}
    assert meta['input_mean'] == '[123.675, 116.28, 103.53]'
    assert meta['input_std'] == '[58.395, 57.12, 57.375]'
    assert meta['input_bgr_to_rgb'] == 'true'
    assert meta['mlla_mm_kind'] == 'segmentor'


def test_tiny_mask_rcnn_features_onnx_matches_torch(tmp_path):
    cfg = write_tiny_mask_rcnn(tmp_path)
    target = build_target(str(cfg), log=lambda msg: None, features=True)
    assert target.kind == 'detector-features' and target.output_names == [f'fpn{i}' for i in range(5)]
    data = export_bytes(target, (64, 64), dynamic=True)
    assert_all_pass(check_onnx(data, target.model, target.output_names, [(1, 64, 64), (1, 37, 53), (2, 45, 29)]))


def test_backbone_of_a_config(tmp_path):
    target = build_target(str(write_tiny_upernet(tmp_path)), backbone_only=True, log=lambda msg: None)
    assert target.kind == 'backbone' and target.output_names == ['feat0', 'feat1', 'feat2', 'feat3']
    data = export_bytes(target, (64, 64), dynamic=True)
    assert_all_pass(check_onnx(data, target.model, target.output_names, [(1, 37, 53), (2, 64, 64)]))


# --------------------------------------------------------------------------
# Without onnx / onnxruntime.
# --------------------------------------------------------------------------
def test_package_imports_without_onnx_and_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None; sys.modules['onnxscript'] = None\n"
        "import mlla_mm, mlla_mm.deploy, mlla_mm.deploy.onnx_export as ox\n"
        "try:\n"
        "    ox.require('onnx', 'onnxruntime')\n"
        "except ox.UsageError as err:\n"
        "    print('MSG', err)\n")
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'MSG ONNX export needs onnx, onnxruntime' in res.stdout and 'pip install onnx onnxruntime' in res.stdout
    assert "pip install -e '.[deploy]'" in res.stdout


def test_export_needs_no_onnxscript():
    """The TorchScript exporter runs without onnxscript (so the 'deploy' extra does not install it)."""
    code = (
        "import sys\n"
        "sys.modules['onnxscript'] = None\n"
        "import torch\n"
        "from mlla_mm.deploy.onnx_export import ExportTarget, export_bytes, check_onnx\n"
        "from mlla_mm.deploy.wrappers import BackboneForExport, output_names\n"
        "from mlla_mm.models import MLLA\n"
        "torch.set_num_threads(1)\n"
        f"m = BackboneForExport(MLLA({TINY_ARCH!r})).eval()\n"
        "t = ExportTarget(m, 'backbone', output_names('backbone', 4), 'tiny')\n"
        "rows = check_onnx(export_bytes(t, (32, 32)), m, t.output_names, [(1, 37, 21)])\n"
        "print('ROWS', sum(r.passed for r in rows), len(rows))\n")
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'ROWS 4 4' in res.stdout


# --------------------------------------------------------------------------
# Opsets and configs whose model is a backbone.
# --------------------------------------------------------------------------
def test_opset_range_ends_export_and_outside_is_a_usage_error():
    """MIN_OPSET and MAX_OPSET export this project's graphs; anything outside is one UsageError naming the range."""
    from mlla_mm.deploy.onnx_export import MAX_OPSET, MIN_OPSET, UsageError
    from torch.onnx import _constants
    assert MAX_OPSET == _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    target = tiny_backbone()
    for opset, formulation in [(MIN_OPSET, 'plain'), (MAX_OPSET, 'onnx')]:  # plain needs 13 (aten::unflatten)
        data = export_bytes(target, (32, 32), dynamic=False, opset=opset, formulation=formulation)
        assert_all_pass(check_onnx(data, target.model, target.output_names, [(1, 32, 32)]))
    for opset in (0, MIN_OPSET - 1, MAX_OPSET + 1, 99):
        with pytest.raises(UsageError, match=rf'--opset {opset}: expected an ONNX opset from {MIN_OPSET} to '
                                             rf'{MAX_OPSET}'):
            export_bytes(target, (32, 32), opset=opset)


@pytest.mark.parametrize('backbone_only', [True, False])
def test_config_whose_model_is_a_backbone_exports_it(tmp_path, backbone_only):
    """``model = dict(type='mlla_mm.MLLA', ...)``: the backbone itself, with its weights (backbone_only or not)."""
    cfg = tmp_path / 'bare.py'
    cfg.write_text(BARE_BACKBONE)
    torch.manual_seed(3)
    saved = MLLA(TINY_ARCH)
    ckpt = tmp_path / 'bb.pth'
    torch.save({'state_dict': saved.state_dict()}, ckpt)
    target = build_target(str(cfg), str(ckpt), backbone_only=backbone_only, log=lambda msg: None)
    assert target.kind == 'backbone' and target.output_names == ['feat0', 'feat1', 'feat2', 'feat3']
    got = target.model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.state_dict().items())
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(target.model(img), saved.eval()(img)))


def test_backbone_only_needs_a_backbone(tmp_path):
    """A config whose model has no backbone (an FPN alone) is one clear UsageError; a ResNet alone exports."""
    from mlla_mm.deploy.onnx_export import UsageError
    neck = tmp_path / 'neck.py'
    neck.write_text("default_scope = 'mmdet'\n"
                    "model = dict(type='mmdet.FPN', in_channels=[16, 32], out_channels=8, num_outs=2)\n")
    with pytest.raises(UsageError, match=r'neck\.py: --backbone-only: the model \(FPN\) has no backbone'):
        build_target(str(neck), backbone_only=True, log=lambda msg: None)
    resnet = tmp_path / 'resnet.py'  # mmdet's ResNet.train() returns None: build_target must not chain .eval()
    resnet.write_text("default_scope = 'mmdet'\nmodel = dict(type='mmdet.ResNet', depth=18)\n")
    target = build_target(str(resnet), backbone_only=True, log=lambda msg: None)
    assert target.kind == 'backbone' and not target.model.training
    assert [t.shape[1] for t in target.model(torch.zeros(1, 3, 32, 32))] == [64, 128, 256, 512]
