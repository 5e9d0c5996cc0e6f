"""Crafted checkpoints against every loader: no code runs, no state changes, memory stays bounded.

The corpus (``evil_pickles.py``) has calls of foreign callables (REDUCE,
INST, OBJ, NEWOBJ, NEWOBJ_EX, STACK_GLOBAL, EXT1/2/4), BUILD on allow-listed
classes and functions, the reported getattr chain (HistoryBuffer's
``__getattribute__`` -> ``__globals__`` -> ``eval``), allocation bombs,
out-of-range storages, zip bombs, legacy files and real checkpoints with a
malicious prefix. In-process loaders (``load_file``, ``MLLA`` ``init_cfg``,
mmengine's ``_load_checkpoint``, the path of ``load_from``/``--resume``) run
over the whole corpus in one subprocess with a 3 GiB address-space limit
(a regression fails the test instead of exhausting the machine); real
checkpoints of every layout must still load afterwards in that process. The
tools run as subprocesses on a representative subset.
"""
import json
import subprocess

import pytest
import torch

from tests.helpers import PY, ROOT, run_tool, tool_env, write_tiny_config
from tests.test_reliability import evil_pickles as ep

CODE, MEMORY, FORMAT = list(ep.CODE), list(ep.MEMORY), list(ep.FORMAT)
ALL = CODE + MEMORY + FORMAT
LOADERS = ('load_file', 'init_cfg', 'mmengine')


@pytest.fixture(scope='module')
def real(tmp_path_factory, golden_dir):
    """Real checkpoints: golden det/cls, an mmengine resume checkpoint, an ImageNet training checkpoint."""
    return ep.write_real(tmp_path_factory.mktemp('real'), golden_dir)


@pytest.fixture(scope='module')
def evil(tmp_path_factory, real):
    folder = tmp_path_factory.mktemp('evil')
    marker = folder.parent / f'{folder.name}-marker'
    files = ep.write_corpus(folder / 'corpus', marker, real['mmengine_resume'])
    assert sorted(files) == sorted(ALL)
    return files, marker


@pytest.fixture(scope='module')
def harness(evil, real):
    """Every in-process loader over the whole corpus, in one subprocess with a memory limit."""
    files, marker = evil
    real_dir = real['mmengine_resume'].parent
    for path in real.values():  # the golden files too, in the same folder as the others
        if path.parent != real_dir:
            (real_dir / path.name).write_bytes(path.read_bytes())
    done = subprocess.run([PY, '-m', 'tests.test_reliability.evil_pickles', str(files['ext1'].parent),
                           str(marker), str(real_dir)], cwd=ROOT, env=tool_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize('name', ALL)
def test_every_in_process_loader_refuses_it(name, harness, evil):
    row = harness['results'][name]
    path = str(evil[0][name])
    for loader in LOADERS:
        assert 'error' in row[loader], (loader, row[loader])
        assert path in row[loader]['error'], (loader, row[loader])
        assert 'Traceback' not in row[loader]['error'] and '\n' not in row[loader]['error']
    assert row['marker'] is False, 'code from the file ran'
    assert row['changed'] == [], f'the file changed {row["changed"]}'
    if name in ep.UNSCANNED:  # refused for what it names or calls: the message offers the opt-in
        assert 'MLLA_MM_TRUST_CHECKPOINTS' in row['load_file']['error']


@pytest.mark.slow
@pytest.mark.parametrize('name', ep.UNSCANNED)
def test_torch_and_the_stand_ins_alone_refuse_the_code_payloads(name, harness, evil):
    """Defence in depth: with mlla-mm's scan switched off, the code payloads still run nothing.

    All are refused, except that NumPy silently ignores ``__setstate__`` on
    its global float64 dtype (which stays unchanged).
    """
    row = harness['unscanned'][name]
    assert row['marker'] is False and row['changed'] == [], row
    if name != 'build_numpy_global_dtype':
        assert 'error' in row and str(evil[0][name]) in row['error'], row


@pytest.mark.slow
def test_the_payloads_are_live(harness):
    """Read as trusted files (plain pickle), the code payloads do run: the refusals above matter."""
    assert harness['live'] == {name: True for name in ep.LIVE}


@pytest.mark.slow
def test_the_memory_limit_bites_without_the_checks(harness):
    """Under the same limit, torch's own weights_only load of the bombs runs out of memory."""
    for name, outcome in harness['unguarded'].items():
        assert outcome in ('MemoryError', 'RuntimeError'), (name, outcome)


@pytest.mark.slow
def test_real_checkpoints_still_load_in_the_same_process(harness):
    real = harness['real']
    assert real['mmengine_resume'] == ['message_hub', 'meta', 'np_array', 'optimizer', 'param_schedulers',
                                       'rng_state', 'state_dict']
    assert real['imagenet_training'] == ['config', 'epoch', 'lr_scheduler', 'max_accuracy', 'model', 'optimizer',
                                         'state_dict_ema']
    assert real['mlla_small_official_det'] == ['meta', 'state_dict']
    assert 'model' in real['mlla_small_official_cls']


# --------------------------------------------------------------------------
# The same in this process (no memory bombs here): state really is unchanged.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['getattr_chain', 'build_rebuild_defaults', 'build_history_buffer_statistics',
                                  'build_history_buffer_class', 'build_numpy_global_dtype',
                                  'prefix_pickle_getattr_chain'])
