"""Stage 1 of the paper (Section 3.2, FCLIP): train both CLIP towers further on pairs of a frame and
a caption of the same Memento10k video, without the scores. Trains on the train+val videos, monitors
the loss on the test videos (paper 4.1.1) and exports the epoch of the lowest test loss as the FCLIP
folder that regress.py's strategies 5-6 read (results/fclip/model).

    python contrastive.py --epochs 1
    python contrastive.py --data results/demo/data --checkpoint results/demo/models/clip \
        --out results/demo/fclip
    torchrun --standalone --nproc_per_node 2 contrastive.py   # DDP: a rank takes a slice of a batch
"""
import argparse
import itertools
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from harness import checkpoints, runs, train as training
from harness.runs import count, lr_arg, number

# left out of the run's key (they change no result): --data, --checkpoint enter by content, --device
# as the device it names; --out, --cache are places; --epochs is a cap (a higher one does the same
# epochs); --resume, --compile (the same maths in other kernels), --log-every: how it runs, not what
IGNORED = ('data', 'checkpoint', 'out', 'cache', 'device', 'epochs', 'resume', 'compile', 'log_every')

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=runs.HelpFormatter)
    p.add_argument('--data', default='data/memento10k', help="Memento10k folder (either layout)")
    p.add_argument('--checkpoint', default='openai/clip-vit-base-patch32',
                   help="CLIP to adapt, hub name or folder (paper Table 3)")
    p.add_argument('--out', default='results/fclip', help="its checkpoint, results, model/ (FCLIP)")
    p.add_argument('--cache', default=None, help="the caches' folder (default: FCLIP_CACHE, else "
                                                 "~/.cache/fclip-memorability)")
    p.add_argument('--frames', type=count(1), default=3,
                   help="frames per video: first, middle, last (paper 4.1.1)")
    p.add_argument('--batch-size', type=count(2), default=32, help="global batch of pairs, one a "
                   "video; a pair's negatives are the others (paper 4.3: 32)")
    p.add_argument('--lr', type=lr_arg, default='auto', help="'auto': Smith's range test over "
                   "[1e-8, 1] (paper 4.3, which found 2.75e-4), or a number")
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
    p.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto',
                   help="auto: cuda when torch finds a GPU, else cpu")
    p.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default=None,
                   help="autocast dtype (ours; default: bfloat16 on a GPU that has it, else float16; "
                        "float32 on a CPU); float16 adds a GradScaler")
    p.add_argument('--compile', action='store_true', help="torch.compile the towers")
    p.add_argument('--seed', type=int, default=0, help="seed of the batch order and range test")
    p.add_argument('--log-every', type=float, default=10.0, help="seconds between progress lines")
    p.add_argument('--resume', action='store_true',
                   help="continue the run in OUT after its last finished epoch")
    p.add_argument('--max-steps', type=count(0), default=0,
                   help="end each epoch after N steps, for smoke runs (0: all)")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# the loss
def clip_loss(img, txt, logit_scale, kind='ce'):
    """Contrastive loss of B pairs, row k of img (B, D) matching row k of txt (B, D): logits[i, j] =
    exp(logit_scale) * cos(img_i, txt_j) (B, B), logit_scale () the log temperature, uncapped (a cap
    has no gradient at the published checkpoint's 4.6052 > ln 100); clamp_temperature clamps it.
    ce:  (CE(rows) + CE(columns)) / 2, softmax cross-entropy against the diagonal (CLIP; Table 5).
    bce: paper eq. 5-6, 1/(2B) sum_k [BCE(row k, y_k) + BCE(column k, y_k)], each BCE the mean over
         B sigmoid(logits) against one-hot y_k: the mean BCE over the matrix against the identity"""
    img = F.normalize(img.float(), dim=-1)  # float32: bfloat16 features would blur the cosines
    txt = F.normalize(txt.float(), dim=-1)
    logits = logit_scale.float().exp() * img @ txt.t()  # (B, B) images x captions
    if kind == 'bce':
        return F.binary_cross_entropy_with_logits(logits, torch.eye(len(logits), device=img.device))
    assert kind == 'ce', f"loss must be 'ce' or 'bce', got {kind!r}"
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

