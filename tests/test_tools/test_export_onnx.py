"""tools/export_onnx.py: export + check of a tiny UperNet, failed checks and bad input leave no .onnx behind."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import (NUM_CLASSES, ROOT, TINY_ARCH, load_tool, one_error_line, run_main, run_tool, tool_env,
                           write_tiny_upernet)

TOOL = ROOT / 'tools' / 'export_onnx.py'
export_tool = load_tool('export_onnx')


def leftovers(folder):
    """Every .onnx file or temporary file in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.suffix == '.onnx' or '.tmp-' in p.name)


def assert_tool_error(res, *needles):
    """The tool exited with 2 and printed one ``error:`` line naming each of ``needles``."""
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    one_error_line(res.stderr, *needles)


def test_tool_exports_checks_and_writes_a_dynamic_upernet(tmp_path):
    import onnxruntime as ort
    cfg = write_tiny_upernet(tmp_path)
    out = tmp_path / 'out' / 'upernet.onnx'
    res = run_tool(TOOL, cfg, '--out', out, '--shape', '64', '64', '--dynamic', '--check', timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [ln for ln in res.stdout.splitlines() if 'max|diff|' in ln]
    assert len(rows) == 3 and all(ln.rstrip().endswith('PASS') for ln in rows), res.stdout
    assert 'check: all 3 PASS' in res.stdout
    assert '1x3x64x64' in res.stdout and '2x3x' in res.stdout  # export size and batch 2
    assert leftovers(out.parent) == ['upernet.onnx']
    sess = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    logits = sess.run(None, {'img': np.random.rand(1, 3, 71, 39).astype(np.float32)})[0]
    assert logits.shape == (1, NUM_CLASSES, 71, 39) and np.isfinite(logits).all()


def test_tool_loads_weights_into_the_export(tmp_path, capsys):
    """Saved segmentor weights are what the ONNX file computes (not the random init)."""
    from mlla_mm.deploy.onnx_export import build_target, make_session
    cfg = write_tiny_upernet(tmp_path)
    torch.manual_seed(123)
    trained = build_target(str(cfg), log=lambda m: None).model
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = tmp_path / 'seg.pth'
    torch.save({'state_dict': trained.segmentor.state_dict(), 'meta': {}}, ckpt)
    out = tmp_path / 'seg.onnx'
    assert export_tool.main([str(cfg), str(ckpt), '--out', str(out), '--shape', '48', '48', '--dynamic']) == 0
    img = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        ref = trained(img)[0].numpy()
    got = make_session(str(out)).run(None, {'img': img.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_failed_check_exits_1_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """The exported graph differs from the PyTorch model (one weight changed in the traced copy)."""
    from mlla_mm.deploy import onnx_export
    cfg = write_tiny_upernet(tmp_path)
    make = onnx_export.ExportTarget.exportable

    def corrupted(self, formulation='onnx'):
        model = make(self, formulation)
        with torch.no_grad():
            model.segmentor.decode_head.conv_seg.weight[0, 0] += 1.0
        return model

    monkeypatch.setattr(onnx_export.ExportTarget, 'exportable', corrupted)
    out = tmp_path / 'bad.onnx'
    out.write_bytes(b'previous file')  # an existing file stays as it was (--force: a file mlla-mm did not write)
    code = export_tool.main([str(cfg), '--out', str(out), '--shape', '48', '48', '--dynamic', '--check', '--force'])
    captured = capsys.readouterr()
    assert code == 1
    assert 'FAIL' in captured.out and 'not written' in captured.err
    assert out.read_bytes() == b'previous file'
    assert leftovers(tmp_path) == ['bad.onnx']


def test_write_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The disk fills up during the write: exit 2, one line naming the file, no partial .onnx."""
    from tests.helpers import fill_disk_on_rename
    cfg = write_tiny_upernet(tmp_path)
    fill_disk_on_rename(monkeypatch, '.onnx')
    out = tmp_path / 'full.onnx'
    code = export_tool.main([str(cfg), '--backbone-only', '--out', str(out), '--shape', '32', '32', '--dynamic'])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and str(out) in lines[0], err
    assert 'No space left' in lines[0] and '[Errno' not in lines[0]
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------
# Bad input: one line, exit 2, no .onnx.
# --------------------------------------------------------------------------
def run_in_process(capsys, *args):
    """Run the tool's main() here (no interpreter start-up); returns (exit code, stderr lines)."""
    return run_main(capsys, export_tool.main, *args)


def assert_error(code, lines, *needles):
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_arch_from_the_command_line(tmp_path):
    res = run_tool(TOOL, 'mlla_x', '--out', tmp_path / 'm.onnx')
    assert_tool_error(res, "unknown model 'mlla_x'", 'mlla_t')
    assert leftovers(tmp_path) == []


def test_missing_config(tmp_path, capsys):
    code, lines = run_in_process(capsys, tmp_path / 'nope.py', '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, 'config file not found', 'nope.py')
    assert leftovers(tmp_path) == []


def test_weights_of_another_arch(tmp_path, capsys):
    from mlla_mm.models import MLLA
    ckpt = tmp_path / 'tiny.pth'
    torch.save({'state_dict': MLLA(TINY_ARCH).state_dict()}, ckpt)
    code, lines = run_in_process(capsys, 'mlla_t', ckpt, '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, str(ckpt), 'wrong shape')
    assert leftovers(tmp_path) == []


def test_segmentor_weights_of_another_config(tmp_path, capsys):
    """A checkpoint of the tiny UperNet with 7 classes does not fit the 5-class config."""
    from mlla_mm.deploy.onnx_export import build_target
    other = write_tiny_upernet(tmp_path, 'other.py', num_classes=7)
    seg = build_target(str(other), log=lambda m: None).model.segmentor
    assert seg.decode_head.conv_seg.out_channels == 7
    ckpt = tmp_path / 'other.pth'
    torch.save({'state_dict': seg.state_dict()}, ckpt)
    code, lines = run_in_process(capsys, write_tiny_upernet(tmp_path), ckpt, '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, str(ckpt), 'wrong shape')
    assert leftovers(tmp_path) == []


def test_missing_and_corrupt_weights(tmp_path, capsys):
    code, lines = run_in_process(capsys, 'mlla_t', tmp_path / 'absent.pth', '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, 'absent.pth')
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'PK\x03\x04 not a checkpoint')
    code, lines = run_in_process(capsys, 'mlla_t', bad, '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, 'bad.pth')
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize('kind', ['parent_is_a_file', 'out_is_a_directory'])
def test_unwritable_output_path(tmp_path, capsys, kind):
    if kind == 'parent_is_a_file':
        (tmp_path / 'afile').write_text('x')
        out = tmp_path / 'afile' / 'm.onnx'
    else:
        out = tmp_path / 'adir'
        out.mkdir()
    code, lines = run_in_process(capsys, 'mlla_t', '--out', out)
    assert_error(code, lines, 'cannot write' if kind == 'parent_is_a_file' else 'is a directory', str(out))
    assert leftovers(tmp_path) == [] and not (tmp_path / 'adir' / 'm.onnx').exists()


def test_missing_onnx_says_what_to_install(tmp_path):
    """Without the onnx package the tool names what to install (exit 2, nothing written)."""
    code = ("import sys, runpy\n"
            "sys.modules['onnx'] = None\n"
            f"sys.argv = ['export_onnx.py', 'mlla_t', '--out', {str(tmp_path / 'm.onnx')!r}]\n"
            f"runpy.run_path({str(TOOL)!r}, run_name='__main__')\n")
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=tool_env(), capture_output=True, text=True,
                         timeout=300)
    assert_tool_error(res, 'needs onnx', 'pip install onnx')
    assert leftovers(tmp_path) == []


def test_deploy_extra_pins_the_versions_of_setup_env():
    """setup.cfg's ``deploy`` extra installs exactly what tools/setup_env.sh tests, and the hint names it."""
    import configparser
    import re
    from mlla_mm.deploy.onnx_export import INSTALL_HINT
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    extra = {}
    for line in cfg['options.extras_require']['deploy'].split('\n'):
        if line.strip():
            name, _, version = line.strip().partition('==')
            assert version, f'{line!r} is not pinned with =='
            extra[name] = version
    script = (ROOT / 'tools' / 'setup_env.sh').read_text()
    assert set(extra) == {'onnx', 'onnxruntime'}  # the TorchScript exporter needs no onnxscript (tested)
    pinned = {name: re.search(rf'^{name.upper()}_VERSION=(\S+)$', script, re.M).group(1) for name in extra}
    assert extra == pinned
    assert "'.[deploy]'" in INSTALL_HINT and all(name in INSTALL_HINT for name in extra)


@pytest.mark.parametrize('formulation', ['plain', 'onnx'])
def test_tool_formulation_option(tmp_path, formulation):
    """--formulation picks the traced graph (recorded in the metadata); both pass the check."""
    import onnx
    cfg = write_tiny_upernet(tmp_path)
    out = tmp_path / 'backbone.onnx'
    res = run_tool(TOOL, cfg, '--backbone-only', '--out', out, '--shape', '32', '32', '--dynamic', '--check',
                   '--formulation', formulation, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f'{formulation} graph' in res.stdout and 'check: all 12 PASS' in res.stdout
    model = onnx.load(str(out))
    assert {p.key: p.value for p in model.metadata_props}['mlla_mm_formulation'] == formulation
    splits = sum(n.op_type == 'Split' for n in model.graph.node)
    assert (splits == 0) == (formulation == 'onnx')  # the plain graph splits the RoPE pairs


def test_bad_configs_and_shapes_are_one_line(tmp_path, capsys):
    broken = tmp_path / 'broken.py'
    broken.write_text('model = dict(type=\n')
    code, lines = run_in_process(capsys, broken, '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, f'{broken}: cannot read the config')
    no_model = tmp_path / 'no_model.py'
    no_model.write_text('train_cfg = dict(max_iters=1)\n')
    code, lines = run_in_process(capsys, no_model, '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, f'{no_model}: the config has no model')
    unknown = tmp_path / 'unknown_type.py'
    unknown.write_text("default_scope = 'mmseg'\nmodel = dict(type='NoSuchSegmentor')\n")
    code, lines = run_in_process(capsys, unknown, '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, f'{unknown}: the model does not build', 'NoSuchSegmentor')
    code, lines = run_in_process(capsys, 'mlla_t', '--out', tmp_path / 'm.onnx', '--shape', '0', '64')
    assert_error(code, lines, '--shape must be positive, got 0 64')
    assert leftovers(tmp_path) == []


def test_backbone_only_weights_for_a_segmentor_say_so_and_export(tmp_path, capsys):
    """ImageNet backbone weights for a whole UperNet: the backbone gets them, the tool says the heads do not."""
    from mlla_mm.deploy.onnx_export import make_session
    from mlla_mm.models import MLLA
    cfg = write_tiny_upernet(tmp_path)
    torch.manual_seed(7)
    backbone = MLLA(TINY_ARCH)
    ckpt = tmp_path / 'backbone.pth'
    torch.save({'state_dict': backbone.state_dict()}, ckpt)
    out = tmp_path / 'seg.onnx'
    assert export_tool.main([str(cfg), str(ckpt), '--out', str(out), '--shape', '32', '32']) == 0
    printed = capsys.readouterr()
    assert f'{ckpt} holds backbone weights only: the neck and heads keep their random initialisation' in \
        printed.out + printed.err
    # The exported backbone computes with the saved weights: an MLP layer's matrix is in the file as saved.
    import onnx
    fc1 = backbone.state_dict()['layers.0.blocks.0.mlp.fc1.weight'].numpy()
    inits = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer]
    assert any(a.shape == fc1.T.shape and np.array_equal(a, fc1.T) for a in inits)
    assert make_session(str(out)).run(None, {'img': np.zeros((1, 3, 32, 32), np.float32)})[0].shape[1] == NUM_CLASSES


@pytest.fixture
def no_export(monkeypatch):
    """Make building a model fail loudly: argument checks must come before any work."""
    from mlla_mm.deploy import onnx_export

    def refuse(*args, **kwargs):
        raise AssertionError('a model was built although an argument is invalid')

    monkeypatch.setattr(onnx_export, 'build_target', refuse)


@pytest.mark.parametrize('value', ['0', '12', '21', '99', 'x'])
def test_opset_outside_the_supported_range_is_one_line_up_front(tmp_path, capsys, no_export, value):
    from mlla_mm.deploy.onnx_export import MAX_OPSET, MIN_OPSET
    value = {'12': str(MIN_OPSET - 1), '21': str(MAX_OPSET + 1)}.get(value, value)
    code, lines = run_in_process(capsys, 'mlla_t', '--out', tmp_path / 'm.onnx', '--shape', '32', '32',
                                 '--opset', value)
    assert_error(code, lines, '--opset', f'expected an ONNX opset from {MIN_OPSET} to {MAX_OPSET}', repr(value))
    assert leftovers(tmp_path) == []


def test_help_states_the_opset_range(capsys):
    from mlla_mm.deploy.onnx_export import MAX_OPSET, MIN_OPSET
    with pytest.raises(SystemExit) as stop:
        export_tool.main(['--help'])
    assert stop.value.code == 0
    assert f'ONNX opset, {MIN_OPSET} to {MAX_OPSET}' in ' '.join(capsys.readouterr().out.split())


@pytest.mark.parametrize('args, needles', [
    (['--threads', '-1'], ['--threads', "expected a positive integer, got '-1'"]),
    (['--threads', '0'], ['--threads', "expected a positive integer, got '0'"]),
    (['--shape', '32'], ['--shape']),
    (['--bogus'], ['unrecognized arguments: --bogus']),
    (['--formulation', 'fast'], ['--formulation', "'fast'"]),
])
def test_argument_errors_are_one_line(tmp_path, capsys, no_export, args, needles):
    code, lines = run_in_process(capsys, 'mlla_t', '--out', tmp_path / 'm.onnx', '--shape', '32', '32', *args)
    assert_error(code, lines, *needles)
    assert leftovers(tmp_path) == []


def test_unwritable_output_is_refused_before_the_export(tmp_path, capsys, no_export):
    (tmp_path / 'afile').write_text('x')
    code, lines = run_in_process(capsys, 'mlla_t', '--out', tmp_path / 'afile' / 'm.onnx')
    assert_error(code, lines, f'--out {tmp_path / "afile" / "m.onnx"}: cannot write there',
                 f'{tmp_path / "afile"} is a file, not a directory')


def test_config_whose_model_is_a_backbone(tmp_path, capsys):
    """``model = dict(type='mlla_mm.MLLA', ...)`` with --backbone-only exports that backbone (feat0..feat3)."""
    import onnx
    from tests.helpers import BARE_BACKBONE
    cfg = tmp_path / 'bare.py'
    cfg.write_text(BARE_BACKBONE)
    out = tmp_path / 'bare.onnx'
    code = export_tool.main([str(cfg), '--out', str(out), '--shape', '32', '32', '--backbone-only'])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [o.name for o in onnx.load(str(out)).graph.output] == ['feat0', 'feat1', 'feat2', 'feat3']
    neck = tmp_path / 'neck.py'
    neck.write_text("default_scope = 'mmdet'\n"
                    "model = dict(type='mmdet.FPN', in_channels=[16, 32], out_channels=8, num_outs=2)\n")
    code, lines = run_in_process(capsys, neck, '--out', tmp_path / 'neck.onnx', '--backbone-only')
    assert_error(code, lines, f'{neck}: --backbone-only: the model (FPN) has no backbone')
    assert leftovers(tmp_path) == ['bare.onnx']


# --------------------------------------------------------------------------
# The whole detector (issue 28).
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_tool_exports_and_checks_a_whole_detector(tmp_path):
    import onnxruntime as ort
    from tests.helpers import write_tiny_detector
    out = tmp_path / 'det.onnx'
    res = run_tool(TOOL, write_tiny_detector(tmp_path), '--out', out, '--shape', '64', '96', '--dynamic', '--check',
                   timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [ln for ln in res.stdout.splitlines() if 'max|diff|' in ln]
    assert len(rows) == 12 and all('PASS' in ln for ln in rows), res.stdout
    assert 'inputs img (batch, 3, H, W), img_shape (batch, 2), outputs boxes, scores, labels, masks' in res.stdout
    sess = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    boxes, scores, labels, masks = sess.run(None, {'img': np.random.rand(1, 3, 71, 39).astype(np.float32),
                                                   'img_shape': np.array([[71, 39]])})
    assert boxes.shape[:2] == scores.shape == labels.shape == masks.shape[:2] and masks.shape[2:] == (28, 28)


def test_detector_options_bad_input(tmp_path, capsys):
    from tests.helpers import write_tiny_detector
    det = write_tiny_detector(tmp_path)
    code, lines = run_in_process(capsys, det, '--out', tmp_path / 'm.onnx', '--opset', '15')
    assert_error(code, lines, 'opset 16')
    code, lines = run_in_process(capsys, 'mlla_t', '--features', '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, '--features', 'mlla_t')
    code, lines = run_in_process(capsys, write_tiny_upernet(tmp_path), '--features', '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, '--features', 'EncoderDecoder')
    code, lines = run_in_process(capsys, det, '--features', '--backbone-only', '--out', tmp_path / 'm.onnx')
    assert_error(code, lines, '--features', '--backbone-only')
    assert leftovers(tmp_path) == []
