"""
What both training scripts compute with, so in the keys of what they compute (runs.code): the
learning-rate range test of paper 4.3, inference in batches of similar length gathered under DDP.

    python -m pytest tests/test_train.py -q
"""
import copy
import math

import numpy as np
import torch
import torch.distributed as dist

from harness.runs import UserError, log

def lr_range_test(model, optimizer, loss_of, batches, scaler, steps=100):
    """paper 4.3 (Smith, 2017): the caller's optimizer (hooks too) trains `model` a batch a step,
    its lr rising exponentially 1e-8 -> 1, until the smoothed loss is nan, inf or 4x its lowest"""
    saved = copy.deepcopy([model.state_dict(), optimizer.state_dict()])  # put back at the end
    lrs, losses, avg, lowest = [], [], 0.0, math.inf
    model.train()
    for lr, batch in zip(np.geomspace(1e-8, 1.0, steps), batches):
        for group in optimizer.param_groups:
            group['lr'] = lr
        loss = loss_of(batch)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if dist.is_initialized():  # every rank must see the same curve to stop at the same step
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        loss = loss.item()  # (read every step: the test stops on what it reads)
        if not math.isfinite(loss):
            log(f"lr range test: loss {loss} at lr {lr:.2e}, stopping")
            break
        avg = 0.9 * avg + 0.1 * loss  # Adam's bias-corrected moving average; 0.98 would blur it
        lrs.append(float(lr))
        losses.append(loss)
        lowest = min(lowest, avg / (1 - 0.9 ** len(lrs)))
        if avg / (1 - 0.9 ** len(lrs)) > 4 * lowest:
            log(f"lr range test: loss diverged at lr {lr:.2e}, stopping")
            break
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    return steepest_descent(lrs, losses)

def ema(values, beta=0.9):
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return np.array(out)

def steepest_descent(lrs, losses):
    """"the learning rate at which the loss is placed at the midpoint of the steepest descent
    region" (4.3): the geometric midpoint of the lrs around the steepest slope (of the loss smoothed
    forward and back: no lag, on log10 lr) while below half of it -> (lr, [(lr, loss, smoothed)])"""
    if len(lrs) < 3:
        raise UserError(f"lr range test: the loss diverged after {len(lrs)} steps from lr 1e-8; "
                        f"set --lr by hand")
    smooth = ema(ema(losses)[::-1])[::-1]
    slope = np.gradient(smooth, np.log10(lrs))
    i = a = b = int(np.argmin(slope))
    if slope[i] >= 0:
        raise UserError(f"lr range test: the loss never decreased between lr 1e-8 and "
                        f"{lrs[-1]:.1e}; set --lr by hand")
    while a > 0 and slope[a - 1] < slope[i] / 2:
        a -= 1
    while b < len(slope) - 1 and slope[b + 1] < slope[i] / 2:
        b += 1
    lr = math.sqrt(lrs[a] * lrs[b])
    log(f"lr range test: {len(lrs)} steps, steepest descent from {lrs[a]:.2e} to {lrs[b]:.2e}, "
        f"lr {lr:.2e}")
    return lr, [list(c) for c in zip(lrs, losses, smooth.tolist())]

@torch.no_grad()
def encode_by_length(encode, idx, lengths, batch_size):
    """encode(rows) -> (b, ...) for the rows idx (N,) taken in the order of `lengths` (N,), so that
    a batch padded to its longest pads little -> (N, ...) float32 on the CPU, in idx order"""
    order = torch.argsort(lengths, stable=True)  # (N,)
    parts = [encode(idx[order[i:i + batch_size]]).float() for i in range(0, len(idx), batch_size)]
    return (torch.cat(parts).cpu() if parts else torch.zeros(0))[torch.argsort(order)]

def infer(net, items, idx, dtype, batch_size):
    """(N, ...) outputs of net (no grad) for the rows idx of a data.Items, on the CPU, in batches of
    similar length; under DDP each rank computes idx[rank::world], gathered back in order"""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    net.eval()
    with torch.autocast(items.device.type, getattr(torch, dtype), enabled=dtype != 'float32'):
        out = encode_by_length(lambda rows: net(*items.inputs(rows)), idx[rank::world],
                               items.length[idx][rank::world], batch_size)  # (N / world, ...)
    if world == 1:
        return out
    m = math.ceil(len(idx) / world)  # shards differ by <= 1: padded, gathered on the device (NCCL)
    out = torch.cat([out, out.new_zeros(m - len(out), *out.shape[1:])]).to(items.device)
    parts = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(parts, out)
    return torch.stack(parts, 1).flatten(0, 1)[:len(idx)].cpu()  # row i came from rank i % world
