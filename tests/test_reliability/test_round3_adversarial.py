"""Issue 26, adversarial pass of session 13: defects found by trying the tools as a hostile or careless user would.

Each test is written against a crafted file or argument that broke the code before its fix (the table in
docs/reliability.md, "Adversarial pass, round 3 (session 13)", lists every attempt, held or not).
"""
import json
import os
import struct
import zlib

import pytest
import torch

from tests.helpers import assert_one_error_line, exit_code, load_tool

CONFIG = 'configs/detection/mask_rcnn_mlla_t_demo.py'


# --------------------------------------------------------------------------
# ONNX files that ONNX Runtime refuses or fails on: one UsageError naming the file, not a traceback.
# --------------------------------------------------------------------------
def _onnx_model(path, first_node, inits=(), opsets=()):
    """A detector-shaped graph (img, img_shape -> boxes, scores, labels) starting with ``first_node``."""
    from onnx import TensorProto, helper
    import onnx
    img = helper.make_tensor_value_info('img', TensorProto.FLOAT, [None, 3, None, None])
    shp = helper.make_tensor_value_info('img_shape', TensorProto.INT64, [None, 2])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in
            (('boxes', TensorProto.FLOAT), ('scores', TensorProto.FLOAT), ('labels', TensorProto.INT64))]
    nodes = [first_node,
             helper.make_node('ReduceSum', ['x'], ['s'], keepdims=0),
             helper.make_node('Reshape', ['s', 'shape114'], ['b0']),
             helper.make_node('Tile', ['b0', 'rep'], ['boxes']),
             helper.make_node('Reshape', ['s', 'shape11'], ['scores']),
             helper.make_node('Cast', ['scores'], ['labels'], to=TensorProto.INT64)]
    inits = [*inits, helper.make_tensor('shape114', TensorProto.INT64, [3], [1, 1, 1]),
             helper.make_tensor('rep', TensorProto.INT64, [3], [1, 1, 4]),
             helper.make_tensor('shape11', TensorProto.INT64, [2], [1, 1])]
    graph = helper.make_graph(nodes, 'g', [img, shp], outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17), *opsets])
    model.ir_version = 8  # what the installed ONNX Runtime reads
    onnx.save(model, str(path))
    return path


def _external(name, location, nbytes, dims):
    from onnx import TensorProto
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (('location', location), ('offset', '0'), ('length', str(nbytes))):
        t.external_data.add(key=k, value=v)
    return t


def test_onnx_files_ort_refuses_are_one_error_naming_the_file(tmp_path):
    """External data outside the file's folder (../../etc/passwd, an absolute path, a link to /dev/zero), an
    initializer declaring 2**40 floats over 16 bytes, an unknown custom op: ORT refuses each (nothing is read);
    before, tools/test.py F.onnx ended in an onnxruntime traceback, exit 1."""
    pytest.importorskip('onnxruntime')
    from onnx import TensorProto, helper

    from mlla_mm.deploy.ort_model import OnnxRuntimeModel
    from mlla_mm.errors import UsageError
    add = helper.make_node('Add', ['img', 'w'], ['x'])
    os.symlink('/dev/zero', tmp_path / 'zero.bin')
    huge = helper.make_tensor('w', TensorProto.FLOAT, [4], [1, 2, 3, 4])
    huge.dims[:] = [2 ** 40]
    cases = {
        'dotdot.onnx': (add, [_external('w', '../../../../../../etc/passwd', 16, [4])], (), 'escapes'),
        'absolute.onnx': (add, [_external('w', '/etc/passwd', 16, [4])], (), 'Absolute path'),
        'devzero.onnx': (add, [_external('w', 'zero.bin', 4 << 31, [1 << 31])], (), 'escapes'),
        'huge.onnx': (add, [huge], (), 'exceeds'),
        'custom.onnx': (helper.make_node('Evil', ['img'], ['x'], domain='com.evil'), [],
                        [helper.make_opsetid('com.evil', 1)], 'com.evil:Evil'),
    }
    for name, (node, inits, opsets, reason) in cases.items():
        path = _onnx_model(tmp_path / name, node, inits, opsets)
        with pytest.raises(UsageError) as err:
            OnnxRuntimeModel(str(path), 'detector')
        text = str(err.value)
        assert text.startswith(f'{path}: ONNX Runtime cannot load it: ') and reason in text, text
        assert '\n' not in text and len(text) < 600


