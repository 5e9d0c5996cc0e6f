"""MLLA in timm: the published ImageNet classifier and a feature extractor (DRAFT).

Temporary home of the timm model while ``mlla.py`` is being rewritten; it
moves into ``mlla.py`` (blocks, stages, models, checkpoint filtering,
registered constructors) and this file goes away.

``import mlla_mm`` registers ``mlla_tiny``, ``mlla_small`` and ``mlla_base``
with timm, built by timm's ``build_model_with_cfg`` from the same stem, blocks
and stages as the mm ``MLLA`` backbone.
"""
from __future__ import annotations

import contextvars
import logging
import os
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model,
                         resolve_pretrained_cfg)
from timm.models._features import feature_take_indices

from ..checkpoint import CheckpointError, find_state_dict, load_file
from .mlla import (ARCH_SETTINGS, MLLA, LayerNorm, MLLAStage, Stem, checkpoint_module, is_tracing, needs_checkpoint,
                   resolve_arch)

_logger = logging.getLogger(__name__)

# Set by the registered constructors for the duration of a build: which weights
# ``load_pretrained`` takes from a training checkpoint (``model`` or ``state_dict_ema``).
_PRETRAINED_USE_EMA: 'contextvars.ContextVar[bool]' = contextvars.ContextVar('mlla_pretrained_use_ema',
                                                                            default=False)


