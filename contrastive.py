"""
Stage 1 of the paper (Section 3.2, FCLIP): train both CLIP towers further on pairs of a frame and a
caption of the same Memento10k video, without the memorability scores. Trains on the train+val
videos, monitors the loss on the test videos (paper 4.1.1) and exports the epoch with the lowest
test loss as the FCLIP folder that regress.py strategies 5-6 read (results/fclip/model).

    python contrastive.py --epochs 1
    python contrastive.py --data results/demo/data --checkpoint results/demo/models/clip \
        --out results/demo/fclip
    torchrun --standalone --nproc_per_node 2 contrastive.py   # DDP: a rank takes a slice of a batch

Read train() from top to bottom: data, model, optimizer, the lr range test, then the epochs, each a
loop over batches (autocast -> loss -> backward -> step; clipped only with --grad-clip) followed by
the test loss, the scheduler, early stopping, the export and the checkpoint. What keeps the run safe
(input checks, resume, the run's identity, atomic writes) is runs.py's, one call each.
"""
import argparse
import itertools
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import data
import frames
import runs
import training
from runs import count, lr_arg, number

# the flags left out of the run's identity, as they cannot change a result; every other flag is in
# it, so that a resumed run that changes one is refused naming it. --data and --checkpoint are
# compared by their content; --out and --cache are places; --epochs is a cap (the epochs done so far
# are the same under a higher one, which a resumed run may give); --resume, --compile (the same
# maths in other kernels) and --log-every change how it runs, not what it computes
IGNORED = ('data', 'checkpoint', 'out', 'cache', 'epochs', 'resume', 'compile', 'log_every')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                formatter_class=runs.HelpFormatter)
    p.add_argument('--data', default='data/memento10k', help="Memento10k folder (either layout)")
    p.add_argument('--checkpoint', default='openai/clip-vit-base-patch32',
                   help="CLIP to adapt, hub name or folder (paper Table 3)")
    p.add_argument('--out', default='results/fclip', help="its checkpoint, results, model/ (FCLIP)")
    p.add_argument('--cache', default=None, help="frame and caption cache (default: DATA/cache)")
    p.add_argument('--frames', type=count(1), default=3,
                   help="frames per video: first, middle, last (paper 4.1.1)")
    p.add_argument('--batch-size', type=count(2), default=32,
                   help="global batch of pairs, one per video; a pair's negatives are the others "
                        "(paper 4.3: 32)")
    p.add_argument('--lr', type=lr_arg, default='auto',
                   help="'auto': Smith's range test over [1e-8, 1] (paper 4.3, which found "
                        "2.75e-4), or a number")
    p.add_argument('--lr-steps', type=count(3), default=100, help="the range test's batches (ours)")
    p.add_argument('--loss', choices=['ce', 'bce'], default='ce',
                   help="ce: symmetric softmax cross-entropy (Table 5, 5.1); bce: eq. 5-6 (README)")
    p.add_argument('--epochs', type=count(0), default=20,
                   help="cap on the epochs (ours; early stopping, paper 4.3, ends a run first)")
    p.add_argument('--patience', type=count(1), default=6,
                   help="stop after this many epochs without a lower test loss (paper 4.3: 6)")
    p.add_argument('--plateau-patience', type=count(1), default=3,
                   help="cut the lr after this many epochs without a lower test loss (4.3: 3)")
    p.add_argument('--plateau-factor', type=number(0, 1), default=0.1,
                   help="the lr cut's factor (paper 4.3: 0.1)")
    p.add_argument('--grad-clip', type=number(0), default=0.0,
                   help="clip the gradient norm to this; 0: off (paper 4.3 does not clip)")
    p.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default=None,
                   help="autocast dtype (ours; None: bfloat16 on cuda, float32 on cpu); float16 "
                        "adds a GradScaler")
    p.add_argument('--compile', action='store_true', help="torch.compile the towers")
    p.add_argument('--seed', type=int, default=0, help="seed of the batch order and range test")
    p.add_argument('--log-every', type=float, default=10.0,
                   help="seconds between progress lines when the output is not a terminal")
    p.add_argument('--resume', action='store_true',
                   help="continue the run in OUT after its last finished epoch (OUT/checkpoint.pt)")
    p.add_argument('--max-steps', type=count(0), default=0,
                   help="end each epoch after N steps, for smoke runs (0: all)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# the loss

def clip_loss(img, txt, logit_scale, kind='ce'):
    """Contrastive loss of B pairs where row k of img matches row k of txt.

    img, txt: (B, D) features; logit_scale: the model's log temperature (a scalar tensor).
    logits[i, j] = exp(logit_scale) * cos(img_i, txt_j), (B, B). No cap here: a cap on the scale
    has no gradient above 100, where the published checkpoint sits (4.6052 > ln 100 = 4.60517), and
    would freeze the temperature; the parameter is clamped after each step (clamp_temperature).
    ce:  (CE(rows) + CE(columns)) / 2 with softmax cross-entropy against the diagonal (CLIP; the
         loss of Table 5).
    bce: paper eq. 5-6, 1/(2B) sum_k [BCE(row k, y_k) + BCE(column k, y_k)] where each BCE is the
         mean over the B sigmoid(logits) of that row (column) against the one-hot y_k. Every
         entry sits in one row and one column, so this is the mean BCE over the B x B matrix
         against the identity.
    """
    img = F.normalize(img.float(), dim=-1)  # float32: bfloat16 features would blur the cosines
    txt = F.normalize(txt.float(), dim=-1)
    logits = logit_scale.float().exp() * img @ txt.t()  # (B, B) images x captions
    if kind == 'bce':
        target = torch.eye(len(logits), device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target)
    assert kind == 'ce', f"loss must be 'ce' or 'bce', got {kind!r}"
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def clamp_temperature(optimizer, clip):
    """CLIP's paper (2.5) and open_clip: after each step of `optimizer` (the run's, the range
    test's) the log temperature is clamped to [0, ln 100]: the scale stays <= 100 and can fall"""
    def clamp(optimizer, args, kwargs):
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
    return optimizer.register_step_post_hook(clamp)


# -----------------------------------------------------------------------------
# the pairs

class PairBatchSampler:
    """Global batches of (video, frame, caption) index triples (paper 3.2, 4.1.1): each of the
    F * C pairs of every video once an epoch, never two pairs of one video in a batch, only the
    epoch's last batch short. An epoch is P = F * C rounds; in each, every video gives one of its
    shuffled pairs, in random order, except that videos already in the batch the previous round
    left open go last. Under DDP each rank takes its contiguous slice of every global batch cut to
    a multiple of `world` (a short last batch may lose a few pairs). The order is a function of
    (seed, epoch): set_epoch(e) replays epoch e, and a resumed run needs no other state."""

    def __init__(self, n_videos, n_frames=3, n_captions=5, batch_size=32, seed=0, rank=0, world=1):
        # runs.check_pairs refuses such a --batch-size first: here it is a bug
        assert batch_size <= n_videos, f"batch_size {batch_size} > {n_videos} videos"
        self.n_videos, self.n_frames, self.n_captions = n_videos, n_frames, n_captions
        self.rank, self.world = rank, world
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def __len__(self):  # the batches yielded: a last one too small to give every rank a pair is not
        full, rest = divmod(self.n_videos * self.n_frames * self.n_captions, self.batch_size)
        return full + (rest >= self.world)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _epoch(self):
        n, p, b = self.n_videos, self.n_frames * self.n_captions, self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        pair_order = rng.permuted(np.tile(np.arange(p), (n, 1)), axis=1)  # (n, P)
        videos = []
        for r in range(p):
            order = rng.permutation(n)
            open_ = (r * n) % b
            if open_:
                last = np.isin(order, videos[-1][-open_:])
                order = np.concatenate([order[~last], order[last]])
            videos.append(order)
        v = np.concatenate(videos)  # (n * P,)
        pairs = pair_order[v, np.repeat(np.arange(p), n)]
        return np.stack([v, pairs // self.n_captions, pairs % self.n_captions], 1)  # (n * P, 3)

    def __iter__(self):
        triples = self._epoch().tolist()
        for i in range(len(self)):
            batch = triples[i * self.batch_size:(i + 1) * self.batch_size]
            b = len(batch) // self.world  # this rank's share
            yield [tuple(t) for t in batch[self.rank * b:(self.rank + 1) * b]]



class Pairs:
    """Frames and captions of some videos, read by the sampler's (video, frame, caption) triples.
    Frames come from the uint8 frame cache of the whole dataset (the one `data.py --prepare`
    fills): no video is decoded during an epoch."""

    def __init__(self, frame_store, captions, videos):
        self.frames, self.captions = frame_store, captions
        row = {v: i for i, v in enumerate(frame_store.video_ids)}  # both caches: dataset order
        # sampler's video index -> cache row, videos that failed to decode left out
        kept = [row[v.video_id] for v in videos if v.video_id not in frame_store.failed]
        self.rows = np.array(kept, dtype=np.int64)
        self.failed = len(videos) - len(self.rows)

    def __len__(self):
        return len(self.rows)

    def batch(self, triples, device):
        """[(video, frame, caption), ...] -> pixel_values (B, 3, S, S), input_ids (B, T),
        attention_mask (B, T)"""
        v, f, c = np.asarray(triples).T
        pixels = data.to_device(self.frames.batch(self.rows[v], f), device)  # (B, 3, S, S) uint8
        # trimmed to the batch's longest caption
        input_ids, attention_mask = self.captions.batch(self.rows[v], c)
        return frames.to_pixel_values(pixels, 'clip'), data.to_device(input_ids, device), \
            data.to_device(attention_mask, device)


@torch.no_grad()
def test_loss(model, pairs, sampler, kind, ctx, device):
    """mean loss over the test batches; the sampler's epoch is fixed so every call sees the same
    batches"""
    model.eval()
    sampler.set_epoch(0)
    losses = []
    for batch in sampler:  # this rank's share of each batch
        with ctx():
            img, txt, logit_scale = model(*pairs.batch(batch, device))
        img, txt = training.gather_with_grad(img), training.gather_with_grad(txt)
        losses.append(clip_loss(img, txt, logit_scale, kind))
    model.train()
    return torch.stack(losses).mean().item()


def find_lr(model, optimizer, trainset, args, device):
    """paper 4.3: Smith's range test over [1e-8, 1] on batches of its own order, unclipped as in the
    paper, stepping the run's optimizer (so the temperature is clamped as in the run); the weights
    and the optimizer's state are put back after. model is the one the step runs (DDP, compiled). ->
    (lr, curve)"""
    rank, world = training.rank_world()
    probe = PairBatchSampler(len(trainset), args.frames, data.N_CAPTIONS, args.batch_size,
                             args.seed + 1, rank, world)
    # its own scaler: the range test's steps are not the run's
    ctx, scaler = training.autocast_setup(device, args.dtype)

    def loss_of(batch):
        with ctx():
            img, txt, logit_scale = model(*trainset.batch(batch, device))
        img, txt = training.gather_with_grad(img), training.gather_with_grad(txt)
        return clip_loss(img, txt, logit_scale, args.loss)
    batches = (b for _ in itertools.count() for b in probe)  # the probe's epochs, without end
    return training.lr_range_test(training.bare(model), optimizer, loss_of, batches, scaler,
                                  args.lr_steps, log=training.log)


# -----------------------------------------------------------------------------
# training

def pair_sets(args, memento, clip):
    """-> the Pairs of the train+val videos and of the test videos (paper 4.1.1), from the caches of
    the whole dataset: frames decoded once, captions tokenised once"""
    cache = args.cache or os.path.join(args.data, 'cache')
    videos = memento.videos
    frame_store = frames.frame_cache(videos, 'clip', clip.image_size, args.frames, cache,
                                      training.log)
    captions = data.caption_cache(videos, checkpoints.load_tokenizer(args.checkpoint), cache,
                                  training.log)
    for vid, reason in frame_store.failed.items():
        training.log(f"skipping video {vid}: {reason}")
    trainset = Pairs(frame_store, captions, memento.split('train') + memento.split('val'))
    testset = Pairs(frame_store, captions, memento.split('test'))
    runs.check_pairs(args, {'train+val': trainset, 'test': testset})
    return trainset, testset


def train(args):
    """Runs stage 1 and returns the results dict (also written to OUT/results.json)."""
    t0 = time.time()
    rank, world, device = training.ddp_setup()
    log = training.log  # print on rank 0 only
    args.dtype = args.dtype or ('bfloat16' if device.type == 'cuda' else 'float32')

    # data and model: train on train+val, monitor on test (paper 4.1.1)
    memento = data.load_memento(args.data)
    clip = checkpoints.from_pretrained(args.checkpoint)
    runs.check_contrastive(args, memento, clip, world)  # every refusal before any work
    ctx, scaler = training.autocast_setup(device, args.dtype)  # and a dtype the device lacks
    content = checkpoints.checkpoint_identity(args.checkpoint)
    identity = runs.run_identity(args, IGNORED, memento.videos, content, 'contrastive')
    ckpt_path = os.path.join(args.out, 'checkpoint.pt')
    state = runs.load_state(ckpt_path, identity, args.out) if args.resume else None  # None: new
    trainset, testset = pair_sets(args, memento, clip)
    sampling = (args.frames, data.N_CAPTIONS, args.batch_size, args.seed, rank, world)
    sampler = PairBatchSampler(len(trainset), *sampling)
    test_sampler = PairBatchSampler(len(testset), *sampling)
    log(f"{len(trainset)} train+val videos ({len(sampler)} batches an epoch), {len(testset)} test "
        f"videos; {world} process(es) on {device}, {args.dtype}")

    # model, optimizer
    clip.to(device).train()
    model = clip
    if world > 1:
        model = DDP(clip, device_ids=[device.index] if device.type == 'cuda' else None)
    model = torch.compile(model) if args.compile else model  # compile(DDP): overlapped buckets
    optimizer = torch.optim.Adam(clip.parameters(), lr=1e-8, fused=True)  # one kernel, any device
    clamp_temperature(optimizer, clip)  # logit_scale in [0, ln 100] after each step
    scheduler = training.plateau_scheduler(optimizer, 'min', args.plateau_patience,
                                           args.plateau_factor)
    stopper = training.EarlyStopping(args.patience, mode='min')
    lr, lr_curve, history = args.lr, None, []  # history: Table 5, a row an epoch (0: as loaded)
    if state:  # resume after the last finished epoch, the RNG state included
        runs.restore(state, ckpt_path, model=clip, optimizer=optimizer, scaler=scaler,
                     scheduler=scheduler, early_stopping=stopper)
        lr, lr_curve, history = state['lr'], state['lr_curve'], state['history']
        log(f"resumed from {ckpt_path} after epoch {history[-1]['epoch']}")
    elif lr == 'auto':  # Smith's range test (paper 4.3)
        lr, lr_curve = find_lr(model, optimizer, trainset, args, device)
    if not state:
        optimizer.param_groups[0]['lr'] = lr

    # epoch 0 is the model as loaded on the test pairs (Table 5's first row); then early stopping
    steps = min(len(sampler), args.max_steps or len(sampler))
    total = (args.epochs + 1 - len(history)) * steps * args.batch_size
    progress = training.Progress(total=total, unit='pairs', every=args.log_every)
    for epoch in range(len(history), args.epochs + 1):
        if stopper.stopped:
            break
        loss_sum = torch.zeros((), device=device)  # the epoch's losses, summed on the device
        if epoch > 0:
            sampler.set_epoch(epoch)
            for step, batch in zip(range(steps), sampler):  # this rank's share of a global batch
                with ctx():
                    img, txt, logit_scale = model(*trainset.batch(batch, device))
                # every rank computes the global batch's loss (see training.gather_with_grad)
                img, txt = training.gather_with_grad(img), training.gather_with_grad(txt)
                loss = clip_loss(img, txt, logit_scale, args.loss)
                scaler.scale(loss).backward()
                if args.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not float16's scaled ones
                    torch.nn.utils.clip_grad_norm_(clip.parameters(), args.grad_clip)
                scaler.step(optimizer)  # skipped by float16's scaler when a gradient is not finite
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                progress.update(len(batch) * world, epoch=epoch, step=step + 1, loss=loss,
                                lr=optimizer.param_groups[0]['lr'])

        # end of the epoch: test loss -> early stopping, lr schedule, export of the best, checkpoint
        loss = test_loss(model, testset, test_sampler, args.loss, ctx, device)
        train_loss = loss_sum.item() / steps if epoch > 0 else None  # read once an epoch
        runs.check_finite({'test_loss': loss, 'train_loss': train_loss}, f"epoch {epoch}")
        lr_now, log_scale = optimizer.param_groups[0]['lr'], clip.logit_scale.item()
        history.append({'epoch': epoch, 'train_loss': train_loss, 'test_loss': loss, 'lr': lr_now,
                        'logit_scale': log_scale})
        stopper.step(loss, epoch)
        scheduler.step(loss)
        if stopper.improved and rank == 0:
            checkpoints.save_pretrained(clip, os.path.join(args.out, 'model'), args.checkpoint)
        train_text = '-' if train_loss is None else f'{train_loss:.4f}'
        best = ' | best so far, exported' if stopper.improved else ''
        progress.done_line(f"epoch {epoch} | train loss {train_text} | test loss {loss:.4f}{best}")
        runs.save_state(ckpt_path, {
            'model': clip.state_dict(), 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict(), 'scheduler': scheduler.state_dict(),
            'early_stopping': stopper.state_dict(), 'lr': lr, 'lr_curve': lr_curve,
            'history': history, 'identity': identity})

    results = {'kind': 'contrastive', 'demo': memento.demo, 'checkpoint': args.checkpoint,
               'data': args.data, 'loss': args.loss, 'lr': lr, 'lr_curve': lr_curve,
               'batch_size': args.batch_size, 'dtype': args.dtype, 'world_size': world,
               'frames': args.frames, 'epochs': history, 'chosen_epoch': stopper.best_epoch,
               'best_test_loss': stopper.best, 'stopped_early': stopper.stopped,
               'model': os.path.join(args.out, 'model'), 'wall_time_s': time.time() - t0}
    if rank == 0:  # written when the run has ended: run_all.sh and regress.py read it so
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
    runs.script(main, 'contrastive.py', "the same command with --resume continues after the last "
                "finished epoch (checkpointed after every epoch)")
