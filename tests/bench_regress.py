"""
Speed of regress.py on CPU, each case against a reference measured in the same run:

    python tests/bench_regress.py            # demo of 200 videos, 30 epochs, + a full-size ViT-B/32 fine-tuning epoch
    python tests/bench_regress.py --quick    # demo of 40 videos, 10 epochs, batch 32 (a smoke run, noisy numbers)
    git worktree add /tmp/old COMMIT && python tests/bench_regress.py --against /tmp/old   # 3 only, old vs now

1. a frozen strategy (1, vision, tiny ViT) with the embedding cache (one encoder pass, then the
   head trains on cached features) against the same run with --no-feature-cache (the encoder runs
   at every step of every epoch): wall time and ratio;
2. items/s of fine-tuning epochs (strategies 2 and 4: encoder + head, training plus the validation pass);
3. head training at the paper's scale: 5 folds x 200 epochs on 34,000 cached 512-d caption
   features per fold (8,500 videos x 5 captions, paper 4.1.2), batch 512 and 4096, against the bare
   loop (nn.Linear + MSE + Adam on the same batches; --quick: 20 epochs, scaled to 200): the aim is
   under a minute on 2 CPU cores, which holds while the bare loop takes under about 30 s.
--against DIR: only 3, for this checkout and for another one (DIR, e.g. a git worktree of an older commit), both
imported into this process and their runs interleaved, 5 folds x 20 epochs, three rounds: this machine's speed
drifts too much between runs minutes apart for a comparison of separate runs.
"""
import argparse
import contextlib
import csv
import io
import math
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def timed_run(regress, argv):
    """(seconds, results, captured log) of one regress.py run in this process"""
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        res = regress.main([str(a) for a in argv])
    return time.perf_counter() - t0, res, log.getvalue()


def read_predictions(run_dir):
    with open(os.path.join(run_dir, 'predictions.csv'), newline='') as f:
        return {r['video_id']: float(r['prediction']) for r in csv.DictReader(f)}


def training_rate(res, seconds, per_video):
    """training items per second of a run (the validation passes and set-up included): the epochs it trained
    times its training items per fold, over its wall time"""
    per_fold = res['n_videos'] * (len(res['srcc_folds']) - 1) / len(res['srcc_folds']) * per_video
    return sum(res['epochs_per_fold']) * per_fold / seconds