class MLLAClassifier(nn.Module):
    """MLLA ImageNet classifier (timm model): stem, four stages, final norm, average pool, linear head.

    Parameter names follow the published classification checkpoints
    (``patch_embed.*``, ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``,
    ``norm.*``, ``head.*``). Unlike the published model it accepts any input
    size (H, W >= 1; the image is zero-padded on the right and bottom as in the
    dense-prediction model).

    Args:
        in_chans: Input image channels.
        num_classes: Classes of the head; 0 for no head (pooled features).
        global_pool: ``'avg'`` or ``''`` (no pooling: ``forward_head`` gets NHWC maps).
        embed_dim: Channels of stage 0 (stage i has ``embed_dim * 2**i``).
        depths: Blocks per stage (four stages).
        num_heads: Attention heads per stage.
        mlp_ratio: MLP hidden size relative to the channels.
        drop_rate: Dropout before the head.
        proj_drop_rate: Dropout in the block MLPs.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = 'avg',
                 embed_dim: int = 64, depths: Tuple[int, ...] = (2, 4, 8, 4),
                 num_heads: Tuple[int, ...] = (2, 4, 8, 16), mlp_ratio: float = 4., drop_rate: float = 0.,
                 proj_drop_rate: float = 0., drop_path_rate: float = 0.) -> None:
        super().__init__()
        arch = resolve_arch(dict(embed_dims=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads)))
        if global_pool not in ('avg', ''):
            raise ValueError(f"MLLA: global_pool must be 'avg' or '', got {global_pool!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'MLLA: num_classes must be an int >= 0, got {num_classes!r}')
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.embed_dim: int = arch['embed_dims']
        self.depths: Tuple[int, ...] = arch['depths']
        self.num_heads: Tuple[int, ...] = arch['num_heads']
        num_stages = len(self.depths)
        channels = [self.embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = channels[-1]
        self.output_fmt = 'NHWC'
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=c, reduction=4 * 2**i, module=f'layers.{i}')
                             for i, c in enumerate(channels)]

        self.patch_embed = Stem(in_chans, self.embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(self.depths[:i])
            self.layers.append(MLLAStage(channels[i], self.depths[i], self.num_heads[i], mlp_ratio, proj_drop_rate,
                                         dpr[start:start + self.depths[i]], downsample=i < num_stages - 1))
        self.norm = LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(MLLA._init_module)

    # -- timm model API ------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (a downsample goes with the stage it feeds)."""
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^layers\.(\d+)\.downsample', (99998, )),
                (r'^norm', (99999, )),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the stem, every block and every downsample when gradients are needed."""
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head by a new one with ``num_classes`` outputs (0: none); optionally change the pooling."""
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"MLLA: global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- forward ---------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'MLLA expects images of shape (B, {self.in_chans}, H, W), got {shape}')
        if not is_tracing() and (x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1):
            raise ValueError(f'MLLA expects a non-empty batch with H, W >= 1, got {tuple(x.shape)}')

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The stem or a downsample layer, checkpointed under ``grad_checkpointing``."""
        if self.grad_checkpointing and needs_checkpoint(module, x):
            return checkpoint_module(module, x)
        return module(x)

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (before the downsample) and, unless ``intermediates_only``, the final features.

        Args:
            x: Images ``(B, C, H, W)``.
            indices: Take the last ``n`` stages (int) or these stages (list; negative counts from the end).
            norm: Apply the final norm to the last stage's output when it is taken.
            stop_early: Stop after the last stage taken.
            output_fmt: ``'NCHW'`` or ``'NHWC'`` for the intermediates.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or ``(final features (B, H, W, C) as forward_features, intermediates)``.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"MLLA: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        num_stages = len(self.layers)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        last = max_index if stop_early else num_stages - 1
        intermediates = []
        x = self._run(self.patch_embed, x)
        for i in range(last + 1):
            stage = self.layers[i]
            x = stage(x)  # the blocks; the map leaves before the downsample
            if i in take_indices:
                y = self.norm(x) if norm and i == num_stages - 1 else x  # the final norm fits the last stage only
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y)
            if i < last:
                x = self._run(stage.downsample, x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if last == num_stages - 1 else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one ``indices`` takes (and the downsample feeding them).

        As timm's Swin and ConvNeXt: when stages go, the final norm (sized for
        the last stage) and the head go too, and ``num_features`` becomes the
        channels of the last kept stage. Returns the (non-negative) indices taken.
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.layers = self.layers[:max_index + 1]
            self.layers[-1].downsample = None  # its output would never be used
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> normalised last-stage features ``(B, H/32, W/32, C_3)`` (NHWC)."""
        self._check_input(x)
        x = self._run(self.patch_embed, x)
        for stage in self.layers:
            x = stage(x)
            if stage.downsample is not None:
                x = self._run(stage.downsample, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC features -> logits (or the pooled features with ``pre_logits``)."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- pretrained weights ------------------------------------------------------
    def load_pretrained(self, checkpoint_path: str, use_ema: Optional[bool] = None) -> Dict[str, List[str]]:
        """Load a checkpoint file through mlla-mm's safe loader (timm calls this for ``custom_load`` cfgs).

        Reads the published ImageNet layout (``{'model': ...}``, ``state_dict_ema``
        with ``use_ema``), timm/mmengine checkpoints (``state_dict``), mmdet/mmseg
        checkpoints (the ``backbone.`` part) and plain state dicts. See
        :func:`load_checkpoint_weights` for what is checked.
        """
        use_ema = _PRETRAINED_USE_EMA.get() if use_ema is None else use_ema
        path = os.path.expanduser(os.fspath(checkpoint_path))
        state_dict = checkpoint_filter_fn(load_file(path), self, use_ema=use_ema, source=path)
        return load_checkpoint_weights(self, state_dict, source=path)


# --------------------------------------------------------------------------
# Checkpoint filtering and loading.
# --------------------------------------------------------------------------
_ROPE_TABLE = re.compile(r'(^|\.)attn\.rope\.rotations$')
_OUTPUT_NORM = re.compile(r'^norm\d+\.')


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: Optional[nn.Module] = None, use_ema: bool = False,
                         source: str = '<checkpoint>') -> Dict[str, torch.Tensor]:
    """Published MLLA (or mm backbone) weights -> this model's names. Running it twice changes nothing.

    Accepts a whole checkpoint (``model``, ``state_dict_ema`` with ``use_ema``,
    ``state_dict``) or a state dict; strips ``module.`` (DDP) and ``backbone.``
    prefixes, drops the fixed ``attn.rope.rotations`` tables (RoPE is computed
    for the actual input size), the mm backbone's output norms ``norm{i}`` and,
    for detector/segmentor checkpoints, everything outside the backbone.
    """
    weights, _ = find_state_dict(state_dict, use_ema=use_ema, source=source)
    has_backbone = any(k.startswith(('backbone.', 'module.backbone.')) for k in weights)
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in weights.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
        if has_backbone:
            if not key.startswith('backbone.'):
                continue
            key = key[len('backbone.'):]
        if _ROPE_TABLE.search(key) or _OUTPUT_NORM.match(key):
            continue
        out[key] = value
    return out


