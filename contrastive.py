"""
Stage 1 of the paper (Section 3.2, FCLIP): train both CLIP towers further on pairs of a frame and
a caption of the same Memento10k video, without the memorability scores. Trains on the train+val
videos, monitors the loss on the test videos (paper 4.1.1) and exports the epoch with the lowest
test loss as the FCLIP folder that regress.py strategies 5-6 read (results/fclip/model).

    python contrastive.py --epochs 1
    python contrastive.py --data results/demo/data --checkpoint results/demo/models/clip --out results/demo/fclip --lr 1e-3
    torchrun --standalone --nproc_per_node 2 contrastive.py     # DDP: each rank takes a slice of every batch
"""
import argparse
import functools
import itertools
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
import training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data', default='data/memento10k', help="Memento10k folder (any layout data.load_memento reads)")
    p.add_argument('--checkpoint', default='openai/clip-vit-base-patch32', help="CLIP to adapt, hub name or folder (paper Table 3)")
    p.add_argument('--out', default='results/fclip', help="writes checkpoint.pt, results.json and model/ (the FCLIP folder)")
    p.add_argument('--cache', default=None, help="frame and caption cache folder (None: DATA/cache)")
    p.add_argument('--frames', type=int, default=3, help="frames per video: first, middle, last (paper 4.1.1)")
    p.add_argument('--batch-size', type=int, default=32, help="global batch of pairs, one per video (paper 4.3: 32)")
    p.add_argument('--lr', default='auto', help="'auto': Smith's range test over [1e-8, 1] (paper 4.3 found 2.75e-4), or a number")
    p.add_argument('--lr-steps', type=int, default=100, help="batches of the lr range test")
    p.add_argument('--loss', choices=['ce', 'bce'], default='ce', help="ce: symmetric softmax cross-entropy (Table 5); bce: paper eq. 5-6")
    p.add_argument('--epochs', type=int, default=20, help="cap on training epochs; early stopping normally ends the run first")
    p.add_argument('--patience', type=int, default=6, help="early stopping on the test loss (paper 4.3: 6 epochs)")
    p.add_argument('--plateau-patience', type=int, default=3, help="ReduceLROnPlateau patience on the test loss (paper 4.3: 3)")
    p.add_argument('--plateau-factor', type=float, default=0.1, help="ReduceLROnPlateau factor (paper 4.3: 0.1)")
    p.add_argument('--grad-clip', type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default=None,
                   help="autocast dtype (None: bfloat16 on cuda, float32 on cpu); float16 adds a GradScaler")
    p.add_argument('--compile', action='store_true', help="torch.compile the model")
    p.add_argument('--seed', type=int, default=0, help="seed of the initialisation and of the batch order")
    p.add_argument('--log-every', type=float, default=10.0, help="seconds between log lines (0: every step)")
    p.add_argument('--save-every', type=int, default=0, help="also checkpoint every N steps (0: at the end of each epoch only)")
    p.add_argument('--resume', action='store_true', help="continue from OUT/checkpoint.pt")
    p.add_argument('--max-steps', type=int, default=0, help="stop (with a checkpoint) after N steps in all; for smoke runs (0: no limit)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# the loss

def clip_loss(img, txt, logit_scale, kind='ce'):
    """Contrastive loss of B pairs where row k of img matches row k of txt.

    img, txt: (B, D) features; logit_scale: the model's log temperature (a scalar tensor).
    logits[i, j] = min(exp(logit_scale), 100) * cos(img_i, txt_j), (B, B).
    ce:  (CE(rows) + CE(columns)) / 2 with softmax cross-entropy against the diagonal (CLIP; the
         loss of Table 5).
    bce: paper eq. 5-6, 1/(2B) sum_k [BCE(row k, y_k) + BCE(column k, y_k)] where each BCE is the
         mean over the B sigmoid(logits) of that row (column) against the one-hot y_k. Every
         entry sits in one row and one column, so this is the mean BCE over the B x B matrix
         against the identity.
    """
    img = F.normalize(img.float(), dim=-1)  # float32: bfloat16 features would blur the cosines
    txt = F.normalize(txt.float(), dim=-1)
    logits = logit_scale.float().exp().clamp(max=100) * img @ txt.t()  # (B, B) images x captions
    if kind == 'ce':
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    if kind == 'bce':
        return F.binary_cross_entropy_with_logits(logits, torch.eye(len(logits), device=logits.device))
    raise ValueError(f"loss must be 'ce' or 'bce', got {kind!r}")


class Towers(nn.Module):
    """Both CLIP towers in one forward call, so DDP and torch.compile see the whole step."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values, input_ids, attention_mask):
        # (B, D), (B, D), scalar: the log scale goes through forward so DDP averages its gradient
        return self.clip.encode_image(pixel_values), self.clip.encode_text(input_ids, attention_mask), self.clip.logit_scale


# -----------------------------------------------------------------------------
# the pairs

class Pairs:
    """Frames and captions of some videos, read by the sampler's (video, frame, caption) triples.
    Frames come from the uint8 frame cache of the whole dataset (the one `data.py --prepare`
    fills): no video is decoded during an epoch."""

    def __init__(self, frames, captions, videos):
        self.frames, self.captions = frames, captions
        row = {v: i for i, v in enumerate(frames.video_ids)}  # both caches share the dataset's video order
        # sampler's video index -> cache row, videos that failed to decode left out
        self.rows = np.array([row[v.video_id] for v in videos if v.video_id not in frames.failed], dtype=np.int64)
        self.failed = len(videos) - len(self.rows)

    def __len__(self):
        return len(self.rows)

    def batch(self, triples, device):
        """[(video, frame, caption), ...] -> pixel_values (B, 3, S, S), input_ids (B, T), attention_mask (B, T)"""
        v, f, c = np.asarray(triples).T
        pixels = self.frames.batch(self.rows[v], f)  # (B, 3, S, S) uint8
        input_ids, attention_mask = self.captions.batch(self.rows[v], c)  # trimmed to the batch's longest caption
        pixel_values = data.to_pixel_values(pixels.to(device, non_blocking=True), 'clip')
        return pixel_values, input_ids.to(device, non_blocking=True), attention_mask.to(device, non_blocking=True)


def rank_batches(batches, world):
    """Global batches cut to a multiple of the number of processes: under DDP the few pairs of a
    short last batch that do not split evenly are left out (one process keeps them all)."""
    for batch in batches:
        batch = batch[:len(batch) - len(batch) % world]
        if batch:
            yield batch


def pair_loss(model, pairs, batch, kind, ctx, device, rank=0, world=1):
    """Loss of one global batch: this rank encodes its slice, the loss sees every rank's features."""
    b = len(batch) // world
    pixel_values, input_ids, attention_mask = pairs.batch(batch[rank * b:(rank + 1) * b], device)
    with ctx():
        img, txt, logit_scale = model(pixel_values, input_ids, attention_mask)
    # gather_with_grad's backward sums every rank's gradient into this rank's slice, and DDP then
    # averages over the ranks: the gradients equal those of one process holding the whole batch
    return clip_loss(training.gather_with_grad(img), training.gather_with_grad(txt), logit_scale, kind)


@torch.no_grad()
def evaluate(model, pairs, sampler, kind, ctx, device, rank, world):
    """Mean loss over the test batches; the sampler's epoch is fixed so every call sees the same batches."""
    model.eval()
    sampler.set_epoch(0)
    losses = [pair_loss(model, pairs, batch, kind, ctx, device, rank, world).item()
              for batch in rank_batches(sampler, world)]
    model.train()
    return sum(losses) / len(losses)


def export(clip, checkpoint, folder):
    """save_pretrained into a temporary folder, then swap it in: a half-written model/ is never read."""
    tmp, old = folder + '.tmp', folder + '.old'
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_pretrained(clip, tmp, tokenizer_from=checkpoint)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# training

def train(args):
    """Runs stage 1 and returns the results dict (also written to OUT/results.json)."""
    t0 = time.time()
    rank, world, device = training.ddp_setup()
    master = rank == 0
    log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)  # rank 0 logs
    training.set_seed(args.seed)  # the same initial weights on every rank
    dtype = args.dtype or ('bfloat16' if device.type == 'cuda' else 'float32')
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")

    # data: train on train+val, monitor on test (paper 4.1.1)
    memento = data.load_memento(args.data)
    train_videos, test_videos = memento.split('train') + memento.split('val'), memento.split('test')
    if not test_videos:
        raise ValueError(f"{args.data}: no test videos; contrastive.py monitors the loss on the test split (paper 4.1.1)")
    clip = models.from_pretrained(args.checkpoint)
    if not isinstance(clip, models.CLIP):
        raise ValueError(f"{args.checkpoint}: expected a CLIP checkpoint (config.json model_type 'clip'), found {type(clip).__name__}")
    tokenizer = models.load_tokenizer(args.checkpoint)
    cache_dir = args.cache or os.path.join(args.data, 'cache')
    if world > 1 and not master:
        torch.distributed.barrier()  # rank 0 fills the caches, the others then read them
    frames = data.frame_cache(memento.videos, 'clip', clip.image_size, n_frames=args.frames, cache_dir=cache_dir, log=log)
    captions = data.caption_cache(memento.videos, tokenizer, cache_dir)
    for vid, reason in frames.failed.items():
        log(f"skipping video {vid}: {reason}")
    trainset, testset = Pairs(frames, captions, train_videos), Pairs(frames, captions, test_videos)
    if world > 1 and master:
        torch.distributed.barrier()
    for name, pairs in (('train+val', trainset), ('test', testset)):
        if args.batch_size > len(pairs):
            raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(pairs)} {name} videos of {args.data} "
                             f"({pairs.failed} more failed to decode): a batch holds one pair per video (paper 3.2)")
    n_captions = data.N_CAPTIONS
    sampler = data.PairBatchSampler(len(trainset), args.frames, n_captions, args.batch_size, seed=args.seed)
    test_sampler = data.PairBatchSampler(len(testset), args.frames, n_captions, args.batch_size, seed=args.seed)
    log(f"{len(trainset)} train+val videos ({len(sampler)} batches an epoch), {len(testset)} test videos; "
        f"{world} process(es) on {device}, {dtype}")

    # model, optimizer
    clip.to(device).train()
    model = torch.compile(Towers(clip)) if args.compile else Towers(clip)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)

    def make_optimizer(lr):
        ctx, scaler = training.autocast_setup(device, dtype)
        return torch.optim.Adam(clip.parameters(), lr=lr, fused=device.type == 'cuda'), ctx, scaler

    def train_step(batch, optimizer, scaler, ctx):
        loss = pair_loss(model, trainset, batch, args.loss, ctx, device, rank, world)
        training.optimizer_step(loss, optimizer, scaler, clip.parameters(), args.grad_clip)
        return loss.item()

    ckpt_path = os.path.join(args.out, 'checkpoint.pt')
    resume = args.resume and os.path.exists(ckpt_path)
    if args.resume and not resume:
        log(f"--resume: no {ckpt_path} yet, starting afresh")
    lr, lr_curve = (None, None)
    if resume:
        ckpt = training.load_checkpoint(ckpt_path)
        for key in ('data', 'checkpoint', 'batch_size', 'loss', 'frames', 'seed'):
            if ckpt['args'][key] != getattr(args, key):
                raise ValueError(f"{ckpt_path} was written with --{key.replace('_', '-')} {ckpt['args'][key]}, "
                                 f"this run has {getattr(args, key)}; resume with the same value or start a new --out")
        lr, lr_curve = ckpt['lr'], ckpt['lr_curve']
    elif args.lr == 'auto':
        # Smith's range test (paper 4.3) on its own batch order and optimizer; the weights are put back after
        saved = {k: v.detach().clone() for k, v in clip.state_dict().items()}
        probe = data.PairBatchSampler(len(trainset), args.frames, n_captions, args.batch_size, seed=args.seed + 1)
        optimizer, ctx, scaler = make_optimizer(1e-8)
        batches = rank_batches(forever(probe), world)

        def probe_step(lr):
            for group in optimizer.param_groups:
                group['lr'] = lr
            return train_step(next(batches), optimizer, scaler, ctx)
        lr, lr_curve = training.lr_range_test(probe_step, lo=1e-8, hi=1.0, steps=args.lr_steps, log=log)
        clip.load_state_dict(saved)
    else:
        lr = float(args.lr)

    optimizer, ctx, scaler = make_optimizer(lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode='min', factor=args.plateau_factor,
                                                           patience=args.plateau_patience)
    stopper = training.EarlyStopping(args.patience, mode='min')
    state = {'step': 0, 'history': [], 'train_sum': 0.0, 'train_batches': 0, 'stopped': False, 'wall_time_s': 0.0}
    if resume:
        clip.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        scheduler.load_state_dict(ckpt['scheduler'])
        stopper.load_state_dict(ckpt['early_stopping'])
        sampler.load_state_dict(ckpt['sampler'])
        state = ckpt['state']
        set_rng_state(ckpt['rng'])
        log(f"resumed from {ckpt_path}: epoch {sampler.epoch}, step {state['step']}")

    def results(finished=False):
        return {'kind': 'contrastive', 'finished': finished, 'checkpoint': args.checkpoint, 'data': args.data, 'loss': args.loss,
                'lr': lr, 'lr_curve': lr_curve, 'batch_size': args.batch_size, 'dtype': dtype, 'world_size': world,
                'frames': args.frames, 'epochs': state['history'], 'chosen_epoch': stopper.best_epoch,
                'best_test_loss': stopper.best, 'stopped_early': state['stopped'], 'steps': state['step'],
                'model': os.path.join(args.out, 'model'), 'wall_time_s': state['wall_time_s'] + time.time() - t0}

    def save():
        if master:
            training.atomic_save({'model': clip.state_dict(), 'optimizer': optimizer.state_dict(),
                                  'scaler': scaler.state_dict(), 'scheduler': scheduler.state_dict(),
                                  'early_stopping': stopper.state_dict(), 'sampler': sampler.state_dict(),
                                  'state': dict(state, wall_time_s=results()['wall_time_s']), 'rng': get_rng_state(),
                                  'lr': lr, 'lr_curve': lr_curve, 'args': vars(args)}, ckpt_path)

    def write_results(finished):
        # written once the run ends, so its presence tells run_all.sh the step is done
        if master:
            training.atomic_json(results(finished), os.path.join(args.out, 'results.json'))
        return results(finished)

    def end_of_epoch(epoch, train_loss):
        test_loss = evaluate(model, testset, test_sampler, args.loss, ctx, device, rank, world)
        state['history'].append({'epoch': epoch, 'train_loss': train_loss, 'test_loss': test_loss,
                                 'lr': optimizer.param_groups[0]['lr']})
        state['stopped'] = stopper.step(test_loss, epoch)
        scheduler.step(test_loss)
        if stopper.improved and master:
            export(clip, args.checkpoint, os.path.join(args.out, 'model'))
        log(f"epoch {epoch} | train loss {'-' if train_loss is None else f'{train_loss:.4f}'} | "
            f"test loss {test_loss:.4f}{' | best so far, exported' if stopper.improved else ''}")
        sampler.set_epoch(epoch + 1)
        state['train_sum'], state['train_batches'] = 0.0, 0
        save()

    os.makedirs(args.out, exist_ok=True)
    if not resume:
        if master and os.path.exists(os.path.join(args.out, 'results.json')):
            os.remove(os.path.join(args.out, 'results.json'))  # a previous run's results are stale now
        end_of_epoch(0, None)  # epoch 0: the unchanged model on the test pairs (Table 5's first row)
    pairs_left = ((args.epochs + 1 - sampler.epoch) * len(sampler) - sampler.step) * args.batch_size
    progress = training.Progress(total=pairs_left, unit='pairs', every=args.log_every, log=log)
    while not state['stopped'] and sampler.epoch <= args.epochs:
        epoch = sampler.epoch
        for batch in rank_batches(sampler, world):
            loss = train_step(batch, optimizer, scaler, ctx)
            state['step'] += 1
            state['train_sum'] += loss
            state['train_batches'] += 1
            progress.update(len(batch), epoch=epoch, step=state['step'], loss=loss, lr=optimizer.param_groups[0]['lr'])
            if args.save_every and state['step'] % args.save_every == 0:
                save()
            if args.max_steps and state['step'] >= args.max_steps:
                save()
                log(f"stopping after --max-steps {args.max_steps}; --resume continues")
                return write_results(finished=False)
        end_of_epoch(epoch, state['train_sum'] / state['train_batches'])
    return write_results(finished=True)


def forever(sampler):
    """the sampler's batches epoch after epoch, without end (the lr range test may need more than one)"""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from sampler


def get_rng_state():
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'python': random.getstate(), 'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(rng):
    torch.set_rng_state(rng['torch'])
    if rng['cuda']:
        torch.cuda.set_rng_state_all(rng['cuda'])
    random.setstate(rng['python'])
    np.random.set_state((rng['numpy'][0], np.array(rng['numpy'][1], dtype=np.uint32), *rng['numpy'][2:]))


if __name__ == '__main__':
    models.keep_freed_memory()  # no page faults on every batch's activations
    try:
        train(parse_args())
    except (FileNotFoundError, KeyError, ValueError) as e:  # bad input: the message says what and where
        raise SystemExit(f"contrastive.py: error: {e}")
    finally:
        training.ddp_cleanup()