def test_onnx_graph_failing_at_run_time_is_one_error_naming_the_file(tmp_path):
    """A graph that loads but fails when run (here a Reshape of the image to a wrong size): one UsageError
    naming the file and the input shapes, where ORT's InvalidArgument/RuntimeException escaped before."""
    pytest.importorskip('onnxruntime')
    from mmdet.structures import DetDataSample
    from onnx import TensorProto, helper

    from mlla_mm.deploy.ort_model import OnnxRuntimeModel
    from mlla_mm.errors import UsageError
    node = helper.make_node('Reshape', ['img', 'bad'], ['x'])
    path = _onnx_model(tmp_path / 'runfail.onnx', node, [helper.make_tensor('bad', TensorProto.INT64, [1], [7])])
    model = OnnxRuntimeModel(str(path), 'detector')
    sample = DetDataSample(metainfo=dict(img_shape=(8, 8), ori_shape=(8, 8), scale_factor=(1., 1.)))
    with pytest.raises(UsageError, match=r'^' + str(path) + r': ONNX Runtime failed on inputs of shapes '
                                         r'\[\(1, 3, 8, 8\), \(1, 2\)\]: .*Reshape'):
        model.forward(torch.zeros(1, 3, 8, 8), [sample])


# --------------------------------------------------------------------------
# convert_checkpoint.py: the destination is never the source.
# --------------------------------------------------------------------------
def test_convert_checkpoint_never_writes_over_its_source(tmp_path, capsys):
    """``convert_checkpoint.py W.pth W.pth --backbone-only`` replaced the whole checkpoint by its backbone, exit 0;
    a link to the source is refused too (no surprise about which file changes)."""
    tool = load_tool('convert_checkpoint')
    src = tmp_path / 'w.pth'
    torch.save({'state_dict': {'backbone.patch_embed.proj.weight': torch.ones(4, 3, 3, 3),
                               'neck.conv.weight': torch.ones(2)}, 'meta': {}}, src)
    before = src.read_bytes()
    os.symlink(src, tmp_path / 'soft.pth')
    os.link(src, tmp_path / 'hard.pth')
    for dst in (src, tmp_path / 'soft.pth', tmp_path / 'hard.pth', tmp_path / '.' / 'w.pth'):
        assert exit_code(tool.main, [src, dst, '--backbone-only']) == 2
        assert_one_error_line(capsys, str(dst), 'source')
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['hard.pth', 'soft.pth', 'w.pth']


def test_convert_checkpoint_keeps_a_file_it_did_not_write_unless_forced(tmp_path, capsys):
    """``convert_checkpoint.py SRC notes.txt`` replaced the user's file, exit 0; its own output is rewritten."""
    tool = load_tool('convert_checkpoint')
    src = tmp_path / 'w.pth'
    torch.save({'state_dict': {'backbone.patch_embed.proj.weight': torch.ones(4, 3, 3, 3)}}, src)
    notes = tmp_path / 'notes.pth'
    notes.write_text('my notes')
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': {'w': torch.ones(1)}}, other)  # a checkpoint, but not one the converter wrote
    for dst in (notes, other):
        assert exit_code(tool.main, [src, dst]) == 2
        assert_one_error_line(capsys, str(dst), '--force')
    assert notes.read_text() == 'my notes'
    out = tmp_path / 'out.pth'
    for _ in range(2):  # its own output: rewritten without --force
        assert exit_code(tool.main, [src, out]) == 0
    assert exit_code(tool.main, [src, notes, '--force']) == 0
    assert torch.load(notes, weights_only=True)['meta']['mlla_mm_layout']


# --------------------------------------------------------------------------
# get_flops.py: --json, --shape, and the fast-inference switch.
# --------------------------------------------------------------------------
def test_get_flops_json_never_overwrites_the_config_or_a_foreign_file(tmp_path, capsys):
    """``--json`` over a checkpoint (a typo) replaced it with JSON, exit 0; over the config, the config."""
    get_flops = load_tool('get_flops')
    ckpt = tmp_path / 'w.pth'
    ckpt.write_bytes(b'PK\x03\x04 my weights')
    config = tmp_path / 'mlla_t'  # a backbone name that is also an existing file
    config.write_text('# my notes\n')
    for out, why in ((ckpt, 'add --force'), (config, 'input')):
        assert exit_code(get_flops.main, ['mlla_t', '--shape', 32, 32, '--json', out] if out == ckpt else
                         [config, '--shape', 32, 32, '--json', out, '--force']) == 2
        assert_one_error_line(capsys, '--json', str(out), why)
    assert ckpt.read_bytes() == b'PK\x03\x04 my weights' and config.read_text() == '# my notes\n'
    # its own file is rewritten; a foreign one with --force
    own = tmp_path / 'f.json'
    for _ in range(2):
        assert exit_code(get_flops.main, ['mlla_t', '--shape', 32, 32, '--json', own]) == 0
    assert json.loads(own.read_text())['backbone_macs'] > 0
    assert exit_code(get_flops.main, ['mlla_t', '--shape', 32, 32, '--json', ckpt, '--force']) == 0
    assert json.loads(ckpt.read_text())['written_by'].startswith('mlla-mm')


