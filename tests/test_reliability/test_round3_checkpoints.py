"""Issue 26, round 3: what a checkpoint may hold besides code, each item refused with one line, before use.

- item 5: a whole-model checkpoint (tools/test.py, ``--resume``) whose weights are strings is refused, not
  evaluated with a random backbone;
- item 10: shared and cyclic containers (a tree-size bound, cycles refused);
- item 11: dict keys (and set items) that all hash alike (quadratic to build) are refused, real int keys are not;
- item 14: malformed resume fields (``rng_state``, ``meta``, ``state_dict._metadata``) are one line naming the field;
- item 15: safetensors dtypes and shapes torch cannot hold, ``complex(2**1050, 0)``;
- item 18: timm's ``hf_hub_id`` / ``url`` / ``source`` weights are refused; nothing is downloaded;
- minor: a zip local header's own name/extra lengths, ``/dev/zero`` and FIFOs.

The crafted files are in ``evil_pickles.round3_corpus`` (also run through every loader, under a memory
limit, by ``test_malicious_checkpoints.py``).
"""
import os
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.config import Config

from mlla_mm.checkpoint import CheckpointError, check_checkpoint_fits, load_file
from tests.helpers import load_tool
from tests.test_reliability import evil_pickles as ep



def one_line(err) -> str:
    text = str(err)
    assert '\n' not in text and 'Traceback' not in text, text
    return text


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp('round3')
    paths = {}
    for name, data in ep.round3_corpus().items():
        paths[name] = folder / f'{name}.pth'
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize('name', ep.ROUND3)
def test_every_round3_file_is_one_checkpoint_error(corpus, name):
    """Each crafted file: one CheckpointError naming it, from load_file (the loader behind every path)."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_file(corpus[name])
    assert str(corpus[name]) in one_line(err.value)
    assert time.perf_counter() - start < 5  # refused by the scan, not after a quadratic or exponential load


# --------------------------------------------------------------------------
# Item 10: shared and cyclic containers.
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name, reason', [('cyclic_list', 'contains itself'), ('cyclic_dict', 'contains itself'),
                                          ('shared_halves', 'walked as a tree')])
def test_cycles_and_exponential_sharing_are_refused(corpus, name, reason):
    """A self-containing list was a RecursionError later; 60 levels of shared halves (2**60 as a tree) hung
    torch's Optimizer.load_state_dict. Both loaded before (the scan only bounded the depth)."""
    with pytest.raises(CheckpointError, match=reason):
        load_file(corpus[name])


