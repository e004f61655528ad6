"""Stage 2 of the paper (3.3, 3.4, 4.3.1): an encoder and a regression head predict the memorability
of every frame (vision) or caption (text); a video's prediction is the mean of its items' (eq. 2-3),
scored with Spearman's rank correlation over 5 video-level folds (Table 6). A strategy is a row of
STRATEGIES (Table 3): a frozen one trains the head alone on embeddings computed once (eq. 10), a
fine-tuned one the encoder and the head (eq. 8), in one loop, train_fold().

    python regress.py --strategy 6 --modality vision --data /path/to/Memento10k
    python regress.py --strategy 1 --modality text --data DIR --batch-size table4 --lr auto
    torchrun --nproc_per_node 4 regress.py --strategy 4 --modality vision --data DIR  # fine-tuned
"""
import argparse
import itertools
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from scipy import stats
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
from harness import checkpoints, runs, train as training
from harness.runs import count, lr_arg, number

# flags left out of a run's key (no result depends on them): --data, --checkpoint, --fclip enter by
# content, --device as its device; --out, --cache are places; the rest compute or print the same
IGNORED = ('data', 'checkpoint', 'fclip', 'out', 'cache', 'device', 'compile', 'no_feature_cache',
           'verbose')
warnings.filterwarnings('ignore', category=stats.ConstantInputWarning)  # a NaN SRCC says it

@dataclass(frozen=True)
class Strategy:
    name: str            # Table 6's name
    vision: str | None   # the frames' encoder: a hub name or 'fclip' (Table 3); None: no vision run
    text: str | None     # the captions' encoder; None: no text run
    frozen: bool         # True: the head alone learns, on embeddings computed once (eq. 10)
    lr: dict             # modality -> the learning rate of the paper's result (Table 6)
    batch_size: dict     # modality -> the batch size of the paper's result (Table 6)
    figure: str = ''     # the paper's Fig. 3 name where it differs (SFT: supervised fine-tuning)
    def encoder(self, modality):
        return self.vision if modality == 'vision' else self.text

    def batch_sizes(self, modality, given=None):
        """Table 6's batch size (given None), the ones given, or Table 4's range (['table4'])"""
        if given != ['table4']:
            return given or [self.batch_size[modality]]
        lo, hi = TABLE4[modality, self.frozen]
        return [2 ** i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]

VIT, DISTILBERT = 'google/vit-base-patch32-224-in21k', 'distilbert-base-uncased'
CLIP, FCLIP = 'openai/clip-vit-base-patch32', 'fclip'  # fclip: the folder contrastive.py writes
STRATEGIES = {
    1: Strategy('Unimodal', VIT, DISTILBERT, True,
                dict(vision=2e-3, text=1e-3), dict(vision=1024, text=512)),
    2: Strategy('Adapted Unimodal', VIT, DISTILBERT, False,
                dict(vision=3e-5, text=1e-5), dict(vision=128, text=256), 'Unimodal-SFT'),
    3: Strategy('CLIP-Based', CLIP, CLIP, True,
                dict(vision=1e-3, text=1e-3), dict(vision=1024, text=4096)),
    4: Strategy('Adapted CLIP-Based', CLIP, CLIP, False,
                dict(vision=2e-6, text=2e-6), dict(vision=128, text=256), 'CLIP-SFT'),
    5: Strategy('FCLIP-Based', FCLIP, FCLIP, True,
                dict(vision=1e-3, text=2e-3), dict(vision=2048, text=512)),
    6: Strategy('Adapted FCLIP-Based', FCLIP, FCLIP, False,
                dict(vision=2e-6, text=3e-6), dict(vision=128, text=512), 'FCLIP-SFT'),
}
# Table 4: the batch sizes explored (powers of two from, to), by modality and frozen or not
TABLE4 = {('vision', True): (256, 2048), ('vision', False): (64, 512),
          ('text', True): (512, 4096), ('text', False): (64, 512)}

