"""
Stage 2 of the paper (3.3, 3.4, 4.3.1): an encoder and a regression head predict the memorability of
every frame (vision) or caption (text); the predictions are averaged per video (eq. 2-3) and scored
with Spearman's rank correlation over 5 video-level folds (Table 6).

    python regress.py --strategy 6 --modality vision --data /path/to/Memento10k
    python regress.py --strategy 1 --modality text --data DIR --batch-size table4 --lr auto
    torchrun --nproc_per_node 4 regress.py --strategy 4 --modality vision --data DIR  # fine-tuned

A strategy is a row of strategies.STRATEGIES (Table 3): a frozen row trains the head alone (eq. 10)
on embeddings computed once, a fine-tuned row trains encoder and head (eq. 8), in one loop,
train_fold(). What keeps the run safe (checks, resume, identity) is runs.py's, one call each.
"""
import argparse
import itertools
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import data
import evaluate
import frames
import models
import runs
import training
from runs import count, lr_arg, number
from strategies import STRATEGIES

# the flags left out of a run's identity, as they cannot change a result (a rerun that changes any
# other flag is refused, naming it): --data, --checkpoint and --fclip are compared by their content,
# --out and --cache are places, --compile and --no-feature-cache compute the same, --verbose prints
IGNORED = ('data', 'checkpoint', 'fclip', 'out', 'cache', 'compile', 'no_feature_cache', 'verbose')


def batch_arg(text):
    return text if text == 'table4' else count(1)(text)


def parse_args(argv=None):
    rows = STRATEGIES.items()
    table6 = '\n'.join(f"  {s} {row.name}: " + ', '.join(
        f"{m} {row.lr[m]:g} / {row.batch_size[m]}" for m in row.lr) for s, row in rows)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter,
                                epilog=f"each strategy's lr / batch size (Table 6):\n{table6}")
    p.add_argument('--strategy', type=int, required=True, choices=list(STRATEGIES),
                   help="a row of strategies.STRATEGIES (Table 3): " + '; '.join(
                       f"{s} {r.name} ({'frozen' if r.frozen else 'fine-tuned'})" for s, r in rows))
    p.add_argument('--modality', required=True, choices=['vision', 'text'], help="frames, captions")
    p.add_argument('--data', default='data/memento10k', help="Memento10k folder")
    p.add_argument('--cache', default=None, help="the caches' folder (default: DATA/cache)")
    p.add_argument('--out', default=None, help="output (default: results/s{strategy}-{modality})")
    p.add_argument('--checkpoint', default=None, help="encoder (folder, hub name) for Table 3's")
    p.add_argument('--fclip', default='results/fclip/model', help="contrastive.py's FCLIP (5-6)")
    p.add_argument('--pooling', choices=['cls', 'mean'], default=None,
                   help="a BERT-family encoder's embedding: [CLS] or the mean of its states "
                        "(default: its 1_Pooling/config.json, else cls; the paper names none)")
    p.add_argument('--lr', type=lr_arg, default=None,
                   help="a learning rate, or 'auto': the range test over [1e-8, 1] of paper 4.3 "
                        "(default: Table 6's, listed below)")
    p.add_argument('--batch-size', type=batch_arg, nargs='+', default=None,
                   help="batch sizes, the best mean SRCC wins (paper 4.3.1), or 'table4': the "
                        "powers of two in Table 4's range (default: Table 6's, listed below)")
    p.add_argument('--epochs', type=count(1), default=200, help="epochs per fold at most (4.3.1)")
    p.add_argument('--patience', type=count(1), default=20,
                   help="stop after this many epochs without a better SRCC (paper 4.3.1)")
    p.add_argument('--patience-start', type=count(0), default=50,
                   help="epochs up to this one never count towards --patience (paper 4.3.1)")
    p.add_argument('--plateau-patience', type=count(0), default=0,
                   help="cut the lr tenfold after this many epochs without a better SRCC; 0: a "
                        "constant lr (ours: 4.3.1 names only early stopping; stage 1 uses 3, 4.3)")
    p.add_argument('--folds', type=count(2), default=5, help="video-level CV folds (paper 4.1.2)")
    p.add_argument('--seed', type=int, default=0, help="seed of folds, heads, batch order (ours)")
    p.add_argument('--frames', type=count(1), default=3,
                   help="frames per video: first, middle, last (paper 4.1.1: %(default)s)")
    p.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                   help="autocast dtype (ours; default: bfloat16 on cuda, float32 on cpu); float16 "
                        "adds a GradScaler")
    p.add_argument('--grad-clip', type=number(0), default=0.0,
                   help="clip the gradient norm to this; 0: off (paper: no clipping)")
    p.add_argument('--compile', action='store_true', help="torch.compile the encoder + head")
    p.add_argument('--no-feature-cache', action='store_true',
                   help="frozen strategies: the encoder at every step, not once (same result)")
    p.add_argument('--bucket-batches', action='store_true',
                   help="fine-tuned text: batches of similar caption length, in random order "
                        "(ours; default: the paper's random batches)")
    p.add_argument('--verbose', action='store_true', help="a line per epoch, not one progress line")
    args = p.parse_args(argv)
    args.out = args.out or f"results/s{args.strategy}-{args.modality}"
    return args