def test_refused_here_and_nothing_changed(name, evil, real):
    from mlla_mm.checkpoint import CheckpointError, load_file
    files, marker = evil
    before = ep.state_snapshot()
    with pytest.raises(CheckpointError) as err:
        load_file(files[name])
    assert str(files[name]) in str(err.value)
    assert not marker.exists()
    assert ep.state_snapshot() == before
    ckpt = load_file(real['mmengine_resume'])
    hb = ckpt['message_hub']['log_scalars']['train/loss']
    assert hb.mean() == pytest.approx((1.5 + 1.4 + 1.3) / 3) and hb.statistics('current') == pytest.approx(1.3)


def test_real_layouts_load_with_their_stand_ins(real, tmp_path):
    from collections import OrderedDict

    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    from mlla_mm.checkpoint import load_file
    before = dict(HistoryBuffer._statistics_methods)
    mm = load_file(real['mmengine_resume'])
    hb = mm['message_hub']['log_scalars']['train/loss']
    assert type(hb) is HistoryBuffer and list(hb.data[0]) == pytest.approx([1.5, 1.4, 1.3])
    assert dict(HistoryBuffer._statistics_methods) == before
    assert mm['meta']['seed'] == 42 and isinstance(mm['meta']['seed'], np.int64)
    assert mm['np_array'].dtype == np.float32 and mm['np_array'].shape == (2, 3)
    assert isinstance(mm['rng_state']['numpy'][1], np.ndarray)
    assert torch.is_tensor(mm['optimizer']['state'][0]['exp_avg'])
    # It pickles as mmengine's own class again (a resumed run saves it), and reads back.
    again = tmp_path / 'again.pth'
    torch.save(mm, again)
    assert b'LoadedHistoryBuffer' not in again.read_bytes()
    assert load_file(again)['message_hub']['log_scalars']['train/loss'].current() == pytest.approx(1.3)
    imagenet = load_file(real['imagenet_training'])
    assert type(imagenet['config']) is OrderedDict and imagenet['config']['MODEL']['TYPE'] == 'mlla'
    assert imagenet['config']['TRAIN']['EPOCHS'] == 300


