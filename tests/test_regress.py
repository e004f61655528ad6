"""Tests for regress.py (tiny models, demo data, CPU): python -m pytest tests/test_regress.py -q"""
import ast
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import evaluate
import models
import regress
from conftest import interrupted, student_copy
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)
from harness import runs
from harness import train as training
from harness.checkpoints import Tokenizer
from harness.runs import UserError
from regress import STRATEGIES
from tools import demo, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {regress.VIT: 'vit', regress.DISTILBERT: 'distilbert', regress.CLIP: 'clip'}  # stand-ins of Table 3's
QUICK = ['--folds', 2, '--epochs', 2, '--patience-start', 1, '--patience', 1, '--batch-size', 16, '--lr', '1e-3']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # tiny models gain nothing from intra-op threads, and on a shared 2-core machine their spin-waits cost 5x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder_flags(strategy, modality, tiny_models):
    encoder = STRATEGIES[strategy].encoder(modality)
    if encoder == regress.FCLIP:  # the FCLIP folder: a tiny CLIP stands in for contrastive.py's output
        return ['--fclip', tiny_models['clip']]
    return ['--checkpoint', tiny_models[TINY[encoder]]]


def regress_run(demo_root, out, *flags):
    return regress.main(['--data', str(demo_root), '--out', str(out), *map(str, flags)])


def script(*argv, cwd=ROOT):
    """regress.py (or a module: '-m', ...) as a user runs it, on one thread as the tests in this process:
    -> the CompletedProcess"""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def predictions(out):
    return {r['video_id']: float(r['prediction']) for r in read_csv(os.path.join(out, 'predictions.csv'))}


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


# -----------------------------------------------------------------------------
# every strategy, end to end

@pytest.mark.parametrize('modality', ['vision', 'text'])
@pytest.mark.parametrize('strategy', list(STRATEGIES))
def test_strategy_end_to_end(strategy, modality, demo_root, tiny_models, tmp_path):
    out, row = tmp_path / 'run', STRATEGIES[strategy]
    res = regress_run(demo_root, out, '--strategy', strategy, '--modality', modality,
                      *encoder_flags(strategy, modality, tiny_models), *QUICK)
    memento = data.load_memento(demo_root)
    labelled = {v.video_id: v.score for v in memento.labelled()}
    folds = data.make_folds(memento.labelled(), k=2, seed=0)

    saved = json.load(open(out / 'results.json'))
    assert saved['srcc_folds'] == res['srcc_folds']
    assert (saved['kind'], saved['strategy'], saved['modality']) == ('regress', strategy, modality)
    assert (saved['name'], saved['figure'], saved['frozen']) == (row.name, row.figure, row.frozen)
    encoder = row.encoder(modality)
    # by what was loaded; the tiny folders' names (vit, distilbert, clip) only repeat it, so they are left out
    kind = {'vit': 'ViT', 'distilbert': 'DistilBERT', 'clip': f"CLIP - {modality.title()}"}
    assert saved['encoder'] == (f"FCLIP - {modality.title()}" if encoder == regress.FCLIP else kind[TINY[encoder]])
    # what evaluate.py's figures read: the epoch cap and patience (curves.png) and demo data (fig3.png, Table 6)
    assert (saved['max_epochs'], saved['patience'], saved['demo']) == (2, 1, True)
    assert len(saved['history']) == 2 and [h['epoch'] for h in saved['history'][0]] == \
        list(range(1, saved['epochs_per_fold'][0] + 1))
    assert (saved['lr'], saved['batch_size'], saved['n_videos']) == (1e-3, 16, len(labelled))
    assert len(saved['srcc_folds']) == 2 and all(math.isfinite(r) and -1 <= r <= 1 for r in saved['srcc_folds'])
    assert saved['srcc_mean'] == pytest.approx(np.mean(saved['srcc_folds']))
    assert 'ci' not in saved  # evaluate.py computes it: fisher_ci(srcc_mean, n_videos)
    assert all(1 <= e <= 2 for e in saved['epochs_per_fold'])
    assert all(1 <= b <= e for b, e in zip(saved['best_epoch_per_fold'], saved['epochs_per_fold']))
    assert all(isinstance(h['skipped_steps'], int) and math.isfinite(h['train_loss'])
               for fold in saved['history'] for h in fold)

    # out-of-fold predictions: every labelled video once, in the fold data.make_folds gave it
    rows = read_csv(out / 'predictions.csv')
    assert sorted(r['video_id'] for r in rows) == sorted(labelled)
    for r in rows:
        assert int(r['fold']) == folds[r['video_id']]
        assert float(r['score']) == pytest.approx(labelled[r['video_id']])
        assert 0 < float(r['prediction']) < 1
    for k in range(2):  # each fold's SRCC is that of its best epoch's predictions, the ones written
        fold_rows = [r for r in rows if int(r['fold']) == k]
        assert evaluate.srcc([float(r['prediction']) for r in fold_rows], [float(r['score']) for r in fold_rows]) \
            == pytest.approx(saved['srcc_folds'][k], abs=1e-9)
    test = read_csv(out / 'test_predictions.csv')
    assert list(test[0]) == ['video_id', 'score']
    assert sorted(r['video_id'] for r in test) == sorted(v.video_id for v in memento.split('test'))
    assert all(0 < float(r['score']) < 1 for r in test)

    for k in range(2):
        fold = out / f'fold{k}'
        ckpt = runs.read_state(fold / 'checkpoint.pt')  # a finished fold's checkpoint: its record only
        rec = ckpt['record']
        assert ckpt['finished'] and 'model' not in ckpt and 'optimizer' not in ckpt
        assert set(rec['val']) == {v for v, f in folds.items() if f == k}  # no video of the fold was trained on
        assert set(load_file(fold / 'head.safetensors')) == {'ln.weight', 'ln.bias', 'fc.weight', 'fc.bias'}
        assert (fold / 'encoder' / 'model.safetensors').exists() == (not row.frozen)
    # what evaluate.py reads of it: Table 6's row, with the CI it computes
    [found] = evaluate.load_results(out)[1]
    assert found['srcc_mean'] == saved['srcc_mean']


