"""The MLLA ImageNet classifiers for timm: ``timm.create_model('mlla_tiny')`` after ``import mlla_mm``.

Ordered like timm's model files: the model (``MLLAClassifier``: the stem and stages of
:mod:`mlla_mm.models.mlla`, then the final norm, pooling and the head of the published classification
model), ``checkpoint_filter_fn`` and the loading of published checkpoints through mlla-mm's safe loader,
the pretrained cfgs, and the ``mlla_tiny/small/base`` constructors registered with timm (docs/timm.md).
"""
from __future__ import annotations

import contextvars
import logging
import os
import re
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models import (adapt_input_conv, build_model_with_cfg, generate_default_cfgs, register_model,
                         resolve_pretrained_cfg)
# timm exports feature_take_indices only from this module (in its __all__, not from timm.models; timm's own
# models import it from here too); present since timm 1.0.3.
from timm.models._features import feature_take_indices

from ..checkpoint import CheckpointError, compare_state_dicts, find_state_dict, load_file
from .mlla import (ARCH_SETTINGS, LayerNorm, Stem, _is_number, build_stages, check_hyperparameters, check_images,
                   init_module, resolve_arch, run_stages)
from .ops import is_tracing, set_fast_inference

# --------------------------------------------------------------------------
# The model: the same stem and stages as the backbone, then the final norm, pooling and the head.
# --------------------------------------------------------------------------
_logger = logging.getLogger(__name__)

# Set by the registered constructors for the duration of a build: which weights
# ``MLLAClassifier.load_pretrained`` takes from a training checkpoint (``model`` or ``state_dict_ema``).
_PRETRAINED_USE_EMA: 'contextvars.ContextVar[bool]' = contextvars.ContextVar('mlla_pretrained_use_ema',
                                                                            default=False)


