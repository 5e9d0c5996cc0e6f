"""SafeRunner's config formats its text once (mlla_mm/engine/config_text.py): the same text as mmengine's, every
time, and formatted again only when the config changed."""
import glob

import pytest
import torch
import yapf.yapflib.yapf_api as yapf_api
from mmengine.config import Config

from mlla_mm.engine import config_text
from mlla_mm.engine.config_text import TextOnceConfig, text_once

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

    config_text._formatted.cache_clear()
    monkeypatch.setattr(yapf_api, 'FormatCode', counting)
    yield calls
    config_text._formatted.cache_clear()


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

    config_text._formatted.cache_clear()
    monkeypatch.setattr(config_text, '_formatted', broken)
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
    assert len(dumped) >= 2 and all(open(p).read() == expected for p in dumped), dumped
    assert len(yapf_calls) == 1  # log, dump, runtime hook, visualiser and every checkpoint: one formatting