def clamp_temperature(optimizer, clip):
    """after each step of `optimizer`: the log temperature in [0, ln 100] (CLIP 2.5, open_clip)"""
    def clamp(optimizer, args, kwargs):
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
    return optimizer.register_step_post_hook(clamp)

def gather(x):
    """(B, D) on each rank -> (world * B, D) in rank order, with gradients: every rank computes the
    global batch's loss, and DDP's mean of the ranks' gradients is one process's (open_clip)"""
    return torch.cat(dist_nn.all_gather(x)) if dist.is_initialized() else x

# -----------------------------------------------------------------------------
# the pairs
class PairBatchSampler:
    """Global batches of (video, frame, caption) (paper 3.2, 4.1.1): each video's F * C pairs once
    an epoch, never two of one video in a batch, only the last batch short. An epoch is P = F * C
    rounds; in each, every video gives one of its shuffled pairs, in random order but the videos of
    the batch the previous round left open last. A DDP rank takes its slice of each batch cut to a
    multiple of `world`. The order is a function of (seed, epoch): set_epoch(e) replays epoch e."""
    def __init__(self, n_videos, n_frames=3, n_captions=5, batch_size=32, seed=0, rank=0, world=1):
        assert batch_size <= n_videos, f"batch_size {batch_size} > {n_videos} videos"  # checked
        self.n_videos, self.n_frames, self.n_captions = n_videos, n_frames, n_captions
        self.batch_size, self.seed, self.rank, self.world, self.epoch = batch_size, seed, rank, world, 0

    def __len__(self):  # the batches yielded: not a last one too small to give every rank a pair
        full, rest = divmod(self.n_videos * self.n_frames * self.n_captions, self.batch_size)
        return full + (rest >= self.world)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        n, p, b = self.n_videos, self.n_frames * self.n_captions, self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        pair_order = rng.permuted(np.tile(np.arange(p), (n, 1)), axis=1)  # (n, P)
        rounds = []
        for r in range(p):
            order, open_ = rng.permutation(n), (r * n) % b
            if open_:  # the videos already in the batch this round completes go last
                last = np.isin(order, rounds[-1][-open_:])
                order = np.concatenate([order[~last], order[last]])
            rounds.append(order)
        v = np.concatenate(rounds)  # (n * P,)
        pairs = pair_order[v, np.repeat(np.arange(p), n)]
        triples = np.stack([v, pairs // self.n_captions, pairs % self.n_captions], 1).tolist()
        for i in range(len(self)):
            batch = triples[i * b:(i + 1) * b]
            share = len(batch) // self.world  # this rank's
            yield [tuple(t) for t in batch[self.rank * share:(self.rank + 1) * share]]

class Pairs:
    """The frames and captions of some videos, read by the sampler's (video, frame, caption) triples
    from the caches of the whole dataset: no video is decoded during an epoch."""
    def __init__(self, frames, captions, videos):
        self.frames, self.captions = frames, captions
        row = {v: i for i, v in enumerate(frames.video_ids)}  # both caches: dataset order
        kept = [row[v.video_id] for v in videos if v.video_id not in frames.failed]
        self.rows = np.array(kept, dtype=np.int64)  # sampler's video -> cache row

    def __len__(self):
        return len(self.rows)

    def batch(self, triples, device):
        """-> pixel_values (B, 3, S, S), input_ids (B, T), attention_mask (B, T) on the device"""
        v, f, c = np.asarray(triples).T
        pixels = data.to_device(self.frames.batch(self.rows[v], f), device)  # uint8
        input_ids, attention_mask = self.captions.batch(self.rows[v], c)  # the batch's longest
        return (data.to_pixel_values(pixels, 'clip'), data.to_device(input_ids, device),
                data.to_device(attention_mask, device))

def batch_loss(model, pairs, batch, args, device):
    """the loss of a global batch; each rank computes it on the gathered features of its share"""
    with torch.autocast(device.type, getattr(torch, args.dtype), enabled=args.dtype != 'float32'):
        img, txt, logit_scale = model(*pairs.batch(batch, device))
    return clip_loss(gather(img), gather(txt), logit_scale, args.loss)

@torch.no_grad()
def test_loss(model, pairs, sampler, args, device):
    """the mean loss of the test batches, the same batches at every call (epoch 0's order)"""
    model.eval()
    sampler.set_epoch(0)
    loss = torch.stack([batch_loss(model, pairs, batch, args, device) for batch in sampler]).mean()
    model.train()
    return loss.item()

# -----------------------------------------------------------------------------
# training
def train(args):
    """stage 1, top to bottom: data, model, optimizer, lr range test, epochs -> the results dict"""
    t0 = time.time()
    rank, world, device, args.dtype = runs.start(args.device, args.dtype)
    log = runs.log  # rank 0 prints
    # data and model: train on train+val, monitor on test (paper 4.1.1); caches of the whole dataset
    memento = data.load_memento(args.data)
    clip, folder = data.load_encoder(args.checkpoint)
    runs.check_contrastive(args, memento, clip, world)  # every refusal before any work
    tokenizer = checkpoints.Tokenizer(folder, clip.config.text_config.max_position_embeddings)
    frames = data.frame_cache(memento.videos, 'clip', clip.image_size, args.frames, args.cache, log)
    captions = data.caption_cache(memento.videos, tokenizer, args.cache, log)
    trainset = Pairs(frames, captions, memento.labelled())
    testset = Pairs(frames, captions, memento.split('test'))
    runs.check_pairs(args, {'train+val': len(trainset), 'test': len(testset)})
    key = {'script': 'contrastive.py', 'code': runs.code(train), 'data': memento.key(),
           'frames': frames.key, 'captions': captions.key, 'processes': world, 'device': device.type,
           'checkpoint': runs.content(folder, checkpoints.FILES), **runs.flags(args, IGNORED)}
    done = runs.claim(args.out, key)  # refused, naming what changed, when made of other inputs
    if done and (done['stopped_early'] or len(done['epochs']) > args.epochs):  # (a higher cap: on)
        log(f"{args.out}: finished by an earlier run of these inputs (FCLIP: epoch "
            f"{done['chosen_epoch']}), reused")
        return done
    ckpt_path = os.path.join(args.out, 'checkpoint.pt')
    state = runs.read_state(ckpt_path)
    runs.require(args.resume or state is None, f"{args.out} holds an unfinished run: --resume "
                 f"continues it; to start over delete {args.out} or choose another --out")
    sampling = (args.frames, data.N_CAPTIONS, args.batch_size, args.seed, rank, world)
    sampler = PairBatchSampler(len(trainset), *sampling)
    test_sampler = PairBatchSampler(len(testset), *sampling)
    for vid, reason in frames.failed.items():
        log(f"skipping video {vid}: {reason}")
    log(f"{len(trainset)} train+val videos ({len(sampler)} batches an epoch), {len(testset)} test "
        f"videos; {world} process(es) on {device}, {args.dtype}")
    # model, optimizer; torch.compile(DDP(model)) keeps DDP's buckets overlapping the backward
    model = clip.to(device).train()
    if world > 1:
        model = DDP(clip, device_ids=[device.index] if device.type == 'cuda' else None)
    model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(clip.parameters(), lr=1e-8, fused=True)  # one kernel, any device
    clamp_temperature(optimizer, clip)  # logit_scale in [0, ln 100] after each step
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == 'float16')
    # paper 4.3's "three consecutive epochs": PyTorch's patience waits one epoch more
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, 'min', factor=args.plateau_factor, patience=args.plateau_patience - 1,
        threshold=0, eps=0)
    # history: Table 5, a row an epoch (0: the model as loaded); best: the lowest test loss
    lr, lr_curve, history, best, best_epoch = args.lr, None, [], math.inf, 0
    if state:  # after the last finished epoch, the RNG included
        runs.restore(state, ckpt_path, model=clip, optimizer=optimizer, scaler=scaler,
                     scheduler=scheduler)
        lr, lr_curve, history = state['lr'], state['lr_curve'], state['history']
        best, best_epoch = state['best'], state['best_epoch']
        log(f"resumed from {ckpt_path} after epoch {history[-1]['epoch']}")
        if best_epoch == history[-1]['epoch'] and rank == 0:  # its export may have been cut short
            runs.write_folder(os.path.join(args.out, 'model'), checkpoints.hf_files(clip, folder))
    elif lr == 'auto':  # Smith's range test (paper 4.3) on batches of its own order, then put back
        probe = PairBatchSampler(len(trainset), *sampling[:3], args.seed + 1, rank, world)
        batches = (b for _ in itertools.count() for b in probe)
        lr, lr_curve = training.lr_range_test(
            clip, optimizer, lambda batch: batch_loss(model, trainset, batch, args, device), batches,
            torch.amp.GradScaler(device.type, enabled=args.dtype == 'float16'), args.lr_steps)
    if not state:
        for group in optimizer.param_groups:
            group['lr'] = lr
    steps = min(len(sampler), args.max_steps or len(sampler))
    total = (args.epochs + 1 - len(history)) * steps * args.batch_size
    progress = runs.Progress(total, unit='pairs', every=args.log_every)
    for epoch in range(len(history), args.epochs + 1):
        if epoch - best_epoch > args.patience:  # early stopping (paper 4.3): no lower test loss
            break
        # summed on the device, read once an epoch: float16 steps the scaler skips are left out
        loss_sum, skipped = torch.zeros((), device=device), torch.zeros((), device=device)
        sampler.set_epoch(epoch)
        for step, batch in zip(range(steps if epoch else 0), sampler):  # this rank's share
            loss = batch_loss(model, trainset, batch, args, device)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the true gradients: clipped, and checked for overflow
            norm = torch.nn.utils.clip_grad_norm_(clip.parameters(), args.grad_clip or math.inf)
            scaler.step(optimizer)  # skipped by float16's scaler when a gradient is not finite
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            skip = ~norm.isfinite() & scaler.is_enabled()
            loss_sum += torch.where(skip, 0.0, loss.detach())
            skipped += skip
            progress.update(len(batch) * world, epoch=epoch, step=step + 1, loss=loss.detach(),
                            lr=optimizer.param_groups[0]['lr'])
        # the epoch's end: test loss -> lr schedule, checkpoint, export of the best, early stopping
        loss = test_loss(model, testset, test_sampler, args, device)
        skipped = int(skipped.item())
        train_loss = (loss_sum / max(steps - skipped, 1)).item() if epoch else None
        runs.check_finite({'test_loss': loss, 'train_loss': train_loss}, f"epoch {epoch}")
        history.append({'epoch': epoch, 'train_loss': train_loss, 'test_loss': loss,
                        'skipped_steps': skipped, 'lr': optimizer.param_groups[0]['lr'],
                        'logit_scale': clip.logit_scale.item()})
        if loss < best:
            best, best_epoch = loss, epoch
        scheduler.step(loss)
        runs.save_state(ckpt_path, {
            'model': clip.state_dict(), 'optimizer': optimizer.state_dict(),
            'scaler': scaler.state_dict(), 'scheduler': scheduler.state_dict(), 'lr': lr,
            'lr_curve': lr_curve, 'history': history, 'best': best, 'best_epoch': best_epoch})
        if best_epoch == epoch and rank == 0:  # after the checkpoint: a resume exports it again
            runs.write_folder(os.path.join(args.out, 'model'), checkpoints.hf_files(clip, folder))
        train_text = '-' if train_loss is None else f'{train_loss:.4f}'
        skips = f" ({skipped} steps skipped by the float16 scaler)" * bool(skipped)
        log(f"epoch {epoch} | train loss {train_text}{skips} | test loss {loss:.4f}"
            + ' | best so far, exported' * (best_epoch == epoch))
    results = {'kind': 'contrastive', 'demo': memento.demo, 'checkpoint': args.checkpoint,
               'data': args.data, 'loss': args.loss, 'lr': lr, 'lr_curve': lr_curve,
               'batch_size': args.batch_size, 'dtype': args.dtype, 'world_size': world,
               'frames': args.frames, 'epochs': history, 'chosen_epoch': best_epoch,
               'best_test_loss': best, 'stopped_early': len(history) <= args.epochs,
               'model': os.path.join(args.out, 'model'), 'wall_time_s': time.time() - t0}
    if rank == 0:  # written when the run has ended: regress.py and a rerun read it so
        runs.write_json(os.path.join(args.out, 'results.json'), results)
    log(f"FCLIP: epoch {best_epoch} exported to {results['model']} (test loss {best:.4f}), lr "
        f"{lr:.2e}, {time.time() - t0:.0f} s")
    return results

def main(argv=None):
    return runs.session(train, parse_args(argv))  # one run at a time in --out

if __name__ == '__main__':
    runs.script(main, 'contrastive.py', "the same command with --resume continues after the last "
                "finished epoch (checkpointed after every epoch)")
