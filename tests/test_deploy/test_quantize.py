"""INT8 static quantization: what is quantized, what stays float, accuracy on a tiny MLLA, the tool's options."""
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from mlla_mm.deploy.onnx_export import ExportTarget, export_bytes, make_session
from mlla_mm.deploy.quantize import folder_calibration, quantize_int8, weight_nodes
from mlla_mm.deploy.wrappers import BackboneForExport, output_names
from mlla_mm.errors import UsageError
from mlla_mm.models import MLLA
from tests.helpers import BARE_BACKBONE, TINY_ARCH, load_tool, randomize_norms

export_tool = load_tool('export_onnx')


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    model = randomize_norms(BackboneForExport(MLLA(TINY_ARCH, drop_path_rate=0.)).eval())
    target = ExportTarget(model, 'backbone', output_names('backbone', 4), 'tiny')
    return model, export_bytes(target, (64, 64), dynamic=True)


def feeds(n, shape=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    return [{'img': rng.standard_normal((1, 3, *shape), dtype=np.float32)} for _ in range(n)]


def test_only_weight_products_are_quantized(tiny):
    _, data = tiny
    proto = onnx.load_from_string(data)
    quantized, kept = weight_nodes(proto)
    assert quantized and kept
    weights = {i.name for i in proto.graph.initializer} | {n.output[0] for n in proto.graph.node
                                                          if n.op_type == 'Constant'}
    by_name = {n.name: n for n in proto.graph.node}
    assert all(by_name[k].op_type == 'MatMul' and by_name[k].input[1] not in weights for k in kept)
    assert all(by_name[q].input[1] in weights for q in quantized)


def test_int8_model_is_close_to_fp32_and_keeps_the_attention_products_float(tiny):
    model, data = tiny
    q = quantize_int8(data, feeds(3), log=lambda m: None)
    proto = onnx.load_from_string(q)
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    matmuls = [n for n in proto.graph.node if n.op_type == 'MatMul']
    dq_inputs = [sum(produced_by.get(i) is not None and produced_by[i].op_type == 'DequantizeLinear'
                     for i in n.input) for n in matmuls]
    assert dq_inputs.count(2) > 0 and dq_inputs.count(0) == len(weight_nodes(onnx.load_from_string(data))[1])
    assert len(q) < 0.7 * len(data)  # int8 weights
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta['mlla_mm_kind'] == 'backbone' and meta['mlla_mm_int8_calibration_images'] == '3'
    x = feeds(1, (45, 61), seed=5)[0]['img']  # another size than calibrated
    got = make_session(q).run(None, {'img': x})
    with torch.no_grad():
        ref = [t.numpy() for t in model(torch.from_numpy(x))]
    rel = [np.abs(g - r).max() / np.abs(r).max() for g, r in zip(got, ref)]
    assert max(rel) < 0.1 and min(rel) > 1e-5, rel  # quantized (not fp32), yet close


def test_no_calibration_input_is_an_error(tiny):
    with pytest.raises(UsageError, match='no calibration images'):
        quantize_int8(tiny[1], [], log=lambda m: None)


def test_folder_calibration_reads_resizes_and_normalises(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(tmp_path / 'a.png')
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(tmp_path / 'b.jpg')
    (tmp_path / 'notes.txt').write_text('not an image')
    got = list(folder_calibration(str(tmp_path), 10, (16, 24)))
    assert len(got) == 2 and all(f['img'].shape == (1, 3, 16, 24) for f in got)
    np.testing.assert_allclose(got[0]['img'][0, :, 0, 0], (255 - np.array([123.675, 116.28, 103.53])) /
                               np.array([58.395, 57.12, 57.375]), rtol=1e-5)
    with pytest.raises(UsageError, match='not a directory'):
        list(folder_calibration(str(tmp_path / 'nope'), 1, (8, 8)))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UsageError, match='no images'):
        list(folder_calibration(str(tmp_path / 'empty'), 1, (8, 8)))


# --------------------------------------------------------------------------
# The tool.
# --------------------------------------------------------------------------
def run(capsys, *args):
    try:
        code = export_tool.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.err, captured.err
    return code, [ln for ln in captured.err.splitlines() if ln.strip()], captured.out


@pytest.mark.parametrize('args, needle', [
    (['--int8'], '--calib-dir'),
    (['--calib-images', '4'], 'needs --int8'),
    (['--calib-dir', 'x'], 'needs --int8'),
    (['--int8', '--calib-images', '0'], '--calib-images'),
    (['--int8', '--calib-dir', 'NOPE'], 'not a directory'),
    (['--int8', '--calib-dir', 'EMPTY'], 'no images'),
])
def test_bad_int8_options_are_one_error_line_and_no_file(tmp_path, capsys, args, needle):
    (tmp_path / 'empty').mkdir()
    args = [str(tmp_path / 'empty') if a == 'EMPTY' else str(tmp_path / 'nope') if a == 'NOPE' else a for a in args]
    code, lines, _ = run(capsys, 'mlla_t', '--out', tmp_path / 'q.onnx', *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], lines
    assert not any(p.suffix == '.onnx' or '.tmp-' in p.name for p in tmp_path.iterdir())


@pytest.mark.slow
def test_tool_writes_an_int8_backbone_from_a_calibration_folder(tmp_path, capsys):
    cfg = tmp_path / 'bare.py'
    cfg.write_text(BARE_BACKBONE)
    calib = tmp_path / 'calib'
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(calib / f'{i}.png')
    out = tmp_path / 'q.onnx'
    code, lines, stdout = run(capsys, cfg, '--out', out, '--shape', '32', '32', '--dynamic', '--int8', '--calib-dir',
                              calib)
    assert code == 0, lines
    assert 'calibrated on 3 image(s)' in stdout
    proto = onnx.load(str(out))
    assert any(n.op_type == 'QuantizeLinear' for n in proto.graph.node)
    feats = make_session(str(out)).run(None, {'img': np.zeros((1, 3, 37, 41), np.float32)})
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
