#!/usr/bin/env python
"""The prepared GPU check (``make gpu-check``): one run on a machine with a GPU, one JSON file, one table.

    python tools/gpu_check.py [--out work_dirs/gpu_check/gpu_check.json] [--only NAME ...]

Checks, in order (each a function below; about 3-5 minutes on one GPU):

==============  =====================================================================================
mmcv_ops        mmcv's NMS and RoIAlign run on the GPU and agree with the CPU (a CUDA build of mmcv)
backbone_fp32   MLLA-T fp32 on the GPU (TF32 off) vs a float64 CPU reference: max rel. diff <= 1e-4
autocast_fp16   the same under fp16 autocast: <= 3e-2 (bf16 too where the GPU has it)
golden          the published code's golden outputs (shared/golden) reproduced on the GPU (<= 1e-4)
maskrcnn_amp    30 Mask R-CNN MLLA-T iterations on the demo data with ``--amp``: finite, decreasing loss
upernet_step    one UperNet MLLA-T training step on the GPU: finite loss and gradients
resume          a short run stopped by SIGTERM and resumed (``deterministic=True``) ends with the same
                weights as an uninterrupted run
speed           MLLA-T vs mmdet's Swin-T: backbone inference at 800x1280 (MLLA-T with and without its
                fast inference path), a training step at 2x1024x1024 with and without ``with_cp``,
                peak GPU memory
ddp             a 2-process DDP training step (NCCL) when two GPUs are present
==============  =====================================================================================

Without a GPU it prints one line and exits 0. The checks themselves are
device-agnostic (``Ctx.device``, sizes in ``Ctx``): the test suite runs the
cheap ones on the CPU with tiny sizes (tests/test_tools/test_gpu_check.py).
Exit code: 0 when nothing failed, 1 otherwise.
"""

import argparse
import copy
import dataclasses
import glob
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO_DET = ROOT / 'configs' / 'detection' / 'mask_rcnn_mlla_t_demo.py'
DEMO_SEG = ROOT / 'configs' / 'segmentation' / 'upernet_mlla_t_demo.py'
FP32_LIMIT = 1e-4
AUTOCAST_LIMIT = 3e-2
GOLDEN_LIMIT = 1e-4