def _is_classifier_key(key: str) -> bool:
    return key.startswith(('head.', 'norm.'))


def load_checkpoint_weights(model: MLLAClassifier, state_dict: Mapping[str, torch.Tensor],
                            source: str = '<checkpoint>') -> Dict[str, List[str]]:
    """Load filtered weights into ``model``, refusing another arch.

    - A head of another size (or a model without head) keeps the model's own
      head: fine-tuning to other classes.
    - A stem for 3 channels is adapted to ``in_chans`` as timm does.
    - The final ``norm`` and ``head`` may be missing (a backbone checkpoint);
      they keep their initialisation and a warning says so.
    - Any other missing, unexpected or wrongly shaped tensor is a
      :class:`~mlla_mm.checkpoint.CheckpointError` naming ``source``.

    Returns:
        ``{'loaded': [...], 'missing': [...], 'skipped': [...]}``.
    """
    weights = dict(state_dict)
    own = model.state_dict()
    skipped: List[str] = []
    head_w = weights.get('head.weight')
    if head_w is not None and ('head.weight' not in own or own['head.weight'].shape != head_w.shape):
        skipped = [k for k in ('head.weight', 'head.bias') if k in weights]
        for k in skipped:
            weights.pop(k)
    stem_key = 'patch_embed.conv1.conv.weight'
    if stem_key in weights and stem_key in own and weights[stem_key].shape[1] != own[stem_key].shape[1]:
        weights[stem_key] = adapt_input_conv(own[stem_key].shape[1], weights[stem_key])
    mismatched = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in weights.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in weights]
    required = [k for k in missing if not _is_classifier_key(k) and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in weights if k not in own]
    if mismatched or required or unexpected:
        parts = []
        if mismatched:
            parts.append(f'{len(mismatched)} tensor(s) of the wrong shape (e.g. {"; ".join(mismatched[:2])})')
        if required:
            parts.append(f'{len(required)} missing (e.g. {", ".join(required[:3])})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {", ".join(unexpected[:3])})')
        raise CheckpointError(
            f'{source}: not a checkpoint of this MLLA model (embed_dim {model.embed_dim}, depths '
            f'{list(model.depths)}, num_heads {list(model.num_heads)}): {"; ".join(parts)}. '
            'Another MLLA size, or another model?')
    model.load_state_dict(weights, strict=False)
    kept = [k for k in missing if _is_classifier_key(k)]
    if kept or skipped:
        _logger.warning(f'MLLA: {source}: kept at init (not in the file or another number of classes): '
                        f'{", ".join(sorted(set(kept + skipped)))}')
    _logger.info(f'MLLA: loaded {len(weights)} tensors from {source}')
    return {'loaded': sorted(weights), 'missing': kept, 'skipped': skipped}


# --------------------------------------------------------------------------
# Pretrained configs and the registered constructors.
# --------------------------------------------------------------------------
_FILES = {'mlla_tiny': 'MLLA_T.pth', 'mlla_small': 'MLLA_S.pth', 'mlla_base': 'MLLA_B.pth'}
_TOP1 = {'mlla_tiny': 83.5, 'mlla_small': 84.4, 'mlla_base': 85.3}
ORIGIN_URL = 'https://github.com/LeapLabTHU/MLLA'


