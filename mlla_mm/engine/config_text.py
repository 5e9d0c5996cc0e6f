"""The run's config with its formatted text made once, not at every log line and checkpoint.

mmengine formats the whole config with yapf every time something reads
``Config.pretty_text``: the environment log, the config dump, the runtime
hook, each visualisation backend and every checkpoint (its ``meta['cfg']``).
That is 0.1-0.3 s a time on a 2-core machine, about a quarter of a short run
of ``tools/train.py`` (six reads in a two-epoch run). :class:`TextOnceConfig`
gives the same text, formatting a given unformatted text once: the cheap
unformatted text (mmengine's own, with formatting turned off) is the cache
key, so a config changed between two reads is formatted again.

:class:`~mlla_mm.engine.runner.SafeRunner` makes its config one of these
(:func:`text_once`); nothing else changes.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Union

from mmengine.config import Config

#: yapf's style as mmengine's ``Config.pretty_text`` sets it (mmengine 0.10). A test checks that the text is
#: the same as mmengine's for the project's configs, so a change in mmengine shows.
_YAPF_STYLE = dict(based_on_style='pep8', blank_line_before_nested_class_or_def=True,
                   split_before_expression_after_opening_paren=True)


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