def test_get_flops_shape_too_large_to_allocate_is_one_line(monkeypatch, capsys):
    """``--shape 100000 100000`` asked for a 120 GB input outside the guarded count: RuntimeError traceback."""
    get_flops = load_tool('get_flops')
    real_randn = torch.randn

    def randn(*size, **kwargs):
        if len(size) == 4 and size[2] * size[3] >= 10 ** 10:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 120000000000 "
                               'bytes. Error code 12 (Cannot allocate memory)')
        return real_randn(*size, **kwargs)

    monkeypatch.setattr(torch, 'randn', randn)
    assert exit_code(get_flops.main, ['mlla_t', '--shape', 100000, 100000]) == 2
    assert_one_error_line(capsys, '--shape 100000 100000', "can't allocate memory")


@pytest.mark.parametrize('tool,argv', [('get_flops', ['mlla_t', '--shape', 32, 32]),
                                       ('export_onnx', ['mlla_t', '--shape', 32, 32, '--out', '{tmp}/m.onnx'])])
def test_a_bad_fast_inference_variable_is_one_line_from_the_tools(tmp_path, monkeypatch, capsys, tool, argv):
    """``MLLA_MM_FAST_INFERENCE=yes``: a ValueError traceback from the model's constructor, exit 1."""
    monkeypatch.setenv('MLLA_MM_FAST_INFERENCE', 'yes')
    main = load_tool(tool).main
    assert exit_code(main, [str(a).format(tmp=tmp_path) for a in argv]) == 2
    assert_one_error_line(capsys, 'MLLA_MM_FAST_INFERENCE', "'yes'")
    assert list(tmp_path.iterdir()) == []
    from mlla_mm.models.ops import fast_inference_default
    with pytest.raises(ValueError):  # still a ValueError for library callers
        fast_inference_default()


# --------------------------------------------------------------------------
# infer.py: the score threshold, and an --out folder inside the input folder.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('thr', ['nan', '-0.5', '1.5'])
def test_infer_score_threshold_outside_0_to_1_is_refused(tmp_path, capsys, thr):
    """``--score-thr nan`` drew no box on any picture and exited 0."""
    infer = load_tool('infer')
    (tmp_path / 'a.png').write_bytes(b'')
    code = exit_code(infer.main, [CONFIG, tmp_path / 'missing.pth', tmp_path / 'a.png', '--out', tmp_path / 'o',
                                  '--score-thr', thr])
    assert code == 2
    assert_one_error_line(capsys, '--score-thr', thr)
    assert not (tmp_path / 'o').exists()


def test_infer_never_reads_its_own_output_folder_inside_the_input_folder(tmp_path):
    """``infer.py imgs/ --out imgs/out``: the second run found the first run's pictures as inputs and refused to
    write over them (it would draw on its own drawings)."""
    infer = load_tool('infer')
    (tmp_path / 'imgs' / 'out' / 'deeper').mkdir(parents=True)
    (tmp_path / 'imgs' / 'sub').mkdir()
    for rel in ('a.png', 'sub/b.jpg', 'out/a.png', 'out/deeper/c.png'):
        (tmp_path / 'imgs' / rel).write_bytes(b'x')
    found = infer.find_images(str(tmp_path / 'imgs'), skip=str(tmp_path / 'imgs' / 'out'))
    assert [p.relative_to(tmp_path / 'imgs').as_posix() for p in found] == ['a.png', 'sub/b.jpg']
    # a folder that only starts with the same name is not the output folder
    (tmp_path / 'imgs' / 'outside.png').write_bytes(b'x')
    found = infer.find_images(str(tmp_path / 'imgs'), skip=str(tmp_path / 'imgs' / 'out'))
    assert 'outside.png' in [p.name for p in found]


# --------------------------------------------------------------------------
# safetensors: a header that names one tensor twice.
# --------------------------------------------------------------------------
def _safetensors(path, header_bytes, data):
    path.write_bytes(struct.pack('<Q', len(header_bytes)) + header_bytes + data)
    return path


