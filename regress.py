"""
Stage 2 of the paper (Sections 3.3, 3.4, 4.3.1): an encoder and a regression head predict the
memorability of every frame (vision) or caption (text); the predictions are averaged per video
(late fusion, eq. 2-3) and scored with Spearman's rank correlation over 5 video-level folds (Table 6).

    python regress.py --strategy 6 --modality vision --data /path/to/Memento10k
    python regress.py --strategy 1 --modality text --data DIR --batch-size table4 --lr auto
    torchrun --nproc_per_node 4 regress.py --strategy 4 --modality vision --data DIR   # fine-tuned only

Strategies (Table 3): 1-2 ViT / DistilBERT, 3-4 CLIP, 5-6 FCLIP (the folder contrastive.py writes).
Odd strategies freeze the encoder and train only the head (eq. 10) on embeddings computed once;
even strategies train encoder and head together (eq. 8). Both run the same loop, train_fold():
for epoch: for batch: autocast -> MSE (eq. 9) -> backward -> clip -> step; then the validation SRCC,
early stopping and the fold's checkpoint.
"""
import argparse

from cli import count, lr_arg, number


def batch_arg(text):
    return text if text == 'table4' else count(1)(text)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--strategy', type=int, required=True, choices=range(1, 7),
                   help="Table 3: 1-2 ViT/DistilBERT, 3-4 CLIP, 5-6 FCLIP; odd = frozen encoder, even = fine-tuned")
    p.add_argument('--modality', required=True, choices=['vision', 'text'], help="frames or captions (paper 3.1)")
    p.add_argument('--data', default='data/memento10k', help="Memento10k folder (default: %(default)s)")
    p.add_argument('--cache', default=None, help="frame, caption, fold and feature cache (default: DATA/cache)")
    p.add_argument('--out', default=None, help="output folder (default: results/s{strategy}-{modality})")
    p.add_argument('--checkpoint', default=None, help="encoder folder or hub name replacing the strategy's (Table 3)")
    p.add_argument('--fclip', default='results/fclip/model',
                   help="FCLIP folder of contrastive.py, strategies 5-6 (default: %(default)s)")
    p.add_argument('--lr', type=lr_arg, default=None,
                   help="learning rate, or 'auto' for the range test over [1e-8, 1] of paper 4.3 "
                        "(default: the strategy's Table 6 value)")
    p.add_argument('--batch-size', type=batch_arg, nargs='+', default=None,
                   help="one or more batch sizes, the best mean SRCC wins (paper 4.3.1), or 'table4' for the powers "
                        "of two in Table 4's range (default: the strategy's Table 6 value)")
    p.add_argument('--epochs', type=count(1), default=200, help="maximum epochs per fold (paper 4.3.1: %(default)s)")
    p.add_argument('--patience', type=count(1), default=20,
                   help="stop after this many epochs without a better validation SRCC (paper 4.3.1: %(default)s)")
    p.add_argument('--patience-start', type=count(0), default=50,
                   help="epochs up to this one never count towards --patience (paper 4.3.1: %(default)s)")
    p.add_argument('--plateau-patience', type=count(0), default=0,
                   help="cut the lr tenfold after this many epochs without a better validation SRCC; 0 = a constant "
                        "lr (ours: 4.3.1 names only early stopping; 3 is the contrastive step's value, paper 4.3)")
    p.add_argument('--folds', type=count(2), default=5,
                   help="video-level cross-validation folds (paper 4.1.2: %(default)s)")
    p.add_argument('--seed', type=int, default=0,
                   help="seed of the folds, head initialisation and batch order (ours: 0)")
    p.add_argument('--frames', type=count(1), default=3,
                   help="frames per video: first, middle, last (paper 4.1.1: %(default)s)")
    p.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                   help="autocast dtype, embedding included (ours; default: bfloat16 on cuda, float32 on cpu); "
                        "float16 adds a GradScaler")
    p.add_argument('--grad-clip', type=number(0), default=0.0,
                   help="fine-tuned strategies: clip the gradient norm to this; 0 = off (paper: no clipping)")
    p.add_argument('--compile', action='store_true', help="torch.compile the encoder + head")
    p.add_argument('--no-feature-cache', action='store_true',
                   help="frozen strategies: run the encoder at every step instead of once (same result, slower)")
    p.add_argument('--bucket-batches', action='store_true',
                   help="fine-tuned text: training batches of similar caption length, in random order, so less "
                        "padding (ours; default: the paper's random batches)")
    p.add_argument('--verbose', action='store_true', help="a line per epoch instead of one progress line")
    return p.parse_args(argv)


