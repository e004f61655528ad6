"""
What both training scripts share: the learning-rate range test, early stopping, the
autocast/GradScaler set-up, DDP start-up and the gather with gradients, atomic checkpoints and
the progress line. Imported by contrastive.py and regress.py; nothing here runs on its own:

    python -m pytest tests/test_training.py -q
"""
import json
import math
import os
import random
import tempfile
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# learning rate range test (Smith 2017, paper 4.3)

def _ema(values, beta):
    # bias-corrected exponential moving average, as in Adam
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)


def lr_range_test(step, lo=1e-8, hi=1.0, steps=100, smooth=0.9, log=print):
    """Smith's range test. step(lr) trains one batch at lr and returns its loss (float).

    The lr grows exponentially from lo to hi over `steps` batches. The loss is smoothed with a
    bias-corrected exponential moving average (beta=smooth; 0.9, as 0.98 would average over half
    of the 100 steps and blur the descent into the divergence); the test stops early when that
    smoothed loss is not finite or exceeds 4x its minimum (divergence).
    The choice ("the learning rate at which the loss is placed at the midpoint of the steepest
    descent region", paper 4.3) is defined as:
      1. s = the loss smoothed forward and then backward with the same moving average, so the
         curve has no lag (a causal average shifts the curve towards larger lrs);
      2. slope = ds / dlog10(lr); the steepest point is the most negative slope;
      3. the steepest-descent region is the contiguous run of points around it whose slope
         stays below half that minimum;
      4. best_lr = the geometric midpoint of the region's first and last lr.
    Returns (best_lr, curve) with curve = [(lr, loss, s), ...]. The caller restores the model
    and optimizer afterwards. Raises ValueError when the loss never decreases.
    """
    mult = (hi / lo) ** (1 / (steps - 1))
    lrs, losses, avg, lowest = [], [], 0.0, math.inf
    for i in range(steps):
        lr = lo * mult ** i
        loss = float(step(lr))
        if not math.isfinite(loss):
            log(f"lr range test: loss {loss} at lr {lr:.2e}, stopping")
            break
        avg = smooth * avg + (1 - smooth) * loss
        smoothed = avg / (1 - smooth ** (i + 1))
        lrs.append(lr)
        losses.append(loss)
        lowest = min(lowest, smoothed)
        if smoothed > 4 * lowest:
            log(f"lr range test: loss diverged at lr {lr:.2e}, stopping")
            break
    if len(lrs) < 3:
        raise ValueError(f"lr range test: the loss diverged after {len(lrs)} steps from lr {lo:.1e}; lower lo")
    s = _ema(_ema(losses, smooth)[::-1], smooth)[::-1]  # zero-phase smoothing
    slope = np.gradient(s, np.log10(lrs))
    i = int(np.argmin(slope))
    if slope[i] >= 0:
        raise ValueError(f"lr range test: the loss never decreased between lr {lo:.1e} and {lrs[-1]:.1e}; set the lr by hand")
    a, b = i, i
    while a > 0 and slope[a - 1] < slope[i] / 2:
        a -= 1
    while b < len(slope) - 1 and slope[b + 1] < slope[i] / 2:
        b += 1
    best_lr = math.sqrt(lrs[a] * lrs[b])
    log(f"lr range test: {len(lrs)} steps, steepest descent from {lrs[a]:.2e} to {lrs[b]:.2e}, lr {best_lr:.2e}")
    return best_lr, list(zip(lrs, losses, s.tolist()))


# -----------------------------------------------------------------------------
# early stopping (paper 4.3: patience 6 on the test loss; 4.3.1: 20 after epoch 50)

