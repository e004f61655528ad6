"""Tests for regress.py (tiny models, demo data, CPU): python -m pytest tests/test_regress.py -q"""
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

import checkpoints
import data
import demo
import evaluate
import figures
import predict
import regress
import runs
import strategies
import training
from conftest import student_copy
from runs import UserError
from strategies import STRATEGIES
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {strategies.VIT: 'vit', strategies.DISTILBERT: 'distilbert', strategies.CLIP: 'clip'}  # stand-ins of Table 3's
QUICK = ['--epochs', '3', '--patience-start', '1', '--patience', '1', '--batch-size', '16', '--lr', '1e-3']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # tiny models gain nothing from intra-op threads, and on a shared 2-core machine their spin-waits cost 5x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder_flags(strategy, modality, tiny_models):
    encoder = STRATEGIES[strategy].encoder(modality)
    if encoder == strategies.FCLIP:  # the FCLIP folder: a tiny CLIP stands in for contrastive.py's output
        return ['--fclip', tiny_models['clip']]
    return ['--checkpoint', tiny_models[TINY[encoder]]]


def regress_run(demo_root, out, *flags):
    return regress.main(['--data', demo_root, '--out', str(out), *map(str, flags)])


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def predictions(out):
    return {r['video_id']: float(r['prediction']) for r in read_csv(os.path.join(out, 'predictions.csv'))}


@pytest.mark.parametrize('modality', ['vision', 'text'])
@pytest.mark.parametrize('strategy', list(STRATEGIES))
def test_strategy_end_to_end(strategy, modality, demo_root, tiny_models, tmp_path):
    out = tmp_path / 'run'
    res = regress_run(demo_root, out, '--strategy', strategy, '--modality', modality,
                      *encoder_flags(strategy, modality, tiny_models), *QUICK)
    memento = data.load_memento(demo_root)
    labelled = {v.video_id: v.score for v in memento.labelled()}
    folds = data.make_folds(memento.labelled(), k=5, seed=0, cache_dir=os.path.join(demo_root, 'cache'))

    saved = json.load(open(out / 'results.json'))
    assert saved['srcc_folds'] == res['srcc_folds']
    assert (saved['kind'], saved['strategy'], saved['modality']) == ('regress', strategy, modality)
    encoder = STRATEGIES[strategy].encoder(modality)
    assert saved['frozen'] == STRATEGIES[strategy].frozen
    # by what was loaded; the tiny folders' names (vit, distilbert, clip) only repeat it, so they are left out
    kind = {'vit': 'ViT', 'distilbert': 'DistilBERT', 'clip': f"CLIP - {modality.title()}"}
    assert saved['encoder'] == (f"FCLIP - {modality.title()}" if encoder == strategies.FCLIP else kind[TINY[encoder]])
    # what evaluate.py's figures read: the epoch cap and patience (curves.png) and demo data (fig3.png, Table 6)
    assert (saved['max_epochs'], saved['patience'], saved['demo']) == (3, 1, True)
    assert len(saved['history']) == 5 and [h['epoch'] for h in saved['history'][0]] == \
        list(range(1, saved['epochs_per_fold'][0] + 1))
    assert (saved['lr'], saved['batch_size'], saved['n_videos']) == (1e-3, 16, len(labelled))
    assert len(saved['srcc_folds']) == 5 and all(math.isfinite(r) and -1 <= r <= 1 for r in saved['srcc_folds'])
    assert saved['srcc_mean'] == pytest.approx(np.mean(saved['srcc_folds']))
    assert saved['ci'] == pytest.approx(list(evaluate.fisher_ci(saved['srcc_mean'], n=len(labelled))))
    assert all(1 <= e <= 3 for e in saved['epochs_per_fold'])
    assert all(1 <= b <= e for b, e in zip(saved['best_epoch_per_fold'], saved['epochs_per_fold']))

    # out-of-fold predictions: every labelled video once, in the fold data.make_folds gave it
    rows = read_csv(out / 'predictions.csv')
    assert sorted(r['video_id'] for r in rows) == sorted(labelled)
    for r in rows:
        assert int(r['fold']) == folds[r['video_id']]
        assert float(r['score']) == pytest.approx(labelled[r['video_id']])
        assert 0 < float(r['prediction']) < 1
    for k in range(5):  # each fold's SRCC is that of its best epoch's predictions, the ones written
        fold_rows = [r for r in rows if int(r['fold']) == k]
        assert evaluate.srcc([float(r['prediction']) for r in fold_rows], [float(r['score']) for r in fold_rows]) \
            == pytest.approx(saved['srcc_folds'][k], abs=1e-9)
    test = read_csv(out / 'test_predictions.csv')
    assert list(test[0]) == ['video_id', 'score']
    assert sorted(r['video_id'] for r in test) == sorted(v.video_id for v in memento.split('test'))
    assert all(0 < float(r['score']) < 1 for r in test)

    for k in range(5):
        fold = out / f'fold{k}'
        ckpt = runs.read_state(fold / 'checkpoint.pt')  # a finished fold's checkpoint: its record only
        rec = ckpt['record']
        assert ckpt['finished'] and 'model' not in ckpt and 'optimizer' not in ckpt
        assert set(rec['val']) == {v for v, f in folds.items() if f == k}  # no video of the fold was trained on
        assert set(load_file(fold / 'head.safetensors')) == {'ln.weight', 'ln.bias', 'fc.weight', 'fc.bias'}
        assert (fold / 'encoder' / 'model.safetensors').exists() == (not STRATEGIES[strategy].frozen)