if __name__ == '__main__':
    ARGS = get_args()  # --help and a wrong flag answer before torch is imported (2-4 s)

import itertools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save as safetensors_bytes  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import files  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402

# Table 3: the pre-trained checkpoint of strategies 1-2 and 3-4 (5-6 use --fclip)
CHECKPOINTS = {(1, 'vision'): 'google/vit-base-patch32-224-in21k', (1, 'text'): 'distilbert-base-uncased',
               (3, 'vision'): 'openai/clip-vit-base-patch32', (3, 'text'): 'openai/clip-vit-base-patch32'}
# Table 6: (learning rate, batch size) of the paper's result for each strategy x modality
TABLE6 = {(1, 'vision'): (2e-3, 1024), (1, 'text'): (1e-3, 512), (2, 'vision'): (3e-5, 128),
          (2, 'text'): (1e-5, 256), (3, 'vision'): (1e-3, 1024), (3, 'text'): (1e-3, 4096),
          (4, 'vision'): (2e-6, 128), (4, 'text'): (2e-6, 256), (5, 'vision'): (1e-3, 2048),
          (5, 'text'): (2e-3, 512), (6, 'vision'): (2e-6, 128), (6, 'text'): (3e-6, 512)}
# Table 4: batch sizes explored, by (modality, frozen)
TABLE4 = {('vision', True): (256, 2048), ('vision', False): (64, 512), ('text', True): (512, 4096),
          ('text', False): (64, 512)}
# the flags a fold's results depend on: a rerun with another value refuses to reuse the fold
SAME_ON_RERUN = ('strategy', 'modality', 'epochs', 'patience', 'patience_start', 'plateau_patience', 'folds', 'seed',
                 'frames', 'dtype', 'grad_clip', 'bucket_batches')


@torch.no_grad()
def embed_once(enc, items, checkpoint, dtype):
    """(N, D) layer-normalised embeddings (zhat of eq. 11) of every item for a frozen encoder, computed once per
    checkpoint x modality x preprocessing x dtype and kept next to the frame or caption cache"""
    key = {'checkpoint': training.checkpoint_identity(checkpoint), 'modality': items.modality, 'items': items.key,
           'dtype': dtype, 'layer-normalised': True}
    path = os.path.join(os.path.dirname(items.store.path), f"features-{training.fingerprint(key)}.pt")

    def build(path):
        t0 = time.time()
        net = models.Normalized(enc).to(items.device)
        features = predict(net, items, torch.arange(len(items)), dtype, batch_size=256)  # (N, D)
        training.save_checkpoint(path, {'features': features, 'key': key})
        print(f"embedded {len(items)} {items.modality} items in {time.time() - t0:.1f}s -> {path}")
    return files.cached(path, lambda p: training.load_checkpoint(p, hint='')['features'], build, print)


@torch.no_grad()
def predict(net, items, idx, dtype, batch_size):
    """(N, ...) outputs of net for the item rows idx on the CPU, captions in batches of similar length; under DDP
    each rank computes idx[rank::world] and the shards are gathered back into idx order"""
    rank, world = training.rank_world()
    ctx, _ = training.autocast_setup(items.device, dtype)
    net.eval()

    def forward(b):
        with ctx():
            return net(*items.inputs(b))
    mine = idx[rank::world]
    out = training.encode_by_length(forward, mine, items.length[mine], batch_size)  # (len(mine), ...) on the CPU
    return training.gather_strided(out, len(idx), items.device)