def test_frozen_run_learns(demo_root, minilm_dir, tmp_path):
    # a real pre-trained sentence encoder, frozen: the head must rank the demo videos by their captions
    res = regress_run(demo_root, tmp_path / 'run', '--strategy', 1, '--modality', 'text', '--checkpoint', minilm_dir,
                      '--epochs', 60, '--patience-start', 60, '--batch-size', 32, '--lr', '1e-2')
    assert res['encoder'] == f"BERT ({os.path.basename(minilm_dir)})"  # what was loaded, not the strategy's default
    assert res['srcc_mean'] > 0.6, res['srcc_folds']
    assert res['srcc_pooled'] > 0.6  # all out-of-fold predictions at once, not only per fold


# -----------------------------------------------------------------------------
# frozen features, early stopping, DDP, batch sizes

def test_unreadable_feature_cache_is_rebuilt(demo_root, tiny_models, tmp_path, capsys):
    flags = ['--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], *QUICK[:-2], '--lr', '1e-2',
             '--cache', tmp_path / 'cache']
    first = regress_run(demo_root, tmp_path / 'a', *flags)
    [name] = [f for f in os.listdir(tmp_path / 'cache') if f.startswith('features-') and f.endswith('.npy')]
    path = tmp_path / 'cache' / name
    path.write_bytes(path.read_bytes()[:100])  # a disk that filled, a file cut short by hand
    capsys.readouterr()
    again = regress_run(demo_root, tmp_path / 'b', *flags)
    out = capsys.readouterr().out
    assert 'warning: rebuilding an unreadable cache file' in out and 'delete it' not in out  # no advice it then ignores
    assert 'text items 200/200' in out  # embedded again
    assert again['srcc_folds'] == first['srcc_folds'] and predictions(tmp_path / 'a') == predictions(tmp_path / 'b')


def test_early_stopping_counts_after_patience_start(demo_root, tiny_models, tmp_path):
    res = regress_run(demo_root, tmp_path / 'run', '--strategy', 3, '--modality', 'text', '--checkpoint',
                      tiny_models['clip'], '--folds', 3, '--epochs', 12, '--patience-start', 5, '--patience', 2,
                      '--batch-size', 16, '--lr', '1e-2')
    for epochs, best in zip(res['epochs_per_fold'], res['best_epoch_per_fold']):
        assert epochs == min(12, max(best, 5) + 2)  # stops 2 epochs after max(best epoch, 5), never before epoch 7


def test_feature_cache_equals_encoder_in_loop(demo_root, tiny_models, tmp_path):
    # tiny ViT: its random features spread well (tiny CLIP vision's barely differ, so float noise could swap ranks)
    flags = ['--strategy', 1, '--modality', 'vision', '--checkpoint', tiny_models['vit'], '--epochs', 4, '--folds', 2,
             '--patience-start', 4, '--batch-size', 16, '--lr', '1e-2', '--cache', tmp_path / 'cache']
    cached = regress_run(demo_root, tmp_path / 'cached', *flags)
    looped = regress_run(demo_root, tmp_path / 'looped', *flags, '--no-feature-cache')
    assert np.allclose(cached['srcc_folds'], looped['srcc_folds'], atol=1e-6)
    a, b = predictions(tmp_path / 'cached'), predictions(tmp_path / 'looped')
    assert a.keys() == b.keys()
    assert np.allclose([a[k] for k in a], [b[k] for k in a], atol=1e-5)
    assert len(set(a.values())) > 1  # not a constant head, which would match trivially
    assert len([f for f in os.listdir(tmp_path / 'cache') if f.startswith('features-') and f.endswith('.npy')]) == 1


def torchrun(*argv):
    return script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'regress.py', *argv)


def test_ddp_two_processes_matches_one(demo_root, tiny_models, tmp_path):
    # tiny CLIP text: its random features spread (tiny DistilBERT's barely differ, so float noise could swap ranks)
    flags = ['--data', demo_root, '--strategy', '4', '--modality', 'text', '--checkpoint', tiny_models['clip'],
             '--epochs', '2', '--patience-start', '1', '--batch-size', '16', '--lr', '1e-3', '--folds', '2', '--verbose']
    proc = torchrun(*flags, '--out', tmp_path / 'ddp')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count('fold 0 | epoch 1/2 | train loss') == 1  # rank 0 logs, rank 1 does not
    ddp = json.load(open(tmp_path / 'ddp' / 'results.json'))
    one = regress.main([*flags, '--out', str(tmp_path / 'one')])
    assert len(ddp['srcc_folds']) == 2 and (tmp_path / 'ddp' / 'fold1' / 'encoder' / 'model.safetensors').exists()
    # sharded batches with DDP's gradient average give the single-process result
    assert np.allclose(ddp['srcc_folds'], one['srcc_folds'], atol=1e-6)
    a, b = predictions(tmp_path / 'ddp'), predictions(tmp_path / 'one')
    assert np.allclose([a[k] for k in b], [b[k] for k in b], atol=1e-5)
    # the world size is part of the run's key: one process never reuses the folds of two
    with pytest.raises(UserError, match=r"other inputs \(processes: 2 then, 1 now\)"):
        regress.main([*flags, '--out', str(tmp_path / 'ddp')])


def test_ddp_range_test_matches_one_process(demo_root, tiny_models, tmp_path):
    # under DDP each rank's loss is its weighted share and the ranks' mean is the batch's loss: one process's curve
    flags = ['--data', demo_root, '--strategy', '4', '--modality', 'text', '--checkpoint', tiny_models['clip'],
             '--epochs', '1', '--patience-start', '1', '--batch-size', '16', '--lr', 'auto', '--folds', '2']
    proc = torchrun(*flags, '--out', tmp_path / 'ddp')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ddp = json.load(open(tmp_path / 'ddp' / 'results.json'))
    one = regress.main([*flags, '--out', str(tmp_path / 'one')])
    n = min(len(ddp['lr_curve']), len(one['lr_curve']))
    assert n > 20 and np.allclose(np.array(ddp['lr_curve'])[:n], np.array(one['lr_curve'])[:n], rtol=1e-4)
    assert ddp['lr'] == pytest.approx(one['lr'], rel=1e-3)