def test_frozen_run_learns(demo_root, minilm_dir, tmp_path):
    # a real pre-trained sentence encoder, frozen: the head must rank the demo videos by their captions
    res = regress_run(demo_root, tmp_path / 'run', '--strategy', 1, '--modality', 'text', '--checkpoint', minilm_dir,
                      '--epochs', 60, '--patience-start', 60, '--batch-size', 32, '--lr', '1e-2')
    assert res['encoder'] == f"BERT ({os.path.basename(minilm_dir)})"  # what was loaded, not the strategy's default
    assert res['srcc_mean'] > 0.6, res['srcc_folds']
    assert res['srcc_pooled'] > 0.6  # all out-of-fold predictions at once, not only per fold


def test_unreadable_feature_cache_is_rebuilt(demo_root, tiny_models, tmp_path, capsys):
    flags = ['--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], '--epochs', 2,
             '--patience-start', 2, '--batch-size', 16, '--lr', '1e-2', '--cache', tmp_path / 'cache']
    first = regress_run(demo_root, tmp_path / 'a', *flags)
    [name] = [f for f in os.listdir(tmp_path / 'cache') if f.startswith('features-') and f.endswith('.pt')]
    path = tmp_path / 'cache' / name
    path.write_bytes(path.read_bytes()[:100])  # a run killed while another process wrote it, a full disk
    capsys.readouterr()
    again = regress_run(demo_root, tmp_path / 'b', *flags)
    out = capsys.readouterr().out
    assert 'warning: rebuilding an unreadable cache file' in out and 'delete it' not in out  # no advice it then ignores
    assert again['srcc_folds'] == first['srcc_folds'] and predictions(tmp_path / 'a') == predictions(tmp_path / 'b')


def test_early_stopping_counts_after_patience_start(demo_root, tiny_models, tmp_path):
    res = regress_run(demo_root, tmp_path / 'run', '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'],
                      '--epochs', 12, '--patience-start', 5, '--patience', 2, '--batch-size', 16, '--lr', '1e-2')
    for epochs, best in zip(res['epochs_per_fold'], res['best_epoch_per_fold']):
        assert epochs == min(12, max(best, 5) + 2)  # stops 2 epochs after max(best epoch, 5), never before epoch 7


def test_feature_cache_equals_encoder_in_loop(demo_root, tiny_models, tmp_path):
    # tiny ViT: its random features spread well (tiny CLIP vision's barely differ, so float noise could swap ranks)
    flags = ['--strategy', 1, '--modality', 'vision', '--checkpoint', tiny_models['vit'], '--epochs', 4,
             '--patience-start', 4, '--batch-size', 16, '--lr', '1e-2']
    cached = regress_run(demo_root, tmp_path / 'cached', *flags)
    looped = regress_run(demo_root, tmp_path / 'looped', *flags, '--no-feature-cache')
    assert np.allclose(cached['srcc_folds'], looped['srcc_folds'], atol=1e-6)
    a, b = predictions(tmp_path / 'cached'), predictions(tmp_path / 'looped')
    assert a.keys() == b.keys()
    assert np.allclose([a[k] for k in a], [b[k] for k in a], atol=1e-5)
    assert len(set(a.values())) > 1  # not a constant head, which would match trivially
    assert any(f.startswith('features-') for f in os.listdir(os.path.join(demo_root, 'cache')))