def test_real_sharing_and_optimizer_state_still_load(tmp_path):
    """Shared references a real checkpoint has (the same list twice, tied tensors) and an optimizer state load."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optim.step()
    classes = ['a', 'b', 'c']
    shared = {'classes': classes, 'palette': [(1, 2, 3)] * 3}
    ckpt = {'state_dict': model.state_dict(), 'optimizer': optim.state_dict(),
            'meta': {'dataset_meta': shared, 'copy': shared, 'again': [shared] * 50}}
    torch.save(ckpt, tmp_path / 'real.pth')
    loaded = load_file(tmp_path / 'real.pth')
    assert loaded['meta']['again'][49]['classes'] == classes
    other = torch.optim.AdamW(model.parameters())
    other.load_state_dict(loaded['optimizer'])
    assert torch.equal(other.state_dict()['state'][0]['exp_avg'], optim.state_dict()['state'][0]['exp_avg'])


def test_the_tree_bound_is_proportional_to_the_pickle(tmp_path):
    """Sharing is allowed up to the bound, refused beyond it: a list holding the previous one twice, 12 levels
    (8 k nodes as a tree) and 24 levels (33 M), both from under 1 kB."""
    from mlla_mm import checkpoint_guard as guard
    for levels, refused in ((12, False), (24, True)):
        path = tmp_path / f'halves_{levels}.pth'
        path.write_bytes(ep.torch_archive(ep.pickle_of(ep.shared_halves(levels))))
        with open(path, 'rb') as f:
            if refused:
                with pytest.raises(guard.Refused, match='walked as a tree'):
                    guard.check_file(f)
            else:
                guard.check_file(f)


# --------------------------------------------------------------------------
# Item 11: hash-colliding keys.
# --------------------------------------------------------------------------
def test_hash_colliding_keys_are_refused_fast(corpus):
    """20 000 int keys equal modulo 2**61-1 all hash to 0: building the dict took 2.3 s (40 000: 9.3 s, a
    5.6 MB file about 15 minutes); now refused by the scan."""
    assert {hash(k) for k in ep.colliding_ints(100)} == {0}
    start = time.perf_counter()
    for name in ('hash_colliding_keys', 'hash_colliding_set'):
        with pytest.raises(CheckpointError, match='distinct keys of one hash'):
            load_file(corpus[name])
    assert time.perf_counter() - start < 3


@pytest.mark.parametrize('name, reason', [('hash_colliding_unreachable', 'distinct keys of one hash'),
                                          ('shared_tuple_key_unreachable', 'too large to hash'),
                                          ('shared_tuple_set', 'walked as a tree'),
                                          ('deep_tuple_key', 'more than 100 deep'),
                                          ('cyclic_tensor_attribute', 'contains itself')])
def test_what_is_hashed_or_hidden_in_attributes_is_checked_too(corpus, name, reason):
    """The unpickler builds (and hashes) every dict and set, also those left off the result; hashing a tuple
    visits every element, shared ones once per use (2**60 for 60 levels of halves); tensor attributes are
    walked like the rest."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=reason):
        load_file(corpus[name])
    assert time.perf_counter() - start < 3


def test_real_int_keys_still_load_fast(tmp_path):
    """Optimizer states use int keys 0..N (mmengine, mmdet, torch); -1/-2 (one hash) and keys equal to ints of
    another type (a bool, a float) too: each keeps its value and its type."""
    n = 100_000
    odd = {-1: 'a', -2: 'b', True: 'c', 2.0: 'd', 3: 'e'}
    torch.save({'state': {k: None for k in range(n)}, 'odd': odd}, tmp_path / 'ints.pth')
    start = time.perf_counter()
    loaded = load_file(tmp_path / 'ints.pth')
    assert len(loaded['state']) == n and loaded['odd'] == odd
    assert [type(k) for k in loaded['odd']] == [int, int, bool, float, int]
    assert time.perf_counter() - start < 10  # about 1 s on a loaded 2-core EPYC


# --------------------------------------------------------------------------
# Item 15: numbers and safetensors torch cannot hold.
# --------------------------------------------------------------------------
def test_complex_overflow_is_refused_and_a_large_complex_still_loads(corpus, tmp_path):
    with pytest.raises(CheckpointError, match='do not fit a float'):
        load_file(corpus['complex_overflow'])
    torch.save({'z': complex(2.0 ** 1000, -1.5)}, tmp_path / 'z.pth')
    assert load_file(tmp_path / 'z.pth')['z'] == complex(2.0 ** 1000, -1.5)


@pytest.mark.parametrize('name, reason', [('safetensors_dtype_f4', "dtype 'F4'"),
                                          ('safetensors_dtype_f6_e2m3', "dtype 'F6_E2M3'"),
                                          ('safetensors_dtype_f8_e8m0', "dtype 'F8_E8M0'"),
                                          ('safetensors_shape_2_63', 'shape [9223372036854775808, 0]')])
def test_safetensors_torch_cannot_hold_name_the_tensor(corpus, name, reason):
    """KeyError / TypeError tracebacks before; now one line naming the tensor and what torch lacks."""
    with pytest.raises(CheckpointError) as err:
        load_file(corpus[name])
    assert reason in one_line(err.value) and "tensor 'w'" in str(err.value)


