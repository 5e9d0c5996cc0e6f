"""INT8 static post-training quantization of an exported graph with ONNX Runtime's quantization tools.

:func:`quantize_int8` calibrates activation ranges (min/max) on given
inputs and writes a QDQ model: weights int8 per output channel, activations
uint8 (u8s8, what ONNX Runtime's x86 kernels run with VNNI). Only ``Conv``
and ``MatMul``/``Gemm`` nodes with a weight operand, except depthwise
convolutions on float inputs, are quantized (:func:`weight_nodes`, after
:func:`prepare_for_int8` has turned the channel-major q and k projections,
``MatMul(W, x)``, into 1x1 convolutions), and a ``Relu`` right after one of them is folded into its
output's quantization; everything else stays float: MLLA's attention
products of two activations (``k^T v`` and its normaliser), RoPE, ELU,
softmax, LayerNorm, GELU, and a detector's NMS, RoiAlign and box decoding.
``MatMul`` outputs stay float (ONNX Runtime runs ``MatMulIntegerToFloat``).

:func:`config_calibration` gives calibration inputs from a config's training
images through its test pipeline and data preprocessor;
:func:`folder_calibration` from a folder of images (ImageNet normalisation,
for a bare backbone export).
"""
from __future__ import annotations

import itertools
import os
import tempfile
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..datasets.synthetic import make_synthetic_data
from ..errors import UsageError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
QUANTIZED_OPS = ('Conv', 'MatMul', 'Gemm')


def _is_float_depthwise(node, produced_by: Dict[str, object]) -> bool:
    """A grouped convolution (``group`` > 1) that reads a float tensor: MLLA's ``dwc``, ``lepe`` and ``cpe`` s.

    The downsample's depthwise convolution reads the ``Relu`` of a quantized
    1x1 convolution, already uint8, and feeds another: ONNX Runtime fuses it
    into a ``QLinearConv`` whatever the quantizer does, so it is quantized.
    """
    if node.op_type != 'Conv' or not any(a.name == 'group' and a.i > 1 for a in node.attribute):
        return False
    src = produced_by.get(node.input[0])
    return src is None or src.op_type != 'Relu'


def weight_nodes(model) -> Tuple[List[str], List[str]]:
    """``(quantized, kept float)`` node names among ``QUANTIZED_OPS``: quantized when the second input is a weight.

    ``MatMul`` of two activations (linear attention's ``k^T v``, ``q (k^T v)``
    and its normaliser) is kept float: its range changes with every image.
    Depthwise (grouped) convolutions on float inputs are kept float too
    (:func:`_is_float_depthwise`): ONNX Runtime runs them in int8 only
    channels-last, between transposes; quantized, they made the MLLA-T backbone
    slower and the demo detector less accurate (measurements: docs/deploy.md,
    "Measured").
    """
    weights = {i.name for i in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == 'Constant'}
    weights |= consts
    produced_by = {o: n for n in model.graph.node for o in n.output}
    quantized, kept = [], []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        weighted = len(node.input) > 1 and node.input[1] in weights and not _is_float_depthwise(node, produced_by)
        (quantized if weighted else kept).append(node.name)
    return quantized, kept


def _rank(model, name: str) -> Optional[int]:
    """The rank of value ``name`` from ``model``'s (shape-inferred) value infos, None when unknown."""
    for info in itertools.chain(model.graph.value_info, model.graph.input, model.graph.output):
        if info.name == name and info.type.tensor_type.HasField('shape'):
            return len(info.type.tensor_type.shape.dim)
    return None


