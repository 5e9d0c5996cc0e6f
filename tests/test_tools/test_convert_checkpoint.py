"""tools/convert_checkpoint.py on every published layout."""
import hashlib
import subprocess
import sys

import torch

from tests.helpers import ROOT

TOOL = str(ROOT / 'tools' / 'convert_checkpoint.py')


def convert(src, dst, *extra):
    return subprocess.run([sys.executable, TOOL, str(src), str(dst), *extra], capture_output=True, text=True,
                          timeout=120)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_imagenet_layout_twice_gives_the_same_file(tmp_path, golden_dir):
    once, twice = tmp_path / 'once.pth', tmp_path / 'twice.pth'
    res = convert(golden_dir / 'mlla_small_official_cls.pth', once)
    assert res.returncode == 0, res.stderr
    assert 'layout backbone (from imagenet)' in res.stdout
    res = convert(once, twice)
    assert res.returncode == 0, res.stderr
    a, b = torch.load(once, weights_only=True), torch.load(twice, weights_only=True)
    assert a['meta'] == b['meta']
    assert list(a['state_dict']) == list(b['state_dict'])
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
    assert sha(once) == sha(twice)
    assert not any('rope' in k or k.startswith(('head.', 'norm.')) for k in a['state_dict'])
    src = torch.load(golden_dir / 'mlla_small_official_cls.pth', weights_only=True)['model']
    assert torch.equal(a['state_dict']['layers.1.blocks.0.attn.qk.weight'], src['layers.1.blocks.0.attn.qk.weight'])


def test_detector_layout_keeps_prefixes_or_extracts_backbone(tmp_path, golden_dir):
    src = golden_dir / 'mlla_small_official_det.pth'
    res = convert(src, tmp_path / 'full.pth')
    assert res.returncode == 0, res.stderr
    full = torch.load(tmp_path / 'full.pth', weights_only=True)['state_dict']
    assert all(k.startswith('backbone.') for k in full) and 'backbone.norm0.weight' in full
    assert not any('rope' in k for k in full)
    res = convert(src, tmp_path / 'bb.pth', '--backbone-only')
    assert res.returncode == 0, res.stderr
    bb = torch.load(tmp_path / 'bb.pth', weights_only=True)
    assert 'norm0.weight' in bb['state_dict'] and bb['meta']['mlla_mm_layout'] == 'backbone'
    res = convert(tmp_path / 'bb.pth', tmp_path / 'bb2.pth', '--backbone-only')
    assert sha(tmp_path / 'bb.pth') == sha(tmp_path / 'bb2.pth')


def test_bad_source_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / 'broken.pth').write_bytes(b'\x00' * 10)
    for src in [tmp_path / 'broken.pth', tmp_path / 'missing.pth']:
        res = convert(src, tmp_path / 'out.pth')
        assert res.returncode == 2
        assert src.name in res.stderr and 'Traceback' not in res.stderr
        assert not (tmp_path / 'out.pth').exists()
    assert [p.name for p in tmp_path.iterdir()] == ['broken.pth']


# A full disk, simulated with a file-size limit (writes past it fail with EFBIG).
FULL_DISK = ('import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
             'resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv = sys.argv[1:]; '
             'runpy.run_path(sys.argv[0], run_name="__main__")')


def test_full_disk_is_one_line_naming_the_file(tmp_path, golden_dir):
    dst = tmp_path / 'out.pth'
    dst.write_bytes(b'previous version')
    res = subprocess.run([sys.executable, '-c', FULL_DISK.format(limit=64 << 10), TOOL,
                          str(golden_dir / 'mlla_small_official_cls.pth'), str(dst), '--force'],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and str(dst) in errors[0] and 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert 'File too large' in errors[0] and 'unchanged' in errors[0]  # the OS's reason, not torch's
    assert dst.read_bytes() == b'previous version'
    assert [p.name for p in tmp_path.iterdir()] == ['out.pth']  # no temporary file left


def test_refused_source_is_one_line_and_writes_nothing(tmp_path):
    from tests.test_reliability.evil_pickles import call, glob, pickle_of, s, torch_archive
    marker = tmp_path / 'marker'
    src = tmp_path / 'evil.pth'
    src.write_bytes(torch_archive(pickle_of(call(glob('os', 'system'), s(f'touch {marker}')))))
    res = convert(src, tmp_path / 'out.pth')
    assert res.returncode == 2 and not marker.exists()
    errors = [line for line in res.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and str(src) in errors[0] and 'os.system' in errors[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['evil.pth']


# --------------------------------------------------------------------------
# Bad arguments and paths: one line, exit 2, nothing written (in-process: no interpreter start-up).
# --------------------------------------------------------------------------
def convert_here(capsys, *args):
    """(exit code, non-empty stderr lines) of the tool's main() run in this process."""
    from tests.helpers import load_tool
    try:
        code = load_tool('convert_checkpoint').main([str(a) for a in args])
    except SystemExit as stop:  # argument errors
        code = stop.code
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def test_directory_as_source_says_so(tmp_path, capsys):
    (tmp_path / 'ckpts').mkdir()
    code, lines = convert_here(capsys, tmp_path / 'ckpts', tmp_path / 'out.pth')
    assert code == 2 and lines == [f'error: {tmp_path / "ckpts"} is a directory, not a checkpoint file']
    assert [p.name for p in tmp_path.iterdir()] == ['ckpts']


def test_unwritable_destination_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    import mlla_mm.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError('the source was read although the destination cannot be written')

    monkeypatch.setattr(mlla_mm.checkpoint, 'convert_file', refuse)
    src = tmp_path / 'src.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}}, src)
    (tmp_path / 'afile').write_text('x')
    for dst, reason in [(tmp_path / 'afile' / 'out.pth', f'{tmp_path / "afile"} is a file, not a directory'),
                        (tmp_path, f'{tmp_path} is a directory')]:
        code, lines = convert_here(capsys, src, dst)
        assert code == 2 and lines == [f'error: cannot write {dst}: {reason}'], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile', 'src.pth']


def test_argument_errors_are_one_line(tmp_path, capsys):
    for args, needle in [(['--bogus', 'a', 'b'], 'unrecognized arguments: --bogus'),
                         (['only_src.pth'], 'the following arguments are required: dst')]:
        code, lines = convert_here(capsys, *args)
        assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], lines
    assert list(tmp_path.iterdir()) == []