def find_lr(net, items, batch_size, args):
    """paper 4.3: Smith's range test over [1e-8, 1] on shuffled batches of fold 0's training rows"""
    rank, world = training.rank_world()
    ctx, scaler = training.autocast_setup(items.device, args.dtype)
    gen, rows = torch.Generator().manual_seed(args.seed), items.split(0)[0]
    batches = (b for _ in itertools.count() for b in rows[torch.randperm(len(rows), generator=gen)].split(batch_size)
               if len(b) >= world)  # shuffled epochs of fold 0's rows, without end

    def loss_of(batch):  # eq. 9, weighted as in train_fold
        mine = batch[rank::world]
        with ctx():
            pred = net(*items.inputs(mine))  # (B / world,)
        return F.mse_loss(pred, items.target[mine.to(items.device)]) * (len(mine) * world / len(batch))
    return training.lr_range_test(net.module if world > 1 else net, loss_of, batches, scaler, fused=True,
                                  log=print if rank == 0 else (lambda *a: None))


def train_fold(args, items, net, fold, identity, fold_dir, progress):
    """One fold (paper 4.3.1): Adam on the MSE of eq. 9 over the other folds' rows, early stopping on
    the validation SRCC of the fused predictions. Leaves the best epoch's weights in net and returns the
    fold's record. A fine-tuned fold checkpoints every epoch and continues from fold_dir/checkpoint.pt.
    identity: the run's settings (lr and batch size included), stored with every checkpoint"""
    lr, batch_size = identity['--lr'], identity['--batch-size']
    rank, world = training.rank_world()
    raw = net.module if world > 1 else net
    model = torch.compile(net) if args.compile else net
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)  # one kernel per step, on CUDA and CPU
    ctx, scaler = training.autocast_setup(items.device, args.dtype)
    scheduler = training.plateau_scheduler(optimizer, 'max', max(args.plateau_patience, 1), 0.1)
    stopper = training.EarlyStopping(args.patience, mode='max', start_epoch=args.patience_start)
    gen = torch.Generator().manual_seed(args.seed * 1000 + fold)
    train_idx, val_idx = items.split(fold)
    val_video = items.video[val_idx].numpy()  # integer ids: fusing strings every epoch would cost more than the head
    _, val_target = evaluate.fuse(items.target[val_idx].cpu().numpy(), val_video)  # (V,) the videos' scores
    eval_batch = 1 << 16 if items.features is not None else batch_size
    best, best_val, epoch, stop, history = None, None, 0, False, []
    ckpt_path = os.path.join(fold_dir, 'checkpoint.pt')
    if os.path.exists(ckpt_path):  # a fine-tuned fold interrupted mid-way (its identity was checked by the caller)
        ckpt = training.load_checkpoint(ckpt_path)
        training.restore(ckpt, model=raw, optimizer=optimizer, scaler=scaler, scheduler=scheduler,
                         early_stopping=stopper)
        gen.set_state(ckpt['generator'])
        best, best_val, epoch, stop = ckpt['best'], ckpt['best_val'], ckpt['epoch'], ckpt['stop']
        history = ckpt['history']
        progress.done_line(f"fold {fold}: resumed from {ckpt_path} after epoch {epoch}")

    while not stop and epoch < args.epochs:
        epoch += 1
        torch.manual_seed(hash((args.seed, fold, epoch, rank)))  # dropout masks: replayed on resume, distinct per rank
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        if args.bucket_batches:
            perm = data.length_batches(perm, items.length, batch_size, gen)
        total, seen = torch.zeros((), device=items.device), 0
        for i in range(0, len(perm), batch_size):
            batch = perm[i:i + batch_size]
            if len(batch) < world:  # under DDP, a last batch too small to give every rank an item
                continue
            mine = batch[rank::world]
            with ctx():
                pred = model(*items.inputs(mine))  # (B / world,)
            loss = F.mse_loss(pred, items.target.index_select(0, mine.to(items.device)))  # eq. 9
            # weighted so that DDP's gradient average over the ranks is the gradient of the whole batch's mean
            scaler.scale(loss * (len(mine) * world / len(batch))).backward()
            if args.grad_clip > 0 and raw.trainable:
                scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(optimizer)  # skipped by the float16 scaler when the gradients are not finite
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            total, seen = total + loss.detach() * len(mine), seen + len(mine)
            progress.update(len(batch), fold=fold, epoch=f"{epoch}/{args.epochs}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}")

        # validation: the SRCC of the fused predictions -> early stopping, lr schedule, best weights, checkpoint
        ids, fused = evaluate.fuse(predict(raw, items, val_idx, args.dtype, eval_batch).numpy(), val_video)
        r = evaluate.srcc(fused, val_target)
        history.append({'epoch': epoch, 'train_loss': total.item() / max(seen, 1), 'val_srcc': r,
                        'lr': optimizer.param_groups[0]['lr']})
        stop = stopper.step(r, epoch)
        if args.plateau_patience:
            scheduler.step(r)
        if stopper.improved or best is None:  # the fold's model is the best epoch's (trainable weights only)
            best = {k: v.detach().clone() for k, v in raw.state_dict().items()
                    if raw.trainable or k.startswith('head.')}
            best_val = dict(zip(map(int, ids), map(float, fused)))
        if args.verbose:
            progress.done_line(f"fold {fold} | epoch {epoch}/{args.epochs} | train loss "
                               f"{history[-1]['train_loss']:.4g} | val srcc {r:.4f} | "
                               f"lr {history[-1]['lr']:.1e}")
        if raw.trainable and rank == 0:  # a frozen fold is quick to redo: no checkpoint every epoch
            training.save_checkpoint(ckpt_path, {
                'model': raw.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                'scheduler': scheduler.state_dict(), 'early_stopping': stopper.state_dict(),
                'generator': gen.get_state(), 'best': best, 'best_val': best_val, 'epoch': epoch, 'stop': stop,
                'history': history, 'identity': identity})
    if stopper.best is None:
        why = (f"its validation set holds {len(val_target)} video(s), which have no rank correlation"
               if len(val_target) < 2 else "the run diverged or predicts one constant (try a lower --lr)")
        raise ValueError(f"fold {fold}: the validation SRCC was {r} at every epoch: {why}")
    raw.load_state_dict(best, strict=False)
    return {'fold': fold, 'srcc': stopper.best, 'epochs': epoch, 'best_epoch': stopper.best_epoch,
            'val': best_val, 'history': history}