def parse_args(argv=None):
    rows = STRATEGIES.items()
    table6 = '\n'.join(f"  {s} {row.name}: " + ', '.join(
        f"{m} {row.lr[m]:g} / {row.batch_size[m]}" for m in row.lr) for s, row in rows)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter,
                                epilog=f"each strategy's lr / batch size (Table 6):\n{table6}")
    p.add_argument('--strategy', type=int, required=True, choices=list(STRATEGIES),
                   help="a row of STRATEGIES (Table 3): " + '; '.join(
                       f"{s} {r.name} ({'frozen' if r.frozen else 'fine-tuned'})" for s, r in rows))
    p.add_argument('--modality', required=True, choices=['vision', 'text'], help="frames, captions")
    p.add_argument('--data', default='data/memento10k', help="Memento10k folder")
    p.add_argument('--cache', default=None, help="the caches' folder (default: FCLIP_CACHE, else "
                                                 "~/.cache/fclip-memorability)")
    p.add_argument('--out', default=None, help="output (default: results/s{strategy}-{modality})")
    p.add_argument('--checkpoint', default=None, help="encoder (folder, hub name) for Table 3's")
    p.add_argument('--fclip', default='results/fclip/model', help="contrastive.py's FCLIP (5-6)")
    p.add_argument('--pooling', choices=['cls', 'mean'], default=None,
                   help="a BERT-family encoder's embedding: [CLS] or the mean of its states "
                        "(default: its 1_Pooling/config.json, else cls; the paper names none)")
    p.add_argument('--lr', type=lr_arg, default=None, help="a learning rate, or 'auto': the range "
                   "test over [1e-8, 1] of paper 4.3 (default: Table 6's, listed below)")
    p.add_argument('--batch-size', type=lambda t: t if t == 'table4' else count(1)(t), nargs='+',
                   default=None, help="batch sizes, the best mean SRCC wins (paper 4.3.1), or "
                   "'table4': the powers of two of Table 4's range (default: Table 6's, below)")
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
    p.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto',
                   help="auto: cuda when torch finds a GPU, else cpu")
    p.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float16'],
                   help="autocast dtype (ours; default: bfloat16 on a GPU that has it, else "
                        "float16; float32 on a CPU); float16 adds a GradScaler")
    p.add_argument('--grad-clip', type=number(0), default=0.0,
                   help="clip the gradient norm to this; 0: off (paper: no clipping)")
    p.add_argument('--compile', action='store_true', help="torch.compile the encoder + head")
    p.add_argument('--no-feature-cache', action='store_true',
                   help="frozen strategies: the encoder at every step, not once (same result)")
    p.add_argument('--verbose', action='store_true', help="a line per epoch, not one per fold")
    args = p.parse_args(argv)
    args.out = args.out or f"results/s{args.strategy}-{args.modality}"
    return args

@torch.no_grad()
def embed(encoder, items, content, args):
    """(N, D) embeddings z of every item for a frozen encoder, computed once into the cache"""
    code = runs.code(embed, data.load_encoder, data.Items)
    key = runs.fingerprint([items.store.key, content, code, items.device.type, args.dtype, args.pooling])
    path = os.path.join(runs.cache_dir(args.cache), f"features-{key}.npy")
    rows = lambda i, j: (training.infer(encoder, items, torch.arange(i, j), args.dtype, 256).numpy(), {})
    shape = (len(items), *rows(0, 1)[0].shape[1:])  # (N, D), or what an edited encoder gives
    fill = lambda p: runs.fill(p, shape, np.float32, rows, runs.log, f'{items.modality} items', block=4096)
    return torch.from_numpy(np.array(runs.cached(path, runs.read_array, fill, runs.log)[0]))