@torch.no_grad()
def embed_once(encoder, items, content, dtype):
    """(N, D) embeddings z of every item for a frozen encoder, computed once, kept by the frame or
    caption cache under a key of all a feature comes from: the files the loader reads (content), the
    code that computes it (an edit elsewhere, the optimizer's say, keeps them), the items, dtype,
    pooling"""
    key = {'checkpoint content': content,
           'code': runs.feature_code(), 'modality': items.modality, 'items': items.key,
           'dtype': dtype, 'pooling': getattr(encoder, 'pooling', None)}
    path = os.path.join(os.path.dirname(items.store.path), f"features-{runs.fingerprint(key)}.pt")

    def build(path):
        t0 = time.time()
        features = training.infer(encoder, items, torch.arange(len(items)), dtype, 256)  # (N, D)
        runs.save_state(path, {'features': features, 'key': key})
        print(f"embedded {len(items)} {items.modality} items in {time.time() - t0:.1f}s -> {path}")
    return runs.cached(path, lambda p: runs.read_state(p, hint='')['features'], build, print)


def find_lr(model, items, identity, run_dir, args):
    """paper 4.3: Smith's range test over [1e-8, 1] on shuffled batches of fold 0's training rows,
    with fold 0's head; its lr and curve are kept in run_dir/lr_range.pt. -> (lr, curve)"""
    path = os.path.join(run_dir, 'lr_range.pt')
    found = runs.load_state(path, identity, args.out)
    if found:
        return found['lr'], found['curve']
    rank, world = training.rank_world()
    ctx, scaler = training.autocast_setup(items.device, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    rows = items.split(0)[0]
    shuffled = (rows[torch.randperm(len(rows), generator=gen)] for _ in itertools.count())  # no end
    batches = (b for p in shuffled for b in p.split(identity['--batch-size']) if len(b) >= world)

    def loss_of(batch):  # eq. 9, weighted as in train_fold
        mine = batch[rank::world]
        with ctx():
            pred = model(*items.inputs(mine))  # (B / world,)
        return F.mse_loss(pred, items.targets(mine)) * (len(mine) * world / len(batch))
    raw_model = training.bare(model)
    torch.manual_seed(args.seed * 1000)  # fold 0's head
    raw_model.reset_head()
    optimizer = torch.optim.Adam([p for p in raw_model.parameters() if p.requires_grad], fused=True)
    lr, curve = training.lr_range_test(raw_model, optimizer, loss_of, batches, scaler,
                                       log=training.log)
    runs.save_state(path, {'lr': lr, 'curve': curve, 'identity': identity})
    return lr, curve


def train_fold(args, items, model, fold, identity, fold_dir, state, progress):
    """One fold (paper 4.3.1): Adam on the MSE of eq. 9 over the other folds' rows, early stopping
    on the validation SRCC of the fused predictions. Leaves the best epoch's weights in the model
    and returns the fold's record; a fine-tuned fold checkpoints every epoch and resumes from there.
    model: the Regressor as the step runs it (compiled, DDP); identity: the run's inputs;
    state: what fold_dir/checkpoint.pt holds from an interrupted run of these inputs, or None"""
    lr, batch_size = identity['--lr'], identity['--batch-size']
    rank, world = training.rank_world()
    raw_model = training.bare(model)  # the Regressor itself: its state_dict, validation without DDP
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)  # one kernel per step, on CUDA and CPU
    ctx, scaler = training.autocast_setup(items.device, args.dtype)
    scheduler = training.plateau_scheduler(optimizer, 'max', max(args.plateau_patience, 1), 0.1)
    stopper = training.EarlyStopping(args.patience, mode='max', start_epoch=args.patience_start)
    gen = torch.Generator().manual_seed(args.seed * 1000 + fold)
    train_idx, val_idx = items.split(fold)
    val_video = items.video[val_idx].numpy()  # integer ids: fusing strings each epoch costs more
    _, val_target = evaluate.fuse(items.target[val_idx].numpy(), val_video)  # (V,) video scores
    best, best_val, history = None, None, []
    ckpt_path = os.path.join(fold_dir, 'checkpoint.pt')
    if state:  # a fine-tuned fold stopped mid-way
        runs.restore(state, ckpt_path, model=raw_model, optimizer=optimizer, scaler=scaler,
                     scheduler=scheduler, early_stopping=stopper)
        gen.set_state(state['generator'])
        best, best_val, history = state['best'], state['best_val'], state['history']
        progress.done_line(f"fold {fold}: resumed from {ckpt_path} after epoch {len(history)}")

    for epoch in range(len(history) + 1, args.epochs + 1):
        if stopper.stopped:
            break
        torch.manual_seed(hash((args.seed, fold, epoch, rank)))  # dropout: as before a resume
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        if args.bucket_batches:
            perm = data.length_batches(perm, items.length, batch_size, gen)
        loss_sum = torch.zeros((), device=items.device)  # summed on the device, read once an epoch
        seen = 0
        for batch in perm.split(batch_size):
            if len(batch) < world:  # under DDP, a last batch too small to give every rank an item
                continue
            mine = batch[rank::world]
            with ctx():
                pred = model(*items.inputs(mine))  # (B / world,)
            loss = F.mse_loss(pred, items.targets(mine))  # eq. 9
            # weighted so that DDP's mean over the ranks is the gradient of the whole batch's mean
            scaler.scale(loss * (len(mine) * world / len(batch))).backward()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not float16's scaled ones
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(optimizer)  # skipped by float16's scaler when the gradients are not finite
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(mine)
            seen += len(mine)
            progress.update(len(batch), fold=fold, epoch=epoch, lr=optimizer.param_groups[0]['lr'])

        # validation: the SRCC of the fused predictions -> early stopping, lr schedule, checkpoint
        pred = training.infer(raw_model, items, val_idx, args.dtype, batch_size)
        ids, fused = evaluate.fuse(pred.numpy(), val_video)
        r = evaluate.srcc(fused, val_target)
        lr_now = optimizer.param_groups[0]['lr']
        train_loss = loss_sum.item() / max(seen, 1)
        history.append({'epoch': epoch, 'train_loss': train_loss, 'val_srcc': r, 'lr': lr_now})
        stopper.step(r, epoch)
        if args.plateau_patience:
            scheduler.step(r)
        if stopper.improved or best is None:  # the fold's model is the best epoch's
            best = {k: v.detach().clone() for k, v in raw_model.state_dict().items()
                    if raw_model.trainable or k.startswith('head.')}
            best_val = dict(zip(map(int, ids), map(float, fused)))
        if args.verbose:
            progress.done_line(f"fold {fold} | epoch {epoch}/{args.epochs} | train loss "
                               f"{train_loss:.4g} | val srcc {r:.4f} | lr {lr_now:.1e}")
        if raw_model.trainable:  # a frozen fold is quick to redo: no checkpoint every epoch
            runs.save_state(ckpt_path, {
                'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict(), 'scheduler': scheduler.state_dict(),
                'early_stopping': stopper.state_dict(), 'generator': gen.get_state(),
                'best': best, 'best_val': best_val, 'history': history, 'identity': identity})
    runs.check_learned(fold, stopper.best, len(val_target))
    raw_model.load_state_dict(best, strict=False)
    return {'fold': fold, 'srcc': stopper.best, 'epochs': len(history),
            'best_epoch': stopper.best_epoch, 'val': best_val, 'history': history}