def test_ddp_two_processes_matches_one(demo_root, tiny_models, tmp_path):
    # tiny CLIP text: its random features spread (tiny DistilBERT's barely differ, so float noise could swap ranks)
    flags = ['--data', demo_root, '--strategy', '4', '--modality', 'text', '--checkpoint', tiny_models['clip'],
             '--epochs', '2', '--patience-start', '1', '--batch-size', '16', '--lr', '1e-3', '--folds', '2', '--verbose']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           os.path.join(ROOT, 'regress.py'), *flags, '--out', str(tmp_path / 'ddp')],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count('fold 0 | epoch 1/2 | train loss') == 1  # rank 0 logs, rank 1 does not
    ddp = json.load(open(tmp_path / 'ddp' / 'results.json'))
    one = regress.main([*flags, '--out', str(tmp_path / 'one')])
    assert len(ddp['srcc_folds']) == 2 and (tmp_path / 'ddp' / 'fold1' / 'encoder' / 'model.safetensors').exists()
    # sharded batches with DDP's gradient average give the single-process result
    assert np.allclose(ddp['srcc_folds'], one['srcc_folds'], atol=1e-6)
    a, b = predictions(tmp_path / 'ddp'), predictions(tmp_path / 'one')
    assert np.allclose([a[k] for k in b], [b[k] for k in b], atol=1e-5)

def test_ddp_range_test_matches_one_process(demo_root, tiny_models, tmp_path):
    # under DDP each rank's loss is its weighted share and the ranks' mean is the batch's loss: one process's curve
    flags = ['--data', demo_root, '--strategy', '4', '--modality', 'text', '--checkpoint', tiny_models['clip'],
             '--epochs', '1', '--patience-start', '1', '--batch-size', '16', '--lr', 'auto', '--folds', '2']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           os.path.join(ROOT, 'regress.py'), *flags, '--out', str(tmp_path / 'ddp')],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ddp = json.load(open(tmp_path / 'ddp' / 'results.json'))
    one = regress.main([*flags, '--out', str(tmp_path / 'one')])
    n = min(len(ddp['lr_curve']), len(one['lr_curve']))
    assert n > 20 and np.allclose(np.array(ddp['lr_curve'])[:n], np.array(one['lr_curve'])[:n], rtol=1e-4)
    assert ddp['lr'] == pytest.approx(one['lr'], rel=1e-3)


def test_batch_size_list_picks_best(demo_root, tiny_models, tmp_path):
    out = tmp_path / 'run'
    res = regress_run(demo_root, out, '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'],
                      '--epochs', 3, '--patience-start', 1, '--lr', '1e-2', '--batch-size', 8, 64)
    search = res['batch_size_search']
    assert [s['batch_size'] for s in search] == [8, 64]
    assert search[0]['srcc_folds'] != search[1]['srcc_folds']  # two different experiments
    best = max(search, key=lambda s: s['srcc_mean'])
    assert (res['batch_size'], res['srcc_mean'], res['folds_dir']) == (best['batch_size'], best['srcc_mean'], f"bs{best['batch_size']}")
    assert all((out / s['folds_dir'] / f'fold{k}' / 'head.safetensors').exists() for s in search for k in range(5))
    # only the summary is a results.json: evaluate.py's Table 6 must see one row for this run
    assert [p for p in out.rglob('results.json')] == [out / 'results.json']


def test_every_batch_size_starts_from_the_pretrained_encoder(demo_root, tiny_models, tmp_path):
    """a fine-tuned search over batch sizes: the folds of the second size are those of a run of that
    size alone, not a fine-tuning of the first size's last fold"""
    flags = ['--strategy', 4, '--modality', 'vision', '--checkpoint', tiny_models['clip'], '--folds', 2,
             *QUICK[:-4], '--lr', '1e-3']
    search = regress_run(demo_root, tmp_path / 'both', *flags, '--batch-size', 8, 16)['batch_size_search']
    alone = regress_run(demo_root, tmp_path / 'alone', *flags, '--batch-size', 16)
    assert search[1]['batch_size'] == alone['batch_size'] == 16
    assert np.allclose(search[1]['srcc_folds'], alone['srcc_folds'], atol=1e-6)


