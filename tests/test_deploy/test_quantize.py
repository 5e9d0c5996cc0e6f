"""INT8 static quantization: what is quantized, what stays float, accuracy on a tiny MLLA, the tool's options."""
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from mlla_mm.deploy.onnx_export import ExportTarget, export_bytes, make_session
from mlla_mm.deploy.quantize import folder_calibration, prepare_for_int8, quantize_int8, weight_nodes
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
    grouped = {n.name for n in proto.graph.node if n.op_type == 'Conv'
               and any(a.name == 'group' and a.i > 1 for a in n.attribute)}
    depthwise = {g for g in grouped if '/downsample/' not in g}
    assert depthwise and depthwise <= set(kept)  # the blocks' dwc, lepe and cpe convolutions stay float
    assert grouped - depthwise and (grouped - depthwise) <= set(quantized)  # the downsample's reads a ReLU: int8
    assert all(by_name[k].op_type == 'MatMul' and by_name[k].input[1] not in weights for k in set(kept) - depthwise)
    assert all(by_name[q].input[1] in weights for q in quantized)


def test_int8_model_is_close_to_fp32_and_keeps_the_attention_products_float(tiny):
    model, data = tiny
    q = quantize_int8(data, feeds(3), log=lambda m: None)
    proto = onnx.load_from_string(q)
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    matmuls = [n for n in proto.graph.node if n.op_type == 'MatMul']
    dq_inputs = [sum(produced_by.get(i) is not None and produced_by[i].op_type == 'DequantizeLinear'
                     for i in n.input) for n in matmuls]
    prepared = onnx.load_from_string(data)
    prepare_for_int8(prepared)
    kept_matmuls = [k for k in weight_nodes(prepared)[1] if k in {n.name for n in prepared.graph.node
                                                                  if n.op_type == 'MatMul'}]
    assert dq_inputs.count(2) > 0 and dq_inputs.count(0) == len(kept_matmuls)
    assert len(q) < 0.7 * len(data)  # int8 weights
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta['mlla_mm_kind'] == 'backbone' and meta['mlla_mm_int8_calibration_images'] == '3'
    x = feeds(1, (45, 61), seed=5)[0]['img']  # another size than calibrated
    got = make_session(q).run(None, {'img': x})
    with torch.no_grad():
        ref = [t.numpy() for t in model(torch.from_numpy(x))]
    rel = [np.abs(g - r).max() / np.abs(r).max() for g, r in zip(got, ref)]
    assert max(rel) < 0.1 and min(rel) > 1e-5, rel  # quantized (not fp32), yet close


def test_prepare_turns_weight_left_products_into_convolutions_with_the_same_outputs(tiny):
    _, data = tiny
    proto = onnx.load_from_string(data)
    weights = {i.name for i in proto.graph.initializer}
    left = [n for n in proto.graph.node if n.op_type == 'MatMul' and n.input[0] in weights]
    assert left  # the export formulation's channel-major q and k projections
    _, converted = prepare_for_int8(proto)
    assert converted == len(left)
    weights = {i.name for i in proto.graph.initializer}
    assert not [n for n in proto.graph.node if n.op_type == 'MatMul' and n.input[0] in weights]
    assert len(weight_nodes(proto)[0]) == len(weight_nodes(onnx.load_from_string(data))[0]) + len(left)
    x = feeds(1, (45, 61), seed=3)[0]
    for got, ref in zip(make_session(proto.SerializeToString()).run(None, x), make_session(data).run(None, x)):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def optimized_graph(model: bytes, path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs (ORT_ENABLE_ALL) for ``model``."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path)
    opts.log_severity_level = 3
    ort.InferenceSession(model, sess_options=opts, providers=['CPUExecutionProvider'])
    return onnx.load(str(path))


def float_weight_products_and_requantizations(graph: onnx.ModelProto):
    """Products that still run float on a weight (an initializer or its dequantized copy), and
    ``DequantizeLinear -> QuantizeLinear`` chains (a tensor rounded to uint8 twice)."""
    init = {i.name for i in graph.graph.initializer}
    prod = {o: n for n in graph.graph.node for o in n.output}

    def weight(name):
        dq = prod.get(name)
        return name in init or (dq is not None and dq.op_type == 'DequantizeLinear' and dq.input[0] in init)
    floats = [n.name for n in graph.graph.node if n.op_type in ('Conv', 'MatMul', 'Gemm', 'FusedConv', 'FusedMatMul',
                                                                 'FusedGemm') and any(weight(i) for i in n.input[:2])
              and not any(a.name == 'group' and a.i > 1 for a in n.attribute)]  # depthwise: float by design
    requant = [n.name for n in graph.graph.node if n.op_type == 'QuantizeLinear' and n.input[0] in prod
               and prod[n.input[0]].op_type == 'DequantizeLinear']
    return floats, requant


def test_onnx_runtime_runs_every_weight_product_of_the_int8_model_in_integer_kernels(tiny, tmp_path):
    _, data = tiny
    graph = optimized_graph(quantize_int8(data, feeds(2), log=lambda m: None), tmp_path / 'opt.onnx')
    floats, requant = float_weight_products_and_requantizations(graph)
    assert floats == [] and requant == []  # q/k projections quantized; the stem's ReLUs folded into their Q
    ops = {n.op_type for n in graph.graph.node}
    grouped = [n for n in graph.graph.node if any(a.name == 'group' and a.i > 1 for a in n.attribute)]
    assert grouped and not [n.name for n in grouped if n.op_type.startswith('QLinear')  # the blocks' depthwise
                            and '/downsample/' not in n.name]  # convolutions run float
    assert {'QLinearConv', 'MatMulIntegerToFloat'} <= ops and 'QLinearMatMul' not in ops  # float MatMul outputs


def test_a_bias_shared_through_identity_is_quantized_with_its_convolution(tmp_path):
    """The exporter shares equal tensors (e.g. two zero biases) through ``Identity``; such a convolution
    must still become ``QLinearConv``, not a float ``Conv`` of dequantized weights."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, c, 3, 3)).astype(np.float32), f'w{i}')
             for i, c in enumerate((3, 8))] + [numpy_helper.from_array(np.zeros(8, np.float32), 'b')]
    nodes = [helper.make_node('Identity', ['b'], ['b_shared']),
             helper.make_node('Conv', ['img', 'w0', 'b'], ['y0'], pads=[1, 1, 1, 1]),
             helper.make_node('Relu', ['y0'], ['r0']),
             helper.make_node('Conv', ['r0', 'w1', 'b_shared'], ['out'], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('img', TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info('out', TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=8)
    q = quantize_int8(model.SerializeToString(), feeds(2, (16, 16)), log=lambda m: None)
    floats, requant = float_weight_products_and_requantizations(optimized_graph(q, tmp_path / 'opt.onnx'))
    assert floats == [] and requant == []
    x = feeds(2, (16, 16))[1]  # a calibration input: no clipping at the calibrated ranges
    got, ref = make_session(q).run(None, x)[0], make_session(model.SerializeToString()).run(None, x)[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


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
