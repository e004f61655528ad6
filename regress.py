"""
Stage 2 of the paper (Sections 3.3, 3.4, 4.3.1): an encoder and a regression head predict the
memorability of every frame (vision) or caption (text); the predictions are averaged per video
(late fusion, eq. 2-3) and scored with Spearman's rank correlation over 5 video-level folds (Table 6).

    python regress.py --strategy 6 --modality vision --data /path/to/Memento10k
    python regress.py --strategy 1 --modality text --data DIR --batch-size table4 --lr auto
    torchrun --nproc_per_node 4 regress.py --strategy 4 --modality vision --data DIR   # fine-tuned only

Strategies (Table 3): 1-2 ViT / DistilBERT, 3-4 CLIP, 5-6 FCLIP (the folder contrastive.py writes).
Odd strategies freeze the encoder and train only the head (eq. 10) on embeddings cached on disk;
even strategies train encoder and head together (eq. 8). One training loop serves both: only the
function that turns a batch of items into encoder inputs differs (cached embeddings vs pixels/tokens).
"""
import argparse
import csv
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import evaluate
import models
import training

# Table 3: the pre-trained checkpoint of strategies 1-2 and 3-4 (5-6 use --fclip)
CHECKPOINTS = {(1, 'vision'): 'google/vit-base-patch32-224-in21k', (1, 'text'): 'distilbert-base-uncased',
               (3, 'vision'): 'openai/clip-vit-base-patch32', (3, 'text'): 'openai/clip-vit-base-patch32'}
ENCODER_NAMES = {(1, 'vision'): 'ViT', (1, 'text'): 'DistilBERT', (3, 'vision'): 'CLIP - Vision',
                 (3, 'text'): 'CLIP - Text', (5, 'vision'): 'FCLIP - Vision', (5, 'text'): 'FCLIP - Text'}
# Table 6: (learning rate, batch size) of the paper's result for each strategy x modality
TABLE6 = {(1, 'vision'): (2e-3, 1024), (1, 'text'): (1e-3, 512), (2, 'vision'): (3e-5, 128),
          (2, 'text'): (1e-5, 256), (3, 'vision'): (1e-3, 1024), (3, 'text'): (1e-3, 4096),
          (4, 'vision'): (2e-6, 128), (4, 'text'): (2e-6, 256), (5, 'vision'): (1e-3, 2048),
          (5, 'text'): (2e-3, 512), (6, 'vision'): (2e-6, 128), (6, 'text'): (3e-6, 512)}
# Table 4: batch sizes explored, by (modality, frozen)
TABLE4 = {('vision', True): (256, 2048), ('vision', False): (64, 512), ('text', True): (512, 4096), ('text', False): (64, 512)}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--strategy', type=int, required=True, choices=range(1, 7),
                   help="Table 3: 1-2 ViT/DistilBERT, 3-4 CLIP, 5-6 FCLIP; odd = frozen encoder, even = fine-tuned")
    p.add_argument('--modality', required=True, choices=['vision', 'text'], help="frames or captions (paper 3.1)")
    p.add_argument('--data', default='data/memento10k', help="Memento10k folder (default: %(default)s)")
    p.add_argument('--cache', default=None, help="frame, caption, fold and feature cache (default: DATA/cache)")
    p.add_argument('--out', default=None, help="output folder (default: results/s{strategy}-{modality})")
    p.add_argument('--checkpoint', default=None, help="encoder folder or hub name replacing the strategy's (Table 3)")
    p.add_argument('--fclip', default='results/fclip/model', help="FCLIP folder of contrastive.py, strategies 5-6 (default: %(default)s)")
    p.add_argument('--lr', default=None, help="learning rate, or 'auto' for the range test over [1e-8, 1] of paper 4.3 "
                                              "(default: the Table 6 value of the strategy)")
    p.add_argument('--batch-size', nargs='+', default=None,
                   help="one or more batch sizes, the best mean SRCC wins (paper 4.3.1), or 'table4' for the powers of two "
                        "in Table 4's range (default: the Table 6 value of the strategy)")
    p.add_argument('--epochs', type=int, default=200, help="maximum epochs per fold (paper 4.3.1: %(default)s)")
    p.add_argument('--patience', type=int, default=20, help="early stopping patience on validation SRCC (paper 4.3.1: %(default)s)")
    p.add_argument('--patience-start', type=int, default=50, help="patience counts only after this epoch (paper 4.3.1: %(default)s)")
    p.add_argument('--folds', type=int, default=5, help="video-level cross-validation folds (paper 4.1.2: %(default)s)")
    p.add_argument('--seed', type=int, default=0, help="seed of the folds, head initialisation and batch order (default: %(default)s)")
    p.add_argument('--frames', type=int, default=3, help="frames per video: first, middle, last (paper 4.1.1: %(default)s)")
    p.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                   help="autocast dtype (default: bfloat16 on cuda, float32 on cpu); float16 adds a GradScaler")
    p.add_argument('--grad-clip', type=float, default=1.0,
                   help="fine-tuned strategies: clip the gradient norm to this, 0 = off (default: %(default)s); a frozen "
                        "encoder's linear head trains unclipped")
    p.add_argument('--compile', action='store_true', help="torch.compile the encoder + head")
    p.add_argument('--no-feature-cache', action='store_true',
                   help="frozen strategies: run the encoder at every step instead of caching embeddings (same result, slower)")
    return p.parse_args(argv)


