"""
What both training scripts (contrastive.py, regress.py) teach and share: the learning-rate range
test, early stopping, the plateau schedule, the autocast/GradScaler set-up, DDP start-up and the
gather with gradients, encoding in batches of similar length, and the progress line. The training
steps themselves stay in the scripts; only the range test's steps are here, written once for both.
What keeps a run safe (checkpoints, identity, refusals) is runs.py's. Nothing here runs on its own:

    python -m pytest tests/test_training.py -q
"""
import copy
import functools
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from runs import UserError, hms


# -----------------------------------------------------------------------------
# learning rate range test (Smith 2017, paper 4.3)

def _ema(values, beta):
    # bias-corrected exponential moving average, as in Adam
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)


class LRRangeTest:
    """Smith's range test as a loop (lr_range_test below is the one both scripts run):

        finder = LRRangeTest(lo=1e-8, hi=1.0, steps=100)
        for lr in finder:          # exponentially from lo to hi; ends early on divergence
            ... set lr, train one batch ...
            finder.record(loss.item())
        best_lr, curve = finder.result()

    The loss is smoothed with a bias-corrected exponential moving average (beta=smooth; 0.9, as 0.98
    would average over half of the 100 steps and blur the descent into the divergence); the test
    stops when that smoothed loss is not finite or exceeds 4x its minimum. The choice ("the learning
    rate at which the loss is placed at the midpoint of the steepest descent region", paper 4.3):
      1. s = the loss smoothed forward and then backward with the same moving average, so the curve
         has no lag (a causal average shifts the curve towards larger lrs);
      2. slope = ds / dlog10(lr); the steepest point is the most negative slope;
      3. the steepest-descent region is the contiguous run of points around it whose slope stays
         below half that minimum;
      4. best_lr = the geometric midpoint of the region's first and last lr.
    The caller puts the weights back afterwards. result() raises UserError when the loss never
    decreases or diverges at once.
    """

    def __init__(self, lo=1e-8, hi=1.0, steps=100, smooth=0.9, log=print):
        self.lo, self.hi, self.steps, self.smooth, self.log = lo, hi, steps, smooth, log
        self.lrs, self.losses, self.avg, self.lowest, self.stopped = [], [], 0.0, math.inf, False

    def __iter__(self):
        mult = (self.hi / self.lo) ** (1 / (self.steps - 1))
        for i in range(self.steps):
            if self.stopped:
                return
            self.lr = self.lo * mult ** i
            yield self.lr

    def record(self, loss):
        if not math.isfinite(loss):
            self.log(f"lr range test: loss {loss} at lr {self.lr:.2e}, stopping")
            self.stopped = True
            return
        self.avg = self.smooth * self.avg + (1 - self.smooth) * loss
        smoothed = self.avg / (1 - self.smooth ** (len(self.lrs) + 1))
        self.lrs.append(self.lr)
        self.losses.append(loss)
        self.lowest = min(self.lowest, smoothed)
        if smoothed > 4 * self.lowest:
            self.log(f"lr range test: loss diverged at lr {self.lr:.2e}, stopping")
            self.stopped = True

    def result(self):
        """-> (best_lr, curve) with curve = [(lr, loss, smoothed), ...]"""
        lrs = self.lrs
        if len(lrs) < 3:
            raise UserError(f"lr range test: the loss diverged after {len(lrs)} steps from lr "
                            f"{self.lo:.1e}; set --lr by hand")
        s = _ema(_ema(self.losses, self.smooth)[::-1], self.smooth)[::-1]  # zero-phase smoothing
        slope = np.gradient(s, np.log10(lrs))
        i = int(np.argmin(slope))
        if slope[i] >= 0:
            raise UserError(f"lr range test: the loss never decreased between lr {self.lo:.1e} and "
                            f"{lrs[-1]:.1e}; set --lr by hand")
        a, b = i, i
        while a > 0 and slope[a - 1] < slope[i] / 2:
            a -= 1
        while b < len(slope) - 1 and slope[b + 1] < slope[i] / 2:
            b += 1
        best_lr = math.sqrt(lrs[a] * lrs[b])
        self.log(f"lr range test: {len(lrs)} steps, steepest descent from {lrs[a]:.2e} to "
                 f"{lrs[b]:.2e}, lr {best_lr:.2e}")
        return best_lr, [list(c) for c in zip(lrs, self.losses, s.tolist())]


