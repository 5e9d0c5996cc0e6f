"""mlla_mm/engine/config_cache.py: SafeRunner's config formats its text once (the same text as mmengine's, formatted
again only when the config changed), and ``mmdet::``/``mmseg::`` paths are found from a metafile index read once
(the same answers as mmengine's own lookup)."""
import glob

import pytest
import torch
import yapf.yapflib.yapf_api as yapf_api
from mmengine.config import Config

from mlla_mm.engine import config_cache
from mlla_mm.engine.config_cache import TextOnceConfig, text_once

from tests.helpers import ROOT

CONFIGS = [ROOT / 'configs/detection/mask_rcnn_mlla_t_demo.py', ROOT / 'configs/segmentation/upernet_mlla_t_demo.py']


@pytest.fixture
def yapf_calls(monkeypatch):
    """How often yapf formats (the cache emptied first)."""
    calls = []
    real = yapf_api.FormatCode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    config_cache._formatted.cache_clear()
    monkeypatch.setattr(yapf_api, 'FormatCode', counting)
    yield calls
    config_cache._formatted.cache_clear()


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_the_text_is_mmengines(path):
    cfg = Config.fromfile(str(path))
    once = text_once(cfg)
    assert isinstance(once, TextOnceConfig) and type(cfg) is Config  # the caller's config is left as it was
    assert once.pretty_text == cfg.pretty_text and once.filename == cfg.filename


def test_keys_that_are_not_names_and_nested_sequences():
    cfg = Config(dict(a={'1x': 2, 'b c': [1, (2, 'x'), dict(d=None)]}, e=(0.5, [True]), f="it's"))
    assert text_once(cfg).pretty_text == cfg.pretty_text
    assert text_once(cfg.to_dict()).pretty_text == cfg.pretty_text  # a dict, as the Runner takes it too


def test_formatted_once_and_again_after_a_change(yapf_calls):
    cfg = text_once(Config.fromfile(str(CONFIGS[0])))
    first = cfg.pretty_text
    assert cfg.pretty_text == first and cfg.pretty_text == first and len(yapf_calls) == 1
    cfg.model.backbone.drop_path_rate = 0.123
    changed = cfg.pretty_text
    assert changed != first and 'drop_path_rate=0.123' in changed and len(yapf_calls) == 2
    assert changed == Config.pretty_text.fget(cfg)  # mmengine's own formatting of the changed config


