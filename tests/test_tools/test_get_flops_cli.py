"""tools/get_flops.py: params and MACs of a backbone or a config; bad input is one error line (from the former
tests/test_tools/test_benchmark_tools.py)."""
import json

import pytest

from tests.helpers import ROOT, assert_one_error_line, exit_code, load_tool

get_flops = load_tool('get_flops')


def never(*args, **kwargs):
    raise AssertionError('measured although the arguments are bad')


def test_get_flops_backbone_matches_spec():
    res = get_flops.measure('mlla_t', (224, 224))
    assert res['backbone_params'] == 23_880_096
    assert res['backbone_macs'] / 1e9 == pytest.approx(4.13, rel=0.005)
    assert res['backbone_flops'] == 2 * res['backbone_macs']
    assert sum(res['backbone_by_op'].values()) == res['backbone_macs']
    assert res['backbone_by_op']['bmm'] > 0  # the linear-attention products are counted
    assert get_flops.kind_and_arch('configs/detection/mask_rcnn_mlla_s.py') == ('mask_rcnn', 's')
    assert get_flops.kind_and_arch('configs/segmentation/upernet_mlla_b.py') == ('upernet', 'b')


@pytest.mark.slow
def test_get_flops_on_a_config(tmp_path, capsys):
    cfg = ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t.py'  # the repo's own: missing is a failure
    assert cfg.is_file(), cfg
    out = tmp_path / 'f.json'
    assert get_flops.main([str(cfg), '--shape', '128', '160', '--json', str(out), '--threads', '1']) == 0
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res['kind'] == 'mask_rcnn' and res['arch'] == 't' and res['published_gmacs'] == 255.
    assert res['params'] > res['backbone_params'] == 23_880_096
    assert res['macs'] > res['backbone_macs'] > 0
    assert 'GMACs' in stdout


@pytest.fixture
def file_in_the_way(tmp_path):
    """A regular file: a path under it cannot be written."""
    path = tmp_path / 'plain'
    path.write_text('x')
    return path


@pytest.mark.parametrize('argv, name', [
    (['mlla_t', '--threads', '0'], '--threads'),
    (['mlla_t', '--threads', '-2'], '--threads'),
    (['mlla_t', '--shape', '0', '32'], '--shape'),
    (['mlla_t', '--shape', '32', 'x'], '--shape'),
])
def test_get_flops_bad_arguments_are_one_error_line(argv, name, capsys, monkeypatch):
    monkeypatch.setattr(get_flops, 'measure', never)
    assert exit_code(get_flops.main, argv) == 2
    assert_one_error_line(capsys, name)


def test_get_flops_bad_config_or_backbone_name_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(get_flops, 'count_flops', never)
    broken = tmp_path / 'broken_cfg.py'
    broken.write_text('model = dict(\n')
    for target, expected in ((tmp_path / 'nonexist.py', 'neither a config file nor a backbone name'),
                             ('mlla_x', 'mlla_t, mlla_s, mlla_b'),
                             (broken, 'SyntaxError'),
                             (tmp_path, 'is a directory')):
        assert exit_code(get_flops.main, [target]) == 2
        assert expected in assert_one_error_line(capsys, target)


def test_get_flops_json_that_cannot_be_written_fails_before_measuring(tmp_path, file_in_the_way, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(get_flops, 'measure', never)
    for out in (file_in_the_way / 'x.json', tmp_path):
        assert exit_code(get_flops.main, ['mlla_t', '--shape', '32', '32', '--json', out]) == 2
        assert_one_error_line(capsys, '--json', out)
    assert not (file_in_the_way / 'x.json').exists()


def test_get_flops_json_is_whole_or_absent(tmp_path, monkeypatch, capsys):
    """--json goes through atomic_write: numbers that cannot be written leave no half-written file."""
    monkeypatch.setattr(get_flops, 'report', lambda res: 'report')
    monkeypatch.setattr(get_flops, 'measure', lambda target, shape: dict(target=target, bad=object()))
    out = tmp_path / 'f.json'
    with pytest.raises(TypeError):
        get_flops.main(['mlla_t', '--json', str(out)])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(get_flops, 'measure', lambda target, shape: dict(target=target, macs=1))
    assert get_flops.main(['mlla_t', '--json', str(out)]) == 0
    assert json.loads(out.read_text()) == dict(written_by='mlla-mm get_flops', target='mlla_t', macs=1)
    assert [p.name for p in tmp_path.iterdir()] == ['f.json']