def find_lr(model, items, args, run_dir):
    """paper 4.3's range test on fold 0's training rows and head, kept in run_dir -> (lr, curve)"""
    if found := runs.read_state(os.path.join(run_dir, 'lr_range.pt')):
        return found['lr'], found['curve']
    rank, world = runs.rank_world()
    gen = torch.Generator().manual_seed(args.seed)
    rows = items.split(0)[0]
    shuffled = (rows[torch.randperm(len(rows), generator=gen)] for _ in itertools.count())
    batches = (b for p in shuffled for b in p.split(args.batch_size) if len(b) >= world)
    raw_model = bare(model)
    new_head(raw_model, args.seed * 1000)  # fold 0's
    params = [p for p in raw_model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(items.device.type, enabled=args.dtype == 'float16')
    lr, curve = training.lr_range_test(raw_model, torch.optim.Adam(params, fused=True),
                                       lambda b: batch_loss(model, items, b, args), batches, scaler)
    runs.save_state(os.path.join(run_dir, 'lr_range.pt'), {'lr': lr, 'curve': curve})
    return lr, curve

def bare(model):
    """the Regressor inside torch.compile's and DDP's wrappers (nanoGPT's raw_model)"""
    model = getattr(model, '_orig_mod', model)
    return model.module if isinstance(model, DDP) else model

def new_head(model, seed):
    """the head of eq. 11 drawn from `seed` on the CPU, then moved: one head a seed on any device"""
    torch.manual_seed(seed)
    model.head.load_state_dict(models.RegressionHead(model.dim).state_dict())

def batch_loss(model, items, batch, args):
    """eq. 9 on this rank's share of the batch, weighted: DDP's mean gradient is the batch's"""
    rank, world = runs.rank_world()
    mine = batch[rank::world]
    with torch.autocast(items.device.type, getattr(torch, args.dtype), enabled=args.dtype != 'float32'):
        pred = model(*items.inputs(mine))  # (B / world,)
    return F.mse_loss(pred, items.targets(mine)) * (len(mine) * world / len(batch))

def train_fold(args, items, model, fold, fold_dir, state, progress):
    """One fold (paper 4.3.1): Adam on the MSE of eq. 9 over the other folds' rows, early stopping
    on the fused predictions' val SRCC; leaves the best epoch's weights in the model -> record"""
    rank, world = runs.rank_world()
    raw_model = bare(model)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, fused=True)  # one kernel a step, any device
    scaler = torch.amp.GradScaler(items.device.type, enabled=args.dtype == 'float16')
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(  # paper 4.3's reading, as in stage 1
        optimizer, 'max', factor=0.1, patience=max(args.plateau_patience, 1) - 1, threshold=0, eps=0)
    gen = torch.Generator().manual_seed(args.seed * 1000 + fold)
    train_idx, val_idx = items.split(fold)
    val_video = items.video[val_idx].numpy()
    val_target = data.fuse(items.target[val_idx].numpy(), val_video)[1]  # (V,) the videos' scores
    best, best_epoch, best_state, best_val, history = -math.inf, 0, None, None, []
    ckpt_path = os.path.join(fold_dir, 'checkpoint.pt')
    if state:  # a fine-tuned fold stopped mid-way
        runs.restore(state, ckpt_path, model=raw_model, optimizer=optimizer, scaler=scaler,
                     scheduler=scheduler)
        gen.set_state(state['generator'])
        best, best_epoch, history = state['best'], state['best_epoch'], state['history']
        best_state, best_val = state['best_state'], state['best_val']
        runs.log(f"fold {fold}: resumed from {ckpt_path} after epoch {len(history)}")
    for epoch in range(len(history) + 1, args.epochs + 1):
        if epoch - 1 - max(best_epoch, args.patience_start) >= args.patience:  # early stopping
            break
        torch.manual_seed(hash((args.seed, fold, epoch, rank)))  # dropout, as before a resume
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        totals = torch.zeros(3, device=items.device)  # loss, items, skipped steps, on the device
        for batch in (b for b in perm.split(args.batch_size) if len(b) >= world):  # rows >= ranks
            loss = batch_loss(model, items, batch, args)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # the true gradients: clipped, and checked for overflow
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
            scaler.step(optimizer)  # skipped by float16's scaler when a gradient is not finite
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            skip = ~norm.isfinite() & scaler.is_enabled()  # a skipped step adds nothing
            totals += torch.stack([torch.where(skip, 0.0, loss.detach() * len(batch)),
                                   torch.where(skip, 0.0, len(batch)), skip.float()])
            progress.update(len(batch), fold=fold, epoch=epoch, lr=optimizer.param_groups[0]['lr'])
        loss_sum, seen, skipped = totals.tolist()  # the epoch's one read of the device
        train_loss = loss_sum / max(seen, 1)
        runs.check_finite({'training loss': train_loss}, f"fold {fold}, epoch {epoch}")
        # validation: the SRCC of the fused predictions -> early stopping, lr schedule, checkpoint
        pred = training.infer(raw_model, items, val_idx, args.dtype, args.batch_size)
        ids, fused = data.fuse(pred.numpy(), val_video)
        r = float(stats.spearmanr(fused, val_target).statistic)  # NaN: constant predictions
        history.append({'epoch': epoch, 'train_loss': train_loss, 'skipped_steps': int(skipped),
                        'val_srcc': None if math.isnan(r) else r, 'lr': optimizer.param_groups[0]['lr']})
        if r > best:  # the fold's model is the best epoch's; a NaN never improves
            best, best_epoch = r, epoch
            best_state = {k: v.detach().clone() for k, v in raw_model.state_dict().items()
                          if raw_model.trainable or k.startswith('head.')}
            best_val = dict(zip(map(int, ids), map(float, fused)))
        if args.plateau_patience:
            scheduler.step(r)
        if args.verbose:
            runs.log(f"fold {fold} | epoch {epoch}/{args.epochs} | train loss {train_loss:.4g} | "
                     f"val srcc {r:.4f}")
        if raw_model.trainable:  # a frozen fold is quick to redo: no checkpoint every epoch
            runs.save_state(ckpt_path, {
                'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict(), 'scheduler': scheduler.state_dict(),
                'generator': gen.get_state(), 'best': best, 'best_epoch': best_epoch,
                'best_state': best_state, 'best_val': best_val, 'history': history})
    runs.check_learned(fold, best if best_epoch else None, len(val_target))
    raw_model.load_state_dict(best_state, strict=False)
    return {'fold': fold, 'srcc': best, 'epochs': len(history), 'best_epoch': best_epoch,
            'val': best_val, 'history': history}