def test_text_yapf_cannot_format_takes_mmengines_path(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError('cannot format')

    config_cache._formatted.cache_clear()
    monkeypatch.setattr(config_cache, '_formatted', broken)
    cfg = Config(dict(a=1))
    assert text_once(cfg).pretty_text == cfg.pretty_text  # mmengine formats it itself


def test_a_run_formats_once_and_its_checkpoints_hold_mmengines_text(cfg_path, tmp_path, yapf_calls):
    from mmengine.registry import RUNNERS
    cfg = Config.fromfile(str(cfg_path))
    cfg.work_dir = str(tmp_path / 'work')
    cfg.default_hooks.checkpoint.interval = 1
    runner = RUNNERS.build(cfg)
    assert isinstance(runner.cfg, TextOnceConfig)
    runner.train()
    ckpts = sorted(glob.glob(str(tmp_path / 'work' / 'epoch_*.pth')))
    assert ckpts, 'the run wrote no checkpoint'
    expected = Config.pretty_text.fget(runner.cfg)  # mmengine's formatting, not the cache
    for ckpt in ckpts:
        assert torch.load(ckpt, map_location='cpu', weights_only=False)['meta']['cfg'] == expected
    dumped = glob.glob(str(tmp_path / 'work' / '**' / '*.py'), recursive=True)  # the log folder's, the visualiser's
    assert dumped and all(open(p).read() == expected for p in dumped), dumped
    assert len(yapf_calls) == 1  # log, dump, runtime hook, visualiser and every checkpoint: one formatting


# --------------------------------------------------------------------------------------------------------------
# Finding mmdet:: and mmseg:: configs
# --------------------------------------------------------------------------------------------------------------
def _outcome(lookup, package_path, name):
    try:
        return 'ok', lookup(package_path, name)
    except (ValueError, FileNotFoundError) as err:
        return type(err).__name__, str(err)


def _named_twice(package_path):
    import collections
    import os.path as osp

    from mmengine.fileio import load
    names = collections.Counter()
    for meta in load(osp.join(package_path, '.mim', 'model-index.yml'))['Import']:
        names.update(m['Config'].partition('/')[-1] for m in load(osp.join(package_path, '.mim', meta))['Models']
                     if 'Config' in m)
    return sorted(name for name, n in names.items() if n > 1 and name)


@pytest.mark.parametrize('package', ['mmdet', 'mmseg'])
def test_the_index_answers_as_mmengine_does_for_every_config_name(package):
    """A name nobody has (the error lists every config name: the whole index), model configs from the start, middle
    and end of the index, and a base config (in no metafile: mmengine then takes the base path): the same value or
    the same error as mmengine's own function."""
    from mmengine.utils import get_installed_path
    path = get_installed_path(package)
    index = config_cache._metafile_index(path, config_cache._index_stamp(path))
    assert len(index) > 50  # mmdet and mmseg each name hundreds of configs
    names = ['no_such_config', *(sorted(index)[i] for i in (0, len(index) // 2, -1)), '_base_/default_runtime']
    names += _named_twice(path)[:2]  # several entries (weights) for one config: the first one is the answer
    for name in names:
        assert _outcome(config_cache.package_config_metainfo, path, name) == \
            _outcome(config_cache.MMENGINE_METAINFO, path, name), name


def test_installed_on_import_and_the_metafiles_are_read_once_per_process(monkeypatch):
    import mmengine.config.utils as mm_config_utils
    import mmengine.fileio
    assert mm_config_utils._get_cfg_metainfo is config_cache.package_config_metainfo  # by `import mlla_mm`
    reads = []
    real = mmengine.fileio.load
    monkeypatch.setattr(mmengine.fileio, 'load', lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    config_cache._metafile_index.cache_clear()
    for _ in range(2):
        a = Config.fromfile(str(CONFIGS[0]))
    assert len(reads) > 50 and len(set(reads)) == len(reads)  # each metafile once, for both loads
    monkeypatch.setattr(mm_config_utils, '_get_cfg_metainfo', config_cache.MMENGINE_METAINFO)
    assert Config.fromfile(str(CONFIGS[0])).pretty_text == a.pretty_text  # mmengine's lookup: the same config


def test_a_changed_model_index_is_read_again(tmp_path):
    """A reinstall (another model-index.yml) is not answered from the old index."""
    mim = tmp_path / '.mim'
    (mim / 'configs').mkdir(parents=True)
    (mim / 'meta.yml').write_text('Models:\n  - Name: a\n    Config: configs/x/a.py\n')
    (mim / 'model-index.yml').write_text('Import:\n  - meta.yml\n')
    assert config_cache.package_config_metainfo(str(tmp_path), 'x/a.py') == {'Name': 'a', 'Config': 'configs/x/a.py'}
    (mim / 'meta2.yml').write_text('Models:\n  - Name: b\n    Config: configs/x/b.py\n')
    (mim / 'model-index.yml').write_text('Import:\n  - meta.yml\n  - meta2.yml\n')
    assert config_cache.package_config_metainfo(str(tmp_path), 'x/b.py')['Name'] == 'b'
    entry = config_cache.package_config_metainfo(str(tmp_path), 'x/a.py')
    entry['Name'] = 'changed by a caller'  # a copy: the index keeps its own
    assert config_cache.package_config_metainfo(str(tmp_path), 'x/a.py')['Name'] == 'a'