def head_on_normalized(head, zhat):
    """models.RegressionHead on features already layer-normalised without affine (the cached path):
    sigmoid(w . (gamma * zhat + beta) + b) regrouped, so a step reads the (B, D) batch twice instead of ~10 times"""
    w = head.fc.weight[0]  # (D,)
    return torch.sigmoid(zhat @ (w * head.ln.weight) + (w @ head.ln.bias + head.fc.bias[0]))  # (B,)


class Regressor(nn.Module):
    """eq. 1: y = g_RH(f_enc(x)); a frozen encoder stays in eval mode and out of autograd (eq. 10).
    normalized: the inputs are cached embeddings, already layer-normalised (see head_on_normalized)"""

    def __init__(self, encoder, dim, trainable, normalized=False):
        super().__init__()
        self.encoder, self.head, self.trainable, self.normalized = encoder, models.RegressionHead(dim), trainable, normalized
        encoder.requires_grad_(trainable)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.train(mode and self.trainable)
        return self

    def forward(self, *inputs):
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            z = self.encoder(*inputs).float()  # (B, D)
        with torch.autocast(z.device.type, enabled=False):  # a bfloat16 head would round scores to ~0.004: ties
            return head_on_normalized(self.head, z) if self.normalized else self.head(z)  # (B,)


class Items:
    """Every frame (vision) or caption (text) of the videos, one row each; target = its video's score (paper 4.1.2)."""

    def __init__(self, videos, modality, enc, tokenizer, n_frames, cache_dir, log=print):
        self.modality, self.videos = modality, videos
        if modality == 'vision':
            self.family = enc.image_family
            self.store = data.frame_cache(videos, enc.image_family, enc.image_size, n_frames, cache_dir, log=log)
            per_video, failed = n_frames, self.store.failed
        else:
            self.store = data.caption_cache(videos, tokenizer, cache_dir)
            per_video, failed = self.store.ids.shape[1], {}
        for vid, reason in failed.items():
            log(f"skipping video {vid}: {reason}")
        row = {v: i for i, v in enumerate(self.store.video_ids)}
        keep = [i for i, v in enumerate(videos) if v.video_id not in failed]
        self.video = torch.tensor(keep, dtype=torch.long).repeat_interleave(per_video)  # (N,) index into videos
        self.row = torch.tensor([row[videos[i].video_id] for i in self.video.tolist()], dtype=torch.long)  # (N,) cache row
        self.sub = torch.arange(per_video).repeat(len(keep))  # (N,) frame or caption index
        self.target = torch.tensor([math.nan if v.score is None else v.score for v in videos])[self.video]  # (N,)
        self.key = os.path.basename(self.store.path)  # the cache file name hashes videos and preprocessing

    def __len__(self):
        return len(self.video)

    def inputs(self, idx, device):
        """encoder inputs of the item rows idx: (pixel_values,) or (input_ids, attention_mask)"""
        r, s = self.row[idx].numpy(), self.sub[idx].numpy()
        if self.modality == 'vision':
            frames = self.store.batch(r, s)  # (B, 3, S, S) uint8
            return (data.to_pixel_values(frames.to(device), self.family),)
        ids, mask = self.store.batch(r, s)  # (B, T) trimmed to the batch's longest caption
        return ids.to(device), mask.to(device)