def test_batch_size_list_picks_best(demo_root, tiny_models, tmp_path):
    out = tmp_path / 'run'
    res = regress_run(demo_root, out, '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'],
                      '--folds', 2, '--epochs', 3, '--patience-start', 1, '--lr', '1e-2', '--batch-size', 8, 64)
    search = res['batch_size_search']
    assert [s['batch_size'] for s in search] == [8, 64]
    assert search[0]['srcc_folds'] != search[1]['srcc_folds']  # two different experiments
    best = max(search, key=lambda s: s['srcc_mean'])
    assert (res['batch_size'], res['srcc_mean'], res['folds_dir']) == \
        (best['batch_size'], best['srcc_mean'], f"bs{best['batch_size']}")
    assert all((out / s['folds_dir'] / f'fold{k}' / 'head.safetensors').exists() for s in search for k in range(2))
    # only the summary is a results.json: evaluate.py's Table 6 must see one row for this run
    assert [p for p in out.rglob('results.json')] == [out / 'results.json']


def test_every_batch_size_starts_from_the_pretrained_encoder(demo_root, tiny_models, tmp_path):
    """a fine-tuned search over batch sizes: the folds of the second size are those of a run of that
    size alone, not a fine-tuning of the first size's last fold"""
    flags = ['--strategy', 4, '--modality', 'vision', '--checkpoint', tiny_models['clip'], *QUICK[:-4], '--lr', '1e-3']
    search = regress_run(demo_root, tmp_path / 'both', *flags, '--batch-size', 8, 16)['batch_size_search']
    alone = regress_run(demo_root, tmp_path / 'alone', *flags, '--batch-size', 16)
    assert search[1]['batch_size'] == alone['batch_size'] == 16
    assert np.allclose(search[1]['srcc_folds'], alone['srcc_folds'], atol=1e-6)


def test_grad_clip_clips_a_frozen_head_too(demo_root, tiny_models, tmp_path):
    flags = ['--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], *QUICK]
    regress_run(demo_root, tmp_path / 'free', *flags)
    regress_run(demo_root, tmp_path / 'clipped', *flags, '--grad-clip', 1e-6)
    assert predictions(tmp_path / 'free') != predictions(tmp_path / 'clipped')


# -----------------------------------------------------------------------------
# reruns: reuse, resume, refusals

def test_an_interrupted_run_keeps_its_finished_folds(demo_root, tiny_models, tmp_path, capsys):
    flags = ['--strategy', 4, '--modality', 'vision', '--checkpoint', tiny_models['clip'], '--verbose', *QUICK[2:],
             '--folds', 3]
    out = tmp_path / 'run'
    first = regress_run(demo_root, out, *flags)
    # as if the run had died as fold 1 began: results.json is written last
    os.remove(out / 'fold1' / 'checkpoint.pt')
    os.remove(out / 'results.json')
    mtime = os.path.getmtime(out / 'fold0' / 'checkpoint.pt')
    capsys.readouterr()
    again = regress_run(demo_root, out, *flags)
    log = capsys.readouterr().out
    assert all(f"fold {k}: finished by an earlier run, kept" in log for k in (0, 2))
    assert 'fold 1: finished' not in log and 'fold 1 | epoch 1/2' in log and 'fold 0 | epoch' not in log
    assert os.path.getmtime(out / 'fold0' / 'checkpoint.pt') == mtime
    assert again['srcc_folds'] == first['srcc_folds']  # fold 1 retrained to the same result, bitwise
    # a finished run of the same inputs is reused whole: nothing trained, nothing written
    before = snapshot(out)
    reused = regress_run(demo_root, out, *flags)
    log = capsys.readouterr().out
    assert f"{out}: finished by an earlier run of these inputs, reused" in log and 'epoch' not in log
    assert reused == json.load(open(out / 'results.json')) and snapshot(out) == before
    with pytest.raises(UserError, match=r"other inputs \(--lr: 0.001 then, 0.01 now\); give another --out"):
        regress_run(demo_root, out, *flags, '--lr', '1e-2')
    assert snapshot(out) == before


@pytest.mark.parametrize('encoder', ['clip', 'distilbert'])  # DistilBERT: dropout masks must replay too
def test_fine_tuned_fold_resumes_from_epoch_checkpoint(encoder, demo_root, tiny_models, tmp_path, monkeypatch):
    flags = ['--strategy', 4, '--modality', 'text', '--checkpoint', tiny_models[encoder], '--folds', 2,
             '--epochs', 4, '--patience-start', 4, '--batch-size', 16, '--lr', '1e-3']
    full = regress_run(demo_root, tmp_path / 'full', *flags)
    ckpt = str(tmp_path / 'cut' / 'fold0' / 'checkpoint.pt')
    real_save = runs.save_state

    def dying_save(path, state):  # fold 0 dies once its epoch-2 checkpoint is written
        real_save(path, state)
        if path == ckpt and len(state.get('history', [])) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, 'save_state', dying_save)
    with pytest.raises(KeyboardInterrupt):
        regress_run(demo_root, tmp_path / 'cut', *flags)
    monkeypatch.setattr(runs, 'save_state', real_save)
    assert len(runs.read_state(ckpt)['history']) == 2
    reads, read_state = [], runs.read_state
    monkeypatch.setattr(runs, 'read_state', lambda path: reads.append(str(path)) or read_state(path))
    resumed = regress_run(demo_root, tmp_path / 'cut', *flags)
    assert reads.count(ckpt) == 1  # a fine-tuned state (model, Adam's moments) is read once on a resume
    assert resumed['epochs_per_fold'] == full['epochs_per_fold'] == [4, 4]
    assert resumed['srcc_folds'] == full['srcc_folds']  # bitwise: weights, optimizer, RNG, batch order
    assert resumed['history'] == full['history']
    assert predictions(tmp_path / 'full') == predictions(tmp_path / 'cut')


def test_lr_auto_logs_the_range_test(demo_root, tiny_models, tmp_path):
    res = regress_run(demo_root, tmp_path / 'run', '--strategy', 5, '--modality', 'text', '--fclip', tiny_models['clip'],
                      '--lr', 'auto', '--folds', 2, '--epochs', 2, '--patience-start', 1, '--batch-size', 16)
    saved = json.load(open(tmp_path / 'run' / 'results.json'))
    curve = np.array(saved['lr_curve'])  # (steps, 3): lr, loss, smoothed loss
    assert curve.shape[1] == 3 and curve[0, 0] == pytest.approx(1e-8) and np.all(np.diff(curve[:, 0]) > 0)
    assert curve[0, 0] < res['lr'] < curve[-1, 0] and saved['lr'] == res['lr']
    assert all(h['lr'] == res['lr'] for fold in saved['history'] for h in fold)  # the folds train at it
    assert (tmp_path / 'run' / 'lr_range.pt').exists()