def prepare_for_int8(model) -> Tuple[int, int]:
    """Rewrite ``model`` (an ``onnx.ModelProto``, in place) so that its weight products quantize; same function.

    * ``Identity`` of an initializer (the TorchScript exporter's way of sharing equal tensors, e.g. two
      zero biases) becomes a copy of the initializer: a ``Conv`` whose bias comes out of an ``Identity``
      is not quantized and not fused, and runs as a float convolution of dequantized weights.
    * ``MatMul(W, X)`` with ``W`` a 2-D weight and ``X`` a 3-D ``(B, Cin, N)`` activation (the export
      formulation's channel-major q and k projections) becomes ``Squeeze(Conv1x1(Unsqueeze(X)))``, with a
      following ``Add`` of a ``(Cout, 1)`` bias folded into the convolution: ONNX Runtime has no integer
      kernel with the weight on the left (such a product stays a float ``MatMul``), and runs the
      convolution as ``QLinearConv`` with per-channel weights.

    Returns:
        ``(identities replaced, weight-left products turned into convolutions)``.
    """
    import onnx
    from onnx import helper, numpy_helper
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    identities = [n for n in graph.node if n.op_type == 'Identity' and n.input[0] in inits
                  and n.output[0] not in outputs]
    for node in identities:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        inits[copy.name] = copy
        graph.node.remove(node)
    opset = max((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), default=0)
    if opset < 13:  # Unsqueeze/Squeeze take their axes as an input from opset 13 on
        return len(identities), 0
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    shaped = onnx.shape_inference.infer_shapes(model)
    axis = 'mlla_mm_int8_axis3'
    converted = 0
    for node in list(graph.node):
        if node.op_type != 'MatMul' or node.input[0] not in inits or node.input[1] in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[0]])
        if weight.ndim != 2 or _rank(shaped, node.input[1]) != 3:
            continue
        out, after = node.output[0], consumers.get(node.output[0], [])
        bias = None
        if len(after) == 1 and after[0].op_type == 'Add' and out not in outputs:
            other = [i for i in after[0].input if i != out]
            if len(other) == 1 and other[0] in inits:
                b = numpy_helper.to_array(inits[other[0]])
                if b.shape in ((weight.shape[0], 1), (1, weight.shape[0], 1)):
                    bias = b.reshape(-1)
        if axis not in inits:
            inits[axis] = numpy_helper.from_array(np.array([3], np.int64), axis)
            graph.initializer.append(inits[axis])
        base = f'{node.name or out}/conv1x1'
        graph.initializer.append(numpy_helper.from_array(weight[:, :, None, None], f'{base}_weight'))
        conv_in = [f'{base}_input', f'{base}_weight']
        if bias is not None:
            graph.initializer.append(numpy_helper.from_array(bias, f'{base}_bias'))
            conv_in.append(f'{base}_bias')
            out = after[0].output[0]
            graph.node.remove(after[0])
        at = list(graph.node).index(node)
        graph.node.remove(node)
        new = [helper.make_node('Unsqueeze', [node.input[1], axis], [conv_in[0]], name=f'{base}/Unsqueeze'),
               helper.make_node('Conv', conv_in, [f'{base}_output'], name=base, kernel_shape=[1, 1]),
               helper.make_node('Squeeze', [f'{base}_output', axis], [out], name=f'{base}/Squeeze')]
        for i, n in enumerate(new):
            graph.node.insert(at + i, n)
        converted += 1
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return len(identities), converted


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Iterable[Dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)
        self.count = 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        feed = next(self._it, None)
        if feed is not None:
            self.count += 1
        return feed

    def rewind(self) -> None:  # not used by MinMax calibration
        raise NotImplementedError