def checkpoint_identity(checkpoint):
    """what cached embeddings depend on: the resolved folder, its config and the weights' size and mtime"""
    folder = models.resolve(checkpoint)
    st = os.stat(os.path.join(folder, 'model.safetensors'))
    with open(os.path.join(folder, 'config.json'), 'rb') as f:
        config = hashlib.sha256(f.read()).hexdigest()
    return {'folder': os.path.abspath(folder), 'config': config, 'weights': [st.st_size, st.st_mtime_ns]}


def batched(fn, idx, batch_size):
    return torch.cat([fn(idx[i:i + batch_size]).float().cpu() for i in range(0, len(idx), batch_size)])


@torch.no_grad()
def cached_features(enc, items, checkpoint, cache_dir, device, ctx, log=print):
    """(N, D) embeddings of every item, computed once per checkpoint x modality x preprocessing (atomic write)"""
    key = {'checkpoint': checkpoint_identity(checkpoint), 'modality': items.modality, 'items': items.key}
    path = os.path.join(cache_dir, f"features-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.pt")
    if os.path.exists(path):
        log(f"embeddings from {path}")
        return training.load_checkpoint(path)['features']
    t0, enc = time.time(), enc.to(device).eval()

    def embed(b):
        with ctx():
            return enc(*items.inputs(b, device))
    features = batched(embed, torch.arange(len(items)), 256)  # (N, D)
    training.atomic_save({'features': features, 'key': key}, path)
    log(f"embedded {len(items)} {items.modality} items in {time.time() - t0:.1f}s -> {path}")
    return features


def train_step(net, params, opt, scaler, ctx, inputs, target, batch, grad_clip, rank=0, world=1):
    """one Adam step on the MSE of eq. 9 (batch: item rows); under DDP this rank takes batch[rank::world]
    and its loss is weighted so that DDP's gradient average equals the gradient of the whole batch's mean"""
    b = batch[rank::world]
    with ctx():
        pred = net(*inputs(b))  # (B / world,)
    loss = F.mse_loss(pred.float(), target[b.to(target.device)])
    training.optimizer_step(loss * (len(b) * world / len(batch)), opt, scaler, params, grad_clip)
    return loss.detach()


@torch.no_grad()
def predict(net, inputs, idx, batch_size, env):
    """(N,) predictions of the item rows idx on the CPU; under DDP each rank computes idx[rank::world]"""
    rank, world, device, ctx, _ = env
    net.eval()

    def forward(b):
        with ctx():
            return net(*inputs(b))
    out = batched(forward, idx[rank::world], batch_size) if len(idx[rank::world]) else torch.zeros(0)
    if world > 1:  # shards differ by at most one item: pad, gather, interleave back into idx order
        m = math.ceil(len(idx) / world)
        out = torch.cat([out, out.new_zeros(m - len(out))]).to(device)
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out)
        out = torch.stack(parts, 1).flatten()[:len(idx)].cpu()
    return out


def find_lr(net, inputs, target, train_idx, batch_size, args, env, log):
    """paper 4.3: Smith's range test over [1e-8, 1] on fold 0's training items; the weights are put back after"""
    rank, world, device, ctx, scaler = env
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-8, fused=True)
    clip = args.grad_clip if (net.module if world > 1 else net).trainable else 0.0
    gen, batches = torch.Generator().manual_seed(args.seed), []

    def step(lr):
        if not batches:
            batches.extend(b for b in train_idx[torch.randperm(len(train_idx), generator=gen)].split(batch_size) if len(b) >= world)
        for g in opt.param_groups:
            g['lr'] = lr
        net.train()
        loss = train_step(net, params, opt, scaler, ctx, inputs, target, batches.pop(0), clip, rank, world)
        if world > 1:  # every rank must see the same curve to stop at the same step
            dist.all_reduce(loss)
            loss /= world
        return loss.item()
    lr, curve = training.lr_range_test(step, lo=1e-8, hi=1.0, log=log)
    net.load_state_dict(state)
    return lr, curve


