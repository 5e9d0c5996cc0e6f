"""Layer-wise learning-rate decay for detectors and segmentors with an MLLA backbone.

mmdet's and mmseg's ``LearningRateDecayOptimizerConstructor`` only know
ConvNeXt and BEiT parameter names; this one reads MLLA's::

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.05),
        constructor='MLLALayerDecayOptimizerConstructor',
        paramwise_cfg=dict(decay_rate=0.9, decay_type='layer_wise'))

Layer ids (``D = sum(depths)`` of the model's backbone: 18 for MLLA-T, 36
for MLLA-S/B; the number of layers is always taken from the model):

- ``layer_wise``: the stem ``backbone.patch_embed`` is 0; block j of stage i
  (``backbone.layers.{i}.blocks.{j}``) is ``1 + sum(depths[:i]) + j``; the
  downsample ``backbone.layers.{i}.downsample`` belongs to the FOLLOWING
  stage (the id of ``layers.{i+1}.blocks.0``); the output norms
  ``backbone.norm{k}``, the neck, the heads and every other parameter
  outside the backbone are at the top, ``D + 1``.
- ``stage_wise``: stem 0, stage i (blocks) ``i + 1``, ``layers.{i}.downsample``
  ``i + 2``, output norms, neck and heads at the top, 5.

i.e. ``num_layers = D`` (``layer_wise``) or the number of stages, 4
(``stage_wise``), ``top = num_layers + 1``, and each parameter gets

    lr = base_lr * decay_rate ** (top - layer_id)

so the heads train at the base rate and the stem at ``decay_rate ** top`` of
it (the convention of mmdet's constructor). Weight decay is the optimizer's
``weight_decay`` except for biases, the parameters of norm layers
(LayerNorm, BatchNorm, GroupNorm, InstanceNorm) and every other 1-D
parameter, which get none. Every parameter of the model (frozen ones too, as
mmengine's default constructor does) is in exactly one group, named
``layer_{id}_{decay|no_decay}``, which also records ``lr_scale`` and
``param_names``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..models import MLLA

DECAY_TYPES = ('layer_wise', 'stage_wise')
NORM_TYPES = (nn.LayerNorm, _BatchNorm, nn.GroupNorm, _InstanceNorm)


def mlla_layer_id(name: str, depths: List[int], decay_type: str) -> int:
    """The layer id of parameter ``name`` (a name in the detector/segmentor) for an MLLA backbone.

    Args:
        name: Parameter name in the whole model, e.g. ``backbone.layers.2.blocks.3.mlp.fc1.weight``.
        depths: Blocks per stage of the backbone.
        decay_type: ``'layer_wise'`` or ``'stage_wise'``.

    Raises:
        ValueError: ``name`` is a backbone parameter this scheme does not know.
    """
    num_stages = len(depths)
    top = (sum(depths) if decay_type == 'layer_wise' else num_stages) + 1
    if not name.startswith('backbone.'):
        return top
    parts = name.split('.')
    if parts[1] == 'patch_embed':
        return 0
    if parts[1].startswith('norm') and parts[1][4:].isdigit():
        return top
    if parts[1] == 'layers' and len(parts) > 3 and parts[2].isdigit():
        stage = int(parts[2])
        if parts[3] == 'blocks' and len(parts) > 4 and parts[4].isdigit():
            block = int(parts[4])
            if stage < num_stages and block < depths[stage]:
                if decay_type == 'stage_wise':
                    return stage + 1
                return 1 + sum(depths[:stage]) + block
        if parts[3] == 'downsample' and stage + 1 < num_stages:
            # The downsample feeds stage + 1 and counts as part of it.
            if decay_type == 'stage_wise':
                return stage + 2
            return 1 + sum(depths[:stage + 1])
    raise ValueError(f'MLLALayerDecayOptimizerConstructor: no layer id for backbone parameter {name!r}')


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MLLALayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise (or stage-wise) learning-rate decay over an MLLA backbone.

    ``paramwise_cfg`` takes exactly ``decay_rate`` (a float in (0, 1],
    required) and ``decay_type`` (``'layer_wise'``, the default, or
    ``'stage_wise'``); any other key is an error. See the module docstring
    for the layer ids.

    Args:
        optim_wrapper_cfg: The ``optim_wrapper`` config (with ``optimizer``).
        paramwise_cfg: ``dict(decay_rate=..., decay_type=...)``.
    """

    ALLOWED_KEYS = ('decay_rate', 'decay_type')

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        cfg = self.paramwise_cfg
        unknown = sorted(set(cfg) - set(self.ALLOWED_KEYS))
        if unknown:
            hint = ' (the number of layers is taken from the model)' if 'num_layers' in unknown else ''
            raise ValueError(f'MLLALayerDecayOptimizerConstructor: unknown paramwise_cfg key(s) {unknown}{hint}; '
                             f'allowed: {list(self.ALLOWED_KEYS)}')
        rate = cfg.get('decay_rate')
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError('MLLALayerDecayOptimizerConstructor: paramwise_cfg.decay_rate must be a number '
                             f'in (0, 1], got {rate!r}')
        self.decay_rate = float(rate)
        self.decay_type = cfg.get('decay_type', 'layer_wise')
        if self.decay_type not in DECAY_TYPES:
            raise ValueError(f'MLLALayerDecayOptimizerConstructor: decay_type must be one of {list(DECAY_TYPES)}, '
                             f'got {self.decay_type!r}')
        if self.base_lr is None:
            raise ValueError('MLLALayerDecayOptimizerConstructor: the optimizer needs an lr')

    def add_params(self, params: List[dict], module: nn.Module) -> None:  # type: ignore[override]
        """Append one parameter group per (layer id, decay / no decay) to ``params``.

        Args:
            params: The list of groups, extended in place.
            module: The detector or segmentor (it must have an MLLA ``backbone``).
        """
        backbone = getattr(module, 'backbone', None)
        if not isinstance(backbone, MLLA):
            raise ValueError('MLLALayerDecayOptimizerConstructor needs a model whose backbone is MLLA, got '
                             f'{type(backbone).__name__ if backbone is not None else "no backbone"}')
        depths = list(backbone.depths)
        top = (sum(depths) if self.decay_type == 'layer_wise' else len(depths)) + 1
        no_decay_ids = {id(p) for m in module.modules() if isinstance(m, NORM_TYPES)
                        for p in m.parameters(recurse=False)}
        groups: Dict[str, dict] = {}
        for name, param in module.named_parameters():
            layer_id = mlla_layer_id(name, depths, self.decay_type)
            no_decay = param.ndim <= 1 or name.endswith('.bias') or id(param) in no_decay_ids
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = self.decay_rate ** (top - layer_id)
                groups[key] = dict(params=[], param_names=[], group_name=key, lr_scale=scale,
                                   lr=self.base_lr * scale)
                if no_decay:
                    groups[key]['weight_decay'] = 0.
                elif self.base_wd is not None:
                    groups[key]['weight_decay'] = self.base_wd
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        print_log(f'MLLALayerDecayOptimizerConstructor: {self.decay_type}, decay_rate {self.decay_rate}, '
                  f'layer ids 0..{top}, {len(groups)} parameter groups', logger='current')
        params.extend(groups[k] for k in sorted(groups, key=lambda k: (int(k.split('_')[1]), k)))