# --------------------------------------------------------------------------
# Results, the table and the JSON file.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """One row of the table."""

    name: str
    status: str  # PASS, FAIL, SKIP or INFO (a measurement without a limit)
    value: str = ''
    limit: str = ''
    seconds: float = 0.0
    detail: str = ''
    data: Dict[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Ctx:
    """Where and how big: the defaults are the GPU check's; the tests pass the CPU and tiny sizes."""

    device: str = 'cuda'
    work_dir: Path = ROOT / 'work_dirs' / 'gpu_check'
    arch: object = 'tiny'  # MLLA arch for the accuracy checks
    size: Tuple[int, int] = (224, 320)  # input of the accuracy checks
    infer_size: Tuple[int, int] = (800, 1280)
    train_size: Tuple[int, int] = (1024, 1024)
    train_batch: int = 2
    repeats: int = 5
    warmup: int = 2
    iters: int = 30
    seg_size: Tuple[int, int] = (512, 512)
    seg_arch: Optional[dict] = None  # None: the config's MLLA-T
    det_extra: str = ''  # config lines appended to the detector runs' configs (the tests shrink the model)
    det_workers: int = 2  # dataloader workers of the detector runs
    speed_arch: object = 'tiny'  # the MLLA of the speed rows (the tests use smaller ones)
    swin_kwargs: Optional[dict] = None  # overrides of Swin-T's settings (the tests use smaller ones)
    python: str = sys.executable


def verdict(value: float, limit: float) -> str:
    """PASS when ``value`` is finite and at most ``limit``."""
    return 'PASS' if math.isfinite(value) and value <= limit else 'FAIL'


def format_table(results: Sequence[Result]) -> str:
    """The results as a fixed-width text table (details after the value)."""
    rows = [('check', 'status', 'value', 'limit', 'time')]
    rows += [(r.name, r.status, r.value + (f' ({r.detail})' if r.detail else ''), r.limit, f'{r.seconds:.1f} s')
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for k, row in enumerate(rows):
        lines.append('  '.join(cell.ljust(widths[i]) if i < 4 else cell for i, cell in enumerate(row)).rstrip())
        if k == 0:
            lines.append('  '.join('-' * w for w in widths) + '  ----')
    return '\n'.join(lines)


def environment(device: str) -> Dict[str, object]:
    """What ran the check: torch, CUDA, the GPU(s), mmcv's CUDA build."""
    env: Dict[str, object] = dict(torch=torch.__version__, cuda=torch.version.cuda, device=device,
                                  python=sys.version.split()[0])
    if device.startswith('cuda') and torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                   capability='.'.join(map(str, torch.cuda.get_device_capability(0))))
    try:
        from mlla_mm.engine.device import mmcv_compiling_cuda_version
        env['mmcv_cuda'] = mmcv_compiling_cuda_version()
    except Exception as err:  # noqa: BLE001
        env['mmcv_cuda'] = f'error: {err}'
    return env


def write_report(path: Path, env: Dict[str, object], results: Sequence[Result]) -> None:
    """The JSON file, whole or not at all."""
    from mlla_mm.utils.io import atomic_write
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(environment=env, results=[dataclasses.asdict(r) for r in results],
                   failed=[r.name for r in results if r.status == 'FAIL'])
    with atomic_write(str(path), 'w') as f:
        json.dump(payload, f, indent=2, default=str)


# --------------------------------------------------------------------------
# Numbers.
# --------------------------------------------------------------------------
def max_rel_diff(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    """``max |out - ref| / max |ref|`` over each pair (in float64 on the CPU), the largest over the pairs."""
    if len(outputs) != len(references):
        raise ValueError(f'{len(outputs)} outputs against {len(references)} references')
    worst = 0.0
    for out, ref in zip(outputs, references):
        if out.shape != ref.shape:
            raise ValueError(f'shape {tuple(out.shape)} against {tuple(ref.shape)}')
        out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
        if not torch.isfinite(out).all():
            return math.inf
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (out - ref).abs().max().item() / scale)
    return worst


def max_abs_diff(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    """The largest ``|out - ref|`` over the pairs (inf for a non-finite output)."""
    worst = 0.0
    for out, ref in zip(outputs, references):
        out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
        if not torch.isfinite(out).all():
            return math.inf
        worst = max(worst, (out - ref).abs().max().item())
    return worst


class exact_fp32:
    """TF32 off for matmuls and cuDNN convolutions inside (the fp32 comparisons); restored after."""

    def __enter__(self) -> 'exact_fp32':
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return self

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` (the GPU synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mib(fn: Callable[[], object], device: str) -> Optional[float]:
    """Peak GPU memory allocated during ``fn`` in MiB (None on the CPU)."""
    if not device.startswith('cuda'):
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def parse_train_losses(log_text: str) -> List[float]:
    """The total ``loss`` of every logged training iteration of an mmengine log, in order."""
    losses = []
    for line in log_text.splitlines():
        if '(train)' not in line:
            continue
        match = re.search(r'\sloss: (\S+)', line)
        if match:
            try:
                losses.append(float(match.group(1)))
            except ValueError:
                losses.append(math.nan)
    return losses


def loss_trend(losses: Sequence[float], window: int = 5) -> Tuple[bool, str]:
    """Finite and decreasing: the mean of the last ``window`` losses below the mean of the first ``window``."""
    if len(losses) < 2 * window:
        return False, f'{len(losses)} logged losses, expected at least {2 * window}'
    if not all(math.isfinite(v) for v in losses):
        bad = next(i for i, v in enumerate(losses) if not math.isfinite(v))
        return False, f'non-finite loss at logged iteration {bad + 1}'
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    return last < first, f'loss {first:.3f} -> {last:.3f} (means of the first and last {window})'


# --------------------------------------------------------------------------
# The checks.
# --------------------------------------------------------------------------
def build_mlla(arch: object, seed: int = 0, **kwargs) -> torch.nn.Module:
    """An eval-mode MLLA backbone with seeded random weights and non-trivial BatchNorm statistics."""
    from mlla_mm.models import MLLA
    torch.manual_seed(seed)
    model = MLLA(arch, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def check_mmcv_ops(ctx: Ctx) -> Result:
    """mmcv's NMS and RoIAlign on ``ctx.device``, compared with their CPU results."""
    from mmcv.ops import RoIAlign, nms

    from mlla_mm.engine.device import mmcv_cuda_problem
    problem = mmcv_cuda_problem('mmdet', cuda_available=ctx.device.startswith('cuda'))
    if problem:
        return Result('mmcv_ops', 'FAIL', detail=problem)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], 1)
    scores = torch.rand(200, generator=g)
    feat = torch.randn(2, 8, 32, 32, generator=g)
    rois = torch.cat([torch.randint(0, 2, (50, 1), generator=g).float(), boxes[:50] / 4], 1)
    layer = RoIAlign((7, 7), 0.25, 0)
    keep_cpu = nms(boxes, scores, 0.5)[1]
    keep_dev = nms(boxes.to(ctx.device), scores.to(ctx.device), 0.5)[1]
    out_cpu = layer(feat, rois)
    out_dev = layer(feat.to(ctx.device), rois.to(ctx.device))
    same_keep = keep_dev.cpu().tolist() == keep_cpu.tolist()
    diff = max_abs_diff([out_dev], [out_cpu])
    ok = same_keep and diff <= 1e-5 and out_dev.device.type == torch.device(ctx.device).type
    return Result('mmcv_ops', 'PASS' if ok else 'FAIL', f'NMS kept {len(keep_dev)} boxes '
                  f'({"same" if same_keep else "NOT the same"} as the CPU), RoIAlign max |diff| {diff:.1e}',
                  'same boxes, 1e-5', data=dict(roi_align_max_abs_diff=diff, nms_same=same_keep))


def check_backbone_fp32(ctx: Ctx) -> Result:
    """MLLA fp32 on the device (TF32 off) against the same weights in float64 on the CPU."""
    model = build_mlla(ctx.arch)
    x = torch.randn(1, 3, *ctx.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        with exact_fp32():
            out = model.to(ctx.device)(x.to(ctx.device))
    diff = max_rel_diff(out, ref)
    return Result('backbone_fp32', verdict(diff, FP32_LIMIT), f'max rel. diff {diff:.2e}', f'{FP32_LIMIT:g}',
                  data=dict(max_rel_diff=diff, size=list(ctx.size)))


def autocast_dtypes(device: str) -> List[torch.dtype]:
    """fp16 (where autocast has it) and bf16 where the device supports it."""
    kind = torch.device(device).type
    if kind == 'cuda':
        return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    return [torch.bfloat16]  # the CPU: bf16 autocast is what --amp runs there


def check_autocast(ctx: Ctx) -> List[Result]:
    """MLLA under autocast on the device against the float64 CPU reference, one row per dtype."""
    model = build_mlla(ctx.arch)
    x = torch.randn(1, 3, *ctx.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    model = model.to(ctx.device)
    rows = []
    for dtype in autocast_dtypes(ctx.device):
        name = 'autocast_' + {torch.float16: 'fp16', torch.bfloat16: 'bf16'}[dtype]
        with torch.no_grad(), torch.autocast(torch.device(ctx.device).type, dtype=dtype):
            out = model(x.to(ctx.device))
        diff = max_rel_diff(out, ref)
        rows.append(Result(name, verdict(diff, AUTOCAST_LIMIT), f'max rel. diff {diff:.2e}', f'{AUTOCAST_LIMIT:g}',
                           data=dict(max_rel_diff=diff)))
    return rows


def shared_dir() -> Optional[Path]:
    """shared/ with the golden data (``MLLA_MM_SHARED``, beside the repository, or inside it)."""
    env = os.environ.get('MLLA_MM_SHARED')
    for c in ([Path(env)] if env else []) + [ROOT.parent / 'shared', ROOT / 'shared']:
        if (c / 'golden' / 'golden_small.pt').is_file():
            return c
    return None


def check_golden(ctx: Ctx) -> Result:
    """The published code's outputs (shared/golden/golden_small.pt) from its checkpoint, on the device."""
    from mlla_mm.models import MLLA
    shared = shared_dir()
    if shared is None:
        return Result('golden', 'SKIP', detail='shared/golden not found (MLLA_MM_SHARED=/path/to/shared)')
    golden = torch.load(shared / 'golden' / 'golden_small.pt', weights_only=True)
    ckpt = torch.load(shared / 'golden' / 'mlla_small_official_det.pth', weights_only=True)
    a = golden['arch']
    model = MLLA(dict(embed_dims=a['embed_dim'], depths=list(a['depths']), num_heads=list(a['num_heads'])))
    model.load_state_dict({k[len('backbone.'):]: v for k, v in ckpt['state_dict'].items()})
    model = model.eval().to(ctx.device)
    worst = 0.0
    with torch.no_grad(), exact_fp32():
        for case in golden['cases'].values():
            worst = max(worst, max_abs_diff(model(case['x'].to(ctx.device)), case['ys']))
    return Result('golden', verdict(worst, GOLDEN_LIMIT), f'max |diff| {worst:.2e} over '
                  f'{len(golden["cases"])} case(s)', f'{GOLDEN_LIMIT:g}', data=dict(max_abs_diff=worst))


DET_CONFIG = '''
_base_ = [{base!r}]
data_root = {root!r}
synthetic_data = dict(kind='coco-shapes', root=data_root, seed=0, num_train={num_train}, num_val=4, size=160)
train_dataloader = dict(batch_size=2, num_workers={workers}, persistent_workers={workers} > 0,
                        dataset=dict(data_root=data_root))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
max_epochs = {epochs}
train_cfg = dict(max_epochs=max_epochs, val_interval=1000)
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=3))
randomness = dict(seed=0, deterministic={deterministic})
{extra}
'''


def write_det_config(folder: Path, *, num_train: int, epochs: int, deterministic: bool = False,
                     extra: str = '', workers: int = 2) -> Path:
    """The demo's Mask R-CNN MLLA-T on its synthetic shapes (``num_train`` images, 2 per batch), no validation."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'det.py'
    path.write_text(DET_CONFIG.format(base=str(DEMO_DET), root=str(folder / 'data') + '/', num_train=num_train,
                                      epochs=epochs, deterministic=deterministic, extra=extra, workers=workers))
    return path


def tool_env(ctx: Ctx) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUBLAS_WORKSPACE_CONFIG=':4096:8')
    if not ctx.device.startswith('cuda'):
        env['CUDA_VISIBLE_DEVICES'] = ''
    return env


def newest_log(work_dir: Path) -> Optional[Path]:
    """mmengine's text log of the newest run in ``work_dir`` (``<timestamp>/<timestamp>.log``)."""
    logs = sorted(glob.glob(str(work_dir / '*' / '*.log')), key=os.path.getmtime)
    return Path(logs[-1]) if logs else None


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return ' '.join(lines[-1].split())[:300] if lines else ''


def check_maskrcnn_amp(ctx: Ctx) -> Result:
    """``ctx.iters`` Mask R-CNN MLLA-T iterations (tools/train.py --amp) on the demo's data: finite, decreasing."""
    work = ctx.work_dir / 'maskrcnn_amp'
    cfg = write_det_config(work, num_train=2 * ctx.iters, epochs=1, extra=ctx.det_extra, workers=ctx.det_workers)
    proc = subprocess.run([ctx.python, str(ROOT / 'tools' / 'train.py'), str(cfg), '--work-dir', str(work),
                           '--amp'], cwd=ROOT, env=tool_env(ctx), capture_output=True, text=True, timeout=600)
    log = newest_log(work)
    losses = parse_train_losses(log.read_text()) if log else []
    if proc.returncode != 0:
        return Result('maskrcnn_amp', 'FAIL', detail=f'tools/train.py exit {proc.returncode}: '
                      f'{last_line(proc.stderr)}', data=dict(losses=losses))
    ok, how = loss_trend(losses)
    wrapper = 'AmpOptimWrapper' if ctx.device.startswith('cuda') else 'CPUAutocastOptimWrapper'
    return Result('maskrcnn_amp', 'PASS' if ok and len(losses) == ctx.iters else 'FAIL',
                  f'{len(losses)} iterations, {how}', 'finite, decreasing',
                  detail=f'--amp: {wrapper}', data=dict(losses=losses))


def seg_model(ctx: Ctx):
    """The UperNet MLLA-T demo model (plain BN for one process), built from its config."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope, init_default_scope

    import mlla_mm  # noqa: F401 (registers MLLA)
    cfg = Config.fromfile(str(DEMO_SEG))
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.init_cfg = None
    if ctx.seg_arch is not None:
        model_cfg.backbone.arch = ctx.seg_arch
        dims = ctx.seg_arch['embed_dims']
        model_cfg.decode_head.in_channels = [dims, dims * 2, dims * 4, dims * 8]
        model_cfg.decode_head.channels = 32
        if model_cfg.get('auxiliary_head'):
            aux = model_cfg.auxiliary_head
            for head in aux if isinstance(aux, list) else [aux]:
                head.in_channels = dims * 4
                head.channels = 16
    model_cfg.data_preprocessor.size = ctx.seg_size
    init_default_scope('mmseg')
    from mmseg.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(model_cfg)
    return revert_sync_batchnorm(model), cfg


def check_upernet_step(ctx: Ctx) -> Result:
    """One UperNet MLLA-T training step on the device: finite loss, finite gradients, weights changed."""
    from mmengine.optim import OptimWrapper
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    torch.manual_seed(0)
    model, cfg = seg_model(ctx)
    model = model.to(ctx.device).train()
    optim = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-4))
    h, w = ctx.seg_size
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, h, w), generator=g))
        samples.append(sample)
    data = dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(2)],
                data_samples=samples)
    before = [p.detach().clone() for p in model.parameters()]
    start = time.perf_counter()
    log_vars = model.train_step(data, optim)
    sync(ctx.device)
    seconds = time.perf_counter() - start
    loss = float(log_vars['loss'].detach())  # the total of the heads' losses (mmengine's parse_losses)
    finite_grads = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    ok = math.isfinite(loss) and finite_grads and changed
    return Result('upernet_step', 'PASS' if ok else 'FAIL', f'loss {loss:.3f}, step {seconds:.2f} s at 2x{h}x{w}',
                  'finite, weights updated', detail='' if ok else f'finite grads {finite_grads}, changed {changed}',
                  data=dict(loss=loss, step_seconds=seconds))


def state_dict_of(path: Path) -> Dict[str, torch.Tensor]:
    from mlla_mm.checkpoint import load_file
    ckpt = load_file(str(path), map_location='cpu')
    return ckpt.get('state_dict', ckpt)


def compare_state_dicts(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Tuple[bool, float]:
    """Whether every tensor is bit-identical, and the largest absolute difference."""
    if a.keys() != b.keys():
        return False, math.inf
    worst = 0.0
    same = True
    for k in a:
        if not torch.equal(a[k], b[k]):
            same = False
            if a[k].is_floating_point():
                worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
            else:
                worst = math.inf
    return same, worst


def wait_for_iterations(log_dir: Path, count: int, proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until the newest log in ``log_dir`` shows ``count`` logged training iterations (False: it ended first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        log = newest_log(log_dir)
        if log and len(parse_train_losses(log.read_text())) >= count:
            return True
        time.sleep(0.05)
    return False


def check_resume(ctx: Ctx, per_epoch: int = 20, epochs: int = 2) -> Result:
    """An uninterrupted run against one stopped by SIGTERM after ``per_epoch + 3`` iterations and resumed."""
    train = [ctx.python, str(ROOT / 'tools' / 'train.py')]
    env = tool_env(ctx)
    runs = {}
    for name in ('whole', 'resumed'):
        work = ctx.work_dir / f'resume_{name}'
        cfg = write_det_config(work, num_train=2 * per_epoch, epochs=epochs, deterministic=True, extra=ctx.det_extra,
                               workers=ctx.det_workers)
        runs[name] = work
        if name == 'whole':
            proc = subprocess.run(train + [str(cfg), '--work-dir', str(work)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                return Result('resume', 'FAIL', detail=f'uninterrupted run exit {proc.returncode}: '
                              f'{last_line(proc.stderr)}')
            continue
        with open(work / 'stopped_run.txt', 'w') as out:
            popen = subprocess.Popen(train + [str(cfg), '--work-dir', str(work)], cwd=ROOT, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, text=True)
            reached = wait_for_iterations(work, per_epoch + 3, popen, timeout=600)
            if reached:
                popen.send_signal(signal.SIGTERM)
            code = popen.wait(timeout=600)
        if not reached or code != 143:
            return Result('resume', 'FAIL', detail=f'the run to stop ended with exit {code} '
                          f'{"before" if not reached else "after"} the signal (expected 143 after it)')
        proc = subprocess.run(train + [str(cfg), '--work-dir', str(work), '--resume'], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return Result('resume', 'FAIL', detail=f'--resume exit {proc.returncode}: {last_line(proc.stderr)}')
    final = f'epoch_{epochs}.pth'
    same, worst = compare_state_dicts(state_dict_of(runs['whole'] / final), state_dict_of(runs['resumed'] / final))
    return Result('resume', 'PASS' if same else 'FAIL',
                  'same weights' if same else f'weights differ (max |diff| {worst:.2e})', 'bit-identical',
                  detail=f'SIGTERM after {per_epoch + 3} of {per_epoch * epochs} iterations, deterministic=True',
                  data=dict(max_abs_diff=worst))


def build_swin_t(with_cp: bool = False, **overrides) -> torch.nn.Module:
    """mmdet's Swin-T backbone as in its Mask R-CNN config (``overrides``: other settings)."""
    from mmdet.models.backbones import SwinTransformer
    torch.manual_seed(0)
    cfg = dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4,
               qkv_bias=True, qk_scale=None, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.2,
               patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=with_cp, convert_weights=True)
    cfg.update(overrides)
    return SwinTransformer(**cfg)


class fast_path_allowed_on:
    """Inside: MLLA's fast inference path may run on ``device`` too (it runs on the CPU only by default,
    ``mlla_mm.models.ops.FAST_INFERENCE_DEVICES``), so its speed there can be measured."""

    def __init__(self, device: str) -> None:
        self.kind = torch.device(device).type

    def __enter__(self) -> 'fast_path_allowed_on':
        from mlla_mm.models import ops
        self.saved = ops.FAST_INFERENCE_DEVICES
        ops.FAST_INFERENCE_DEVICES = tuple(self.saved) + ((self.kind, ) if self.kind not in self.saved else ())
        return self

    def __exit__(self, *exc) -> None:
        from mlla_mm.models import ops
        ops.FAST_INFERENCE_DEVICES = self.saved


def check_speed(ctx: Ctx) -> List[Result]:
    """Backbone inference and a training step, MLLA-T against Swin-T, on the device; peak memory."""
    dev = ctx.device
    rows = []
    x = torch.randn(1, 3, *ctx.infer_size, device=dev)
    swin = ctx.swin_kwargs or {}
    models = {'mlla_t': build_mlla(ctx.speed_arch).to(dev), 'swin_t': build_swin_t(**swin).to(dev)}
    models['swin_t'].eval()  # (mmdet's SwinTransformer.train() returns None: no chaining)
    infer: Dict[str, float] = {}
    mlla = models['mlla_t']
    with torch.no_grad():
        for name, model in models.items():  # as a run on this device does it
            infer[name] = median_seconds(lambda m=model: m(x), dev, ctx.repeats, ctx.warmup)
        with fast_path_allowed_on(dev):  # the fast inference path against the autograd code, on this device
            fast_out = mlla(x)
            infer['mlla_t_fast'] = median_seconds(lambda: mlla(x), dev, ctx.repeats, ctx.warmup)
            mlla.set_fast_inference(False)
            plain_out = mlla(x)
            infer['mlla_t_plain'] = median_seconds(lambda: mlla(x), dev, ctx.repeats, ctx.warmup)
            mlla.set_fast_inference(True)
    same = max_rel_diff(fast_out, plain_out)
    h, w = ctx.infer_size
    text = ', '.join(f'{k} {v * 1000:.1f} ms' for k, v in infer.items())
    rows.append(Result('speed_infer', 'INFO', f'{h}x{w}: {text}', '',
                       detail=f'MLLA-T / Swin-T {infer["mlla_t"] / infer["swin_t"]:.2f}x; fast path / plain '
                              f'{infer["mlla_t_fast"] / infer["mlla_t_plain"]:.2f}x, max rel. diff {same:.1e}',
                       data=dict(infer, fast_vs_plain_max_rel_diff=same)))
    del models
    train: Dict[str, Dict[str, Optional[float]]] = {}
    xb = torch.randn(ctx.train_batch, 3, *ctx.train_size, device=dev)
    for name, make in (('mlla_t', lambda cp: build_mlla(ctx.speed_arch, with_cp=cp)),
                       ('swin_t', lambda cp: build_swin_t(cp, **swin))):
        for cp in (False, True):
            model = make(cp).to(dev)
            model.train()

            def step(m=model):
                loss = sum(o.float().mean() for o in m(xb))
                loss.backward()
                m.zero_grad(set_to_none=True)
            seconds = median_seconds(step, dev, max(1, ctx.repeats // 2), 1)
            memory = peak_memory_mib(step, dev)
            train[f'{name}{"_cp" if cp else ""}'] = dict(seconds=seconds, peak_mib=memory)
            del model
    b, (th, tw) = ctx.train_batch, ctx.train_size
    text = ', '.join(f'{k} {v["seconds"] * 1000:.0f} ms' + (f' / {v["peak_mib"]:.0f} MiB' if v['peak_mib'] else '')
                     for k, v in train.items())
    rows.append(Result('speed_train', 'INFO', f'{b}x{th}x{tw}: {text}', '',
                       detail=f'MLLA-T / Swin-T {train["mlla_t"]["seconds"] / train["swin_t"]["seconds"]:.2f}x',
                       data=train))
    return rows


def check_ddp(ctx: Ctx) -> Result:
    """Two processes, one GPU each (tools/dist_train.sh, NCCL), two iterations of the demo detector."""
    count = torch.cuda.device_count() if ctx.device.startswith('cuda') else 0
    if count < 2:
        return Result('ddp', 'SKIP', detail=f'{count} GPU(s): the 2-process DDP step needs two')
    work = ctx.work_dir / 'ddp'
    cfg = write_det_config(work, num_train=8, epochs=1, extra=ctx.det_extra, workers=ctx.det_workers)
    env = dict(tool_env(ctx), PORT=str(29500 + os.getpid() % 1000), PYTHON=ctx.python)
    proc = subprocess.run(['bash', str(ROOT / 'tools' / 'dist_train.sh'), str(cfg), '2', '--work-dir', str(work)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = newest_log(work)
    losses = parse_train_losses(log.read_text()) if log else []
    ok = proc.returncode == 0 and losses and all(math.isfinite(v) for v in losses)
    return Result('ddp', 'PASS' if ok else 'FAIL', f'{len(losses)} iterations on 2 GPUs', 'exit 0, finite loss',
                  detail='' if ok else f'exit {proc.returncode}: {last_line(proc.stderr)}', data=dict(losses=losses))


#: name -> check; a check returns one Result or a list of them.
CHECKS: Dict[str, Callable[[Ctx], object]] = {
    'mmcv_ops': check_mmcv_ops,
    'backbone_fp32': check_backbone_fp32,
    'autocast': check_autocast,
    'golden': check_golden,
    'maskrcnn_amp': check_maskrcnn_amp,
    'upernet_step': check_upernet_step,
    'resume': check_resume,
    'speed': check_speed,
    'ddp': check_ddp,
}


def run_checks(ctx: Ctx, names: Sequence[str], echo: Callable[[str], None] = print) -> List[Result]:
    """Run the named checks; an exception in one is its FAIL row, the others still run."""
    results: List[Result] = []
    for name in names:
        start = time.perf_counter()
        try:
            out = CHECKS[name](ctx)
        except Exception as err:  # noqa: BLE001 (a broken check is a row of the table)
            detail = f'{type(err).__name__}: {" ".join(str(err).split())[:300]}'
            where = traceback.extract_tb(err.__traceback__)[-1]
            out = Result(name, 'FAIL', detail=f'{detail} ({os.path.basename(where.filename)}:{where.lineno})')
        rows = out if isinstance(out, list) else [out]
        seconds = time.perf_counter() - start
        for row in rows:
            row.seconds = seconds / len(rows)
            echo(f'gpu-check: {row.name}: {row.status} {row.value} {row.detail}'.rstrip())
        results.extend(rows)
        if ctx.device.startswith('cuda'):
            torch.cuda.empty_cache()
    return results


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=str(ROOT / 'work_dirs' / 'gpu_check' / 'gpu_check.json'),
                        help='the JSON file (default: work_dirs/gpu_check/gpu_check.json)')
    parser.add_argument('--only', nargs='+', choices=list(CHECKS), help='run only these checks')
    parser.add_argument('--device', default='cuda', help='cuda or cuda:N (default: cuda)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print('gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing to check')
        return 0
    device = args.device
    if device.startswith('cuda:'):
        torch.cuda.set_device(torch.device(device))
    out = Path(args.out)
    ctx = Ctx(device=device, work_dir=out.parent)
    env = environment(device)
    print(f'gpu-check on {env.get("gpu")} (torch {env["torch"]}, CUDA {env["cuda"]}, mmcv CUDA {env["mmcv_cuda"]})',
          flush=True)
    results = run_checks(ctx, args.only or list(CHECKS), echo=lambda line: print(line, flush=True))
    write_report(out, env, results)
    print()
    print(format_table(results))
    print(f'\nwritten: {out}')
    return 1 if any(r.status == 'FAIL' for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