def fit(net, inputs, target, video, train_idx, val_idx, lr, batch_size, eval_batch, args, env, fold, ckpt_path, log):
    """one fold: Adam + MSE, early stopping on the validation SRCC of fused predictions (paper 4.3.1);
    target, video: (N,) score and video index of every item. Leaves the best epoch's weights in net and
    returns the fold's record, its 'val' = {video index: fused prediction at the best epoch}"""
    rank, world, device, ctx, scaler = env
    raw = net.module if world > 1 else net
    model = torch.compile(net) if args.compile else net
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, fused=True)  # one kernel per step, on CUDA and CPU
    clip = args.grad_clip if raw.trainable else 0.0
    stopper = training.EarlyStopping(args.patience, mode='max', start_epoch=args.patience_start)
    gen = torch.Generator().manual_seed(args.seed * 1000 + fold)
    val_video = video[val_idx].numpy()  # integer ids: fusing 8,500 strings every epoch would cost more than the head
    _, val_target = evaluate.fuse(target[val_idx].cpu().numpy(), val_video)  # (V,) the videos' scores
    best, best_val, epoch, stop, r = None, None, 0, False, math.nan
    if ckpt_path and os.path.exists(ckpt_path):  # a fine-tuned fold interrupted mid-way
        ck = training.load_checkpoint(ckpt_path)
        raw.load_state_dict(ck['model'])
        opt.load_state_dict(ck['optimizer'])
        stopper.load_state_dict(ck['stopper'])
        gen.set_state(ck['gen'])
        best, best_val, epoch, stop = ck['best'], ck['best_val'], ck['epoch'], ck['stop']
        log(f"fold {fold}: resumed from {ckpt_path} after epoch {epoch}")
    progress = training.Progress(total=(args.epochs - epoch) * len(train_idx), unit='items', every=0, log=log)
    while not stop and epoch < args.epochs:
        epoch += 1
        torch.manual_seed(hash((args.seed, fold, epoch, rank)))  # dropout masks: replayed on resume, distinct per rank
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        total, seen = torch.zeros((), device=device), 0
        for i in range(0, len(perm), batch_size):
            batch = perm[i:i + batch_size]
            if len(batch) < world:  # under DDP, a last batch too small to give every rank an item
                continue
            loss = train_step(model, params, opt, scaler, ctx, inputs, target, batch, clip, rank, world)
            total, seen = total + loss * len(batch[rank::world]), seen + len(batch[rank::world])
        ids, fused = evaluate.fuse(predict(raw, inputs, val_idx, eval_batch, env).numpy(), val_video)
        r = evaluate.srcc(fused, val_target)
        stop = stopper.step(r, epoch)
        if stopper.improved or best is None:  # the fold's model is the best epoch's (trainable weights only)
            best = {k: v.detach().clone() for k, v in raw.state_dict().items() if raw.trainable or k.startswith('head.')}
            best_val = dict(zip(ids, fused.tolist()))
        progress.update(len(perm), force=True, fold=fold, epoch=f"{epoch}/{args.epochs}",
                        train_loss=total.item() / max(seen, 1), val_srcc=r, lr=f"{lr:.1e}")
        if ckpt_path and rank == 0:
            training.atomic_save({'model': raw.state_dict(), 'optimizer': opt.state_dict(), 'stopper': stopper.state_dict(),
                                  'gen': gen.get_state(), 'best': best, 'best_val': best_val, 'epoch': epoch, 'stop': stop},
                                 ckpt_path)
    raw.load_state_dict(best, strict=False)
    return {'srcc': stopper.best if stopper.best is not None else r, 'epochs': epoch,
            'best_epoch': stopper.best_epoch or epoch, 'val': best_val}