def make_pool(global_pool: str) -> nn.Module:
    """timm's global pooling of NHWC maps to ``(B, C * feat_mult)``; ``''``: none (the maps pass through)."""
    if not isinstance(global_pool, str):
        raise ValueError(f"MLLA: global_pool must be a string such as 'avg' or '', got {global_pool!r}")
    try:
        return SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool), input_fmt='NHWC')
    except (AssertionError, ValueError, KeyError):
        raise ValueError(f"MLLA: global_pool must be one of 'avg', 'max', 'avgmax', 'catavgmax' or '', "
                         f'got {global_pool!r}') from None


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
        global_pool: timm's pooling (``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'``) or ``''``
            (no pooling: ``forward_head`` gets NHWC maps).
        embed_dim: Channels of stage 0 (stage i has ``embed_dim * 2**i``).
        depths: Blocks per stage (four stages).
        num_heads: Attention heads per stage.
        mlp_ratio: MLP hidden size relative to the channels.
        drop_rate: Dropout before the head.
        proj_drop_rate: Dropout in the block MLPs.
        drop_path_rate: Stochastic depth, rising linearly over all blocks.
        output_stride: Must be 32 (no dilated variant); accepted as timm's feature API passes it.
        device: Where the parameters are created (e.g. ``'meta'``); timm's factory argument.
        dtype: Floating dtype of the parameters; timm's factory argument.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = 'avg',
                 embed_dim: int = 64, depths: Tuple[int, ...] = (2, 4, 8, 4),
                 num_heads: Tuple[int, ...] = (2, 4, 8, 16), mlp_ratio: float = 4., drop_rate: float = 0.,
                 proj_drop_rate: float = 0., drop_path_rate: float = 0., output_stride: int = 32,
                 device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if output_stride != 32:
            raise ValueError(f'MLLA: output_stride must be 32 (MLLA has no dilated stages), got {output_stride!r}')
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f'MLLA: dtype must be a floating torch.dtype, got {dtype!r}')
        with torch.device(device) if device is not None else nullcontext():
            self._build(in_chans, num_classes, global_pool, embed_dim, depths, num_heads, mlp_ratio, drop_rate,
                        proj_drop_rate, drop_path_rate)
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(self, in_chans: int, num_classes: int, global_pool: str, embed_dim: int, depths: Tuple[int, ...],
               num_heads: Tuple[int, ...], mlp_ratio: float, drop_rate: float, proj_drop_rate: float,
               drop_path_rate: float) -> None:
        arch = resolve_arch(dict(embed_dims=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads)))
        check_hyperparameters(arch['embed_dims'], mlp_ratio, proj_drop_rate, drop_path_rate)
        if not _is_number(drop_rate) or not 0 <= drop_rate < 1:
            raise ValueError(f'MLLA: drop_rate must be a number in [0, 1), got {drop_rate!r}')
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'MLLA: num_classes must be an int >= 0, got {num_classes!r}')
        self.num_classes = num_classes
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
        self.layers = build_stages(self.embed_dim, self.depths, self.num_heads, mlp_ratio, proj_drop_rate,
                                   drop_path_rate)
        self.norm = LayerNorm(self.num_features)
        self.global_pool = global_pool
        self.pool = make_pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features * self.pool.feat_mult(), num_classes) if num_classes > 0 \
            else nn.Identity()
        self.apply(init_module)

    # -- timm model API ------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], Tuple[int, ...]]:
        """Parameter groups for layer-wise learning-rate decay, as timm's Swin and ConvNeXt group them.

        The stem first; then each block (or, ``coarse``, each stage); a downsample
        goes with the first block of the stage it feeds (in MLLA's layout it sits at
        the end of the previous stage, ``layers.{i}.downsample``); the final norm
        with the last block; anything else (the head) last. A callable, which
        timm's ``group_with_matcher`` takes, because the downsample's group is
        ``i + 1``.
        """
        depths = [len(stage.blocks) for stage in self.layers]

        def group(name: str) -> Tuple[int, ...]:
            if name.startswith('patch_embed.'):
                return (0, )
            m = re.match(r'^layers\.(\d+)\.(blocks\.(\d+)|downsample)\.', name)
            if m:
                i = int(m.group(1))
                if m.group(3) is not None:
                    return (1, i) if coarse else (1, i, int(m.group(3)))
                return (1, i + 1) if coarse else (1, i + 1, 0)
            if name.startswith('norm.'):
                last = len(depths) - 1
                return (1, last) if coarse else (1, last, max(depths[-1] - 1, 0))
            return (2, )

        return group

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the stem, every block and every downsample when gradients are needed."""
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fast_inference(self, enable: bool = True) -> 'MLLAClassifier':
        """Switch the fast inference path on or off for this model (default: ``MLLA_MM_FAST_INFERENCE``)."""
        return set_fast_inference(self, enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head by a new one with ``num_classes`` outputs (0: none); optionally change the pooling.

        The new head is created on the model's device and in its dtype.
        """
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f'MLLA: num_classes must be an int >= 0, got {num_classes!r}')
        if global_pool is not None:
            self.pool = make_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.num_features * self.pool.feat_mult(), num_classes, **dd) if num_classes > 0 \
            else nn.Identity()

    # -- forward ---------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if not is_tracing():  # (traced sizes would be frozen into the graph by these checks)
            check_images(x, self.in_chans)

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

        def intermediate(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
            def take(y: torch.Tensor) -> torch.Tensor:  # the map leaves its stage before the downsample
                y = self.norm(y) if norm and i == num_stages - 1 else y  # the final norm fits the last stage only
                return y.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else y
            return take

        x, intermediates = run_stages(self.patch_embed, self.layers, x, last,
                                      {i: intermediate(i) for i in take_indices}, self.grad_checkpointing)
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
        x, _ = run_stages(self.patch_embed, self.layers, x, len(self.layers) - 1, None, self.grad_checkpointing)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC features -> logits (or the pooled features with ``pre_logits``)."""
        x = self.pool(x)
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
# Checkpoint filtering and loading (timm models).
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
    fit = compare_state_dicts(own, weights)
    mismatched = [msg for _, msg in fit.wrong]
    missing, unexpected = fit.missing, fit.unexpected
    required = [k for k in missing if not _is_classifier_key(k) and not k.endswith('num_batches_tracked')]
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
# Pretrained configs and the constructors registered with timm.
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


_FEATURE_CLS = ('getter', 'hook')


class MissingWeightsError(CheckpointError, FileNotFoundError):
    """A weights file that is not there (nothing can be downloaded): says where to get it and where to put it."""


def missing_weights_message(path: str, variant: str = 'mlla_tiny', option: str = '') -> str:
    """What to say when the weights file ``path`` (a tool's ``option``) is not there.

    The message says where to get the file and where to put it.
    """
    variant = {'mlla_t': 'mlla_tiny', 'mlla_s': 'mlla_small', 'mlla_b': 'mlla_base'}.get(variant, variant)
    where = f'{option} {path}' if option else str(path)
    if os.path.basename(path) in _FILES.values():
        return (f'{where}: not found; the published weights are not downloaded: get {os.path.basename(path)} from '
                f'{ORIGIN_URL} (README, Pretrained Models) and put it at {path}')
    name = _FILES.get(variant, 'MLLA_T.pth')
    return (f'{where}: not found (the published weights are not downloaded: get {name} from {ORIGIN_URL} '
            f'(README, Pretrained Models) and put it at data/pretrained/{name})')


def refuse_remote_weights(variant: str, cfg: Any) -> None:
    """Refuse a resolved timm ``PretrainedCfg`` whose weights timm would download or take from a hub cache.

    timm loads, in this order: ``source='hf-hub'`` / ``'local-dir'``, then
    ``state_dict`` (in memory), ``file``, ``hf_hub_id``, ``url``. Only
    ``state_dict`` and ``file`` (read by :meth:`MLLAClassifier.load_pretrained`
    through the safe loader) are allowed: nothing is ever downloaded.

    Raises:
        CheckpointError: One line naming the setting and what to pass instead.
    """
    source = getattr(cfg, 'source', None)
    if source in ('hf-hub', 'local-dir'):
        what = f"source={source!r}"
    elif getattr(cfg, 'state_dict', None) or getattr(cfg, 'file', None):  # timm's own precedence
        return
    elif getattr(cfg, 'hf_hub_id', None):
        what = f'hf_hub_id={cfg.hf_hub_id!r}'
    elif getattr(cfg, 'url', None):
        what = f'url={cfg.url!r}'
    else:
        return
    raise CheckpointError(
        f'{variant}: pretrained weights from {what} would be downloaded or read from a hub cache by timm\'s own '
        "loader, which mlla-mm never does; get the file and pass pretrained_cfg_overlay=dict(file='PATH') "
        '(read by the safe loader)')


def _create_mlla(variant: str, pretrained: bool = False, use_ema: bool = False, if_missing: str = 'error',
                 **kwargs: Any) -> nn.Module:
    """Build ``variant`` with timm's ``build_model_with_cfg``; weights come from ``pretrained_cfg`` ``file``.

    A ``file`` that does not exist is :class:`MissingWeightsError` (where to get the published file and where
    to put it), or with ``if_missing='warn'`` (what the configs say) a warning and random weights.
    """
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    feature_cls = kwargs.get('feature_cls', 'getter')
    if kwargs.get('features_only') and not (isinstance(feature_cls, str) and feature_cls.lower() in _FEATURE_CLS):
        # 'list'/'dict' need the stages as sequential children, and 'fx' (torchvision's rule: the last
        # node inside a module) would return each stage's *downsampled* map, because the downsample
        # layers are children of the stages in the published layout.
        raise ValueError(f"{variant}: features_only supports feature_cls 'getter' (the default) or 'hook', got "
                         f'{feature_cls!r}')
    if use_ema and not pretrained:
        raise ValueError(f'{variant}: use_ema=True selects pretrained weights; it needs pretrained=True')
    if if_missing not in ('error', 'warn'):
        raise ValueError(f"{variant}: if_missing must be 'error' or 'warn', got {if_missing!r}")
    file = (kwargs.get('pretrained_cfg_overlay') or {}).get('file')
    if pretrained and file and not os.path.exists(os.path.expanduser(str(file))):
        if if_missing == 'error':
            raise MissingWeightsError(missing_weights_message(str(file), variant))
        print_log(f'{variant}: pretrained weights {file} not found; the model is RANDOMLY initialised. Put the '
                  f'published ImageNet weights at {file} to fine-tune from them.', logger='current', level=30)
        pretrained = False
        kwargs['pretrained_cfg_overlay'] = None
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        if not (cfg.file or cfg.state_dict or cfg.url or cfg.hf_hub_id):
            name = _FILES.get(variant, 'the checkpoint')
            raise MissingWeightsError(
                f'{variant}: pretrained=True needs the published weights file, which is not downloaded: get '
                f'{name} from {ORIGIN_URL} (README, Pretrained Models), put it for example at '
                f"data/pretrained/{name} and pass pretrained_cfg_overlay=dict(file='data/pretrained/{name}')")
        refuse_remote_weights(variant, cfg)
    overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
    if pretrained:  # a file is read by the safe loader (load_pretrained); timm is left nothing to download
        overlay.update(custom_load=True, url='', hf_hub_id=None, hf_hub_filename=None, source=None)
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
           'missing_weights_message',
           'default_cfgs', 'mlla_tiny', 'mlla_small', 'mlla_base']