def _cfg(variant: str) -> Dict[str, Any]:
    """The published ImageNet-1k recipe (Swin's data pipeline: bicubic, resize 256, centre crop 224)."""
    return dict(
        url='',
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, crop_mode='center',
        interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv='patch_embed.conv1.conv', classifier='head',
        custom_load=True,  # timm hands the file to MLLAClassifier.load_pretrained (safe loader)
        paper_ids='arXiv:2405.16605',
        paper_name='Demystify Mamba in Vision: A Linear Attention Perspective',
        origin_url=ORIGIN_URL,
        license='unknown',
        description=f'{variant}: MLLA ImageNet-1k classifier, top-1 {_TOP1[variant]} (published)',
        notes=(f'Weights: {_FILES[variant]} from {ORIGIN_URL} (no download here); load with '
               f"pretrained=True, pretrained_cfg_overlay=dict(file='.../{_FILES[variant]}').",
               'License: the published repository states none that could be verified; its code derives '
               'from Swin Transformer (MIT).'),
    )


default_cfgs = generate_default_cfgs({f'{name}.in1k': _cfg(name) for name in _FILES})


class MissingWeightsError(CheckpointError):
    """``pretrained=True`` without a weights file (nothing can be downloaded)."""


def _create_mlla(variant: str, pretrained: bool = False, use_ema: bool = False, **kwargs: Any) -> nn.Module:
    """Build ``variant`` with timm's ``build_model_with_cfg``; weights come from ``pretrained_cfg`` ``file``."""
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    if use_ema and not pretrained:
        raise ValueError(f'{variant}: use_ema=True selects pretrained weights; it needs pretrained=True')
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not (cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
            name = _FILES.get(variant, 'the checkpoint')
            raise MissingWeightsError(
                f'{variant}: pretrained=True needs the published weights file, which is not downloaded: get '
                f'{name} from {ORIGIN_URL} (README, Pretrained Models), put it for example at '
                f"data/pretrained/{name} and pass pretrained_cfg_overlay=dict(file='data/pretrained/{name}')")
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if overlay.get('file') or overlay.get('url'):
        # timm resets custom_load when a file is given; keep it, so the file is read by the safe loader
        # in MLLAClassifier.load_pretrained and never by timm's torch.load
        overlay['custom_load'] = True
    kwargs['pretrained_cfg_overlay'] = overlay or None
    token = _PRETRAINED_USE_EMA.set(bool(use_ema))
    try:
        return build_model_with_cfg(
            MLLAClassifier, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
            **kwargs)
    finally:
        _PRETRAINED_USE_EMA.reset(token)


def _arch_kwargs(arch: str) -> Dict[str, Any]:
    s = ARCH_SETTINGS[arch]
    return dict(embed_dim=s['embed_dims'], depths=s['depths'], num_heads=s['num_heads'])


@register_model
def mlla_tiny(pretrained: bool = False, **kwargs: Any) -> MLLAClassifier:
    """MLLA-T: embed_dim 64, depths (2, 4, 8, 4), heads (2, 4, 8, 16); 24.4 M parameters, top-1 83.5."""
    return _create_mlla('mlla_tiny', pretrained=pretrained, **dict(_arch_kwargs('tiny'), **kwargs))


@register_model
def mlla_small(pretrained: bool = False, **kwargs: Any) -> MLLAClassifier:
    """MLLA-S: embed_dim 64, depths (3, 6, 21, 6), heads (2, 4, 8, 16); 43.0 M parameters, top-1 84.4."""
    return _create_mlla('mlla_small', pretrained=pretrained, **dict(_arch_kwargs('small'), **kwargs))


@register_model
def mlla_base(pretrained: bool = False, **kwargs: Any) -> MLLAClassifier:
    """MLLA-B: embed_dim 96, depths (3, 6, 21, 6), heads (3, 6, 12, 24); 96.0 M parameters, top-1 85.3."""
    return _create_mlla('mlla_base', pretrained=pretrained, **dict(_arch_kwargs('base'), **kwargs))


__all__ = ['MLLAClassifier', 'checkpoint_filter_fn', 'load_checkpoint_weights', 'MissingWeightsError',
           'default_cfgs']