def test_paper_defaults_and_choices():
    args = regress.parse_args(['--strategy', '6', '--modality', 'vision'])
    # paper 4.3.1: 200 epochs, patience 20 after epoch 50, 5 folds; 4.1.1: 3 frames; no clipping; Table 6 lr, batch
    assert (args.epochs, args.patience, args.patience_start, args.folds, args.frames, args.grad_clip) == \
        (200, 20, 50, 5, 3, 0.0)
    assert args.plateau_patience == 0  # the reading chosen for 4.3.1: a constant lr (README, choices)
    assert (args.lr, args.batch_size, args.device, args.out) == (None, None, 'auto', 'results/s6-vision')
    assert (STRATEGIES[6].lr[args.modality], STRATEGIES[6].batch_sizes(args.modality)) == (2e-6, [128])
    args = regress.parse_args(['--strategy', '3', '--modality', 'text'])
    assert (STRATEGIES[3].lr[args.modality], STRATEGIES[3].batch_sizes(args.modality)) == (1e-3, [4096])  # Table 6
    for strategy, modality, sizes in ((1, 'vision', [256, 512, 1024, 2048]), (2, 'vision', [64, 128, 256, 512]),
                                      (5, 'text', [512, 1024, 2048, 4096]), (6, 'text', [64, 128, 256, 512])):
        args = regress.parse_args(['--strategy', str(strategy), '--modality', modality, '--batch-size', 'table4'])
        assert STRATEGIES[strategy].batch_sizes(args.modality, args.batch_size) == sizes  # Table 4
    assert (STRATEGIES[5].lr['vision'], STRATEGIES[5].batch_size['vision']) == (1e-3, 2048)
    assert [s.frozen for s in STRATEGIES.values()] == [True, False] * 3  # Table 3: odd rows frozen
    assert [s.name for s in STRATEGIES.values()] == ['Unimodal', 'Adapted Unimodal', 'CLIP-Based',
                                                     'Adapted CLIP-Based', 'FCLIP-Based', 'Adapted FCLIP-Based']


def test_bad_input(demo_root, tiny_models, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        regress_run(demo_root, tmp_path / 'a', '--strategy', 7, '--modality', 'vision')
    assert 'invalid choice: 7' in capsys.readouterr().err
    with pytest.raises(UserError, match=r'no-fclip not found.*run `python contrastive.py'):
        regress_run(demo_root, tmp_path / 'b', '--strategy', 5, '--modality', 'vision', '--fclip', tmp_path / 'no-fclip',
                    '--batch-size', 16)
    with pytest.raises(UserError, match=r"distilbert: has no vision encoder"):
        regress_run(demo_root, tmp_path / 'c', '--strategy', 1, '--modality', 'vision', '--checkpoint',
                    tiny_models['distilbert'], '--batch-size', 16)
    with pytest.raises(UserError, match=r"vit: has no text encoder"):
        regress_run(demo_root, tmp_path / 'd', '--strategy', 2, '--modality', 'text', '--checkpoint', tiny_models['vit'],
                    '--batch-size', 16)
    with pytest.raises(UserError, match='34 labelled videos.*100 folds'):
        regress_run(demo_root, tmp_path / 'f', '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'],
                    '--folds', 100)
    with pytest.raises(UserError, match='need at least 40 for 20 folds'):  # a fold of one video has no SRCC
        regress_run(demo_root, tmp_path / 'f', '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'],
                    '--folds', 20)
    (tmp_path / 'file').write_text('notes')
    with pytest.raises(UserError, match='--out .*file is a file, expected a folder'):
        regress_run(demo_root, tmp_path / 'file', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'], *QUICK)
    assert (tmp_path / 'file').read_text() == 'notes'
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'results.json').write_text('{"kind": "contrastive"}')
    with pytest.raises(UserError, match='other holds files of no run of this repository; choose another --out'):
        regress_run(demo_root, tmp_path / 'other', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'], *QUICK)
    # what an interrupted contrastive.py leaves: its key, a checkpoint and the best model so far
    unfinished = tmp_path / 'fclip'
    shutil.copytree(tiny_models['clip'], unfinished / 'model')
    (unfinished / 'checkpoint.pt').write_bytes(b'')
    (unfinished / 'key.json').write_text(json.dumps({'script': 'contrastive.py'}))
    with pytest.raises(UserError, match=r"fclip holds a run of contrastive.py, not of regress.py; give another --out"):
        regress_run(demo_root, unfinished, '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'],
                    *QUICK)
    with pytest.raises(UserError, match='unfinished contrastive.py run'):
        regress_run(demo_root, tmp_path / 'e', '--strategy', 5, '--modality', 'text', '--fclip', unfinished / 'model',
                    '--batch-size', 16)
    assert sorted(os.listdir(unfinished)) == ['checkpoint.pt', 'key.json', 'model']
    monkeypatch.setattr(data, 'load_memento', lambda root: data.Memento(root, 'official', [], []))
    with pytest.raises(UserError, match='0 labelled videos'):
        regress_run(demo_root, tmp_path / 'g', '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'])
    assert not any((tmp_path / n).exists() for n in 'abcdefg')  # nothing written for a rejected run


def test_bad_input_is_one_line_from_the_script(demo_root, tiny_models, tmp_path):
    r = script('regress.py', '--data', tmp_path / 'nowhere', '--out', tmp_path / 'run', '--strategy', 3,
               '--modality', 'text', '--checkpoint', tiny_models['clip'])
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    [line] = r.stderr.strip().splitlines()
    assert line.startswith('regress.py: error: ') and 'nowhere: no such folder' in line
    assert not (tmp_path / 'run').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(demo_root, tiny_models, tmp_path):
    r = script('regress.py', '--data', demo_root, '--out', tmp_path / 'run', '--strategy', 3, '--modality', 'text',
               '--checkpoint', tiny_models['clip'], *QUICK, '--device', 'cuda')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    [line] = r.stderr.strip().splitlines()
    assert line.startswith('regress.py: error: --device cuda') and 'torch.cuda.is_available() is False' in line
    assert '--device cpu' in line and r.stdout == ''  # what to do, and no work before it
    assert not (tmp_path / 'run').exists()