def test_history_buffer_stand_in_refuses_foreign_state():
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    from mlla_mm.checkpoint_guard import history_buffer_class, history_buffer_statistic
    cls = history_buffer_class()
    registry = dict(HistoryBuffer._statistics_methods)
    buf = cls.__new__(cls)
    good = {'max_length': 10, '_log_history': np.ones(2), '_count_history': np.ones(2),
            'statistics_methods': {'mean': 'mean', 'min': 'min'}}
    buf.__setstate__(good)
    assert type(buf) is HistoryBuffer and buf.current() == 1.0 and buf.statistics('mean') == 1.0
    assert 'statistics_methods' not in vars(buf)
    for bad in [dict(good, _statistics_methods={}), dict(good, __class__=dict), {k: good[k] for k in list(good)[:2]},
                dict(good, statistics_methods={'__getattribute__': '__getattribute__'}),
                dict(good, statistics_methods={'mean': print}), dict(good, max_length=-1),
                dict(good, _log_history=np.ones((2, 2)))]:
        with pytest.raises(ValueError):
            cls.__new__(cls).__setstate__(bad)
    assert dict(HistoryBuffer._statistics_methods) == registry
    # The name builtins.getattr resolves to this while a file is read: only HistoryBuffer's four statistics.
    assert history_buffer_statistic(cls, 'mean') == 'mean'
    for args in [(cls, '__getattribute__'), (HistoryBuffer, 'mean'), (torch._utils, '_rebuild_tensor_v2')]:
        with pytest.raises(__import__('pickle').UnpicklingError):
            history_buffer_statistic(*args)


# --------------------------------------------------------------------------
# The tools, as subprocesses, on a representative subset.
# --------------------------------------------------------------------------
LIMITED = ('import resource, runpy, sys; import mlla_mm.checkpoint; '
           'vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:")][0]; '
           'resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), vm + (3 << 30))); '
           'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')


def assert_one_error_line(done, path, marker):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert not marker.exists(), 'code from the checkpoint ran'
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('error:')]
    assert len(errors) == 1 and str(path) in errors[0], done.stderr[-3000:]
    assert 'Traceback' not in done.stderr and 'MemoryError' not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize('name', ['getattr_chain', 'prefix_pickle_os_system', 'ext1', 'bytearray_huge',
                                  'zip_bomb_declared', 'storage_out_of_range', 'legacy_format'])
def test_convert_tool_refuses(name, evil, tmp_path):
    files, marker = evil
    out = tmp_path / 'out.pth'
    done = run_tool('-c', LIMITED, 'tools/convert_checkpoint.py', files[name], out)
    assert_one_error_line(done, files[name], marker)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize('name', ['getattr_chain', 'prefix_pickle_bytearray'])
def test_test_tool_refuses(name, evil, tmp_path, tiny_data):
    files, marker = evil
    config = write_tiny_config(tmp_path, tiny_data, epochs=1)
    done = run_tool('tools/test.py', config, files[name], '--work-dir', tmp_path / 'work')
    assert_one_error_line(done, files[name], marker)



def test_real_checkpoints_fit_the_per_byte_budget_alone(real, tmp_path, monkeypatch):
    """The object budget's per-byte part alone (no 64 MiB base) covers real checkpoints, with room to spare."""
    from mlla_mm import checkpoint_guard as guard
    many = {f'backbone.layers.{i}.blocks.{j}.w': torch.zeros(2, 2) for i in range(20) for j in range(50)}
    opt = {'state': {k: {'step': torch.tensor(1.0), 'exp_avg': torch.zeros(2, 2)} for k in range(1000)},
           'param_groups': [{'params': list(range(1000)), 'lr': 0.1, 'betas': (0.9, 0.999)}]}
    torch.save({'state_dict': many, 'optimizer': opt}, tmp_path / 'many.pth')
    monkeypatch.setattr(guard, 'OBJECT_BUDGET_BASE', 0)
    monkeypatch.setattr(guard, 'OBJECT_BUDGET_PER_BYTE', guard.OBJECT_BUDGET_PER_BYTE // 2)
    for path in [*real.values(), tmp_path / 'many.pth']:
        with open(path, 'rb') as f:
            guard.scan_pickle(guard.inspect_archive(f))