def lr_range_test(model, optimizer, loss_of, batches, scaler, steps=100, log=print):
    """Both scripts' range test (paper 4.3): the caller's optimizer trains model on `batches`,
    one step each with an lr growing from 1e-8 to 1, so that what the run does after a step (the
    optimizer's hooks: contrastive.py clamps the temperature) happens here too. loss_of(batch) ->
    the step's loss, the ranks' mean being the batch's (each rank's weighted share of it, or the
    whole batch's loss on every rank). model is the bare module, loss_of may run it through a DDP
    or compile wrapper; its weights and the optimizer's state are saved and put back after.
    -> (best_lr, curve)"""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # its tensors change in place
    finder = LRRangeTest(lo=1e-8, hi=1.0, steps=steps, log=log)
    model.train()
    for lr, batch in zip(finder, batches):
        optimizer.param_groups[0]['lr'] = lr
        loss = loss_of(batch)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if dist.is_initialized():  # every rank must see the same curve to stop at the same step
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        finder.record(loss.item())
    model.load_state_dict(saved)
    optimizer.load_state_dict(saved_optimizer)
    return finder.result()


# -----------------------------------------------------------------------------
# early stopping (paper 4.3: patience 6 on the test loss; 4.3.1: 20 after epoch 50)

class EarlyStopping:
    """Stop when the metric has not improved for `patience` consecutive epochs after start_epoch.

    Epochs <= start_epoch never count. step(value, epoch) returns True (stop now) when
    epoch - max(best_epoch, start_epoch) >= patience: "no improvement for six consecutive epochs"
    stops at the end of the sixth. With start_epoch=50, patience=20 and the best value at epoch 1,
    training stops at epoch 70 (epochs 51..70 without improvement); a best at epoch 60 stops it at
    epoch 80. Improvement is strict (> for 'max', < for 'min'); a NaN never improves.
    """

    def __init__(self, patience, mode='max', start_epoch=0):
        if mode not in ('max', 'min'):
            raise ValueError(f"EarlyStopping mode must be 'max' or 'min', got {mode!r}")
        self.patience, self.mode, self.start_epoch = patience, mode, start_epoch
        self.best, self.best_epoch, self.improved, self.stopped = None, None, False, False

    def step(self, value, epoch):
        value = float(value)
        if self.best is None:
            self.improved = not math.isnan(value)
        else:
            self.improved = value > self.best if self.mode == 'max' else value < self.best
        if self.improved:
            self.best, self.best_epoch = value, epoch
        last = max(self.start_epoch, self.best_epoch or 0)
        self.stopped = epoch - last >= self.patience
        return self.stopped

    def state_dict(self):
        return {'best': self.best, 'best_epoch': self.best_epoch, 'stopped': self.stopped}

    def load_state_dict(self, state):
        self.best = state['best']
        self.best_epoch = state['best_epoch']
        self.stopped = state['stopped']


def plateau_scheduler(optimizer, mode, patience, factor):
    """ReduceLROnPlateau that cuts the lr after `patience` consecutive epochs without improvement,
    as paper 4.3 reads ("each time the validation loss does not [improve] for three consecutive
    epochs"): PyTorch's own `patience` waits one epoch more (it cuts when the bad epochs exceed it).
    """
    # threshold 0: 'better' means strictly better, as in EarlyStopping; eps 0: every cut is applied
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor,
                                                      patience=patience - 1, threshold=0, eps=0)


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
        raise UserError(f"dtype must be one of {list(dtypes)}, got {dtype!r}")
    if device_type == 'cpu' and dtype == 'float16':
        raise UserError("dtype float16 needs a CUDA device (autocast on CPU supports bfloat16); "
                        "use --dtype bfloat16 or float32")
    if device_type == 'cpu' and dtype == 'bfloat16':
        warn_slow_bfloat16()
    autocast = partial(torch.amp.autocast, device_type, dtype=dtypes[dtype])
    ctx = nullcontext if dtype == 'float32' else autocast
    return ctx, torch.amp.GradScaler(device_type, enabled=dtype == 'float16')


@functools.cache
def cpu_bfloat16_slowdown():
    """how many times longer a bfloat16 matmul takes than a float32 one on this CPU (the best of 3
    of a 256^3 matmul, timed once): about 1 with bfloat16 instructions (AVX-512 BF16, AMX), about
    150 with AVX2 only"""
    def seconds(x):
        x @ x  # warm-up: the first call picks the kernel
        times = []
        for _ in range(3):
            t = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t)
        return min(times)
    x = torch.randn(256, 256)
    return seconds(x.bfloat16()) / seconds(x)