def test_a_real_safetensors_file_still_loads(tmp_path):
    from safetensors.torch import save_file
    weights = {'a': torch.arange(6.).reshape(2, 3), 'b': torch.zeros(0, 4), 'c': torch.ones(3, dtype=torch.int64)}
    save_file(weights, str(tmp_path / 'w.safetensors'))
    loaded = load_file(tmp_path / 'w.safetensors')
    assert sorted(loaded) == sorted(weights) and all(torch.equal(loaded[k], v) for k, v in weights.items())


# --------------------------------------------------------------------------
# Minor: zip local headers, devices and FIFOs.
# --------------------------------------------------------------------------
def test_a_local_header_that_moves_the_data_into_the_next_member_is_refused(corpus):
    """The span check used the directory's name length; a reader uses the local header's name and extra
    lengths, so the storage was read 8 bytes into the next member."""
    with pytest.raises(CheckpointError, match="'archive/data/0' overlaps the next member"):
        load_file(corpus['zip_local_header_extra'])


def test_devices_and_fifos_are_not_regular_files(tmp_path):
    fifo = tmp_path / 'fifo.pth'
    os.mkfifo(fifo)
    for path in ('/dev/zero', str(fifo)):
        with pytest.raises(CheckpointError, match='is not a regular file') as err:
            load_file(path)
        assert path in one_line(err.value)
    with pytest.raises(FileNotFoundError, match='not found'):
        load_file(tmp_path / 'nothing.pth')


# --------------------------------------------------------------------------
# Items 5 and 14: the whole-model check and the resume fields.
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def model_state(cfg_path, tmp_path_factory):
    """The tiny detector's state dict (built on the meta device would do, but real tensors are saved)."""
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(cfg_path)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_string_weights_are_refused_by_the_whole_model_check(model_state):
    """Values without a shape were skipped by the shape check: tools/test.py evaluated a random backbone."""
    model, full = model_state
    strings = OrderedDict((k, 'x' if k.startswith('backbone.') else v) for k, v in full.items())
    with pytest.raises(CheckpointError, match='are not tensors') as err:
        check_checkpoint_fits(model, strings, 'strings.pth', whole=True)
    assert 'backbone.' in one_line(err.value) and 'str, not a tensor' in str(err.value)
    with pytest.raises(CheckpointError, match='are not tensors'):  # also for load_from (fine-tuning)
        check_checkpoint_fits(model, strings, 'strings.pth')
    check_checkpoint_fits(model, full, 'full.pth', whole=True)


def test_tools_test_refuses_a_checkpoint_with_string_weights(cfg_path, model_state, tmp_path, capsys):
    _, full = model_state
    ckpt = tmp_path / 'strings.pth'
    torch.save({'state_dict': {k: 'x' if k.startswith('backbone.') else v for k, v in full.items()}, 'meta': {}},
               ckpt)
    rc = load_tool('test').main([str(cfg_path), str(ckpt), '--work-dir', str(tmp_path / 'work')])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert rc == 2 and len(lines) == 1 and str(ckpt) in lines[0] and 'not tensors' in lines[0], err[-2000:]
    assert 'Traceback' not in err


@pytest.mark.parametrize('metadata, ok', [({'': {'version': 1}, 'backbone': {}}, True), ([1, 2], False),
                                          ({'': 'x'}, False), ({'': {'version': 'two'}}, False)])
def test_state_dict_metadata_of_the_wrong_type_is_one_line(model_state, metadata, ok):
    model, full = model_state
    sd = OrderedDict(full)
    sd._metadata = metadata
    if ok:
        check_checkpoint_fits(model, sd, 'meta.pth', whole=True)
        return
    with pytest.raises(CheckpointError, match=r'state_dict\._metadata must be') as err:
        check_checkpoint_fits(model, sd, 'meta.pth', whole=True)
    one_line(err.value)


def _resume_checkpoint(full):
    from mlla_mm.engine.rng import get_random_state
    hub = {'log_scalars': {}, 'runtime_info': {}, 'resumed_keys': {}}
    return {'meta': {'epoch': 0, 'iter': 0, 'seed': 0}, 'state_dict': full, 'message_hub': hub,
            'rng_state': get_random_state(0)}