def run_folds(args, items, model, pretrained, folder, run_dir, progress):
    """k-fold CV at args.lr, args.batch_size -> the folds' records: each from the model's weights
    now (left so), a head of its seed; a finished fold is kept; a tuned one saves pretrained"""
    raw_model = bare(model)
    start = {k: v.cpu().clone() for k, v in raw_model.state_dict().items()}  # every fold's start
    test_idx = torch.where(items.fold < 0)[0]
    ids = [v.video_id for v in items.videos]
    folds = []
    for k in range(args.folds):
        fold_dir = os.path.join(run_dir, f'fold{k}')
        state = runs.read_state(os.path.join(fold_dir, 'checkpoint.pt'))
        if state and state.get('finished'):
            runs.log(f"fold {k}: finished by an earlier run, kept")
            progress.update(args.epochs * len(items.split(k)[0]))
            folds.append(state['record'])
            continue
        raw_model.load_state_dict(start)
        new_head(raw_model, args.seed * 1000 + k)  # the same on every rank and device
        rec = train_fold(args, items, model, k, fold_dir, state, progress)
        pred = training.infer(raw_model, items, test_idx, args.dtype, args.batch_size)
        test_ids, test = data.fuse(pred.numpy(), items.video[test_idx].numpy())
        rec['val'] = {ids[i]: p for i, p in rec['val'].items()}
        rec['test'] = {ids[i]: float(p) for i, p in zip(test_ids, test)}
        if runs.is_main():  # the fold's model, then its record: a finished fold's checkpoint.pt
            head = {n: t.contiguous() for n, t in raw_model.head.state_dict().items()}
            runs.write_bytes(os.path.join(fold_dir, 'head.safetensors'), safetensors_bytes(head))
            if raw_model.trainable:  # with the tokenizer of a text encoder
                tokenizer = folder if args.modality == 'text' else None
                runs.write_folder(f'{fold_dir}/encoder', checkpoints.hf_files(pretrained, tokenizer))
        runs.save_state(os.path.join(fold_dir, 'checkpoint.pt'), {'finished': True, 'record': rec})
        runs.log(f"fold {k}: val srcc {rec['srcc']:.4f} (best epoch {rec['best_epoch']} of "
                 f"{rec['epochs']})")
        folds.append(rec)
    raw_model.load_state_dict(start)  # as it came: the next batch size's folds start from it too
    return folds