def read_fold(fold_dir, config):
    """the record of a fold finished by an earlier run, or None; a fold begun with other settings is an error"""
    path = os.path.join(fold_dir, 'config.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        found = json.load(f)
    diff = {k: (found.get(k), v) for k, v in config.items() if found.get(k) != v}
    if diff:
        raise ValueError(f"{path} was written with other settings {{key: (found, now)}} {diff}; "
                         f"use another --out or delete {fold_dir}")
    if not os.path.exists(os.path.join(fold_dir, 'fold.json')):
        return None  # begun, not finished: a fine-tuned fold continues from its checkpoint.pt
    with open(os.path.join(fold_dir, 'fold.json')) as f:
        return json.load(f)


def run_folds(args, env, items, fold_of, checkpoint, frozen, features, lr, batch_size, run_dir, log):
    """5-fold CV of one (lr, batch size): -> summary dict; each finished fold is saved and skipped on a rerun"""
    rank, world, device, ctx, _ = env
    ids = [v.video_id for v in items.videos]
    fold_idx = torch.tensor([fold_of.get(ids[i], -1) for i in items.video.tolist()])  # (N,) -1 = unlabelled test video
    test_idx, target = torch.where(fold_idx < 0)[0], items.target.to(device)
    feats = None  # cached embeddings, layer-normalised once here instead of at every step (head_on_normalized)
    if features is not None:
        feats = F.layer_norm(features.to(device), features.shape[1:], eps=models.RegressionHead(1).ln.eps)  # the head's eps
    inputs = (lambda b: (feats.index_select(0, b.to(device)),)) if feats is not None else (lambda b: items.inputs(b, device))
    eval_batch = 1 << 16 if feats is not None else batch_size

    def build(fold):
        if feats is not None:  # frozen, cached: the encoder's output is a lookup
            base, enc, dim = None, nn.Identity(), feats.shape[1]
        else:
            base = models.from_pretrained(checkpoint).to(device)
            enc = models.encoder_for(base, args.modality)
            dim = enc.embed_dim
        torch.manual_seed(args.seed * 1000 + fold)  # the same head, cached or not, on every rank
        net = Regressor(enc, dim, not frozen, normalized=feats is not None).to(device)
        return base, (DDP(net, device_ids=[device.index] if device.type == 'cuda' else None) if world > 1 else net)

    lr_curve = None
    if lr == 'auto':
        path = os.path.join(run_dir, 'lr_range.json')
        if os.path.exists(path):
            with open(path) as f:
                found = json.load(f)
            lr, lr_curve = found['lr'], found['curve']
            log(f"lr {lr:.2e} from the range test in {path}")
        else:
            _, net = build(0)
            lr, lr_curve = find_lr(net, inputs, target, torch.where((fold_idx >= 0) & (fold_idx != 0))[0],
                                   batch_size, args, env, log)
            if rank == 0:
                os.makedirs(run_dir, exist_ok=True)
                training.atomic_json({'lr': lr, 'curve': lr_curve}, path)
    config = {k: getattr(args, k) for k in ('strategy', 'modality', 'epochs', 'patience', 'patience_start', 'folds',
                                            'seed', 'frames', 'dtype', 'grad_clip')}
    config.update(checkpoint=checkpoint, lr=lr, batch_size=batch_size)
    folds = []
    for k in range(args.folds):
        fold_dir = os.path.join(run_dir, f'fold{k}')
        done = read_fold(fold_dir, config)
        if done is not None:
            log(f"fold {k}: finished by an earlier run (srcc {done['srcc']:.4f}), skipped")
            folds.append(done)
            continue
        if rank == 0:
            os.makedirs(fold_dir, exist_ok=True)
            training.atomic_json(config, os.path.join(fold_dir, 'config.json'))
        base, net = build(k)
        raw = net.module if world > 1 else net
        train_idx, val_idx = torch.where((fold_idx >= 0) & (fold_idx != k))[0], torch.where(fold_idx == k)[0]
        ckpt = os.path.join(fold_dir, 'checkpoint.pt') if not frozen else None
        rec = fit(net, inputs, target, items.video, train_idx, val_idx, lr, batch_size, eval_batch,
                  args, env, k, ckpt, log)
        tv, test = evaluate.fuse(predict(raw, inputs, test_idx, eval_batch, env).numpy(), items.video[test_idx].numpy())
        rec.update(fold=k, val={ids[i]: p for i, p in rec['val'].items()}, test={ids[i]: float(p) for i, p in zip(tv, test)})
        if rank == 0:
            save_file({k_: v.contiguous() for k_, v in raw.head.state_dict().items()}, os.path.join(fold_dir, 'head.safetensors'))
            if not frozen:
                models.save_pretrained(base, os.path.join(fold_dir, 'encoder'),
                                       tokenizer_from=checkpoint if args.modality == 'text' else None)
            training.atomic_json(rec, os.path.join(fold_dir, 'fold.json'))  # written last: marks the fold finished
            if ckpt and os.path.exists(ckpt):
                os.remove(ckpt)
        log(f"fold {k}: val srcc {rec['srcc']:.4f} (best epoch {rec['best_epoch']} of {rec['epochs']})")
        folds.append(rec)
    return summarise(folds, items, lr, lr_curve, batch_size)


def summarise(folds, items, lr, lr_curve, batch_size):
    score = {v.video_id: v.score for v in items.videos}
    rows = [(vid, score[vid], p, f['fold']) for f in folds for vid, p in f['val'].items()]
    srcc = [float(f['srcc']) for f in folds]
    mean, n = float(np.mean(srcc)), len(rows)
    tests = {vid for f in folds for vid in f['test']}
    test_rows = [(vid, float(np.mean([f['test'][vid] for f in folds]))) for vid in sorted(tests)]
    return {'lr': lr, 'batch_size': batch_size, 'srcc_folds': srcc, 'srcc_mean': mean,
            'ci': list(evaluate.fisher_ci(mean, n)) if abs(mean) < 1 and n > 3 else [mean, mean],  # eq. 13
            'srcc_pooled': evaluate.srcc([r[2] for r in rows], [r[1] for r in rows]),
            'n_videos': n, 'n_test_videos': len(test_rows), 'epochs_per_fold': [f['epochs'] for f in folds],
            'best_epoch_per_fold': [f['best_epoch'] for f in folds], 'lr_curve': lr_curve,
            'rows': rows, 'test_rows': test_rows}


def resolve_checkpoint(args):
    family = (args.strategy + 1) // 2 * 2 - 1  # 1, 3, 5
    if args.checkpoint:  # the strategy's name with the encoder actually used
        return args.checkpoint, f"{ENCODER_NAMES[family, args.modality]} ({os.path.basename(args.checkpoint.rstrip('/'))})"
    if family == 5:
        if not os.path.isdir(args.fclip):
            raise FileNotFoundError(f"FCLIP folder {args.fclip} not found: strategies 5-6 start from the encoders that "
                                    f"contrastive.py writes; run `python contrastive.py --data {args.data}` first or pass --fclip DIR")
        return args.fclip, ENCODER_NAMES[family, args.modality]
    return CHECKPOINTS[family, args.modality], ENCODER_NAMES[family, args.modality]


def hyperparameters(args, frozen):
    """-> (lr or 'auto', [batch sizes], description); the defaults are the paper's Table 6"""
    lr6, bs6 = TABLE6[args.strategy, args.modality]
    try:
        lr = lr6 if args.lr is None else 'auto' if args.lr == 'auto' else float(args.lr)
        if args.batch_size is None:
            sizes = [bs6]
        elif args.batch_size == ['table4']:
            lo, hi = TABLE4[args.modality, frozen]
            sizes = [2 ** i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]
        else:
            sizes = [int(b) for b in args.batch_size]
        if min(sizes) < 1:
            raise ValueError(f"batch sizes must be positive, found {min(sizes)}")
    except ValueError as e:
        raise ValueError(f"--lr takes a number or 'auto' (found {args.lr!r}); --batch-size takes integers or 'table4' "
                         f"(found {args.batch_size}): {e}") from e
    desc = (f"lr {lr} ({'paper Table 6' if args.lr is None else 'range test, paper 4.3' if lr == 'auto' else '--lr'}), "
            f"batch size {sizes} ({'paper Table 6' if args.batch_size is None else '--batch-size'})")
    return lr, sizes, desc


def run(args):
    """stage 2 for one strategy x modality; writes --out and returns the results dict"""
    t0, frozen = time.time(), args.strategy % 2 == 1
    checkpoint, encoder_name = resolve_checkpoint(args)
    base = models.from_pretrained(checkpoint)
    enc = models.encoder_for(base, args.modality)  # a checkpoint of the wrong modality raises here
    tokenizer = models.load_tokenizer(checkpoint) if args.modality == 'text' else None
    lr, sizes, desc = hyperparameters(args, frozen)
    memento = data.load_memento(args.data)
    labelled = memento.labelled()
    if len(labelled) < max(args.folds, 2):
        raise ValueError(f"{args.data}: {len(labelled)} labelled videos (train + val with a score), "
                         f"need at least {max(args.folds, 2)} for {args.folds} folds")
    rank, world, device = training.ddp_setup()
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        if frozen and world > 1:
            raise ValueError(f"strategy {args.strategy} is frozen: its head trains on cached embeddings in seconds; "
                             f"run it without torchrun (DDP serves the fine-tuned strategies 2, 4, 6)")
        dtype = args.dtype or ('bfloat16' if device.type == 'cuda' else 'float32')
        ctx, scaler = training.autocast_setup(device, dtype)
        env = (rank, world, device, ctx, scaler)
        cache = args.cache or os.path.join(args.data, 'cache')
        out = args.out or f"results/s{args.strategy}-{args.modality}"
        log(f"strategy {args.strategy} ({'frozen' if frozen else 'fine-tuned'}) {args.modality}: {checkpoint}; {desc}; "
            f"{world} process(es) on {device}, {dtype}; {args.data}: {len(labelled)} labelled and "
            f"{len(memento.split('test'))} test videos, {len(memento.exclusions)} excluded or flagged")
        if world > 1 and rank != 0:
            dist.barrier()  # rank 0 fills the frame/caption caches, the others then read them
        items = Items(memento.videos, args.modality, enc, tokenizer, args.frames, cache, log)
        if world > 1 and rank == 0:
            dist.barrier()
        fold_of = data.make_folds(labelled, k=args.folds, seed=args.seed, cache_dir=cache)
        features = None
        if frozen and not args.no_feature_cache:
            features = cached_features(enc, items, checkpoint, cache, device, ctx, log)
        del base, enc
        runs = []
        for bs in sizes:
            run_dir = out if len(sizes) == 1 else os.path.join(out, f'bs{bs}')
            runs.append(run_folds(args, env, items, fold_of, checkpoint, frozen, features, lr, bs, run_dir, log))
            runs[-1]['folds_dir'] = os.path.relpath(run_dir, out)
            log(f"batch size {bs}: srcc {runs[-1]['srcc_mean']:.4f} over {args.folds} folds {runs[-1]['srcc_folds']}")
        best = max(runs, key=lambda r: r['srcc_mean'] if not math.isnan(r['srcc_mean']) else -2)
        results = {'kind': 'regress', 'strategy': args.strategy, 'modality': args.modality, 'checkpoint': checkpoint,
                   'checkpoint_path': os.path.abspath(models.resolve(checkpoint)), 'encoder': encoder_name,
                   'frozen': frozen, 'frames': args.frames, 'folds': args.folds, 'seed': args.seed,
                   **{k: v for k, v in best.items() if k not in ('rows', 'test_rows')}, 'wall_time_s': time.time() - t0}
        if len(sizes) > 1:
            results['batch_size_search'] = [{k: v for k, v in r.items() if k not in ('rows', 'test_rows', 'lr_curve')} for r in runs]
        if rank == 0:
            write_outputs(out, results, best)
        log(f"{results['encoder']} strategy {args.strategy}: srcc {results['srcc_mean']:.4f} "
            f"(95% CI {results['ci'][0]:.3f}, {results['ci'][1]:.3f}) over {results['n_videos']} videos, "
            f"lr {results['lr']:.2g}, batch size {results['batch_size']} -> {out}")
        return results
    finally:
        training.ddp_cleanup()


def write_outputs(out, results, best):
    os.makedirs(out, exist_ok=True)
    for name, header, rows in (('predictions.csv', ['video_id', 'score', 'prediction', 'fold'], best['rows']),
                               ('test_predictions.csv', ['video_id', 'score'], best['test_rows'])):
        tmp = os.path.join(out, name + '.tmp')
        with open(tmp, 'w', newline='') as f:
            csv.writer(f).writerows([header] + [list(r) for r in rows])
        os.replace(tmp, os.path.join(out, name))
    training.atomic_json(results, os.path.join(out, 'results.json'))


def main(argv=None):
    return run(get_args(argv))


if __name__ == '__main__':
    models.keep_freed_memory()  # no page faults on every batch's activations
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as e:  # bad input: the message says what and where
        raise SystemExit(f"regress.py: error: {e}")