def test_safetensors_naming_a_tensor_twice_is_refused(tmp_path):
    """JSON allows a repeated key and the last wins: a viewer reading the first entry sees a [1] tensor, the
    loader loaded a [2] one. Refused, naming the key; a file without repeats still loads."""
    from mlla_mm.checkpoint import CheckpointError, load_file
    entry = '{{"dtype": "F32", "shape": [{n}], "data_offsets": [0, {b}]}}'
    dup = _safetensors(tmp_path / 'dup.safetensors',
                       ('{"backbone.w": ' + entry.format(n=1, b=4) + ', "backbone.w": ' + entry.format(n=2, b=8)
                        + '}').encode(), bytes(8))
    with pytest.raises(CheckpointError, match=r"dup\.safetensors \(its header names 'backbone\.w' twice\)"):
        load_file(str(dup))
    nested = _safetensors(tmp_path / 'nested.safetensors',
                          b'{"w": {"dtype": "F32", "shape": [1], "shape": [2], "data_offsets": [0, 8]}}', bytes(8))
    with pytest.raises(CheckpointError, match="names 'shape' twice"):
        load_file(str(nested))
    ok = _safetensors(tmp_path / 'ok.safetensors', ('{"backbone.w": ' + entry.format(n=2, b=8) + '}').encode(),
                      struct.pack('<2f', 1.0, 2.0))
    assert load_file(str(ok))['backbone.w'].tolist() == [1.0, 2.0]


# --------------------------------------------------------------------------
# export_onnx.py --int8 --calib-dir: a FIFO and a decompression bomb among the images.
# --------------------------------------------------------------------------
def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b''))
                     + chunk(b'IEND', b''))


def test_calibration_folder_skips_fifos_and_refuses_bombs_in_one_line(tmp_path):
    """A FIFO named ``a.png`` in --calib-dir hung the export forever (opened for reading); a 20000x20000 PNG
    header (400 Mpixels) was PIL's DecompressionBombError traceback."""
    from PIL import Image

    from mlla_mm.deploy.quantize import folder_calibration, folder_images
    from mlla_mm.errors import UsageError
    os.mkfifo(tmp_path / 'a.png')
    Image.new('RGB', (8, 8)).save(tmp_path / 'b.png')
    os.symlink('/dev/zero', tmp_path / 'c.png')
    assert folder_images(str(tmp_path), 10) == [str(tmp_path / 'b.png')]
    feeds = list(folder_calibration(str(tmp_path), 10, (4, 4)))
    assert len(feeds) == 1 and feeds[0]['img'].shape == (1, 3, 4, 4)
    bomb = tmp_path / 'bomb'
    bomb.mkdir()
    _png_header_only(bomb / 'big.png', 20000, 20000)
    with pytest.raises(UsageError, match=r'^--calib-dir: cannot read .*big\.png: .*exceeds limit'):
        list(folder_calibration(str(bomb), 10, (4, 4)))


# --------------------------------------------------------------------------
# Data check: a box float32 cannot hold.
# --------------------------------------------------------------------------
def test_a_box_float32_cannot_hold_is_refused_by_the_data_check(tmp_path):
    """A box ``[1, 1, 1e300, 1e300]`` overlaps its image, so mmdet keeps it, and its float32 array is inf; the
    check passed it without a word. A box far outside but float32-sized stays a counted drop (mmdet's rule)."""
    import numpy as np
    from PIL import Image

    from mlla_mm.datasets.checks import check_annotations
    from mlla_mm.errors import BadAnnotationError
    assert np.isinf(np.array([1 + 1e300], dtype=np.float32)).all()  # what mmdet's float32 boxes make of it
    (tmp_path / 'imgs').mkdir()
    Image.new('RGB', (32, 32)).save(tmp_path / 'imgs' / 'a.png')

    def run(bbox):
        ann = dict(id=1, image_id=1, category_id=1, bbox=bbox, area=100.0, iscrowd=0)
        (tmp_path / 'a.json').write_text(json.dumps(dict(
            images=[dict(id=1, file_name='a.png', width=32, height=32)], annotations=[ann],
            categories=[dict(id=1, name='thing')])))
        ds = dict(type='CocoDataset', data_root=str(tmp_path), ann_file='a.json', data_prefix=dict(img='imgs/'),
                  metainfo=dict(classes=('thing',)), pipeline=[])
        return check_annotations(ds, 'val_dataloader', 'x.py')

    with pytest.raises(BadAnnotationError, match=r'bbox whose corners float32 cannot hold .*annotation ids 1'):
        run([1, 1, 1e300, 1e300])
    with pytest.raises(BadAnnotationError, match='float32 cannot hold'):
        run([-1e39, 1, 10, 10])
    assert run([1, 1, 10, 10]) == []
    warnings = run([100, 100, 10, 10])
    assert len(warnings) == 1 and 'box outside its image' in warnings[0], warnings