def run_folds(args, items, checkpoint, lr, batch_size, run_dir, identity, progress):
    """k-fold CV of one (lr, batch size): -> summary dict. A finished fold is saved and skipped on a rerun made
    from the same inputs; a rerun from other inputs (flags, dataset, checkpoint content) is refused."""
    rank, world = training.rank_world()
    frozen = args.strategy % 2 == 1
    lr_curve = None
    if lr == 'auto':
        path = os.path.join(run_dir, 'lr_range.pt')
        if os.path.exists(path):
            found = training.load_checkpoint(path)
            training.check_identity(found['identity'], identity, path, f"use another --out or delete {run_dir}")
            lr, lr_curve = found['lr'], found['curve']
            progress.done_line(f"lr {lr:.2e} from the range test in {path}")
        else:
            lr, lr_curve = find_lr(build(args, items, checkpoint, 0)[1], items, batch_size, args)
            if rank == 0:
                training.save_checkpoint(path, {'lr': lr, 'curve': lr_curve, 'identity': identity})
    identity = dict(identity, **{'--lr': lr})
    folds = []
    for k in range(args.folds):
        fold_dir = os.path.join(run_dir, f'fold{k}')
        ckpt_path = os.path.join(fold_dir, 'checkpoint.pt')
        if os.path.exists(ckpt_path):
            found = training.load_checkpoint(ckpt_path)
            training.check_identity(found['identity'], identity, ckpt_path, f"use another --out or delete {run_dir}")
            if found.get('finished'):
                progress.done_line(f"fold {k}: finished by an earlier run (srcc {found['record']['srcc']:.4f}), "
                                   f"skipped")
                progress.update(args.epochs * len(items.split(k)[0]))
                folds.append(found['record'])
                continue
        base, net = build(args, items, checkpoint, k)
        raw = net.module if world > 1 else net
        rec = train_fold(args, items, net, k, identity, fold_dir, progress)
        test_idx = torch.where(items.fold < 0)[0]
        tv, test = evaluate.fuse(predict(raw, items, test_idx, args.dtype, batch_size).numpy(),
                                 items.video[test_idx].numpy())
        ids = [v.video_id for v in items.videos]
        rec.update(val={ids[i]: p for i, p in rec['val'].items()}, test={ids[i]: float(p) for i, p in zip(tv, test)})
        files.finite(rec, f"fold {k}")
        if rank == 0:  # the fold's model, then its record: a finished fold's checkpoint.pt holds only the record
            head = {name: t.contiguous() for name, t in raw.head.state_dict().items()}
            files.atomic_write(os.path.join(fold_dir, 'head.safetensors'), lambda f: f.write(safetensors_bytes(head)))
            if not frozen:
                models.save_pretrained(base, os.path.join(fold_dir, 'encoder'),
                                       tokenizer_from=checkpoint if args.modality == 'text' else None)
            training.save_checkpoint(ckpt_path, {'finished': True, 'record': rec, 'identity': identity})
        progress.done_line(f"fold {k}: val srcc {rec['srcc']:.4f} (best epoch {rec['best_epoch']} of {rec['epochs']})")
        folds.append(rec)
    return {'lr': lr, 'batch_size': batch_size, 'lr_curve': lr_curve,
            **evaluate.summarise_folds(folds, {v.video_id: v.score for v in items.videos})}