def run_folds(args, items, pretrained, model, checkpoint, run_dir, identity, progress):
    """k-fold CV of one (lr, batch size) -> summary dict. Each fold starts from the model's weights
    now, its head drawn from the fold's seed, and the model is left with them; a finished fold is
    kept for a rerun of its inputs.
    pretrained: what checkpoint loaded, whose fine-tuned tower each fold saves in HF's layout"""
    rank, world = training.rank_world()
    raw_model = training.bare(model)
    start = {k: v.cpu().clone() for k, v in raw_model.state_dict().items()}  # every fold's start
    lr, lr_curve = identity['--lr'], None
    if lr == 'auto':
        lr, lr_curve = find_lr(model, items, identity, run_dir, args)
        progress.done_line(f"lr {lr:.2e} from the range test (paper 4.3)")
    identity = dict(identity, **{'--lr': lr})
    folds = []
    for k in range(args.folds):
        fold_dir = os.path.join(run_dir, f'fold{k}')
        ckpt_path = os.path.join(fold_dir, 'checkpoint.pt')
        state = runs.load_state(ckpt_path, identity, args.out)
        if state and state.get('finished'):
            progress.done_line(f"fold {k}: finished by an earlier run, skipped")
            progress.update(args.epochs * len(items.split(k)[0]))
            folds.append(state['record'])
            continue
        raw_model.load_state_dict(start)
        torch.manual_seed(args.seed * 1000 + k)  # the fold's head, the same on every rank
        raw_model.reset_head()
        rec = train_fold(args, items, model, k, identity, fold_dir, state, progress)
        test_idx = torch.where(items.fold < 0)[0]
        pred = training.infer(raw_model, items, test_idx, args.dtype, identity['--batch-size'])
        test_ids, test = evaluate.fuse(pred.numpy(), items.video[test_idx].numpy())
        ids = [v.video_id for v in items.videos]
        rec['val'] = {ids[i]: p for i, p in rec['val'].items()}
        rec['test'] = {ids[i]: float(p) for i, p in zip(test_ids, test)}
        runs.check_finite(rec, f"fold {k}")
        if rank == 0:  # the fold's model, then its record: a finished fold's checkpoint.pt
            head = {name: t.contiguous() for name, t in raw_model.head.state_dict().items()}
            runs.atomic_write(os.path.join(fold_dir, 'head.safetensors'),
                              lambda f: f.write(safetensors_bytes(head)))
            if raw_model.trainable:
                tokenizer = checkpoint if args.modality == 'text' else None
                checkpoints.save_pretrained(pretrained, f'{fold_dir}/encoder', tokenizer)
        runs.save_state(ckpt_path, {'finished': True, 'record': rec, 'identity': identity})
        progress.done_line(f"fold {k}: val srcc {rec['srcc']:.4f} (best epoch {rec['best_epoch']} "
                           f"of {rec['epochs']})")
        folds.append(rec)
    raw_model.load_state_dict(start)  # as it came: the next batch size's folds start from it too
    scores = {v.video_id: v.score for v in items.videos}
    return {'lr': lr, 'batch_size': identity['--batch-size'], 'lr_curve': lr_curve,
            **evaluate.summarise_folds(folds, scores)}