def test_grad_clip_clips_a_frozen_head_too(demo_root, tiny_models, tmp_path):
    flags = ['--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], '--folds', 2, *QUICK]
    regress_run(demo_root, tmp_path / 'free', *flags)
    regress_run(demo_root, tmp_path / 'clipped', *flags, '--grad-clip', 1e-6)
    assert predictions(tmp_path / 'free') != predictions(tmp_path / 'clipped')


def test_resume_skips_finished_folds(demo_root, tiny_models, tmp_path, capsys):
    flags = ['--strategy', 4, '--modality', 'vision', '--checkpoint', tiny_models['clip'], '--verbose', *QUICK]
    first = regress_run(demo_root, tmp_path / 'run', *flags)
    os.remove(tmp_path / 'run' / 'fold2' / 'checkpoint.pt')  # as if the run had died as fold 2 began
    mtime = os.path.getmtime(tmp_path / 'run' / 'fold0' / 'checkpoint.pt')
    capsys.readouterr()
    again = regress_run(demo_root, tmp_path / 'run', *flags)
    log = capsys.readouterr().out
    assert all(f"fold {k}: finished by an earlier run" in log for k in (0, 1, 3, 4))
    assert 'fold 2: finished' not in log and 'fold 2 | epoch 1/3' in log
    assert os.path.getmtime(tmp_path / 'run' / 'fold0' / 'checkpoint.pt') == mtime
    assert np.allclose(again['srcc_folds'], first['srcc_folds'], atol=1e-6)  # fold 2 retrained to the same result
    with pytest.raises(ValueError, match="other inputs .--lr: 0.001 then, 0.01 now"):
        regress_run(demo_root, tmp_path / 'run', *flags[:-2], '--lr', '1e-2')


@pytest.mark.parametrize('encoder', ['clip', 'distilbert'])  # DistilBERT: dropout masks must replay too
def test_fine_tuned_fold_resumes_from_epoch_checkpoint(encoder, demo_root, tiny_models, tmp_path, monkeypatch):
    flags = ['--strategy', 4, '--modality', 'text', '--checkpoint', tiny_models[encoder], '--folds', 2,
             '--epochs', 4, '--patience-start', 4, '--batch-size', 16, '--lr', '1e-3']
    full = regress_run(demo_root, tmp_path / 'full', *flags)
    real_srcc, calls = evaluate.srcc, []

    def dying_srcc(*args):  # fold 0 dies after its epoch-2 checkpoint is written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_srcc(*args)
    monkeypatch.setattr(evaluate, 'srcc', dying_srcc)
    with pytest.raises(KeyboardInterrupt):
        regress_run(demo_root, tmp_path / 'cut', *flags)
    monkeypatch.setattr(evaluate, 'srcc', real_srcc)
    assert (tmp_path / 'cut' / 'fold0' / 'checkpoint.pt').exists()
    reads, read_state = [], runs.read_state
    monkeypatch.setattr(runs, 'read_state', lambda path, **kw: reads.append(path) or read_state(path, **kw))
    resumed = regress_run(demo_root, tmp_path / 'cut', *flags)
    assert reads.count(str(tmp_path / 'cut' / 'fold0' / 'checkpoint.pt')) == 1  # a fine-tuned state, read once
    assert resumed['epochs_per_fold'] == full['epochs_per_fold'] == [4, 4]
    assert np.allclose(resumed['srcc_folds'], full['srcc_folds'], atol=1e-6)
    a, b = predictions(tmp_path / 'full'), predictions(tmp_path / 'cut')
    assert np.allclose([a[k] for k in a], [b[k] for k in a], atol=1e-5)


def test_lr_auto_logs_the_range_test(demo_root, tiny_models, tmp_path):
    res = regress_run(demo_root, tmp_path / 'run', '--strategy', 5, '--modality', 'text', '--fclip', tiny_models['clip'],
                      '--lr', 'auto', '--epochs', 2, '--patience-start', 1, '--batch-size', 16)
    saved = json.load(open(tmp_path / 'run' / 'results.json'))
    curve = np.array(saved['lr_curve'])  # (steps, 3): lr, loss, smoothed loss
    assert curve.shape[1] == 3 and curve[0, 0] == pytest.approx(1e-8) and np.all(np.diff(curve[:, 0]) > 0)
    assert curve[0, 0] < res['lr'] < curve[-1, 0] and saved['lr'] == res['lr']


def test_paper_defaults():
    args = regress.parse_args(['--strategy', '3', '--modality', 'text'])
    assert (STRATEGIES[3].lr[args.modality], STRATEGIES[3].batch_sizes(args.modality)) == (1e-3, [4096])  # Table 6
    assert (args.epochs, args.patience, args.patience_start, args.folds, args.frames) == (200, 20, 50, 5, 3)
    for strategy, modality, sizes in ((1, 'vision', [256, 512, 1024, 2048]), (2, 'vision', [64, 128, 256, 512]),
                                      (5, 'text', [512, 1024, 2048, 4096]), (6, 'text', [64, 128, 256, 512])):
        args = regress.parse_args(['--strategy', str(strategy), '--modality', modality, '--batch-size', 'table4'])
        assert STRATEGIES[strategy].batch_sizes(args.modality, args.batch_size) == sizes  # Table 4
    assert (STRATEGIES[6].lr['vision'], STRATEGIES[6].batch_size['vision']) == (2e-6, 128)
    assert (STRATEGIES[5].lr['vision'], STRATEGIES[5].batch_size['vision']) == (1e-3, 2048)


def test_bad_input(demo_root, tiny_models, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        regress_run(demo_root, tmp_path / 'a', '--strategy', 7, '--modality', 'vision')
    assert 'invalid choice: 7' in capsys.readouterr().err
    with pytest.raises(UserError, match='contrastive.py'):
        regress_run(demo_root, tmp_path / 'b', '--strategy', 5, '--modality', 'vision', '--fclip', tmp_path / 'no-fclip',
                    '--batch-size', 16)
    with pytest.raises(ValueError, match="no 'vision' encoder"):
        regress_run(demo_root, tmp_path / 'c', '--strategy', 1, '--modality', 'vision', '--checkpoint', tiny_models['distilbert'],
                    '--batch-size', 16)
    with pytest.raises(ValueError, match="no 'text' encoder"):
        regress_run(demo_root, tmp_path / 'd', '--strategy', 2, '--modality', 'text', '--checkpoint', tiny_models['vit'],
                    '--batch-size', 16)
    with pytest.raises(ValueError, match='34 labelled videos.*100 folds'):
        regress_run(demo_root, tmp_path / 'f', '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], '--folds', 100)
    with pytest.raises(ValueError, match='need at least 40 for 20 folds'):  # a fold of one video has no SRCC
        regress_run(demo_root, tmp_path / 'f', '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], '--folds', 20)
    (tmp_path / 'file').write_text('notes')
    with pytest.raises(ValueError, match='--out .*file is a file, expected a folder'):
        regress_run(demo_root, tmp_path / 'file', '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'])
    (tmp_path / 'fclip-run').mkdir()
    (tmp_path / 'fclip-run' / 'results.json').write_text('{"kind": "contrastive"}')
    with pytest.raises(ValueError, match='fclip-run holds a run of another script'):
        regress_run(demo_root, tmp_path / 'fclip-run', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'])
    unfinished = tmp_path / 'fclip'  # what an interrupted contrastive.py leaves: a checkpoint and the best model so far
    shutil.copytree(tiny_models['clip'], unfinished / 'model')
    (unfinished / 'checkpoint.pt').write_bytes(b'')
    with pytest.raises(ValueError, match='fclip holds a run of another script'):  # an unfinished one
        regress_run(demo_root, unfinished, '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'])
    with pytest.raises(ValueError, match='unfinished contrastive.py run'):
        regress_run(demo_root, tmp_path / 'e', '--strategy', 5, '--modality', 'text', '--fclip', unfinished / 'model',
                    '--batch-size', 16)
    monkeypatch.setattr(data, 'load_memento', lambda root: data.Memento(root, 'official', [], []))
    with pytest.raises(ValueError, match='0 labelled videos'):
        regress_run(demo_root, tmp_path / 'g', '--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'])
    assert not any((tmp_path / n).exists() for n in 'abcdefg')  # nothing written for a rejected run


def test_ctrl_c_says_how_to_continue_and_the_rerun_does(demo_root, tiny_models, tmp_path):
    from conftest import interrupted
    argv = ['regress.py', '--data', demo_root, '--out', tmp_path / 'run', '--strategy', 4, '--modality', 'text',
            '--checkpoint', tiny_models['clip'], '--folds', 2, '--epochs', 40, '--patience-start', 40,
            '--batch-size', 16, '--lr', '1e-3', '--verbose']
    code, out = interrupted(argv, after='fold 0 | epoch 2/40')
    assert code == 130 and out.rstrip().endswith('a frozen fold starts again'), out[-2000:]
    assert 'Traceback' not in out
    res = regress_run(argv[2], argv[4], *argv[5:])  # the same command, in this process
    assert len(res['srcc_folds']) == 2 and res['epochs_per_fold'] == [40, 40]


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
    assert all(math.isfinite(r) for r in res['srcc_folds'])
    regress_run(demo_root, tmp_path / 'fp32', '--strategy', 4, '--modality', 'text',
                      '--checkpoint', tiny_models['clip'], *QUICK)
    bf16, fp32 = predictions(tmp_path / 'bf16'), predictions(tmp_path / 'fp32')
    assert bf16.keys() == fp32.keys()
    diff = max(abs(bf16[v] - fp32[v]) for v in bf16)
    assert 0 < diff < 0.05  # bfloat16 rounding (so autocast ran), not a different model


@pytest.mark.parametrize('flags, message', [
    (['--lr', 'fast'], "argument --lr: expected a number or 'auto', found 'fast'"),
    (['--batch-size', '0'], 'argument --batch-size: expected at least 1, found 0'),
    (['--epochs', '0'], 'argument --epochs: expected at least 1, found 0'),
    (['--folds', '1'], 'argument --folds: expected at least 2, found 1'),
    (['--batch-size', '16', 'table4'], None),
])
def test_arguments_are_checked_before_any_work(flags, message, demo_root, tiny_models, tmp_path, capsys):
    argv = ['--strategy', 3, '--modality', 'text', '--checkpoint', tiny_models['clip'], *flags]
    if message is None:
        with pytest.raises(ValueError, match="'table4' alone"):
            regress_run(demo_root, tmp_path / 'out', *argv)
    else:
        with pytest.raises(SystemExit):
            regress_run(demo_root, tmp_path / 'out', *argv)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=r'--batch-size 10000 \(given\) is larger than the about 135 training text items'):
        regress_run(demo_root, tmp_path / 'out', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'], '--batch-size', 10000)
    assert not (tmp_path / 'out').exists()


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_finished_folds_are_not_reused_for_other_data_or_weights(demo_root, tiny_models, tmp_path):
    import shutil
    import demo
    root, clip = tmp_path / 'data', tmp_path / 'clip'
    shutil.copytree(demo_root, root)
    shutil.copytree(tiny_models['clip'], clip)
    flags = ['--strategy', 3, '--modality', 'text', '--checkpoint', clip, *QUICK]
    regress_run(str(root), tmp_path / 'run', *flags)
    before = snapshot(tmp_path / 'run')
    # the same video ids with 60 scores flipped: the finished folds would report the old SRCC
    path = root / 'memento_train_data.json'
    videos = json.load(open(path))
    for v in videos[:60]:
        v['mem_score'] = 1 - v['mem_score']
    path.write_text(json.dumps(videos))
    with pytest.raises(ValueError, match='other inputs .dataset content'):
        regress_run(str(root), tmp_path / 'run', *flags)
    assert snapshot(tmp_path / 'run') == before
    # the scores as they were, one caption reworded: the text folds would be trained on other captions
    videos = json.load(open(os.path.join(demo_root, 'memento_train_data.json')))
    videos[0]['captions'][0] = 'a caption nobody wrote'
    path.write_text(json.dumps(videos))
    with pytest.raises(ValueError, match='other inputs .dataset content'):
        regress_run(str(root), tmp_path / 'run', *flags)
    assert snapshot(tmp_path / 'run') == before
    shutil.copy(os.path.join(demo_root, 'memento_train_data.json'), path)
    # the same weights copied elsewhere are the same checkpoint: every fold is reused
    shutil.copytree(clip, tmp_path / 'clip-copy')
    regress_run(str(root), tmp_path / 'run', *flags[:-len(QUICK) - 1], tmp_path / 'clip-copy', *QUICK)
    after = snapshot(tmp_path / 'run')
    assert all(after[f] == before[f] for f in before if f.parts[0].startswith('fold'))
    before = after  # results.json names the checkpoint folder it was given
    # the checkpoint folder re-created at the same path with new weights
    demo.make_tiny('clip', str(clip), [c for v in videos for c in v['captions']], seed=1)
    with pytest.raises(ValueError, match='other inputs .checkpoint content'):
        regress_run(str(root), tmp_path / 'run', *flags)
    assert snapshot(tmp_path / 'run') == before


def test_a_diverged_fold_is_an_error_not_a_nan_in_results(demo_root, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, 'srcc', lambda *a: math.nan)
    with pytest.raises(ValueError, match=r'fold 0: the validation SRCC was nan at every epoch'):
        regress_run(demo_root, tmp_path / 'run', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'], *QUICK)
    assert not (tmp_path / 'run' / 'results.json').exists()


def test_paper_defaults_and_choices():
    args = regress.parse_args(['--strategy', '6', '--modality', 'vision'])
    # paper 4.3.1: 200 epochs, patience 20 after epoch 50, 5 folds; 4.1.1: 3 frames; no clipping; Table 6 lr, batch
    assert (args.epochs, args.patience, args.patience_start, args.folds, args.frames, args.grad_clip) == \
        (200, 20, 50, 5, 3, 0.0)
    assert args.plateau_patience == 0  # the reading chosen for 4.3.1: a constant lr (README, choices)
    assert (STRATEGIES[6].lr[args.modality], STRATEGIES[6].batch_sizes(args.modality)) == (2e-6, [128])


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
    enc = checkpoints.from_pretrained(tiny_models['distilbert']).eval()
    ids, mask = checkpoints.load_tokenizer(tiny_models['distilbert'])(
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


def test_length_batches_hold_similar_lengths_and_every_row_once():
    g = torch.Generator().manual_seed(0)
    length = torch.randint(5, 40, (1000,), generator=g)
    rows = torch.randperm(1000, generator=g)[:950]
    out = data.length_batches(rows, length, 64, g)
    assert sorted(out.tolist()) == sorted(rows.tolist())
    batches = out.split(64)
    assert len(batches[-1]) == 950 % 64  # the short batch stays last
    spread = [int(length[b].max() - length[b].min()) for b in batches]
    assert max(spread) <= 3  # 35 lengths over 950 rows: 2-3 per batch, where random batches span about 33
    assert [length[b].min().item() for b in batches[:-1]] != sorted(length[b].min().item() for b in batches[:-1])


def test_bucketed_fine_tuning_runs(demo_root, tiny_models, tmp_path):
    res = regress_run(demo_root, tmp_path / 'run', '--strategy', 4, '--modality', 'text', '--checkpoint',
                      tiny_models['clip'], '--bucket-batches', *QUICK)
    assert all(math.isfinite(r) for r in res['srcc_folds'])


def test_a_bug_in_the_head_keeps_its_traceback(demo_root, tiny_models, tmp_path):
    repo = student_copy(tmp_path / 'repo', {'models.py': [(  # a head meant for two embeddings side by side
        "        self.fc = nn.Linear(dim, 1)  # w, b", "        self.fc = nn.Linear(2 * dim, 1)  # w, b")]})
    r = subprocess.run([sys.executable, 'regress.py', '--data', demo_root, '--out', str(tmp_path / 'run'), '--strategy',
                        '3', '--modality', 'text', '--checkpoint', tiny_models['clip'], *QUICK], cwd=repo,
                       capture_output=True, text=True, timeout=300)
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
    # everything the loader reads is part of a run's identity: neither the folds nor the features are reused
    corpus = open(os.path.join(demo_root, 'captions.txt')).read().splitlines()
    bert, cache = tmp_path / 'bert', tmp_path / 'cache'
    tiny_bert(bert, 'mean', corpus)
    flags = ['--strategy', 1, '--modality', 'text', '--checkpoint', bert, '--cache', cache, *QUICK]
    first = regress_run(demo_root, tmp_path / 'run', *flags)
    features = set(os.listdir(cache))
    for change, key in (('cls', '1_Pooling/config.json'), (300, 'tokenizer.json')):
        tiny_bert(bert, 'mean' if change == 300 else change, corpus, vocab_size=change if change == 300 else 1000)
        before = snapshot(tmp_path / 'run')
        with pytest.raises(UserError, match=rf"other inputs \(checkpoint content {key}: '\w+' then, '\w+' now\)"):
            regress_run(demo_root, tmp_path / 'run', *flags)
        assert snapshot(tmp_path / 'run') == before
        again = regress_run(demo_root, tmp_path / f'run-{change}', *flags)
        new = set(os.listdir(cache)) - features
        assert any(f.startswith('features-') for f in new), new  # embedded again, not read from the old file
        assert change != 300 or any(f.startswith('captions-') for f in new)  # tokenised again
        assert again['srcc_folds'] != first['srcc_folds']
        features |= new


def test_a_strategy_added_as_one_row_runs_and_joins_table6(demo_root, tiny_models, tmp_path, monkeypatch, capsys):
    # strategy 7, a frozen BERT sentence encoder for the captions: one row of the table, nothing else
    corpus = open(os.path.join(demo_root, 'captions.txt')).read().splitlines()
    tiny_bert(tmp_path / 'minilm', 'mean', corpus)
    monkeypatch.setitem(STRATEGIES, 7, strategies.Strategy(
        'Sentence-BERT', vision=strategies.VIT, text=str(tmp_path / 'minilm'), frozen=True,
        lr=dict(vision=1e-3, text=1e-3), batch_size=dict(vision=16, text=16)))
    res = regress.main(['--data', demo_root, '--out', str(tmp_path / 'results' / 's7-text'), '--strategy', '7',
                        '--modality', 'text', '--epochs', '3', '--patience-start', '1', '--patience', '1'])
    assert (res['strategy'], res['frozen'], res['encoder'], res['lr'], res['batch_size']) == (7, True, 'BERT', 1e-3, 16)
    regress_run(demo_root, tmp_path / 'results' / 's1-text', '--strategy', 1, '--modality', 'text',
                *encoder_flags(1, 'text', tiny_models), *QUICK)
    evaluate.main([str(tmp_path / 'results')])
    table = (tmp_path / 'results' / 'table6.md').read_text()
    assert '| 7 - Sentence-BERT | BERT | 1e-03 | 16 |' in table and table.index('1 - Unimodal') < table.index('7 - ')
    fig = figures.fig3([json.load(open(tmp_path / 'results' / f'{r}' / 'results.json')) for r in ('s1-text', 's7-text')],
                        tmp_path / 'fig3.png')
    ticks = [t.get_text().split('\n')[0] for t in fig.axes[0].get_xticklabels()]
    assert ticks[-1] == '7 Sentence-BERT' and fig.axes[0].get_xlim() == (0.5, 7.5)


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
        with pytest.raises(UserError, match=rf"run is in use by another run \(process {first.pid}\)"):
            regress_run(demo_root, tmp_path / 'run', *argv[5:])
    finally:
        first.kill()
        first.wait()


def test_pooling_is_a_flag_where_the_checkpoint_has_none(demo_root, tiny_models, tmp_path):
    # DistilBERT ships no 1_Pooling/config.json: [CLS] unless --pooling mean says otherwise
    flags = ['--strategy', 1, '--modality', 'text', '--checkpoint', tiny_models['distilbert'], *QUICK]
    cls = regress_run(demo_root, tmp_path / 'cls', *flags)
    mean = regress_run(demo_root, tmp_path / 'mean', *flags, '--pooling', 'mean')
    assert (cls['pooling'], mean['pooling']) == ('cls', 'mean') and mean['srcc_folds'] != cls['srcc_folds']
    with pytest.raises(UserError, match=r"--pooling: None then, 'mean' now"):  # in the run's identity
        regress_run(demo_root, tmp_path / 'cls', *flags, '--pooling', 'mean')
    # a frozen run's scores for new captions come from the same pooling
    videos = data.load_memento(demo_root).split('test')[:2]
    scores = predict.predict(tmp_path / 'mean', captions=[' || '.join(v.captions) for v in videos])
    with open(tmp_path / 'mean' / 'test_predictions.csv', newline='') as f:
        expected = {r['video_id']: float(r['score']) for r in csv.DictReader(f)}
    assert scores == pytest.approx([expected[v.video_id] for v in videos], abs=1e-5)
    with pytest.raises(UserError, match=r"--pooling mean: CLIPText has one pooling, its own"):
        regress_run(demo_root, tmp_path / 'clip', '--strategy', 3, '--modality', 'text', '--checkpoint',
                    tiny_models['clip'], '--pooling', 'mean', *QUICK)