def quantize_int8(model: Union[bytes, str], feeds: Iterable[Dict[str, np.ndarray]], log: Callable[[str], None] = print,
                  per_channel: bool = True) -> bytes:
    """The INT8 (QDQ) model of ``model`` calibrated on ``feeds`` (dicts of input arrays); returns its bytes.

    The graph is first rewritten by :func:`prepare_for_int8` (same function, more of it quantizable). The
    outputs of quantized ``MatMul`` s are left float (``OpTypesToExcludeOutputQuantization``): ONNX Runtime
    then runs them as ``MatMulIntegerToFloat`` (int8 product, float result) instead of ``QLinearMatMul``
    followed by a ``DequantizeLinear`` before the float bias ``Add`` and activation, which is faster and
    saves a rounding to uint8. A ``Relu`` after a quantized convolution is folded into its output's
    quantization (zero point 0) instead of running float between a ``DequantizeLinear`` and a
    ``QuantizeLinear``.

    Raises:
        UsageError: onnxruntime's quantization tools are missing, or no calibration input was given.
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError:
        raise UsageError("--int8 needs onnx and onnxruntime (pip install -e '.[deploy]')") from None
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    prepare_for_int8(proto)
    quantized, kept = weight_nodes(proto)
    feeds = iter(feeds)
    first = next(feeds, None)
    if first is None:
        raise UsageError('--int8: no calibration images were read')
    reader = _Reader(itertools.chain([first], feeds))
    with tempfile.TemporaryDirectory(prefix='mlla_mm_int8_') as tmp:
        src, dst = os.path.join(tmp, 'fp32.onnx'), os.path.join(tmp, 'int8.onnx')
        onnx.save(proto, src)
        import logging
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process and notes on computed biases: not actionable here
        try:
            quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS) + ['Relu'], nodes_to_exclude=kept,
                            per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options=dict(ActivationSymmetric=False, WeightSymmetric=True,
                                               OpTypesToExcludeOutputQuantization=['MatMul']))
        finally:
            root.setLevel(level)
        out = onnx.load(dst)
    meta = {p.key: p.value for p in out.metadata_props}
    props = {p.key: p.value for p in proto.metadata_props}  # the export's metadata (kind, hash, ...) carried over
    props.update(mlla_mm_int8='static qdq u8s8 per-channel minmax, float matmul outputs, depthwise float',
                 mlla_mm_int8_calibration_images=str(reader.count))
    for key, value in props.items():
        if key in meta:
            continue
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value
    log(f'int8: {len(quantized)} Conv/MatMul/Gemm nodes quantized, {len(kept)} kept float (activation products, '
        f'depthwise convolutions); '
        f'calibrated on {reader.count} image(s)')
    return out.SerializeToString()


def folder_images(folder: str, count: int) -> List[str]:
    """Up to ``count`` image files of ``folder`` (sorted); a :class:`UsageError` when there is none."""
    if not os.path.isdir(folder):
        raise UsageError(f'--calib-dir {folder}: not a directory')
    # regular files only: opening a FIFO named x.png would wait forever, a device would be read without end
    names = (os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    files = sorted(p for p in names if os.path.isfile(p))
    if not files:
        raise UsageError(f'--calib-dir {folder}: no images ({", ".join(IMAGE_SUFFIXES)}) in it')
    return files[:count]


def folder_calibration(folder: str, count: int, shape: Tuple[int, int],
                       mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                       ) -> Iterator[Dict[str, np.ndarray]]:
    """Feeds ``{'img': 1x3xHxW}`` from the images of ``folder``, resized to ``shape``, RGB, normalised."""
    from PIL import Image
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    for path in folder_images(folder, count):
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert('RGB').resize((shape[1], shape[0]), Image.BILINEAR), np.float32)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # damaged, too many pixels
            raise UsageError(f'--calib-dir: cannot read {path}: {" ".join(str(err).split())[:200]}') from None
        yield {'img': ((rgb.transpose(2, 0, 1) - m) / s)[None].astype(np.float32)}


def config_calibration(config: str, count: int, kind: str) -> Iterator[Dict[str, np.ndarray]]:
    """Feeds from the first ``count`` images of ``config``'s training set, through its test pipeline and its
    model's data preprocessor (as tools/test.py feeds the graph). ``kind``: the export kind (inputs)."""
    import copy

    from mmengine.config import Config
    from mmengine.registry import DATASETS, MODELS, init_default_scope

    import mlla_mm  # noqa: F401
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    train = cfg.get('train_dataloader') or {}
    dataset_cfg = copy.deepcopy(train.get('dataset'))
    if not dataset_cfg:
        raise UsageError(f'--calib-images: {config} has no train_dataloader.dataset to calibrate on')
    while 'dataset' in dataset_cfg and 'pipeline' not in dataset_cfg:  # RepeatDataset & co.
        dataset_cfg = dataset_cfg['dataset']
    pipeline = cfg.get('test_pipeline') or cfg.test_dataloader.dataset.get('pipeline')
    dataset_cfg['pipeline'] = pipeline
    if cfg.get('synthetic_data'):  # a demo config: its data set is made on first use, as the runner does
        make_synthetic_data(cfg)
    try:
        dataset = DATASETS.build(dataset_cfg)
    except FileNotFoundError as err:
        raise UsageError(f'--calib-images: the training set of {config} is missing: {err}') from None
    pre = MODELS.build(cfg.model.data_preprocessor)
    n = min(count, len(dataset))
    if n == 0:
        raise UsageError(f'--calib-images: the training set of {config} is empty')
    for i in range(n):
        data = pre(dict(inputs=[dataset[i]['inputs']], data_samples=[dataset[i]['data_samples']]), False)
        feed = {'img': data['inputs'].float().numpy()}
        if kind == 'detector':
            feed['img_shape'] = np.array([list(data['data_samples'][0].metainfo['img_shape'][:2])], np.int64)
        yield feed


__all__ = ['QUANTIZED_OPS', 'config_calibration', 'folder_calibration', 'folder_images', 'quantize_int8',
           'weight_nodes']