def build(args, items, checkpoint, fold):
    """-> (the loaded model, or None when embedded once; the fold's Regressor). The head starts the same,
    embedded once or not, on every rank."""
    if items.features is not None:  # frozen and embedded once: the encoder's output is a lookup
        base, enc, dim = None, nn.Identity(), items.features.shape[1]
    else:
        base = models.from_pretrained(checkpoint).to(items.device)
        enc = models.encoder_for(base, args.modality)
        dim, enc = enc.embed_dim, models.Normalized(enc)
    torch.manual_seed(args.seed * 1000 + fold)
    net = models.Regressor(enc, dim, trainable=args.strategy % 2 == 0).to(items.device)
    if dist.is_initialized():
        net = DDP(net, device_ids=[items.device.index] if items.device.type == 'cuda' else None)
    return base, net


def resolve_checkpoint(args):
    """-> the encoder's folder or hub name: --checkpoint, else the strategy's (Table 3; 5-6: --fclip)"""
    if args.checkpoint:
        return args.checkpoint
    if args.strategy >= 5:
        if not os.path.isdir(args.fclip):
            raise FileNotFoundError(f"FCLIP folder {args.fclip} not found: strategies 5-6 start from the encoders that "
                                    f"contrastive.py writes; run `python contrastive.py --data {args.data}` first or "
                                    f"pass --fclip DIR")
        run = os.path.dirname(os.path.normpath(args.fclip))  # contrastive.py's --out: results.json once finished
        ckpt, done = (os.path.exists(os.path.join(run, name)) for name in ('checkpoint.pt', 'results.json'))
        if ckpt and not done:
            raise ValueError(f"{args.fclip} is the best epoch so far of an unfinished contrastive.py run ({run} holds "
                             f"a checkpoint but no results.json): continue it with `python contrastive.py --out {run} "
                             f"--resume` and its other flags, or pass --checkpoint {args.fclip} to use it as it is")
        return args.fclip
    return CHECKPOINTS[(args.strategy + 1) // 2 * 2 - 1, args.modality]


def encoder_label(base, args, checkpoint):
    """Table 6's encoder name, from what was loaded: 'ViT', 'DistilBERT', 'CLIP - Vision', 'FCLIP - Text'; a
    --checkpoint adds its name, so all-MiniLM-L6-v2 given to strategy 1 reads 'BERT (all-MiniLM-L6-v2)'"""
    kind = models.describe(base)  # 'CLIP' | 'ViT' | 'DistilBERT' | 'BERT'
    if kind == 'CLIP':
        fclip = args.strategy >= 5 and not args.checkpoint
        kind = f"{'FCLIP' if fclip else 'CLIP'} - {args.modality.title()}"
    return f"{kind} ({os.path.basename(checkpoint.rstrip('/'))})" if args.checkpoint else kind


def hyperparameters(args, frozen):
    """-> (lr or 'auto', [batch sizes], description); the defaults are the paper's Table 6"""
    lr6, bs6 = TABLE6[args.strategy, args.modality]
    lr = lr6 if args.lr is None else args.lr
    if args.batch_size is None:
        sizes = [bs6]
    elif 'table4' in args.batch_size:
        if args.batch_size != ['table4']:
            raise ValueError(f"--batch-size takes whole numbers or 'table4' alone, found {args.batch_size}")
        lo, hi = TABLE4[args.modality, frozen]
        sizes = [2 ** i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]
    else:
        sizes = args.batch_size
    desc = (f"lr {lr} ({'paper Table 6' if args.lr is None else 'range test, paper 4.3' if lr == 'auto' else '--lr'}), "
            f"batch size {sizes} ({'paper Table 6' if args.batch_size is None else '--batch-size'})")
    return lr, sizes, desc


def check_inputs(args, labelled, sizes, out):
    """the flags against the data and the output folder: a clear error now rather than a failure hours later"""
    if len(labelled) < 2 * args.folds:
        raise ValueError(f"{args.data}: {len(labelled)} labelled videos (train + val with a score), need at least "
                         f"{2 * args.folds} for {args.folds} folds: a fold's SRCC ranks two videos or more")
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file, expected a folder for the run's results")
    found = os.path.join(out, 'results.json')  # a rerun rewrites it: it must be this script's
    if os.path.exists(os.path.join(out, 'checkpoint.pt')) or (
            os.path.isfile(found) and files.read_json(found, expect=dict).get('kind') != 'regress'):
        raise ValueError(f"--out {out} holds a run of another script (contrastive.py's); choose another --out")
    per_video = args.frames if args.modality == 'vision' else data.N_CAPTIONS
    n_train = len(labelled) * (args.folds - 1) // args.folds * per_video  # about, per fold
    if max(sizes) > n_train:
        given = {None: "paper Table 6's, the default", 'table4': "the largest of Table 4's"}.get(
            (args.batch_size or [None])[0], 'given')
        raise ValueError(f"--batch-size {max(sizes)} ({given}) is larger than the about {n_train} training "
                         f"{args.modality} items of a fold ({len(labelled)} labelled videos of {args.data}); "
                         f"give a smaller --batch-size")


def run(args):
    """stage 2 for one strategy x modality; writes --out and returns the results dict"""
    t0, frozen = time.time(), args.strategy % 2 == 1
    out = args.out or f"results/s{args.strategy}-{args.modality}"
    lr, sizes, desc = hyperparameters(args, frozen)
    memento = data.load_memento(args.data)
    labelled = memento.labelled()
    check_inputs(args, labelled, sizes, out)  # everything a user can get wrong, before any work
    checkpoint = resolve_checkpoint(args)
    base = models.from_pretrained(checkpoint)
    enc = models.encoder_for(base, args.modality)  # a checkpoint of the wrong modality raises here
    tokenizer = models.load_tokenizer(checkpoint) if args.modality == 'text' else None
    label = encoder_label(base, args, checkpoint)
    rank, world, device = training.ddp_setup()
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        if frozen and world > 1:  # (embed_once's gather would also wait on a lock that another rank holds)
            raise ValueError(f"strategy {args.strategy} is frozen: its head trains on embeddings computed once, in "
                             f"seconds; run it without torchrun (DDP serves the fine-tuned strategies 2, 4, 6)")
        args.dtype = args.dtype or ('bfloat16' if device.type == 'cuda' else 'float32')
        training.autocast_setup(device, args.dtype)  # a dtype the device lacks is refused before any work
        log(f"strategy {args.strategy} ({'frozen' if frozen else 'fine-tuned'}) {args.modality}: {label} from "
            f"{checkpoint}; {desc}; {world} process(es) on {device}, {args.dtype}; {args.data}: {len(labelled)} "
            f"labelled and {len(memento.split('test'))} test videos, {len(memento.exclusions)} excluded or flagged")
        cache = args.cache or os.path.join(args.data, 'cache')  # caches: one rank builds, the others wait
        store = (data.frame_cache(memento.videos, enc.image_family, enc.image_size, args.frames, cache)
                 if args.modality == 'vision' else data.caption_cache(memento.videos, tokenizer, cache))
        for vid, reason in getattr(store, 'failed', {}).items():
            log(f"skipping video {vid}: {reason}")
        folds = data.make_folds(labelled, k=args.folds, seed=args.seed, cache_dir=cache)
        items = data.Items(memento.videos, store, folds, device, getattr(enc, 'image_family', None))
        if frozen and not args.no_feature_cache:
            items.features = embed_once(enc, items, models.resolve(checkpoint), args.dtype).to(device)
        del base, enc
        identity = {'dataset content': training.dataset_identity(memento.videos),
                    'checkpoint content': training.checkpoint_identity(models.resolve(checkpoint)),
                    **{'--' + k.replace('_', '-'): getattr(args, k) for k in SAME_ON_RERUN}}
        n_items = sum(len(items.split(k)[0]) for k in range(args.folds))
        progress = training.Progress(total=len(sizes) * args.epochs * n_items, unit='items')  # an upper bound
        runs = []
        for bs in sizes:
            run_dir = out if len(sizes) == 1 else os.path.join(out, f'bs{bs}')
            runs.append(run_folds(args, items, checkpoint, lr, bs, run_dir, dict(identity, **{'--batch-size': bs}),
                                  progress))
            runs[-1]['folds_dir'] = os.path.relpath(run_dir, out)
            progress.done_line(f"batch size {bs}: srcc {runs[-1]['srcc_mean']:.4f} over {args.folds} folds "
                               f"{[round(r, 4) for r in runs[-1]['srcc_folds']]}")
        best = max(runs, key=lambda r: r['srcc_mean'])
        results = {'kind': 'regress', 'strategy': args.strategy, 'modality': args.modality, 'checkpoint': checkpoint,
                   'checkpoint_path': os.path.abspath(models.resolve(checkpoint)), 'encoder': label,
                   'frozen': frozen, 'frames': args.frames, 'folds': args.folds, 'seed': args.seed, 'dtype': args.dtype,
                   **{k: v for k, v in best.items() if k not in ('rows', 'test_rows')}, 'wall_time_s': time.time() - t0}
        if len(sizes) > 1:
            results['batch_size_search'] = [{k: v for k, v in r.items() if k not in ('rows', 'test_rows', 'lr_curve',
                                                                                     'history')} for r in runs]
        if rank == 0:
            files.write_csv(os.path.join(out, 'predictions.csv'), ['video_id', 'score', 'prediction', 'fold'],
                            best['rows'])
            files.write_csv(os.path.join(out, 'test_predictions.csv'), ['video_id', 'score'], best['test_rows'])
            files.write_json(os.path.join(out, 'results.json'), results)  # written last: marks the run finished
        log(f"{label} strategy {args.strategy}: srcc {results['srcc_mean']:.4f} (95% CI {results['ci'][0]:.3f}, "
            f"{results['ci'][1]:.3f}) over {results['n_videos']} videos, lr {results['lr']:.2g}, batch size "
            f"{results['batch_size']}, {time.time() - t0:.0f} s -> {out}")
        return results
    finally:
        training.ddp_cleanup()


def main(argv=None):
    return run(get_args(argv))


if __name__ == '__main__':
    try:
        run(ARGS)
    except (FileNotFoundError, KeyError, ValueError) as e:  # bad input: the message says what and where
        raise SystemExit(f"regress.py: error: {e}")
    except KeyboardInterrupt:
        print("\nregress.py: interrupted; the same command continues: finished folds are kept, a fine-tuned fold "
              "resumes after its last epoch, a frozen fold starts again", file=sys.stderr)
        raise SystemExit(130)
