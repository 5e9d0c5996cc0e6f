"""Two things mmengine's Config does again and again, done once: formatting the text, finding ``mmdet::`` configs.

**The text.** mmengine formats the whole config with yapf every time
something reads ``Config.pretty_text``: the environment log, the config dump,
the runtime hook, each visualisation backend and every checkpoint (its
``meta['cfg']``): six reads, 1.6 s of the 7 s of a two-epoch run of
``tools/train.py`` on a tiny config (2-core AMD EPYC Zen 4).
:class:`TextOnceConfig` gives the same text, formatting a given unformatted
text once: the cheap unformatted text (mmengine's own, with formatting turned
off) is the cache key, so a config changed between two reads is formatted
again. :class:`~mlla_mm.engine.runner.SafeRunner` makes its config one of
these (:func:`text_once`).

**The base configs.** For every ``mmdet::``/``mmseg::`` path in ``_base_``,
mmengine first reads all of the package's model metafiles (about 100 YAML
files for mmdet) to see whether the path is a model's config, before it takes
it as a base config: 0.35-0.6 s of the 0.45-0.7 s that loading one of our
configs takes. :func:`package_config_metainfo` gives the same answer from an
index of the metafiles read once per process (read again when the package's
``model-index.yml`` changes). It replaces ``mmengine.config.utils.
_get_cfg_metainfo`` (private; this module is the one place that touches it)
when :mod:`mlla_mm.engine` is imported (:func:`install_metainfo_index`); a
test checks it against mmengine's own function for every config name.
"""
from __future__ import annotations

import copy
import functools
import os
import os.path as osp
import warnings
from typing import Any, Dict, Tuple, Union

import mmengine.config.utils as mm_config_utils
from mmengine.config import Config

#: yapf's style as mmengine's ``Config.pretty_text`` sets it (mmengine 0.10). A test checks that the text is
#: the same as mmengine's for the project's configs, so a change in mmengine shows.
_YAPF_STYLE = dict(based_on_style='pep8', blank_line_before_nested_class_or_def=True,
                   split_before_expression_after_opening_paren=True)
#: mmengine's own lookup (kept for the tests and for :func:`install_metainfo_index`'s undo).
MMENGINE_METAINFO = mm_config_utils._get_cfg_metainfo


# --------------------------------------------------------------------------------------------------------------
# The text
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _formatted(text: str) -> str:
    """``text`` formatted by yapf as mmengine formats a config (the same input gives the same output)."""
    from yapf.yapflib.yapf_api import FormatCode
    return FormatCode(text, style_config=_YAPF_STYLE)[0]


class TextOnceConfig(Config):
    """mmengine's :class:`~mmengine.config.Config` whose ``pretty_text`` formats each distinct text once."""

    @property
    def pretty_text(self) -> str:
        if not self._format_python_code:
            return super().pretty_text
        plain = copy.copy(self)  # shallow: the same values, formatting off
        super(Config, plain).__setattr__('_format_python_code', False)
        text = plain.pretty_text
        try:
            return _formatted(text)
        except Exception:  # what yapf cannot format: mmengine's own path and its error
            return super().pretty_text


def text_once(cfg: Union[Config, dict, None]) -> Any:
    """``cfg`` (a Config or a dict, as mmengine's Runner takes it) as a :class:`TextOnceConfig` sharing its values.

    Anything else (``None``) is returned as it is.
    """
    if isinstance(cfg, TextOnceConfig) or cfg is None:
        return cfg
    if isinstance(cfg, Config):
        other = TextOnceConfig.__new__(TextOnceConfig)
        other.__dict__.update(cfg.__dict__)  # the Runner deep-copies it, as it would the Config
        return other
    if isinstance(cfg, dict):
        return TextOnceConfig(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# The base configs
# --------------------------------------------------------------------------------------------------------------
def _index_stamp(package_path: str) -> Tuple[int, int]:
    """When and how big the package's ``model-index.yml`` is (a reinstall changes it); (0, 0) when it is missing."""
    try:
        st = os.stat(osp.join(package_path, '.mim', 'model-index.yml'))
    except OSError:
        return 0, 0
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=16)
def _metafile_index(package_path: str, stamp: Tuple[int, int]) -> Dict[str, dict]:
    """Config name -> the first model entry naming it, over all metafiles of ``model-index.yml`` (mmengine's rule)."""
    from mmengine.fileio import load
    index: Dict[str, dict] = {}
    for meta_path in load(osp.join(package_path, '.mim', 'model-index.yml'))['Import']:
        for model_cfg in load(osp.join(package_path, '.mim', meta_path))['Models']:
            if 'Config' not in model_cfg:
                warnings.warn(f'There is not `Config` define in {model_cfg}')
                continue
            index.setdefault(model_cfg['Config'].partition('/')[-1], model_cfg)
    return index


def package_config_metainfo(package_path: str, cfg_path: str) -> dict:
    """What ``mmengine.config.utils._get_cfg_metainfo`` returns (a copy) or raises, from a cached index."""
    if _index_stamp(package_path) == (0, 0):
        return MMENGINE_METAINFO(package_path, cfg_path)  # mmengine's own error for a package without one
    index = _metafile_index(package_path, _index_stamp(package_path))
    if cfg_path not in index:
        raise ValueError(f'Expected configs: {index.keys()}, but got {cfg_path}')
    return copy.deepcopy(index[cfg_path])


def install_metainfo_index() -> None:
    """Make mmengine's config loader use :func:`package_config_metainfo` (idempotent)."""
    mm_config_utils._get_cfg_metainfo = package_config_metainfo