def test_ctrl_c_says_how_to_continue_and_the_rerun_does(demo_root, tiny_models, tmp_path, capsys):
    argv = ['regress.py', '--data', demo_root, '--out', tmp_path / 'run', '--strategy', 4, '--modality', 'text',
            '--checkpoint', tiny_models['clip'], '--folds', 2, '--epochs', 4, '--patience-start', 4,
            '--batch-size', 16, '--lr', '1e-3', '--verbose']
    code, out = interrupted(argv, after='fold 0 | epoch 2/4')
    assert code == 130 and out.rstrip().endswith('a frozen fold starts again'), out[-2000:]
    assert 'Traceback' not in out
    res = regress_run(argv[2], argv[4], *argv[5:])  # the same command, in this process
    assert re.search(r'fold 0: resumed from .*fold0/checkpoint.pt after epoch [1-4]\n', capsys.readouterr().out)
    assert len(res['srcc_folds']) == 2 and res['epochs_per_fold'] == [4, 4]
    assert [h['epoch'] for h in res['history'][0]] == list(range(1, 5))  # no epoch lost or run twice


def test_fold_stopped_early_stays_stopped_on_resume(demo_root, tiny_models, tmp_path, monkeypatch):
    flags = ['--strategy', 4, '--modality', 'text', '--checkpoint', tiny_models['clip'], '--folds', 2,
             '--epochs', 12, '--patience-start', 2, '--patience', 1, '--batch-size', 16, '--lr', '1e-3']
    full = regress_run(demo_root, tmp_path / 'full', *flags)
    assert full['epochs_per_fold'][0] < 12  # early stopping ended fold 0
    real_save = runs.save_state

    def dying_save(path, state):  # the process dies after fold 0's last epoch checkpoint, before it is marked finished
        if state.get('finished') and path.endswith(os.path.join('fold0', 'checkpoint.pt')):
            raise KeyboardInterrupt
        real_save(path, state)
    monkeypatch.setattr(runs, 'save_state', dying_save)
    with pytest.raises(KeyboardInterrupt):
        regress_run(demo_root, tmp_path / 'cut', *flags)
    monkeypatch.setattr(runs, 'save_state', real_save)
    resumed = regress_run(demo_root, tmp_path / 'cut', *flags)
    assert resumed['epochs_per_fold'] == full['epochs_per_fold']  # no epoch trained past the stop
    assert np.allclose(resumed['srcc_folds'], full['srcc_folds'], atol=1e-6)


def test_fine_tuning_under_bfloat16_autocast(demo_root, tiny_models, tmp_path):
    # the mixed-precision path a GPU takes by default, here on the CPU's bfloat16 autocast
    res = regress_run(demo_root, tmp_path / 'bf16', '--strategy', 4, '--modality', 'text', '--dtype', 'bfloat16',
                      '--checkpoint', tiny_models['clip'], *QUICK)
    assert all(math.isfinite(r) for r in res['srcc_folds']) and res['dtype'] == 'bfloat16'
    regress_run(demo_root, tmp_path / 'fp32', '--strategy', 4, '--modality', 'text',
                '--checkpoint', tiny_models['clip'], *QUICK)
    bf16, fp32 = predictions(tmp_path / 'bf16'), predictions(tmp_path / 'fp32')
    assert bf16.keys() == fp32.keys()
    diff = max(abs(bf16[v] - fp32[v]) for v in bf16)
    assert 0 < diff < 0.05  # bfloat16 rounding (so autocast ran), not a different model