def head_training(regress, epochs=200, folds=5, n_videos=8500, captions=5, dim=512, batch_size=512):
    """seconds for folds x epochs of regress.train_fold on random cached caption features at the paper's sizes,
    and for the bare reference loop (nn.Linear + MSE + Adam on the same batches, no validation)"""
    g = torch.Generator().manual_seed(0)
    items = regress.data.Items.__new__(regress.data.Items)  # the rows regress.py builds, here without a dataset
    items.features = torch.randn(n_videos * captions, dim, generator=g)  # (N, 512) embeddings computed once
    items.target = torch.rand(n_videos, generator=g).repeat_interleave(captions)  # (N,)
    items.video = torch.arange(n_videos).repeat_interleave(captions)  # (N,) video index of every caption
    items.fold = (torch.arange(n_videos) % folds).repeat_interleave(captions)  # (N,)
    items.length, items.device, items.modality = torch.zeros(len(items.video), dtype=torch.long), torch.device('cpu'), 'text'
    args = regress.parse_args(['--strategy', '5', '--modality', 'text', '--epochs', str(epochs), '--patience-start',
                               str(epochs)])
    args.dtype, args.lr, args.batch_size = 'float32', 1e-3, batch_size  # as regress.run sets them for a fold
    progress = regress.runs.Progress(total=1, every=math.inf)  # silent
    ours = bare = 0.0  # fold by fold, the two sides in turn: this machine's speed drifts within minutes
    for k in range(folds):
        torch.manual_seed(k)
        t0 = time.perf_counter()
        net = regress.models.Regressor(torch.nn.Identity(), dim, trainable=False)
        regress.train_fold(args, items, net, k, '/nonexistent', progress)  # a frozen fold writes no checkpoint
        ours += time.perf_counter() - t0
        t0 = time.perf_counter()
        lin = torch.nn.Linear(dim, 1)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-3, fused=True)
        train_idx = items.split(k)[0]
        for _ in range(epochs):
            for b in train_idx[torch.randperm(len(train_idx), generator=g)].split(batch_size):
                loss = torch.nn.functional.mse_loss(lin(items.features.index_select(0, b)).squeeze(1), items.target[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        bare += time.perf_counter() - t0
    return ours, bare, len(train_idx)


def bench_regress(quick=False):
    """prints the measurements and returns them as a dict"""
    import regress
    from tools import demo

    out = {}
    n_videos, epochs = (40, 10) if quick else (200, 30)
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = os.path.join(tmp, 'demo'), os.path.join(tmp, 'cache')
        demo.make_demo(root, n_videos, seed=0)
        corpus = [line.strip() for line in open(os.path.join(root, 'captions.txt')) if line.strip()]
        tiny = {t: os.path.join(tmp, t) for t in ('clip', 'vit', 'distilbert')}
        for t, folder in tiny.items():
            demo.make_tiny(t, folder, corpus)
        common = ['--data', root, '--cache', cache, '--checkpoint', tiny['clip'], '--batch-size', 32 if quick else 64,
                  '--lr', '1e-3']
        frozen = common + ['--strategy', 1, '--modality', 'vision', '--checkpoint', tiny['vit'], '--epochs', epochs,
                           '--patience-start', epochs]
        timed_run(regress, frozen + ['--out', os.path.join(tmp, 'warm'), '--epochs', 1])  # frame cache and folds
        for f in os.listdir(cache):
            if f.startswith('features-'):
                os.remove(os.path.join(cache, f))  # the cached run below pays for its one encoder pass
        t_cache, res, _ = timed_run(regress, frozen + ['--out', os.path.join(tmp, 'cached')])
        t_loop, res_loop, _ = timed_run(regress, frozen + ['--out', os.path.join(tmp, 'loop'), '--no-feature-cache'])
        a, b = (read_predictions(os.path.join(tmp, d)) for d in ('cached', 'loop'))
        diff = max(abs(a[v] - b[v]) for v in a)  # float rounding only: the two paths compute the same function
        out['frozen_cache_s'], out['frozen_loop_s'] = t_cache, t_loop
        print(f"frozen strategy 1 (tiny ViT, {n_videos} videos, 5 folds x {epochs} epochs, CPU): "
              f"cached {t_cache:.1f}s, encoder every step {t_loop:.1f}s, ratio {t_loop / t_cache:.1f}x "
              f"(largest prediction difference {diff:.1e}; srcc {res['srcc_mean']:.4f} vs {res_loop['srcc_mean']:.4f})")

        tuned = ['--folds', 2, '--epochs', 2 if quick else 5, '--patience-start', 10]
        cases = [('2 text, tiny DistilBERT', ['--strategy', 2, '--modality', 'text', '--checkpoint', tiny['distilbert']]),
                 ('4 vision, tiny CLIP', ['--strategy', 4, '--modality', 'vision'])]
        if not quick:  # the real vision tower: ViT-B/32 at 224 px, random weights
            full = os.path.join(tmp, 'clip-b32')
            demo.make_tiny('clip', full, corpus, projection_dim=512, vision_config=dict(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32))
            cases.append(('4 vision, ViT-B/32 size', ['--strategy', 4, '--modality', 'vision', '--checkpoint', full,
                                                      '--epochs', 1, '--batch-size', 32]))
        for i, (name, flags) in enumerate(cases):
            t, res, _ = timed_run(regress, common + tuned + flags + ['--out', os.path.join(tmp, f'tuned{i}')])
            out[f'finetune_items_per_s[{name}]'] = rate = training_rate(res, t, 5 if 'text' in name else 3)
            print(f"fine-tuning strategy {name}: {rate:.0f} items/s (training + validation pass, CPU)")

    epochs = 20 if quick else 200
    for bs in (512, 4096):  # the ends of Table 4's range for frozen text encoders
        ours, bare, n_train = head_training(regress, epochs=epochs, batch_size=bs)
        out[f'head_5x200_s[batch {bs}]'] = ours * 200 / epochs
        print(f"head training, 5 folds x {epochs} epochs on {n_train:,} cached 512-d caption features per fold, batch {bs} "
              f"(CPU, {torch.get_num_threads()} thread(s)): {ours:.1f}s" + (f", {ours * 200 / epochs:.0f}s for 200 epochs" if quick else '')
              + f"; bare Linear+Adam loop on the same batches {bare:.1f}s, ratio {ours / bare:.2f}")
    return out


def import_checkout(root):
    """(regress, bench_regress) of the checkout in root, imported under their own names: each keeps
    references to its own models, training, ... modules"""
    import importlib
    import inspect
    names = ('regress', 'training', 'models', 'checkpoints', 'evaluate', 'figures', 'data', 'frames',
             'files', 'cli', 'runs', 'strategies', 'demo', 'bench_regress', 'bench', 'contrastive',
             'harness', 'harness.runs', 'harness.train', 'harness.checkpoints', 'tools', 'tools.demo')
    saved, path = {n: sys.modules.pop(n) for n in names if n in sys.modules}, list(sys.path)
    sys.path[:0] = [os.path.join(root, 'tests'), root]
    try:
        regress, bench = importlib.import_module('regress'), importlib.import_module('bench_regress')
    finally:
        sys.path[:] = path
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    if 'training' in inspect.signature(bench.head_training).parameters:  # before the loops were rewritten
        return regress, lambda **kw: bench.head_training(regress, regress.training, **kw)
    return regress, lambda **kw: bench.head_training(regress, **kw)


def against(other, epochs=20, rounds=3):
    """head training of this checkout and of `other`, interleaved in one process; prints the median times"""
    import statistics
    runs = {'now': import_checkout(os.path.dirname(HERE))[1], other: import_checkout(other)[1]}
    for bs in (512, 4096):
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, head_training in runs.items():
                ours, bare, _ = head_training(epochs=epochs, batch_size=bs)
                times[name].append((ours, bare))
        (now, now_bare), (then, then_bare) = ([statistics.median(t[i] for t in times[k]) for i in (0, 1)] for k in runs)
        print(f"head training, 5 folds x {epochs} epochs, batch {bs}: now {now:.2f}s (bare loop {now_bare:.2f}s), "
              f"{other} {then:.2f}s (bare loop {then_bare:.2f}s): now / then {now / then:.2f}x, "
              f"each over its bare loop {now / now_bare:.2f}x / {then / then_bare:.2f}x")


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help="smaller demo and fewer epochs")
    p.add_argument('--against', metavar='DIR', help="only the head training, against the checkout in DIR")
    args = p.parse_args()
    if args.against:
        against(args.against)
    else:
        bench_regress(args.quick)
