"""
Stage 1 of the paper (Section 3.2, FCLIP): train both CLIP towers further on pairs of a frame and a
caption of the same Memento10k video, without the memorability scores. Trains on the train+val videos,
monitors the loss on the test videos (paper 4.1.1) and exports the epoch with the lowest test loss as
the FCLIP folder that regress.py strategies 5-6 read (results/fclip/model).

    python contrastive.py --epochs 1
    python contrastive.py --data results/demo/data --checkpoint results/demo/models/clip --out results/demo/fclip
    torchrun --standalone --nproc_per_node 2 contrastive.py     # DDP: each rank takes a slice of every batch

Read train() from top to bottom: data, model, optimizer, the lr range test, then the epochs, each a
loop over batches (autocast -> loss -> backward -> step; clipped only with --grad-clip) followed by the
test loss, the scheduler, early stopping, the export and the checkpoint. What keeps the run safe (input
checks, resume, the run's identity, atomic writes) is runs.py's, one call each.
"""
import argparse
import itertools
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
import runs
import training
from runs import count, lr_arg, number

# what a resumed run must share with the run it continues (a changed one is refused, naming the flag); --data and
# --checkpoint are compared by content, so the same folder reached by another path is the same run
SAME_ON_RESUME = ('frames', 'batch_size', 'lr', 'lr_steps', 'loss', 'patience', 'plateau_patience', 'plateau_factor',
                  'grad_clip', 'seed', 'dtype')