BAD_FIELDS = {
    'rng_state_not_a_dict': (lambda c: c.update(rng_state=[1, 2]), 'rng_state must be a dict'),
    'rng_state_seed_2_70': (lambda c: c['rng_state'].update(seed=2 ** 70), 'rng_state.seed must be an int'),
    'rng_state_torch_3_bytes': (lambda c: c['rng_state'].update(torch=torch.zeros(3, dtype=torch.uint8)),
                                'rng_state.torch must be a uint8 tensor'),
    'rng_state_python_str': (lambda c: c['rng_state'].update(python='abc'), 'rng_state.python'),
    'rng_state_numpy_wrong': (lambda c: c['rng_state'].update(numpy=('MT19937', np.zeros(3, np.uint32), 0, 0, 0.)),
                              'rng_state.numpy'),
    'meta_epoch_one': (lambda c: c['meta'].update(epoch='one'), 'meta.epoch must be an int'),
    'meta_iter_missing': (lambda c: c['meta'].pop('iter'), 'meta.iter must be an int'),
    'meta_seed_2_70': (lambda c: c['meta'].update(seed=2 ** 70), 'meta.seed must be an int'),
    'message_hub_list': (lambda c: c.update(message_hub=[]), 'message_hub must be a dict'),
}


@pytest.mark.parametrize('bad', sorted(BAD_FIELDS))
def test_malformed_resume_fields_name_the_field(model_state, bad):
    from mlla_mm.engine.hooks import check_resume_fields
    _, full = model_state
    ckpt = _resume_checkpoint(full)
    check_resume_fields(ckpt, 'good.pth')
    change, message = BAD_FIELDS[bad]
    change(ckpt)
    with pytest.raises(CheckpointError, match=message) as err:
        check_resume_fields(ckpt, 'bad.pth')
    assert one_line(err.value).startswith('bad.pth: ')


def test_set_random_state_checks_before_it_changes_anything():
    from mlla_mm.engine.rng import RandomStateError, get_random_state, set_random_state
    before = get_random_state()
    bad = dict(before, torch=torch.zeros(3, dtype=torch.uint8))
    np.random.seed(123)  # would be restored by the python/numpy parts of a half-applied state
    drawn = np.random.get_state()[1][:4].copy()
    with pytest.raises(RandomStateError, match='rng_state.torch'):
        set_random_state(bad)
    assert (np.random.get_state()[1][:4] == drawn).all()