def run(args):
    """stage 2 for one strategy x modality; writes --out and returns the results dict"""
    t0 = time.time()
    row = STRATEGIES[args.strategy]
    rank, world, device = training.ddp_setup()
    log = training.log  # print on rank 0 only
    args.dtype = args.dtype or ('bfloat16' if device.type == 'cuda' else 'float32')
    memento = data.load_memento(args.data)
    labelled = memento.labelled()
    runs.check_regress(args, row, labelled, world)  # every refusal before any work
    lr = row.lr[args.modality] if args.lr is None else args.lr  # Table 6's, a number or 'auto'
    sizes = row.batch_sizes(args.modality, args.batch_size)  # Table 6's, those given, or Table 4's
    training.autocast_setup(device, args.dtype)  # a dtype the device lacks is refused now
    checkpoint = args.checkpoint or row.checkpoint(args.modality, args.fclip)  # Table 3's, or FCLIP
    pretrained = checkpoints.from_pretrained(checkpoint, args.pooling).to(device)
    encoder = models.encoder_for(pretrained, args.modality)  # a wrong modality is refused here
    runs.check_pooling(args, encoder)
    label = row.encoder_label(args.modality, models.describe(pretrained), args.checkpoint)
    log(f"strategy {args.strategy} ({'frozen' if row.frozen else 'fine-tuned'}) {args.modality}: "
        f"{label} from {checkpoint}; lr {lr}, batch size {sizes}; {world} process(es) on {device}, "
        f"{args.dtype}; {len(labelled)} labelled and {len(memento.split('test'))} test videos")

    # the rows (every frame or caption), their folds and, for a frozen encoder, z computed once
    cache = args.cache or os.path.join(args.data, 'cache')  # one rank builds, the others wait
    family = getattr(encoder, 'image_family', None)
    if args.modality == 'vision':
        store = frames.frame_cache(memento.videos, family, encoder.image_size, args.frames, cache)
    else:
        store = data.caption_cache(memento.videos, checkpoints.load_tokenizer(checkpoint), cache)
    for vid, reason in getattr(store, 'failed', {}).items():
        log(f"skipping video {vid}: {reason}")
    folds = data.make_folds(labelled, k=args.folds, seed=args.seed, cache_dir=cache)
    items = data.Items(memento.videos, store, folds, device, family)
    dim = encoder.embed_dim
    content = checkpoints.checkpoint_identity(checkpoint)  # the run's identity and the features'
    if row.frozen and not args.no_feature_cache:  # the encoder's output becomes a lookup
        items.features = embed_once(encoder, items, content, args.dtype).to(device)
        encoder = torch.nn.Identity()

    # the model, wrapped once for the whole run: every fold and batch size trains this one module
    raw_model = models.Regressor(encoder, dim, trainable=not row.frozen).to(device)
    model = raw_model
    if world > 1:
        model = DDP(raw_model, device_ids=[device.index] if device.type == 'cuda' else None)
    model = torch.compile(model) if args.compile else model  # compile(DDP): overlapped buckets

    # k-fold cross-validation of each batch size; the best mean SRCC is the result (paper 4.3.1)
    identity = runs.run_identity(args, IGNORED, memento.videos, content, 'regress')
    n_items = sum(len(items.split(k)[0]) for k in range(args.folds))
    progress = training.Progress(total=len(sizes) * args.epochs * n_items, unit='items')  # at most
    results = []
    for bs in sizes:
        run_dir = args.out if len(sizes) == 1 else os.path.join(args.out, f'bs{bs}')
        bs_identity = dict(identity, **{'--batch-size': bs, '--lr': lr})
        result = run_folds(args, items, pretrained, model, checkpoint, run_dir, bs_identity,
                           progress)
        result['folds_dir'] = os.path.relpath(run_dir, args.out)
        results.append(result)
        folds_srcc = [round(r, 4) for r in result['srcc_folds']]
        progress.done_line(f"batch size {bs}: srcc {result['srcc_mean']:.4f}, folds {folds_srcc}")
    best = max(results, key=lambda r: r['srcc_mean'])
    out = {'kind': 'regress', 'strategy': args.strategy, 'modality': args.modality,
           'encoder': label, 'checkpoint': checkpoint,
           'checkpoint_path': os.path.abspath(checkpoints.resolve(checkpoint)),
           'pooling': getattr(pretrained, 'pooling', None), 'frozen': row.frozen,
           'frames': args.frames, 'folds': args.folds, 'seed': args.seed, 'dtype': args.dtype,
           'max_epochs': args.epochs, 'patience': args.patience, 'demo': memento.demo,
           **{k: v for k, v in best.items() if k not in ('rows', 'test_rows')},
           'wall_time_s': time.time() - t0}
    if len(sizes) > 1:
        left_out = ('rows', 'test_rows', 'lr_curve', 'history')
        out['batch_size_search'] = [{k: r[k] for k in r if k not in left_out} for r in results]
    if rank == 0:
        runs.write_csv(os.path.join(args.out, 'predictions.csv'),
                       ['video_id', 'score', 'prediction', 'fold'], best['rows'])
        runs.write_csv(os.path.join(args.out, 'test_predictions.csv'), ['video_id', 'score'],
                       best['test_rows'])
        runs.write_json(os.path.join(args.out, 'results.json'), out)  # last: the run has finished
    low, high = out['ci']
    log(f"{label} strategy {args.strategy}: srcc {out['srcc_mean']:.4f} (95% CI {low:.3f}, "
        f"{high:.3f}), lr {out['lr']:.2g}, batch {out['batch_size']} -> {args.out}")
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        with runs.hold(args.out):  # one run at a time in --out
            return run(args)
    finally:
        training.ddp_cleanup()


if __name__ == '__main__':
    runs.script(main, 'regress.py', "the same command continues: finished folds are kept, a "
                "fine-tuned fold resumes after its last epoch, a frozen fold starts again")