# the loop's own variables, saved with the state_dicts in one checkpoint dict
LOOP = ('lr', 'lr_curve', 'history', 'step', 'stopped', 'train_sum', 'train_batches', 'wall_time_s')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                formatter_class=runs.HelpFormatter)
    p.add_argument('--data', default='data/memento10k', help="Memento10k folder (either layout data.py reads)")
    p.add_argument('--checkpoint', default='openai/clip-vit-base-patch32',
                   help="CLIP to adapt, hub name or folder (paper Table 3)")
    p.add_argument('--out', default='results/fclip', help="writes checkpoint.pt, results.json and model/ (FCLIP)")
    p.add_argument('--cache', default=None, help="frame and caption cache folder (None: DATA/cache)")
    p.add_argument('--frames', type=count(1), default=3, help="frames per video: first, middle, last (paper 4.1.1)")
    p.add_argument('--batch-size', type=count(2), default=32,
                   help="global batch of pairs, one per video; each pair's negatives are the others (paper 4.3: 32)")
    p.add_argument('--lr', type=lr_arg, default='auto',
                   help="'auto': Smith's range test over [1e-8, 1] (paper 4.3, which found 2.75e-4), or a number")
    p.add_argument('--lr-steps', type=count(3), default=100, help="batches of the lr range test (ours)")
    p.add_argument('--loss', choices=['ce', 'bce'], default='ce',
                   help="ce: symmetric softmax cross-entropy (Table 5, 5.1); bce: eq. 5-6 (see README)")
    p.add_argument('--epochs', type=count(0), default=20,
                   help="cap on training epochs (ours; paper 4.3 stops early, which normally ends the run first)")
    p.add_argument('--patience', type=count(1), default=6,
                   help="stop after this many epochs without a lower test loss (paper 4.3: 6)")
    p.add_argument('--plateau-patience', type=count(1), default=3,
                   help="cut the lr after this many epochs without a lower test loss (paper 4.3: 3)")
    p.add_argument('--plateau-factor', type=number(0, 1), default=0.1, help="the lr cut's factor (paper 4.3: 0.1)")
    p.add_argument('--grad-clip', type=number(0), default=0.0,
                   help="clip the gradient norm to this; 0: off (paper 4.3 does not clip)")
    p.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default=None,
                   help="autocast dtype (ours; None: bfloat16 on cuda, float32 on cpu); float16 adds a GradScaler")
    p.add_argument('--compile', action='store_true', help="torch.compile the towers")
    p.add_argument('--seed', type=int, default=0, help="seed of the batch order and of the range test's batches")
    p.add_argument('--log-every', type=float, default=10.0,
                   help="seconds between progress lines when the output is not a terminal")
    p.add_argument('--save-every', type=count(0), default=0,
                   help="also checkpoint every N steps (0: at the end of each epoch only)")
    p.add_argument('--resume', action='store_true', help="continue the run in OUT from OUT/checkpoint.pt")
    p.add_argument('--max-steps', type=count(0), default=0,
                   help="stop (with a checkpoint) after N steps in all; for smoke runs (0: no limit)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# the loss

def clip_loss(img, txt, logit_scale, kind='ce'):
    """Contrastive loss of B pairs where row k of img matches row k of txt.

    img, txt: (B, D) features; logit_scale: the model's log temperature (a scalar tensor).
    logits[i, j] = min(exp(logit_scale), 100) * cos(img_i, txt_j), (B, B). The clamp at 100 is CLIP's
    and open_clip's: the published checkpoint sits at ln 100, so its temperature stays at 100.
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
    if kind == 'bce':
        return F.binary_cross_entropy_with_logits(logits, torch.eye(len(logits), device=logits.device))
    assert kind == 'ce', f"loss must be 'ce' or 'bce', got {kind!r}"
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


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


@torch.no_grad()
def test_loss(model, pairs, sampler, kind, ctx, device):
    """mean loss over the test batches; the sampler's epoch is fixed so every call sees the same batches"""
    model.eval()
    sampler.set_epoch(0)
    losses = []
    for batch in sampler:  # this rank's share of each batch
        with ctx():
            img, txt, logit_scale = model(*pairs.batch(batch, device))
        losses.append(clip_loss(training.gather_with_grad(img), training.gather_with_grad(txt), logit_scale, kind))
    model.train()
    return torch.stack(losses).mean().item()


def find_lr(clip, model, trainset, args, ctx, device, rank, world, log):
    """paper 4.3: Smith's range test over [1e-8, 1] on batches of its own order, unclipped as in the paper; clip is
    the bare CLIP whose weights are put back, model the one the step runs (DDP, compiled). -> (lr, curve)"""
    probe = data.PairBatchSampler(len(trainset), args.frames, data.N_CAPTIONS, args.batch_size, args.seed + 1,
                                  rank, world)

    def loss_of(batch):
        with ctx():
            img, txt, logit_scale = model(*trainset.batch(batch, device))
        return clip_loss(training.gather_with_grad(img), training.gather_with_grad(txt), logit_scale, args.loss)
    scaler = training.autocast_setup(device, args.dtype)[1]  # its own: the range test's steps are not the run's
    return training.lr_range_test(clip, loss_of, (b for _ in itertools.count() for b in probe), scaler,
                                  args.lr_steps, fused=device.type == 'cuda', log=log)


# -----------------------------------------------------------------------------
# training

def train(args):
    """Runs stage 1 and returns the results dict (also written to OUT/results.json)."""
    t0 = time.time()
    rank, world, device = training.ddp_setup()
    log = print if rank == 0 else (lambda *a, **k: None)
    args.dtype = args.dtype or ('bfloat16' if device.type == 'cuda' else 'float32')

    # data and model: train on train+val, monitor on test (paper 4.1.1)
    memento = data.load_memento(args.data)
    clip = models.from_pretrained(args.checkpoint)
    runs.check_contrastive(args, memento, clip, world)  # every refusal before any work
    tokenizer = models.load_tokenizer(args.checkpoint)
    identity = runs.run_identity(args, SAME_ON_RESUME, memento.videos, models.checkpoint_identity(args.checkpoint))
    ckpt_path = os.path.join(args.out, 'checkpoint.pt')
    state = runs.load_state(ckpt_path, identity) if args.resume else None  # None: a new run
    cache_dir = args.cache or os.path.join(args.data, 'cache')
    frames = data.frame_cache(memento.videos, 'clip', clip.image_size, args.frames, cache_dir, log=log)
    captions = data.caption_cache(memento.videos, tokenizer, cache_dir)
    for vid, reason in frames.failed.items():
        log(f"skipping video {vid}: {reason}")
    trainset = Pairs(frames, captions, memento.split('train') + memento.split('val'))
    testset = Pairs(frames, captions, memento.split('test'))
    runs.check_pairs(args, {'train+val': trainset, 'test': testset})
    sampler, test_sampler = (data.PairBatchSampler(len(pairs), args.frames, data.N_CAPTIONS, args.batch_size, args.seed,
                                                   rank, world) for pairs in (trainset, testset))
    log(f"{len(trainset)} train+val videos ({len(sampler)} batches an epoch), {len(testset)} test videos; "
        f"{world} process(es) on {device}, {args.dtype}")

    # model, optimizer
    clip.to(device).train()
    model = torch.compile(clip) if args.compile else clip  # forward: both towers and the log scale
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)
    ctx, scaler = training.autocast_setup(device, args.dtype)
    optimizer = torch.optim.Adam(clip.parameters(), lr=1e-8, fused=device.type == 'cuda')
    scheduler = training.plateau_scheduler(optimizer, 'min', args.plateau_patience, args.plateau_factor)
    stopper = training.EarlyStopping(args.patience, mode='min')
    lr, lr_curve, history, step, stopped, train_sum, train_batches, wall_time = args.lr, None, [], 0, False, 0.0, 0, 0.0
    if state:  # resume: weights, optimizer, scaler, scheduler, sampler, early stopping, RNG and the loop's variables
        runs.restore(state, model=clip, optimizer=optimizer, scaler=scaler, scheduler=scheduler,
                     early_stopping=stopper, sampler=sampler)
        lr, lr_curve, history, step, stopped, train_sum, train_batches, wall_time = (state[k] for k in LOOP)
        log(f"resumed from {ckpt_path}: epoch {sampler.epoch}, step {step}")

    if lr == 'auto':  # Smith's range test (paper 4.3)
        lr, lr_curve = find_lr(clip, model, trainset, args, ctx, device, rank, world, log)
    if not state:
        optimizer.param_groups[0]['lr'] = lr

    def checkpoint():  # one dict: everything a resumed run needs (save_state adds the RNG state)
        runs.save_state(ckpt_path, {
            'model': clip.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'scheduler': scheduler.state_dict(), 'early_stopping': stopper.state_dict(),
            'sampler': sampler.state_dict(), 'identity': identity,
            **dict(zip(LOOP, (lr, lr_curve, history, step, stopped, train_sum, train_batches,
                              wall_time + time.time() - t0)))})

    # epoch 0 is the unchanged model on the test pairs (Table 5's first row); then train until early stopping
    first_epoch = sampler.epoch if state else 0
    pairs_left = ((args.epochs + 1 - first_epoch) * len(sampler) - sampler.step) * args.batch_size
    progress = training.Progress(total=pairs_left, unit='pairs', every=args.log_every)
    interrupted = False
    for epoch in range(first_epoch, args.epochs + 1):
        if stopped:
            break
        if epoch > 0:
            sampler.set_epoch(epoch)
            for batch in sampler:  # this rank's share of the global batch
                with ctx():
                    img, txt, logit_scale = model(*trainset.batch(batch, device))
                # every process computes the loss of the whole global batch (see training.gather_with_grad)
                loss = clip_loss(training.gather_with_grad(img), training.gather_with_grad(txt), logit_scale, args.loss)
                scaler.scale(loss).backward()
                if args.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
                    torch.nn.utils.clip_grad_norm_(clip.parameters(), args.grad_clip)
                scaler.step(optimizer)  # skipped by the float16 scaler when the gradients are not finite
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step, train_sum, train_batches = step + 1, train_sum + loss.item(), train_batches + 1
                progress.update(len(batch) * world, epoch=epoch, step=step, loss=loss.item(),
                                lr=optimizer.param_groups[0]['lr'])
                interrupted = args.max_steps and step >= args.max_steps
                if interrupted or (args.save_every and step % args.save_every == 0):
                    checkpoint()
                if interrupted:
                    break
            if interrupted:
                progress.done_line(f"stopped after --max-steps {args.max_steps}; --resume continues")
                break

        # end of the epoch: test loss -> early stopping, lr schedule, export of the best, checkpoint
        loss = test_loss(model, testset, test_sampler, args.loss, ctx, device)
        train_loss = train_sum / train_batches if train_batches else None
        runs.finite({'test_loss': loss, 'train_loss': train_loss}, f"epoch {epoch}")
        history.append({'epoch': epoch, 'train_loss': train_loss, 'test_loss': loss,
                        'lr': optimizer.param_groups[0]['lr']})
        stopped = stopper.step(loss, epoch)
        scheduler.step(loss)
        if stopper.improved and rank == 0:
            models.save_pretrained(clip, os.path.join(args.out, 'model'), tokenizer_from=args.checkpoint)
        progress.done_line(f"epoch {epoch} | train loss {'-' if train_loss is None else f'{train_loss:.4f}'} | "
                           f"test loss {loss:.4f}{' | best so far, exported' if stopper.improved else ''}")
        sampler.set_epoch(epoch + 1)
        train_sum, train_batches = 0.0, 0
        checkpoint()

    results = {'kind': 'contrastive', 'finished': not interrupted, 'demo': memento.demo,
               'checkpoint': args.checkpoint, 'data': args.data,
               'loss': args.loss, 'lr': lr, 'lr_curve': lr_curve, 'batch_size': args.batch_size, 'dtype': args.dtype,
               'world_size': world, 'frames': args.frames, 'epochs': history, 'chosen_epoch': stopper.best_epoch,
               'best_test_loss': stopper.best, 'stopped_early': stopped, 'steps': step,
               'model': os.path.join(args.out, 'model'), 'wall_time_s': wall_time + time.time() - t0}
    if not interrupted and rank == 0:  # written by a finished run only: it tells run_all.sh and regress.py it is done
        runs.write_json(os.path.join(args.out, 'results.json'), results)
        log(f"FCLIP: epoch {stopper.best_epoch} exported to {os.path.join(args.out, 'model')} "
            f"(test loss {stopper.best:.4f}), lr {lr:.2e}, {time.time() - t0:.0f} s")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        with runs.hold(args.out):  # one run at a time in --out
            return train(args)
    finally:
        training.ddp_cleanup()


if __name__ == '__main__':
    runs.script(main, 'contrastive.py', "the same command with --resume continues from the checkpoint in --out "
                "(written after every epoch, and every --save-every steps)")