@pytest.mark.parametrize('bad', ['meta_epoch_one', 'rng_state_seed_2_70', 'rng_state_torch_3_bytes'])
def test_resume_with_a_malformed_field_is_one_error_line(cfg_path, model_state, tmp_path, capsys, bad):
    """tools/train.py --resume: one `error:` line naming the field, exit 2 (tracebacks from engine/rng.py and
    the hooks before)."""
    _, full = model_state
    ckpt = _resume_checkpoint(full)
    change, message = BAD_FIELDS[bad]
    change(ckpt)
    path = tmp_path / f'{bad}.pth'
    torch.save(ckpt, path)
    rc = load_tool('train').main([str(cfg_path), '--work-dir', str(tmp_path / 'work'), '--resume', str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert rc == 2 and len(lines) == 1 and str(path) in lines[0] and message in lines[0], err[-2000:]
    assert 'Traceback' not in err


# --------------------------------------------------------------------------
# Item 18: timm never downloads and never reads weights past the safe loader.
# --------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """timm's download and hub functions fail the test if called; timm's own file reader too."""
    import timm.models._builder as builder

    def forbidden(*args, **kwargs):
        raise AssertionError(f'timm tried to download or read weights itself: {args[:2]}')

    for name in ('download_cached_file', 'load_state_dict_from_url', 'load_state_dict_from_hf',
                 'load_custom_from_hf', 'load_state_dict_from_path', 'load_state_dict', 'check_cached_file'):
        monkeypatch.setattr(builder, name, forbidden)
    monkeypatch.setattr(builder, 'has_hf_hub', lambda necessary=False: True)  # as if huggingface_hub were there


TIMM_TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


@pytest.mark.parametrize('where', ['overlay', 'cfg'])
@pytest.mark.parametrize('remote', [dict(hf_hub_id='timm/mlla_tiny.in1k'), dict(url='https://example.com/w.pth'),
                                    dict(hf_hub_id='timm/x', source='hf-hub'), dict(file='/tmp', source='local-dir'),
                                    dict(hf_hub_id='timm/x', hf_hub_filename='pytorch_model.bin')])
def test_timm_remote_weights_are_refused(no_network, remote, where):
    import timm
    import mlla_mm  # noqa: F401
    kwargs = dict(pretrained_cfg_overlay=remote) if where == 'overlay' else dict(pretrained_cfg=remote)
    with pytest.raises(CheckpointError, match='never does') as err:
        timm.create_model('mlla_tiny', pretrained=True, **TIMM_TINY, **kwargs)
    line = one_line(err.value)
    assert 'mlla_tiny' in line and "pretrained_cfg_overlay=dict(file='PATH')" in line


def test_timm_file_weights_go_through_the_safe_loader_even_without_custom_load(no_network, tmp_path):
    """``pretrained_cfg=dict(file=..., custom_load=False)`` would have timm's torch.load read it; the safe
    loader reads it (timm's reader is forbidden here), also with a url or hub id beside the file."""
    import timm
    import mlla_mm  # noqa: F401
    source = timm.create_model('mlla_tiny', **TIMM_TINY)
    torch.save({'model': source.state_dict()}, tmp_path / 'w.pth')
    for cfg in (dict(file=str(tmp_path / 'w.pth'), custom_load=False),
                dict(file=str(tmp_path / 'w.pth'), url='https://example.com/w.pth', hf_hub_id='timm/x')):
        model = timm.create_model('mlla_tiny', pretrained=True, **TIMM_TINY, pretrained_cfg=cfg)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
    marker = tmp_path / 'marker'
    (tmp_path / 'evil.pth').write_bytes(ep.corpus(str(marker))['reduce_os_system'])
    with pytest.raises(CheckpointError, match='refusing to load'):
        timm.create_model('mlla_tiny', pretrained=True, **TIMM_TINY,
                          pretrained_cfg=dict(file=str(tmp_path / 'evil.pth'), custom_load=False))
    assert not marker.exists()


def test_resume_never_runs_meta_config(cfg_path, model_state, tmp_path, capsys):
    """mmengine's Runner.resume runs ``meta['config']`` through ``Config.fromstring(..., '.py')``, i.e. executes
    Python from the checkpoint; mmengine itself writes ``meta['cfg']``. A file with ``meta.config`` is refused."""
    _, full = model_state
    marker = tmp_path / 'marker'
    ckpt = _resume_checkpoint(full)
    ckpt['meta']['config'] = f'x = open({str(marker)!r}, "w").close()\ngpu_ids = []\n'  # builtins: no import needed
    torch.save(ckpt, tmp_path / 'config.pth')
    rc = load_tool('train').main([str(cfg_path), '--work-dir', str(tmp_path / 'work'), '--resume',
                                  str(tmp_path / 'config.pth')])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert not marker.exists(), 'code from the checkpoint ran'
    assert rc == 2 and len(lines) == 1 and 'meta.config' in lines[0], err[-2000:]


def test_train_resume_from_a_fifo_or_device_says_not_a_regular_file(cfg_path, tmp_path, capsys):
    fifo = tmp_path / 'fifo.pth'
    os.mkfifo(fifo)
    for path in (str(fifo), '/dev/zero'):
        rc = load_tool('train').main([str(cfg_path), '--work-dir', str(tmp_path / 'work'), '--resume', path])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith('error:')]
        assert rc == 2 and len(lines) == 1 and f'{path} is not a regular file' in lines[0], err[-2000:]
