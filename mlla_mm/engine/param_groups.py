"""One optimizer parameter group per distinct setting, not one per parameter.

With a ``paramwise_cfg`` (e.g. ``custom_keys={'norm': dict(decay_mult=0.)}``,
no weight decay on norm layers), mmengine's ``DefaultOptimWrapperConstructor``
puts every parameter in a group of its own: 521 groups for Mask R-CNN
MLLA-T. The optimizer then steps group by group, and on a CPU that loop is a
good part of the step: the demo model's fused AdamW step took 56 ms with 521
groups and 33 ms with 2 on a 2-core AMD EPYC (docs/benchmarks.md, "AMD EPYC,
Zen 2"). :class:`MergedGroupsOptimWrapperConstructor`
builds the same per-parameter settings with the default constructor and
then merges the groups whose settings are equal (every key but ``params``),
in the order they first appear, so a parameter keeps exactly its lr, weight
decay and other options and the optimizer computes the same numbers::

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
        constructor='MergedGroupsOptimWrapperConstructor',
        paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))

An optimizer state saved by a run with the default constructor has one group
per parameter and does not load into a merged optimizer (PyTorch: "loaded
state dict has a different number of parameter groups"); resume such a run
with the constructor it was started with.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS


def _hashable(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def merge_param_groups(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Groups with equal settings (every key but ``params``) merged, in order of first appearance.

    The parameters of a merged group keep their relative order. The input
    groups are not changed.
    """
    merged: Dict[Hashable, Dict[str, Any]] = {}
    for group in groups:
        settings = {k: v for k, v in group.items() if k != 'params'}
        key = _hashable(settings)
        if key not in merged:
            merged[key] = dict(settings, params=[])
        merged[key]['params'].extend(group['params'])
    return list(merged.values())


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MergedGroupsOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor with equal parameter groups merged (see the module docstring).

    Takes the same ``optim_wrapper_cfg`` and ``paramwise_cfg`` as
    ``DefaultOptimWrapperConstructor``.
    """

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module: Optional[int] = None) -> None:
        """Append the merged groups of ``module``'s parameters to ``params``."""
        if prefix:  # the default constructor's recursion into submodules
            super().add_params(params, module, prefix, is_dcn_module)
            return
        per_param: List[dict] = []
        super().add_params(per_param, module, prefix, is_dcn_module)
        groups = merge_param_groups(per_param)
        print_log(f'MergedGroupsOptimWrapperConstructor: {len(per_param)} parameter groups merged into '
                  f'{len(groups)}', logger='current')
        params.extend(groups)


__all__ = ['MergedGroupsOptimWrapperConstructor', 'merge_param_groups']