class EarlyStopping:
    """Stop when the metric has not improved for `patience` consecutive epochs after start_epoch.

    Epochs <= start_epoch never count. step(value, epoch) returns True (stop now) when
    epoch - max(best_epoch, start_epoch) >= patience. With start_epoch=50, patience=20 and the
    best value at epoch 1, training stops at epoch 70 (epochs 51..70 without improvement), not
    at 69; a best at epoch 60 stops it at epoch 80. Improvement is strict (> for 'max', < for
    'min'); a NaN never improves.
    """

    def __init__(self, patience, mode='max', start_epoch=0):
        if mode not in ('max', 'min'):
            raise ValueError(f"EarlyStopping mode must be 'max' or 'min', got {mode!r}")
        self.patience, self.mode, self.start_epoch = patience, mode, start_epoch
        self.best, self.best_epoch, self.improved = None, None, False

    def step(self, value, epoch):
        value = float(value)
        if self.best is None:
            self.improved = not math.isnan(value)
        else:
            self.improved = value > self.best if self.mode == 'max' else value < self.best
        if self.improved:
            self.best, self.best_epoch = value, epoch
        last = self.start_epoch if self.best_epoch is None else max(self.best_epoch, self.start_epoch)
        return epoch - last >= self.patience

    def state_dict(self):
        return {'best': self.best, 'best_epoch': self.best_epoch}

    def load_state_dict(self, state):
        self.best, self.best_epoch = state['best'], state['best_epoch']


# -----------------------------------------------------------------------------
# mixed precision, DDP

def autocast_setup(device, dtype):
    """-> (ctx(): the autocast context for the forward pass, GradScaler).

    float32 disables autocast; the scaler is only enabled for float16, so one code path
    (scaler.scale(loss).backward(); scaler.step(opt); scaler.update()) serves every dtype.
    """
    device_type = torch.device(device).type
    dtypes = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {list(dtypes)}, got {dtype!r}")
    if device_type == 'cpu' and dtype == 'float16':
        raise ValueError("dtype float16 needs a CUDA device (autocast on CPU supports bfloat16); use --dtype bfloat16 or float32")
    ctx = nullcontext if dtype == 'float32' else partial(torch.amp.autocast, device_type, dtype=dtypes[dtype])
    return ctx, torch.amp.GradScaler(device_type, enabled=dtype == 'float16')


def optimizer_step(loss, optimizer, scaler, params, grad_clip=0.0):
    """backward, clip the gradient norm (on unscaled gradients), step, update the scaler, zero the
    gradients. -> the gradient norm before clipping, or None when grad_clip is 0 (no clipping)."""
    scaler.scale(loss).backward()
    norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)  # skipped by the float16 scaler when the gradients are not finite
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


def ddp_setup():
    """-> (rank, world_size, device). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) joins the
    process group: nccl with one GPU per process, gloo on CPU. Otherwise (0, 1, cuda or cpu)."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if torch.cuda.is_available():
        device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', rank=rank, world_size=world_size)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo', rank=rank, world_size=world_size)
    return rank, world_size, device


def ddp_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # (B, ...) -> (world_size * B, ...); every rank holds the same B
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss sends gradient to every slot: sum them
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x):
    """(B, ...) on each rank -> (world_size * B, ...) in rank order; identity on one process.

    The backward sums, into each rank's slot, the gradients that every rank's loss sends to
    it. So when each rank computes the same global loss on the gathered features (open_clip
    ClipLoss, local_loss=False), DDP's gradient average over the ranks equals the gradient of
    one process holding the whole batch.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


# -----------------------------------------------------------------------------
# checkpoints

def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash mid-write never
    leaves a truncated checkpoint behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_json(obj, path):
    """json.dump to a temporary file, then rename: a results.json is whole or absent."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_checkpoint(path, map_location='cpu'):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it or start over") from e


# -----------------------------------------------------------------------------
# logging

class Progress:
    """One log line per `every` seconds (0: every update): the caller's fields, items/s, ETA.

    p = Progress(total=epochs * len(loader), unit='pairs')
    p.update(n, epoch=e, step=i, loss=loss.item(), lr=lr)   # n items done since the last call
    Only rank 0 prints.
    """

    def __init__(self, total, unit='items', every=10.0, log=print):
        self.total, self.unit, self.every, self.log = total, unit, every, log
        self.done, self.t0 = 0, time.time()
        self.last = -math.inf

    def update(self, n, force=False, **fields):
        self.done += n
        now = time.time()
        if not (force or now - self.last >= self.every or self.done >= self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        parts += [f"{rate:.1f} {self.unit}/s", f"eta {_hms(eta)}"]
        if is_main():
            self.log(" | ".join(parts))


def _hms(seconds):
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