@functools.cache
def warn_slow_bfloat16():
    """once per process: say so where bfloat16 is much slower than float32 on this CPU"""
    slowdown = cpu_bfloat16_slowdown()
    if slowdown > 3 and is_main():
        print(f"warning: bfloat16 matmuls run {slowdown:.0f}x slower than float32 on this CPU "
              f"({torch.backends.cpu.get_cpu_capability()}, no native bfloat16); --dtype float32 "
              f"is faster here", file=sys.stderr)


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
    """leave the process group; on a normal exit every rank waits for the others first, since a rank
    that tears down gloo while another still talks to it can abort ("terminate called without an
    active exception")"""
    if dist.is_initialized():
        # not while an exception unwinds: the other ranks may never arrive
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def bare(model):
    """the module inside the torch.compile and DDP wrappers, whose state_dict has the plain keys
    (nanoGPT's raw_model)"""
    model = getattr(model, '_orig_mod', model)  # torch.compile's wrapper
    return model.module if isinstance(model, DDP) else model


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*args, **kwargs):
    """print, on the main process only (rank 0 under DDP)"""
    if is_main():
        print(*args, **kwargs)


def rank_world():
    """-> (this process's rank, the number of processes): (0, 1) without a process group"""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


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


def gather_strided(mine, n, device):
    """the inverse of idx[rank::world]: each rank's (ceil(n / world), ...)-or-one-less shard on the
    CPU -> the (n, ...) whole, in idx order, on the CPU of every rank, gathered through `device`
    (NCCL gathers CUDA tensors only); identity on one process"""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    world, m = dist.get_world_size(), math.ceil(n / dist.get_world_size())
    # shards differ by <= 1: pad
    mine = torch.cat([mine, mine.new_zeros(m - len(mine), *mine.shape[1:])]).to(device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    # interleave back: item i came from rank i % world
    return torch.stack(parts, 1).flatten(0, 1)[:n].cpu()


# -----------------------------------------------------------------------------
# encoding without training: batches of similar length, results in the original order

@torch.no_grad()
def encode_by_length(encode, idx, lengths, batch_size):
    """encode(idx_batch) -> (b, ...) for item rows idx (N,), visited in order of `lengths` (N,) so
    that a batch padded to its longest pads little; -> (N, ...) float32 on the CPU, in idx order (an
    empty idx: (0,))"""
    order = torch.argsort(lengths, stable=True)  # (N,)
    parts = [encode(idx[order[i:i + batch_size]]).float() for i in range(0, len(idx), batch_size)]
    # one copy to the host, after every batch
    out = torch.cat(parts).cpu() if parts else torch.zeros(0)
    return out[torch.argsort(order)]


@torch.no_grad()
def infer(net, items, idx, dtype, batch_size):
    """(N, ...) outputs of net for the item rows idx of data.Items, on the CPU, in batches of
    similar length; under DDP each rank computes idx[rank::world], gathered back in order"""
    rank, world = rank_world()
    ctx, _ = autocast_setup(items.device, dtype)
    net.eval()

    def forward(b):
        with ctx():
            return net(*items.inputs(b))
    mine = idx[rank::world]
    out = encode_by_length(forward, mine, items.length[mine], batch_size)  # (len(mine), ...)
    return gather_strided(out, len(idx), items.device)


# -----------------------------------------------------------------------------
# logging

class Progress:
    """One progress line: rewritten in place on a terminal, or one line per `every` seconds when
    piped. Shows the caller's fields, items/s and the ETA of the whole run (total items).

    p = Progress(total=epochs * len(loader), unit='pairs')
    p.update(n, epoch=e, loss=loss, lr=lr)  # n items since the last call; tensors read when printed
    p.done_line('epoch 3 | test loss 0.42')  # a line that stays (clears the progress line)
    Only rank 0 prints.
    """

    def __init__(self, total, unit='items', every=10.0, stream=None):
        self.total, self.unit, self.every, self.stream = total, unit, every, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.done, self.t0, self.width = 0, time.time(), 0
        # the first line after one interval: a rate over one batch would make the ETA wild
        self.last = self.t0

    def update(self, n, **fields):
        self.done += n
        now = time.time()
        if not is_main() or now - self.last < (0.5 if self.tty else self.every):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        # the one host read
        fields = {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        line = " | ".join(parts + [f"{rate:.1f} {self.unit}/s", f"eta {hms(eta)}"])
        if self.tty:
            self.stream.write('\r' + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + '\n')
        self.stream.flush()

    def done_line(self, line):
        if is_main():
            clear = '\r' + ' ' * self.width + '\r' if self.tty and self.width else ''
            self.stream.write(clear + line + '\n')
            self.stream.flush()
            self.width = 0