@pytest.mark.parametrize('flags, message', [
    (['--lr', 'fast'], "argument --lr: expected a positive number or 'auto', found 'fast'"),
    (['--batch-size', '0'], 'argument --batch-size: expected a number >= 1, found 0'),
    (['--epochs', '0'], 'argument --epochs: expected a number >= 1, found 0'),
    (['--folds', '1'], 'argument --folds: expected a number >= 2, found 1'),
    (['--batch-size', '16', 'table4'], None),
])
def test_arguments_are_checked_before_any_work(flags, message, demo_root, tiny_models, tmp_path, capsys):
    argv = ['--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], *flags]
    if message is None:
        with pytest.raises(UserError, match=r"'table4' alone, found \[16, 'table4'\]"):
            regress_run(demo_root, tmp_path / 'out', *argv)
    else:
        with pytest.raises(SystemExit):
            regress_run(demo_root, tmp_path / 'out', *argv)
        err = capsys.readouterr().err
        assert message in err and "found 'fast'" in err if flags[0] == '--lr' else message in err, err
    with pytest.raises(UserError, match=r'--batch-size 10000 is larger than the about 135 training text items'):
        regress_run(demo_root, tmp_path / 'out', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'], '--batch-size', 10000)
    assert not (tmp_path / 'out').exists()


def test_finished_runs_are_not_reused_for_other_data_or_weights(demo_root, tiny_models, tmp_path, capsys):
    root, clip = tmp_path / 'data', tmp_path / 'clip'
    shutil.copytree(demo_root, root)
    shutil.copytree(tiny_models['clip'], clip)
    flags = ['--strategy', 3, '--modality', 'text', '--checkpoint', clip, *QUICK]
    regress_run(root, tmp_path / 'run', *flags)
    before = snapshot(tmp_path / 'run')
    # the same video ids with 20 scores flipped: the finished folds would report the old SRCC
    path = root / 'memento_train_data.json'
    videos = json.load(open(path))
    for v in videos[:20]:
        v['mem_score'] = 1 - v['mem_score']
    path.write_text(json.dumps(videos))
    with pytest.raises(UserError, match=r"run holds a run of other inputs \(data: '\w+' then, '\w+' now\)"):
        regress_run(root, tmp_path / 'run', *flags)
    assert snapshot(tmp_path / 'run') == before
    # the scores as they were, one caption reworded: the text folds would be trained on other captions
    videos = json.load(open(os.path.join(demo_root, 'memento_train_data.json')))
    videos[0]['captions'][0] = 'a caption nobody wrote'
    path.write_text(json.dumps(videos))
    with pytest.raises(UserError, match=r"other inputs \(data: '\w+' then, '\w+' now; rows: '\w+' then"):
        regress_run(root, tmp_path / 'run', *flags)
    assert snapshot(tmp_path / 'run') == before
    shutil.copy(os.path.join(demo_root, 'memento_train_data.json'), path)
    # the same weights copied elsewhere are the same checkpoint: the finished run is reused
    shutil.copytree(clip, tmp_path / 'clip-copy')
    capsys.readouterr()
    regress_run(root, tmp_path / 'run', *flags[:4], '--checkpoint', tmp_path / 'clip-copy', *QUICK)
    assert 'finished by an earlier run of these inputs, reused' in capsys.readouterr().out
    assert snapshot(tmp_path / 'run') == before
    # the checkpoint folder re-created at the same path with new weights
    corpus = [line.strip() for line in open(os.path.join(demo_root, 'captions.txt')) if line.strip()]
    demo.make_tiny('clip', str(clip), corpus, seed=1)  # the same tokenizer and config, other weights
    with pytest.raises(UserError, match=r"other inputs \(checkpoint model.safetensors: '\w+' then, '\w+' now\)"):
        regress_run(root, tmp_path / 'run', *flags)
    assert snapshot(tmp_path / 'run') == before


# -----------------------------------------------------------------------------
# divergence and NaN (issue 41)

def constant_at(calls, real=training.infer):
    """training.infer whose validation predictions are one constant at the validation calls `calls`
    (counted from 1), as a diverged head gives: the fold's SRCC is NaN there"""
    seen = []

    def infer(net, items, idx, *args):
        out = real(net, items, idx, *args)
        if isinstance(net, models.Regressor) and bool((items.fold[idx] >= 0).all()):  # a fold's validation rows
            seen.append(1)
            if len(seen) in calls:
                return torch.full_like(out, 0.5)
        return out
    return infer


def test_a_diverged_fold_is_an_error_not_a_nan_in_results(demo_root, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(regress.training, 'infer', constant_at(range(1, 100)))
    with pytest.raises(UserError, match=r'^fold 0: the validation SRCC was nan at every epoch: the model predicts '
                                        r'one constant \(try a lower --lr\)$'):
        regress_run(demo_root, tmp_path / 'run', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'], *QUICK)
    assert not (tmp_path / 'run' / 'results.json').exists()


def test_a_nan_validation_srcc_is_recorded_as_none_and_never_improves(demo_root, tiny_models, tmp_path, monkeypatch):
    # fold 0's epoch 2 predicts one constant: None in the history, no better epoch, and the plateau counts it
    monkeypatch.setattr(regress.training, 'infer', constant_at({2}))
    flags = ['--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], '--folds', 2, '--epochs', 4,
             '--patience-start', 4, '--batch-size', 16, '--lr', '1e-2', '--plateau-patience', 1]
    res = regress_run(demo_root, tmp_path / 'run', *flags)
    fold = res['history'][0]
    assert fold[1]['val_srcc'] is None and all(isinstance(h['val_srcc'], float) for h in fold[:1] + fold[2:])
    assert res['best_epoch_per_fold'][0] != 2 and res['srcc_folds'][0] == max(h['val_srcc'] for h in fold
                                                                              if h['val_srcc'] is not None)
    assert fold[2]['lr'] == pytest.approx(fold[1]['lr'] / 10)  # not an improvement for the lr schedule either
    saved = json.load(open(tmp_path / 'run' / 'results.json'))  # strict JSON: a NaN would not be written
    assert saved['history'][0][1]['val_srcc'] is None and all(map(math.isfinite, saved['srcc_folds']))


def test_weights_that_turn_nan_stop_the_fold_in_one_line(demo_root, tiny_models, tmp_path):
    # a student's change makes every weight NaN at the last step of epoch 3: epoch 4's loss says so, in one line
    repo = student_copy(tmp_path / 'repo', {'regress.py': [(
        "            optimizer.zero_grad(set_to_none=True)\n",
        "            optimizer.zero_grad(set_to_none=True)\n"
        "            if epoch == 3 and batch[-1] == perm[-1]:\n"
        "                [p.data.fill_(math.nan) for p in params]\n")]})
    out = tmp_path / 'run'
    r = script('regress.py', '--data', demo_root, '--out', out, '--strategy', 4, '--modality', 'text',
               '--checkpoint', tiny_models['clip'], '--folds', 2, '--epochs', 8, '--patience-start', 8,
               '--batch-size', 16, '--lr', '1e-3', cwd=repo)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    [line] = r.stderr.strip().splitlines()
    assert line.startswith('regress.py: error: fold 0, epoch 4: training loss is nan: the run diverged'), line
    assert line.endswith('try a lower --lr, or --dtype float32'), line
    history = runs.read_state(out / 'fold0' / 'checkpoint.pt')['history']
    assert len(history) <= 4 and [h['epoch'] for h in history[:3]] == [1, 2, 3]
    assert history[2]['val_srcc'] is None  # epoch 3 ended with NaN weights: no SRCC, no better epoch
    assert not (out / 'results.json').exists() and not (out / 'fold1').exists()


def test_float16_scaler_skipped_steps_add_nothing(demo_root, tiny_models, tmp_path, monkeypatch):
    # float16's GradScaler on the CPU (float32 maths, the scaler's code path): one step's loss is infinite
    real_scaler, real_loss, calls = torch.amp.GradScaler, regress.batch_loss, []
    monkeypatch.setattr(regress.torch.amp, 'GradScaler', lambda device, enabled: real_scaler(device, enabled=True))

    def batch_loss(model, items, batch, args):
        loss = real_loss(model, items, batch, args)
        if len(calls) == 2:  # fold 0, epoch 1, its third step
            loss = loss * math.inf
        calls.append((loss.item(), len(batch)))
        return loss
    monkeypatch.setattr(regress, 'batch_loss', batch_loss)
    res = regress_run(demo_root, tmp_path / 'run', '--strategy', 3, '--modality', 'text', '--checkpoint',
                      tiny_models['clip'], *QUICK)
    fold = res['history'][0]
    assert [h['skipped_steps'] for h in fold] == [1, 0]
    assert all(h['skipped_steps'] == 0 for h in res['history'][1])
    folds = data.make_folds(data.load_memento(demo_root).labelled(), k=2, seed=0)
    steps = math.ceil(5 * sum(f != 0 for f in folds.values()) / 16)  # fold 0's batches an epoch
    first = [c for c in calls[:steps] if math.isfinite(c[0])]
    assert len(first) == steps - 1 and not math.isfinite(calls[2][0])
    mean = sum(loss * n for loss, n in first) / sum(n for _, n in first)  # the loss of the steps taken
    assert fold[0]['train_loss'] == pytest.approx(mean, rel=1e-5)


def test_the_lr_is_set_on_every_parameter_group(demo_root, tiny_models, tmp_path):
    # a student's AdamW of two groups (no decay on biases and norms), in the range test and in the folds
    groups = ("[{'params': [p for p in params if p.dim() > 1]}, "
              "{'params': [p for p in params if p.dim() <= 1], 'weight_decay': 0.0}]")
    repo = student_copy(tmp_path / 'repo', {'regress.py': [
        ("    lr, curve = training.lr_range_test(raw_model, torch.optim.Adam(params, fused=True),\n"
         "                                       lambda b: batch_loss(model, items, b, args), batches, scaler)",
         f"    optimizer = torch.optim.AdamW({groups})\n"
         "    def loss_of(b):\n"
         "        print('range test lrs', [float(g['lr']) for g in optimizer.param_groups])\n"
         "        return batch_loss(model, items, b, args)\n"
         "    lr, curve = training.lr_range_test(raw_model, optimizer, loss_of, batches, scaler)"),
        ("    optimizer = torch.optim.Adam(params, lr=args.lr, fused=True)",
         f"    optimizer = torch.optim.AdamW({groups}, lr=args.lr)"),
        ("            optimizer.zero_grad(set_to_none=True)\n",
         "            optimizer.zero_grad(set_to_none=True)\n"
         "            print('fold lrs', [float(g['lr']) for g in optimizer.param_groups])\n")]})
    out = tmp_path / 'run'
    r = script('regress.py', '--data', demo_root, '--out', out, '--strategy', 3, '--modality', 'text',
               '--checkpoint', tiny_models['clip'], '--folds', 2, '--epochs', 6, '--patience-start', 6,
               '--batch-size', 16, '--lr', 'auto', '--plateau-patience', 1, cwd=repo)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    found = json.load(open(out / 'results.json'))['lr']
    lrs = [line.split(' lrs ') for line in r.stdout.splitlines() if ' lrs [' in line]  # [what, '[lr, lr]']
    lrs = [(what, ast.literal_eval(values)) for what, values in lrs]
    tested = [g for what, g in lrs if what == 'range test']
    trained = [g for what, g in lrs if what == 'fold']
    assert len(tested) > 20 and all(len(g) == 2 and g[0] == g[1] for g in tested)  # both groups at each step's lr
    assert tested[0][0] == pytest.approx(1e-8) and tested[-1][0] > 1e-4
    assert trained and all(len(g) == 2 and g[0] == g[1] for g in trained)  # the run's lr, and its cuts, on both
    assert trained[0][0] == found and min(g[0] for g in trained) < found  # the plateau cut both groups


# -----------------------------------------------------------------------------
# flags, student code, keys

def test_plateau_flag_cuts_the_lr_after_bad_epochs(demo_root, tiny_models, tmp_path):
    flags = ['--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], '--epochs', 8,
             '--patience-start', 8, '--batch-size', 16, '--lr', '1e-2', '--folds', 2]
    const = regress_run(demo_root, tmp_path / 'const', *flags)
    cut = regress_run(demo_root, tmp_path / 'cut', *flags, '--plateau-patience', 1)
    assert all(h['lr'] == 1e-2 for fold in const['history'] for h in fold)
    for fold in cut['history']:  # after every epoch without a better SRCC the next epoch runs at a tenth
        best = -math.inf
        for prev, h in zip(fold, fold[1:]):
            improved, best = prev['val_srcc'] > best, max(best, prev['val_srcc'])
            assert h['lr'] == pytest.approx(prev['lr'] if improved else prev['lr'] / 10), fold
    assert any(h['lr'] < 1e-2 for fold in cut['history'] for h in fold)


def test_length_bucketed_embeddings_equal_the_in_order_ones(demo_root, tiny_models):
    # the real encoder on the demo's captions: batches of similar length give the features of dataset-order batches
    enc, folder = data.load_encoder(tiny_models['distilbert'])
    ids, mask = Tokenizer(folder, enc.config.max_position_embeddings)(
        [c for v in data.load_memento(demo_root).videos for c in v.captions])  # (N, T) padded to the longest
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 3  # captions of several lengths, so the order changes

    def encode(b):
        t = int(mask[b].sum(1).max())
        return enc(ids[b, :t], mask[b, :t])
    with torch.no_grad():
        bucketed = training.encode_by_length(encode, torch.arange(len(ids)), lengths, 16)
        in_order = torch.cat([encode(torch.arange(i, min(i + 16, len(ids)))) for i in range(0, len(ids), 16)])
    assert (bucketed - in_order).abs().max().item() < 1e-5


def test_a_bug_in_the_head_keeps_its_traceback(demo_root, tiny_models, tmp_path):
    repo = student_copy(tmp_path / 'repo', {'models.py': [(  # a head meant for two embeddings side by side
        "        self.fc = nn.Linear(dim, 1)  # w, b", "        self.fc = nn.Linear(2 * dim, 1)  # w, b")]})
    r = script('regress.py', '--data', demo_root, '--out', tmp_path / 'run', '--strategy', 3, '--modality', 'text',
               '--checkpoint', tiny_models['clip'], *QUICK, cwd=repo)
    assert r.returncode == 1 and 'Traceback (most recent call last)' in r.stderr, r.stderr[-2000:]
    assert re.search(r'models\.py", line \d+, in forward\n.*self\.fc\(self\.ln\(z\)\)', r.stderr), r.stderr[-2000:]
    assert r.stderr.splitlines()[-1].startswith('RuntimeError')


def tiny_bert(folder, pooling, corpus, vocab_size=1000):
    """a tiny BERT sentence encoder with sentence-transformers' pooling file, as all-MiniLM-L6-v2 has"""
    demo.make_tiny('bert', str(folder), corpus)
    if vocab_size != 1000:  # another tokenizer.json for the same weights: fewer merges, other tokens
        tk = demo.train_tokenizer(corpus, 'bert', vocab_size=vocab_size)
        (folder / 'tokenizer.json').write_text(tk.to_str())
    (folder / '1_Pooling').mkdir(exist_ok=True)
    (folder / '1_Pooling' / 'config.json').write_text(json.dumps(
        {'pooling_mode_cls_token': pooling == 'cls', 'pooling_mode_mean_tokens': pooling == 'mean'}))


def test_a_changed_pooling_or_tokenizer_is_never_reused(demo_root, tmp_path):
    # everything the loader reads is part of a run's key: neither the run nor the features are reused
    corpus = open(os.path.join(demo_root, 'captions.txt')).read().splitlines()
    bert, cache = tmp_path / 'bert', tmp_path / 'cache'
    tiny_bert(bert, 'mean', corpus)
    flags = ['--strategy', 1, '--modality', 'text', '--checkpoint', bert, '--cache', cache, *QUICK]
    first = regress_run(demo_root, tmp_path / 'run', *flags)
    features = set(os.listdir(cache))
    for change, key in (('cls', '1_Pooling/config.json'), (300, 'tokenizer.json')):
        tiny_bert(bert, 'mean' if change == 300 else change, corpus, vocab_size=change if change == 300 else 1000)
        before = snapshot(tmp_path / 'run')
        with pytest.raises(UserError, match=rf"other inputs \(checkpoint {key}: '\w+' then, '\w+' now"):
            regress_run(demo_root, tmp_path / 'run', *flags)
        assert snapshot(tmp_path / 'run') == before
        again = regress_run(demo_root, tmp_path / f'run-{change}', *flags)
        new = set(os.listdir(cache)) - features
        assert any(f.startswith('features-') for f in new), new  # embedded again, not read from the old file
        assert change != 300 or any(f.startswith('captions-') for f in new)  # tokenised again
        assert again['srcc_folds'] != first['srcc_folds']
        features |= new


def test_a_strategy_added_as_one_row_runs_and_joins_table6(demo_root, tiny_models, tmp_path, monkeypatch):
    # strategy 7, a frozen BERT sentence encoder for the captions: one row of the table, nothing else
    corpus = open(os.path.join(demo_root, 'captions.txt')).read().splitlines()
    tiny_bert(tmp_path / 'minilm', 'mean', corpus)
    monkeypatch.setitem(STRATEGIES, 7, regress.Strategy(
        'Sentence-BERT', vision=regress.VIT, text=str(tmp_path / 'minilm'), frozen=True,
        lr=dict(vision=1e-3, text=1e-3), batch_size=dict(vision=16, text=16)))
    res = regress.main(['--data', demo_root, '--out', str(tmp_path / 'results' / 's7-text'), '--strategy', '7',
                        '--modality', 'text', '--folds', '2', '--epochs', '2', '--patience-start', '1',
                        '--patience', '1'])
    assert (res['strategy'], res['name'], res['frozen'], res['encoder'], res['lr'], res['batch_size']) == \
        (7, 'Sentence-BERT', True, 'BERT', 1e-3, 16)
    regress_run(demo_root, tmp_path / 'results' / 's1-text', '--strategy', 1, '--modality', 'text',
                *encoder_flags(1, 'text', tiny_models), *QUICK)
    found = evaluate.main([str(tmp_path / 'results')])
    assert [r['strategy'] for r in found] == [1, 7]
    table = (tmp_path / 'results' / 'table6.md').read_text()
    [row] = [line for line in table.splitlines() if line.startswith('| 7 - ')]
    assert row.startswith('| 7 - Sentence-BERT | BERT | 1e-03 | 16 |')
    assert table.index('1 - Unimodal') < table.index('7 - ')
    assert re.search(r'\| [+-]\d\.\d{3} \([+-]\d\.\d{3}, [+-]\d\.\d{3}\), p [\d.e-]+ \|$', row), row  # vs strategy 1
    fig = evaluate.fig3(found, tmp_path / 'fig3.png')
    ticks = [t.get_text().split('\n')[0] for t in fig.axes[0].get_xticklabels()]
    assert ticks == ['1 Unimodal', '7 Sentence-BERT']


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(demo_root, tiny_models, tmp_path):
    argv = ['regress.py', '--data', demo_root, '--out', tmp_path / 'run', '--strategy', 4, '--modality', 'text',
            '--checkpoint', tiny_models['clip'], '--folds', 2, '--epochs', 200, '--patience-start', 200,
            '--batch-size', 16, '--lr', '1e-3', '--verbose']
    first = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if 'fold 0 | epoch 1/200' in line:
                break
        before = snapshot(tmp_path / 'run')
        with pytest.raises(UserError, match=rf"run is in use by another run \(process {first.pid}\)"):
            regress_run(demo_root, tmp_path / 'run', *argv[5:])
        assert (tmp_path / 'run' / '.lock').exists()  # the first run's lock, left to it
        assert {p for p in before if p.name != '.lock'} <= set(snapshot(tmp_path / 'run'))
    finally:
        first.kill()
        first.wait()


def test_pooling_is_a_flag_where_the_checkpoint_has_none(demo_root, tiny_models, tmp_path):
    # DistilBERT ships no 1_Pooling/config.json: [CLS] unless --pooling mean says otherwise
    flags = ['--strategy', 1, '--modality', 'text', '--checkpoint', tiny_models['distilbert'], *QUICK]
    cls = regress_run(demo_root, tmp_path / 'cls', *flags)
    mean = regress_run(demo_root, tmp_path / 'mean', *flags, '--pooling', 'mean')
    assert mean['srcc_folds'] != cls['srcc_folds']
    with pytest.raises(UserError, match=r"--pooling: None then, 'mean' now"):  # in the run's key
        regress_run(demo_root, tmp_path / 'cls', *flags, '--pooling', 'mean')
    with pytest.raises(UserError, match=r"--pooling mean: CLIPText has one pooling, its own"):
        regress_run(demo_root, tmp_path / 'clip', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'], '--pooling', 'mean', *QUICK)


def test_a_frozen_run_names_its_pooling_and_predict_uses_it(demo_root, tiny_models, tmp_path):
    flags = ['--strategy', 1, '--modality', 'text', '--checkpoint', tiny_models['distilbert'], *QUICK]
    cls = regress_run(demo_root, tmp_path / 'cls', *flags)
    mean = regress_run(demo_root, tmp_path / 'mean', *flags, '--pooling', 'mean')
    assert (cls['pooling'], mean['pooling']) == ('cls', 'mean')
    # a frozen run's scores for new captions come from the same pooling
    videos = data.load_memento(demo_root).split('test')[:2]
    scores = predict.predict(tmp_path / 'mean', captions=[' || '.join(v.captions) for v in videos])
    expected = {r['video_id']: float(r['score']) for r in read_csv(tmp_path / 'mean' / 'test_predictions.csv')}
    assert scores == pytest.approx([expected[v.video_id] for v in videos], abs=1e-5)