def summary(folds, videos):
    """the folds' records -> their SRCCs and mean, the SRCC of the pooled out-of-fold predictions,
    and the rows of predictions.csv and test_predictions.csv (a test video: the folds' mean)"""
    scores = {v.video_id: v.score for v in videos}
    rows = [(vid, scores[vid], p, f['fold']) for f in folds for vid, p in f['val'].items()]
    tests = sorted({vid for f in folds for vid in f['test']})
    per_fold = lambda key: [f[key] for f in folds]
    return {'srcc_folds': per_fold('srcc'), 'srcc_mean': float(np.mean(per_fold('srcc'))),
            'srcc_pooled': stats.spearmanr([r[2] for r in rows], [r[1] for r in rows]).statistic,
            'n_videos': len(rows), 'n_test_videos': len(tests), 'epochs_per_fold': per_fold('epochs'),
            'best_epoch_per_fold': per_fold('best_epoch'), 'history': per_fold('history'), 'rows': rows,
            'test_rows': [(v, float(np.mean([f['test'][v] for f in folds]))) for v in tests]}

def run(args):
    """stage 2 for one strategy x modality; writes --out and returns the results dict"""
    t0 = time.time()
    row = STRATEGIES[args.strategy]
    rank, world, device, args.dtype = runs.start(args.device, args.dtype)
    log = runs.log  # rank 0 prints
    memento = data.load_memento(args.data)
    labelled = memento.labelled()
    sizes = row.batch_sizes(args.modality, args.batch_size)  # Table 6's, those given, or Table 4's
    runs.check_regress(args, row, labelled, world, sizes)  # every refusal before any work
    lr = row.lr[args.modality] if args.lr is None else args.lr  # Table 6's, a number or 'auto'
    checkpoint = args.checkpoint or (args.fclip if row.encoder(args.modality) == FCLIP
                                     else row.encoder(args.modality))  # Table 3's, or FCLIP
    pretrained, folder = data.load_encoder(checkpoint, args.pooling)
    encoder = models.encoder_for(pretrained, args.modality)
    runs.check_encoder(args, encoder)
    pooling, dim = getattr(encoder, 'pooling', None), encoder.embed_dim  # read before it is a lookup
    kind = models.LABELS[pretrained.config.model_type]  # Table 6's: 'ViT', 'FCLIP - Text', ...
    named = os.path.basename(checkpoint.rstrip('/'))  # a checkpoint given: its folder's name too
    label = (f"{'F' * (checkpoint == args.fclip)}CLIP - {args.modality.title()}" if kind == 'CLIP'
             else kind) + (f" ({named})" if args.checkpoint and named.lower() != kind.lower() else '')
    log(f"strategy {args.strategy} ({'frozen' if row.frozen else 'fine-tuned'}) {args.modality}: "
        f"{label} from {checkpoint}; lr {lr}, batch size {sizes}; {world} process(es) on {device}, "
        f"{args.dtype}; {len(labelled)} labelled and {len(memento.split('test'))} test videos")
    # the rows (every frame or caption) with their folds; a frozen encoder's z computed once
    family = getattr(encoder, 'image_family', None)
    if args.modality == 'vision':
        store = data.frame_cache(memento.videos, family, encoder.image_size, args.frames,
                                 args.cache, log)
    else:
        tokenizer = checkpoints.Tokenizer(folder, encoder.config.max_position_embeddings)
        store = data.caption_cache(memento.videos, tokenizer, args.cache, log)
    for vid, reason in getattr(store, 'failed', {}).items():
        log(f"skipping video {vid}: {reason}")
    folds = data.make_folds(labelled, args.folds, args.seed)
    items = data.Items(memento.videos, store, folds, device, family)
    content = runs.content(folder, checkpoints.FILES)
    key = {'script': 'regress.py', 'code': runs.code(run), 'data': memento.key(), 'rows': store.key,
           'checkpoint': content, 'processes': world, 'device': device.type, **runs.flags(args, IGNORED)}
    if done := runs.claim(args.out, key):  # refused, naming what changed, when made of other inputs
        log(f"{args.out}: finished by an earlier run of these inputs, reused: srcc "
            f"{done['srcc_mean']:.4f}")
        return done
    if row.frozen and not args.no_feature_cache:  # the encoder's output becomes a lookup
        items.features = embed(encoder, items, content, args).to(device)
        encoder = torch.nn.Identity()
    # a part of the encoder to keep frozen in a fine-tuned run: set its requires_grad here
    model = raw_model = models.Regressor(encoder, dim, trainable=not row.frozen).to(device)
    if world > 1:  # wrapped once for the whole run: every fold and batch size trains this module
        model = DDP(raw_model, device_ids=[device.index] if device.type == 'cuda' else None)
    model = torch.compile(model) if args.compile else model  # compile(DDP): overlapped buckets
    n_items = sum(len(items.split(k)[0]) for k in range(args.folds))
    progress = runs.Progress(len(sizes) * args.epochs * n_items)  # at most
    results = []
    for bs in sizes:  # k-fold CV of each batch size; the best mean SRCC is the result (paper 4.3.1)
        run_dir = args.out if len(sizes) == 1 else os.path.join(args.out, f'bs{bs}')
        run_args = argparse.Namespace(**{**vars(args), 'lr': lr, 'batch_size': bs})
        lr_curve = None
        if lr == 'auto':
            run_args.lr, lr_curve = find_lr(model, items, run_args, run_dir)
            runs.log(f"lr {run_args.lr:.2e} from the range test (paper 4.3)")
        folds = run_folds(run_args, items, model, pretrained, folder, run_dir, progress)
        results.append({'lr': run_args.lr, 'batch_size': bs, 'lr_curve': lr_curve,
                        'folds_dir': os.path.relpath(run_dir, args.out), **summary(folds, items.videos)})
        runs.log(f"batch size {bs}: srcc {results[-1]['srcc_mean']:.4f}, folds "
                 f"{[round(r, 4) for r in results[-1]['srcc_folds']]}")
    best = max(results, key=lambda r: r['srcc_mean'])
    out = {'kind': 'regress', 'strategy': args.strategy, 'name': row.name, 'figure': row.figure,
           'modality': args.modality, 'encoder': label, 'checkpoint': checkpoint,
           'checkpoint_path': os.path.abspath(folder), 'pooling': pooling, 'frozen': row.frozen,
           'frames': args.frames, 'folds': args.folds, 'seed': args.seed, 'dtype': args.dtype,
           'max_epochs': args.epochs, 'patience': args.patience, 'demo': memento.demo,
           **{k: v for k, v in best.items() if 'rows' not in k}, 'wall_time_s': time.time() - t0}
    if len(sizes) > 1:  # each batch size's figures
        out['batch_size_search'] = [{k: r[k] for k in r if 'rows' not in k and k not in (
            'lr_curve', 'history')} for r in results]
    if rank == 0:
        runs.write_csv(os.path.join(args.out, 'predictions.csv'),
                       ['video_id', 'score', 'prediction', 'fold'], best['rows'])
        runs.write_csv(os.path.join(args.out, 'test_predictions.csv'), ['video_id', 'score'],
                       best['test_rows'])
        runs.write_json(os.path.join(args.out, 'results.json'), out)  # last: the run has ended
    log(f"{label} strategy {args.strategy}: srcc {out['srcc_mean']:.4f} over {args.folds} folds, "
        f"lr {out['lr']:.2g}, batch {out['batch_size']} -> {args.out}")
    return out

def main(argv=None):
    return runs.session(run, parse_args(argv))  # one run at a time in --out

if __name__ == '__main__':
    runs.script(main, 'regress.py', "the same command continues: finished folds are kept, a "
                "fine-tuned fold resumes after its last epoch, a frozen fold starts again")
