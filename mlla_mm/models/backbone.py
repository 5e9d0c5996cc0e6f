"""``MLLA``: the backbone for mmdet and mmseg (``backbone=dict(type='MLLA', ...)``).

What the mm frameworks add to the maths of :mod:`mlla_mm.models.mlla`: normalised NCHW maps of the stages in
``out_indices``, ``frozen_stages``, ``norm_eval``, ``with_cp`` and ``init_cfg`` (the published weights, any
supported checkpoint layout, through the safe loader, with a report of what was loaded).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModule

from ..checkpoint import load_backbone_weights
from ..registry import register_everywhere
from .mlla import (LayerNorm, Stem, build_stages, check_hyperparameters, check_images, init_module, resolve_arch,
                   run_stages)
from .ops import is_tracing, set_fast_inference
from .timm_mlla import MissingWeightsError, missing_weights_message

INIT_CFG_KEYS = ('checkpoint', 'prefix', 'map_location', 'strict', 'use_ema', 'trusted', 'if_missing')


@register_everywhere
class MLLA(BaseModule):
    """MLLA backbone returning NCHW feature maps at strides 4, 8, 16, 32.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` (or ``'t'``, ``'s'``, ``'b'``),
            or a dict with ``embed_dims``, ``depths`` and ``num_heads``.
        mlp_ratio: Hidden size of the MLPs relative to the channels (> 0).
        drop_rate: Dropout in the MLPs, in [0, 1).
        drop_path_rate: Stochastic depth, rising linearly over all blocks
            from 0 to this value, in [0, 1).
        out_indices: Stages whose (normalised) output is returned.
        frozen_stages: Freeze the stem and stages ``0..frozen_stages-1``;
            -1 freezes nothing.
        norm_eval: Keep BatchNorm layers in eval mode while training.
        with_cp: Activation checkpointing when gradients are needed: each
            block, the stem and each downsample layer keep only their input
            and recompute the rest in the backward pass (BatchNorm
            statistics are still updated once per step).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads any
            supported checkpoint layout. Optional keys: ``prefix`` (take only
            the weights under this prefix, e.g. ``'backbone.'`` of a whole
            detector, and strip it, as in mmengine's ``PretrainedInit``),
            ``map_location`` (as in ``torch.load``; default ``'cpu'``),
            ``strict=True``, ``use_ema=False``, ``trusted=None``,
            ``if_missing='error'|'warn'``.
    """

    def __init__(self, arch: Union[str, dict] = 'tiny', mlp_ratio: float = 4., drop_rate: float = 0.,
                 drop_path_rate: float = 0.1, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        settings = resolve_arch(arch)
        check_hyperparameters(settings['embed_dims'], mlp_ratio, drop_rate, drop_path_rate)
        if init_cfg is not None and not isinstance(init_cfg, dict):
            raise ValueError(f'MLLA: init_cfg must be a dict or None, got {init_cfg!r}')
        for name, value in (('norm_eval', norm_eval), ('with_cp', with_cp)):
            if not isinstance(value, bool):
                raise ValueError(f'MLLA: {name} must be True or False, got {value!r}')
        super().__init__(init_cfg=init_cfg)
        self.embed_dims: int = settings['embed_dims']
        self.depths: Tuple[int, ...] = settings['depths']
        self.num_heads: Tuple[int, ...] = settings['num_heads']
        num_stages = len(self.depths)
        out_indices = tuple(out_indices) if isinstance(out_indices, (list, tuple)) else (out_indices, )
        if not out_indices or any(not isinstance(i, int) or not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f'MLLA: out_indices must be stage indices in 0..{num_stages - 1}, got {out_indices}')
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'MLLA: frozen_stages must be an int in -1..{num_stages}, got {frozen_stages}')
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.channels = [self.embed_dims * 2**i for i in range(num_stages)]
        self.strides = [4 * 2**i for i in range(num_stages)]

        self.patch_embed = Stem(3, self.embed_dims)
        self.layers = build_stages(self.embed_dims, self.depths, self.num_heads, mlp_ratio, drop_rate,
                                   drop_path_rate)
        for i in out_indices:
            self.add_module(f'norm{i}', LayerNorm(self.channels[i]))
        self.with_cp = with_cp
        self.apply(init_module)
        self._freeze_stages()

    # -- options -------------------------------------------------------------
    @property
    def with_cp(self) -> bool:
        """Activation checkpointing of the stem, every block and every downsample layer."""
        return self._with_cp

    @with_cp.setter
    def with_cp(self, enable: bool) -> None:
        self._with_cp = bool(enable)
        for stage in self.layers:
            stage.grad_checkpointing = self._with_cp

    def set_fast_inference(self, enable: bool = True) -> 'MLLA':
        """Switch the fast inference path on or off for this model (default: ``MLLA_MM_FAST_INFERENCE``)."""
        return set_fast_inference(self, enable)

    @property
    def feature_info(self) -> List[Dict[str, Union[int, str]]]:
        """Channels, stride and module name of each returned map."""
        return [dict(num_chs=self.channels[i], reduction=self.strides[i], module=f'norm{i}')
                for i in sorted(self.out_indices)]  # forward returns maps in stage order

    # -- initialisation ------------------------------------------------------
    def init_weights(self) -> None:
        """Load ``init_cfg`` weights (any supported layout) or keep the from-scratch init."""
        cfg = self.init_cfg
        if not (isinstance(cfg, dict) and cfg.get('type') == 'Pretrained'):
            super().init_weights()
            return
        cfg = dict(cfg)
        cfg.pop('type')
        unknown = sorted(set(cfg) - set(INIT_CFG_KEYS))
        if unknown:
            raise ValueError(f'MLLA: unknown init_cfg keys {unknown}; allowed: type, {", ".join(INIT_CFG_KEYS)}')
        path = cfg.get('checkpoint')
        if not path:
            raise ValueError("MLLA: init_cfg type 'Pretrained' needs a checkpoint path")
        path = os.path.expanduser(path)
        if cfg.get('if_missing', 'error') == 'warn' and not os.path.isfile(path):
            print_log(f'MLLA: pretrained checkpoint {path} not found; the backbone is RANDOMLY '
                      f'initialised. Put the published ImageNet weights at {path} (or set '
                      'model.backbone.init_cfg.checkpoint) to fine-tune from them.', logger='current',
                      level=30)
        elif not os.path.lexists(path):  # where to get the published file and where to put it
            raise MissingWeightsError(missing_weights_message(path))
        else:
            load_backbone_weights(
                self, path, strict=cfg.get('strict', True), use_ema=cfg.get('use_ema', False),
                trusted=cfg.get('trusted'), prefix=cfg.get('prefix'),
                map_location=cfg.get('map_location', 'cpu'),
                optional=lambda k: k.split('.')[0] in {f'norm{i}' for i in self.out_indices},
                log=lambda msg: print_log('MLLA: ' + msg, logger='current'))
        self._is_init = True

    # -- freezing ------------------------------------------------------------
    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: List[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            mods.append(self.layers[i])
            if i in self.out_indices:
                mods.append(getattr(self, f'norm{i}'))
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'MLLA':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> tuple of (B, C_i, ceil(H/2^(i+2)), ...) for ``out_indices``."""
        if not is_tracing():  # (traced sizes would be frozen into the graph by these checks)
            check_images(x)
        norms = {i: getattr(self, f'norm{i}') for i in self.out_indices}
        _, outs = run_stages(self.patch_embed, self.layers, x, max(self.out_indices),
                             {i: lambda y, norm=norm: norm(y).permute(0, 3, 1, 2).contiguous()
                              for i, norm in norms.items()}, self.with_cp)
        return tuple(outs)


__all__ = ['MLLA', 'INIT_CFG_KEYS']
