"""
contrastive.py (stage 1, FCLIP) on the demo dataset with a tiny random CLIP, on CPU:

    python -m pytest tests/test_contrastive.py -x -q
"""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import contrastive
import data
from conftest import interrupted, student_copy
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (pytest fixtures)
from harness import checkpoints, runs
from tools import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 6  # the 40-video demo has 6 test videos, and a batch holds one pair per video


def flags(demo_root, tiny_models, out, *extra):
    return ['--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(out), '--batch-size', str(BATCH),
            '--lr', '1e-3', '--epochs', '1', '--log-every', '60', *map(str, extra)]


def run_args(demo_root, tiny_models, out, *extra):
    return contrastive.parse_args(flags(demo_root, tiny_models, out, *extra))


def weights(out):
    return runs.read_state(os.path.join(out, 'checkpoint.pt'))['model']


def exported(out):
    """the state dict of OUT/model/ read back through our loader"""
    return data.load_encoder(os.path.join(out, 'model'))[0].state_dict()


def snapshot(folder):
    """every file under folder -> its bytes and modification time"""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob('*'))
            if p.is_file()}


@pytest.fixture(scope='module')
def run1(demo_root, tiny_models, tmp_path_factory):
    """one uninterrupted epoch; records every batch the script reads, per set of pairs"""
    out = tmp_path_factory.mktemp('run1')
    seen = {}
    read = contrastive.Pairs.batch

    def recording(self, triples, device):
        seen.setdefault(len(self), []).append([tuple(t) for t in triples])
        return read(self, triples, device)
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(contrastive.Pairs, 'batch', recording)
        results = contrastive.train(run_args(demo_root, tiny_models, out))
    return str(out), results, seen


@pytest.fixture(scope='module')
def stopped(demo_root, tiny_models, tmp_path_factory):
    """the same run with an epoch 1 of 3 steps (--max-steps 3)"""
    out = tmp_path_factory.mktemp('stopped')
    results = contrastive.train(run_args(demo_root, tiny_models, out, '--max-steps', '3'))
    return str(out), results, weights(out)


def test_a_dtype_the_device_lacks_is_refused_before_any_work(demo_root, tiny_models, tmp_path):
    args = run_args(demo_root, tiny_models, tmp_path / 'out', '--dtype', 'float16', '--device', 'cpu',
                    '--cache', tmp_path / 'cache')
    with pytest.raises(runs.UserError, match="float16 needs a CUDA device"):
        contrastive.train(args)
    assert not os.path.exists(tmp_path / 'cache') and not os.path.exists(tmp_path / 'out')  # nothing decoded


def test_losses_match_their_definition():
    torch.manual_seed(0)
    B, D = 4, 5
    img, txt = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)

    def cos(a, b):
        return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))

    for log_scale in (math.log(10.0), math.log(200.0)):  # 200: no cap at 100 in the loss
        scale = math.exp(log_scale)
        s = [[scale * cos(img[i], txt[j]) for j in range(B)] for i in range(B)]  # s[image][caption]
        ce_img = sum(-math.log(math.exp(s[k][k]) / sum(math.exp(s[k][j]) for j in range(B))) for k in range(B)) / B
        ce_txt = sum(-math.log(math.exp(s[k][k]) / sum(math.exp(s[i][k]) for i in range(B))) for k in range(B)) / B
        got = contrastive.clip_loss(img, txt, torch.tensor(log_scale), 'ce')
        assert got.dtype == torch.float32
        assert abs(got.item() - (ce_img + ce_txt) / 2) < 1e-5

    # paper eq. 5-6 (a scale of 10 keeps every sigmoid away from 0 and 1 in float64)
    s = [[10.0 * cos(img[i], txt[j]) for j in range(B)] for i in range(B)]

    def bce(preds, labels):  # eq. 6
        return -sum(y * math.log(p) + (1 - y) * math.log(1 - p) for p, y in zip(preds, labels)) / len(preds)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))
    total = 0.0
    for k in range(B):
        y = [1.0 if i == k else 0.0 for i in range(B)]
        total += bce([sigmoid(s[k][i]) for i in range(B)], y) + bce([sigmoid(s[i][k]) for i in range(B)], y)
    got = contrastive.clip_loss(img, txt, torch.tensor(math.log(10.0)), 'bce')
    assert abs(got.item() - total / (2 * B)) < 1e-5


def test_an_unknown_loss_is_a_bug_with_its_traceback():
    img, txt = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(AssertionError, match='mse'):  # a typo is a bug: its traceback, not a one-line error
        contrastive.clip_loss(img, txt, torch.tensor(0.0), 'mse')


def test_clamp_temperature_after_each_step():
    clip = torch.nn.Module()
    clip.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))  # the published one, above ln 100
    optimizer = torch.optim.SGD([clip.logit_scale], lr=1.0)
    contrastive.clamp_temperature(optimizer, clip)
    for grad, expected in ((-1.0, math.log(100)), (0.5, math.log(100) - 0.5), (10.0, 0.0)):
        clip.logit_scale.grad = torch.tensor(grad)
        optimizer.step()
        assert clip.logit_scale.item() == pytest.approx(expected)


def test_the_published_temperature_learns(demo_root, tmp_path):
    # at the published logit_scale, 4.6052 (exp: 100.003), a cap of exp(logit_scale) at 100 in the
    # loss has no gradient and the temperature never moved; clamped after the step, it learns
    with open(os.path.join(demo_root, 'captions.txt')) as f:
        corpus = [line.strip() for line in f if line.strip()]
    folder = str(tmp_path / 'clip')
    demo.make_tiny('clip', folder, corpus, logit_scale_init_value=4.6052)
    results = contrastive.train(run_args(demo_root, {'clip': folder}, tmp_path / 'run', '--max-steps', '3'))
    assert results['chosen_epoch'] == 1
    learned = data.load_encoder(os.path.join(tmp_path, 'run', 'model'))[0].logit_scale.item()
    assert learned != pytest.approx(4.6052, abs=1e-6) and 0 <= learned <= math.log(100)


def test_one_epoch_lowers_the_test_loss(run1):
    out, results, _ = run1
    epochs = results['epochs']
    assert [e['epoch'] for e in epochs] == [0, 1]
    assert epochs[0]['train_loss'] is None and epochs[1]['train_loss'] > 0
    assert [e['skipped_steps'] for e in epochs] == [0, 0]  # float32: no scaler
    assert epochs[1]['test_loss'] < epochs[0]['test_loss']
    assert results['chosen_epoch'] == 1 and results['model'] == os.path.join(out, 'model')
    assert results['demo']  # demo.py's data: Table 5 and the figures say so
    with open(os.path.join(out, 'results.json')) as f:
        assert json.load(f)['epochs'] == epochs


def test_no_batch_holds_two_pairs_of_one_video(run1):
    _, _, seen = run1
    train, test = seen[34], seen[6]
    for batch in train + test:
        assert len({v for v, f, c in batch}) == len(batch) == BATCH
    # one epoch reads every (video, frame, caption) of train+val once; each test pass reads the same batches
    assert sorted(t for batch in train for t in batch) == [(v, f, c) for v in range(34) for f in range(3) for c in range(5)]
    assert test[:len(test) // 2] == test[len(test) // 2:]


def test_export_loads_with_ours_and_transformers(run1, demo_root):
    transformers = pytest.importorskip('transformers')
    out, _, _ = run1
    folder = os.path.join(out, 'model')
    ours, _ = data.load_encoder(folder)
    ref = transformers.CLIPModel.from_pretrained(folder).eval()
    # the exported weights are those of the chosen epoch (1, the last: the checkpoint's)
    for k, v in weights(out).items():
        assert torch.equal(ours.state_dict()[k], v), k
    pairs = pairs_of(demo_root, 'test', folder, ours)
    pixel_values, input_ids, attention_mask = pairs.batch([(v, 1, v % 5) for v in range(len(pairs))], 'cpu')
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=pixel_values)
        ref_txt = ref.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        ref_img, ref_txt = [getattr(x, 'pooler_output', x) for x in (ref_img, ref_txt)]
        img, txt, _ = ours(pixel_values, input_ids, attention_mask)
        assert torch.allclose(img, ref_img, atol=1e-5)
        assert torch.allclose(txt, ref_txt, atol=1e-5)


def test_lr_range_test_puts_the_weights_back(run1, demo_root, tiny_models, tmp_path):
    results = contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--lr', 'auto', '--lr-steps', '20',
                                         '--epochs', '0'))
    assert 3 <= len(results['lr_curve']) <= 20 and 1e-8 <= results['lr'] <= 1
    assert results['epochs'][0]['lr'] == results['lr']
    # epoch 0 evaluates the weights as loaded, not the ones the range test left behind
    assert results['epochs'][0]['test_loss'] == pytest.approx(run1[1]['epochs'][0]['test_loss'], abs=1e-6)


def test_plateau_early_stopping_and_export_follow_the_test_loss(run1, demo_root, tiny_models, tmp_path, monkeypatch):
    test_losses = iter([1.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    monkeypatch.setattr(contrastive, 'test_loss', lambda *a: next(test_losses))
    monkeypatch.setattr(contrastive.PairBatchSampler, '__len__', lambda self: 2)  # 2 steps an epoch keep the test short
    results = contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--epochs', '5', '--patience', '3',
                                         '--plateau-patience', '2'))
    # best at epoch 1; epochs 2 and 3 without improvement cut the lr after epoch 3 (the paper's reading: "for
    # N consecutive epochs" cuts after the Nth, where PyTorch's patience=N waits for the N+1th); a third
    # bad epoch stops the run after epoch 4
    assert [e['epoch'] for e in results['epochs']] == [0, 1, 2, 3, 4] and results['stopped_early']
    assert results['chosen_epoch'] == 1 and results['best_test_loss'] == 0.5
    assert [e['lr'] for e in results['epochs']] == [1e-3] * 4 + [pytest.approx(1e-4)]
    ckpt = runs.read_state(os.path.join(tmp_path, 'checkpoint.pt'))
    assert (ckpt['best'], ckpt['best_epoch']) == (0.5, 1)
    assert ckpt['optimizer']['param_groups'][0]['lr'] == pytest.approx(1e-4)
    # model/ holds epoch 1, not the last epoch's weights
    model = exported(tmp_path)
    assert not all(torch.equal(model[k], v) for k, v in ckpt['model'].items())


def test_resume_after_an_epoch_equals_an_uninterrupted_run(stopped, demo_root, tiny_models, tmp_path):
    # a run that ended after epoch 0 (as one killed during epoch 1 leaves its folder), then resumed
    first = contrastive.train(run_args(demo_root, tiny_models, tmp_path / 'run', '--epochs', '0', '--max-steps', '3'))
    assert [e['epoch'] for e in first['epochs']] == [0]
    os.remove(tmp_path / 'run' / 'results.json')  # as a run killed during epoch 1 leaves it
    # the same data and weights reached by other paths, and the dtype named that the CPU takes anyway: the same run
    resumed = contrastive.train(run_args(os.path.join(demo_root, ''), {'clip': str(shutil.copytree(
        tiny_models['clip'], tmp_path / 'clip-copy'))}, tmp_path / 'run', '--resume', '--dtype', 'float32',
        '--max-steps', '3'))
    full_out, full, _ = stopped
    assert [e['epoch'] for e in resumed['epochs']] == [0, 1]
    for a, b in zip(resumed['epochs'], full['epochs']):
        assert a == b  # train and test loss, lr, temperature: bitwise
    full_w, resumed_w = weights(full_out), weights(tmp_path / 'run')
    for k in full_w:
        assert torch.equal(resumed_w[k], full_w[k]), k
    # a resume with other settings is refused in one line, naming the flag, and changes nothing on disk
    before = snapshot(tmp_path / 'run')
    for argv, change in (
            (['--data', demo_root, '--checkpoint', tiny_models['clip'], '--resume', '--out', str(tmp_path / 'run'),
              '--batch-size', '4', '--lr', '1e-3', '--max-steps', '3'], '--batch-size: 6 then, 4 now'),
            (flags(demo_root, tiny_models, tmp_path / 'run', '--max-steps', '3', '--resume', '--lr', '1e-2'),
             '--lr: 0.001 then, 0.01 now')):
        with pytest.raises(runs.UserError, match=re.escape(f"holds a run of other inputs ({change})")) as e:
            contrastive.train(contrastive.parse_args(argv))
        assert '\n' not in str(e.value)
    assert snapshot(tmp_path / 'run') == before


def test_an_unfinished_run_needs_resume(demo_root, tiny_models, tmp_path):
    contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--epochs', '0'))
    os.remove(tmp_path / 'results.json')  # as a run killed during epoch 1 leaves it
    before = snapshot(tmp_path)
    with pytest.raises(runs.UserError, match='holds an unfinished run: --resume continues it'):
        contrastive.train(run_args(demo_root, tiny_models, tmp_path))
    assert snapshot(tmp_path) == before


def test_rerun_into_a_finished_run_reuses_it_and_other_flags_are_refused(run1, demo_root, tiny_models, tmp_path,
                                                                         capsys):
    out = tmp_path / 'run'
    shutil.copytree(run1[0], out)
    before = snapshot(out)
    capsys.readouterr()
    results = contrastive.train(run_args(demo_root, tiny_models, out))
    assert 'finished by an earlier run' in capsys.readouterr().out
    with open(out / 'results.json') as f:
        assert results == json.load(f)
    assert results['epochs'] == run1[1]['epochs']
    with pytest.raises(runs.UserError, match=re.escape("(--loss: 'ce' then, 'bce' now); give another --out")) as e:
        contrastive.train(run_args(demo_root, tiny_models, out, '--loss', 'bce'))
    assert '\n' not in str(e.value)
    assert snapshot(out) == before  # the trained FCLIP model and its results are untouched


def test_a_diverging_run_is_an_error_naming_the_epoch(demo_root, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(contrastive, 'test_loss', lambda *a: math.nan)
    with pytest.raises(runs.UserError, match='epoch 0: test_loss is nan'):
        contrastive.train(run_args(demo_root, tiny_models, tmp_path))
    assert not (tmp_path / 'results.json').exists()


def test_a_step_the_float16_scaler_skips_adds_nothing_and_is_counted(demo_root, tiny_models, tmp_path, monkeypatch,
                                                                     capsys):
    # the CPU has no float16 autocast: an enabled scaler on float32 steps is the same code path
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, 'GradScaler', lambda device, enabled: scaler('cpu', enabled=True))
    losses, clip_loss = [], contrastive.clip_loss

    def one_bad_step(*args):  # the second training step's gradient is not finite
        loss = clip_loss(*args)
        if not torch.is_grad_enabled():  # the test loss
            return loss
        losses.append(loss.item())
        return loss * math.inf if len(losses) == 2 else loss
    monkeypatch.setattr(contrastive, 'clip_loss', one_bad_step)
    results = contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--max-steps', '4'))
    epochs = results['epochs']
    assert len(losses) == 4 and [e['skipped_steps'] for e in epochs] == [0, 1]
    # the mean over the 3 steps taken, not over 4 nor with the skipped step's inf
    assert epochs[1]['train_loss'] == pytest.approx((losses[0] + sum(losses[2:])) / 3, rel=1e-6)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith('epoch 1 |'))
    assert '(1 steps skipped by the float16 scaler)' in line, line
    assert math.isfinite(epochs[1]['test_loss'])


def test_a_kill_between_checkpoint_and_export_is_put_right_by_the_resume(stopped, demo_root, tiny_models, tmp_path,
                                                                        monkeypatch):
    write_folder, epochs = runs.write_folder, []

    def killed_at_epoch_1(out, files):
        epochs.append(runs.read_state(tmp_path / 'checkpoint.pt')['history'][-1]['epoch'])
        if epochs[-1] == 1:
            raise KeyboardInterrupt
        write_folder(out, files)
    with monkeypatch.context() as m:
        m.setattr(contrastive.runs, 'write_folder', killed_at_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--max-steps', '3'))
    assert epochs == [0, 1] and not (tmp_path / 'results.json').exists()
    ckpt = runs.read_state(tmp_path / 'checkpoint.pt')
    assert ckpt['best_epoch'] == 1 == stopped[1]['chosen_epoch']
    assert not all(torch.equal(exported(tmp_path)[k], v) for k, v in ckpt['model'].items())  # still epoch 0
    results = contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--max-steps', '3', '--resume'))
    model, full = exported(tmp_path), exported(stopped[0])  # and the uninterrupted run's
    for k, v in ckpt['model'].items():
        assert torch.equal(model[k], v) and torch.equal(model[k], full[k]), k
    with open(tmp_path / 'results.json') as f:
        assert json.load(f)['chosen_epoch'] == results['chosen_epoch'] == ckpt['best_epoch'] == 1


def test_the_progress_line_reads_a_detached_loss(demo_root, tiny_models, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--log-every', '0', '--max-steps', '2'))
    steps = [x for x in capsys.readouterr().out.splitlines() if x.startswith('epoch 1 | step')]
    assert len(steps) == 2 and ' | loss ' in steps[0], steps  # a line every step, each reading the loss
    assert not [w for w in caught if 'requires_grad=True' in str(w.message)], [str(w.message) for w in caught]


def test_the_lr_is_set_on_every_parameter_group(demo_root, tiny_models, tmp_path):
    # a student's AdamW: no weight decay on the temperature, in a group of its own
    repo = student_copy(tmp_path / 'repo', {'contrastive.py': [(
        "optimizer = torch.optim.Adam(clip.parameters(), lr=1e-8, fused=True)",
        "optimizer = torch.optim.AdamW([\n"
        "        {'params': [p for n, p in clip.named_parameters() if n != 'logit_scale']},\n"
        "        {'params': [clip.logit_scale], 'weight_decay': 0.0}], lr=1e-8, weight_decay=0.1, fused=True)")]})
    argv = flags(demo_root, tiny_models, tmp_path / 'run', '--lr', 'auto', '--lr-steps', '20', '--max-steps', '2')
    r = subprocess.run([sys.executable, 'contrastive.py', *argv], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(tmp_path / 'run' / 'results.json') as f:
        lr = json.load(f)['lr']
    groups = runs.read_state(tmp_path / 'run' / 'checkpoint.pt')['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [0.1, 0.0]  # the edit took
    assert lr != 1e-8 and [g['lr'] for g in groups] == [lr, lr]


def test_paper_defaults():
    args = contrastive.parse_args([])
    # paper 4.3: batch 32, range test, plateau 3 x 0.1, early stopping 6, no clipping; 4.1.1: 3 frames
    assert (args.batch_size, args.lr, args.plateau_patience, args.plateau_factor, args.patience, args.grad_clip,
            args.frames, args.loss) == (32, 'auto', 3, 0.1, 6, 0.0, 3, 'ce')


def pairs_of(root, split, clip_dir, clip):
    """contrastive.Pairs of one split, read from the caches of the whole dataset as train() builds them"""
    memento = data.load_memento(root)
    frames = data.frame_cache(memento.videos, 'clip', clip.image_size, 3, log=lambda *a: None)
    tokenizer = checkpoints.Tokenizer(clip_dir, clip.config.text_config.max_position_embeddings)
    captions = data.caption_cache(memento.videos, tokenizer, log=lambda *a: None)
    return contrastive.Pairs(frames, captions, memento.split(split))


def loss_and_grads(clip_dir, root, batch, kind, rank=0, world=1):
    """loss of one global batch as contrastive.train computes it, and the gradients DDP leaves on every rank"""
    clip = data.load_encoder(clip_dir)[0].train()
    pairs = pairs_of(root, 'train', clip_dir, clip)
    model = DDP(clip) if world > 1 else clip
    mine = batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]  # the sampler's slice for this rank
    img, txt, logit_scale = model(*pairs.batch(mine, torch.device('cpu')))
    loss = contrastive.clip_loss(contrastive.gather(img), contrastive.gather(txt), logit_scale, kind)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in clip.named_parameters()}


def _ddp_worker(rank, world, ports, argv, refused_argv, clip_dir, root, batch, result_file):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        results = contrastive.train(contrastive.parse_args(argv))  # joins the process group
        if rank == 0:
            with open(f"{result_file}.results.json", 'w') as f:
                json.dump(results, f)
        grads = {kind: loss_and_grads(clip_dir, root, batch, kind, rank, world) for kind in ('ce', 'bce')}
        torch.save(grads, f"{result_file}.{rank}")
    finally:
        runs.stop()
    # the 1-process run resumed by 2: main() joins a process group of its own (on another port) and leaves it
    os.environ['MASTER_PORT'] = str(ports[1])
    try:
        contrastive.main(refused_argv)
        refusal = None
    except runs.UserError as e:
        refusal = str(e)
    with open(f"{result_file}.refusal.{rank}", 'w') as f:
        json.dump(refusal, f)


def test_two_gloo_processes_equal_one(stopped, demo_root, tiny_models, tmp_path):
    n_train = len(data.load_memento(demo_root).split('train'))
    batch = next(iter(contrastive.PairBatchSampler(n_train, 3, 5, 8, seed=0)))
    # one process first: this also fills the frame cache the two ranks then read
    one = {kind: loss_and_grads(tiny_models['clip'], demo_root, batch, kind) for kind in ('ce', 'bce')}
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(('127.0.0.1', 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    argv = ['--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(tmp_path / 'ddp'), '--batch-size',
            str(BATCH), '--lr', '1e-3', '--epochs', '1', '--max-steps', '3']
    # the number of processes is in the key: the 1-process run of `stopped`, resumed by 2, is refused
    resumed = tmp_path / 'stopped'
    shutil.copytree(stopped[0], resumed)
    before = snapshot(resumed)
    refused_argv = flags(demo_root, tiny_models, resumed, '--max-steps', '3', '--resume', '--epochs', '2')
    mp.spawn(_ddp_worker, args=(2, ports, argv, refused_argv, tiny_models['clip'], demo_root, batch,
                                str(tmp_path / 'grads')), nprocs=2)
    for rank in (0, 1):
        with open(tmp_path / f'grads.refusal.{rank}') as f:
            refusal = json.load(f)
        assert refusal and '\n' not in refusal and '(processes: 1 then, 2 now)' in refusal, refusal
    assert snapshot(resumed) == before
    # the whole script: same epoch-0 test loss and same weights after an epoch of 3 steps as one process
    _, one_results, one_w = stopped
    with open(tmp_path / 'grads.results.json') as f:
        two_results = json.load(f)
    assert two_results['world_size'] == 2
    assert two_results['epochs'][0]['test_loss'] == pytest.approx(one_results['epochs'][0]['test_loss'], abs=1e-5)
    two_w = weights(tmp_path / 'ddp')
    for k in one_w:
        a, b = two_w[k], one_w[k]
        if k.endswith('qkv.bias'):  # the key bias has an exactly-zero gradient (softmax ignores a shift), so Adam
            a, b = (torch.cat([x[:len(x) // 3], x[2 * len(x) // 3:]]) for x in (a, b))  # turns float noise into lr steps
        assert torch.allclose(a, b, atol=1e-5), k
    # one global batch: 2 ranks x 4 pairs give the loss and gradients of 1 process x 8 pairs
    for rank in (0, 1):
        two = torch.load(tmp_path / f'grads.{rank}')
        for kind, (loss, grads) in one.items():
            assert two[kind][0] == pytest.approx(loss, abs=1e-6)
            for n, g in grads.items():
                # float32 sums over batches split differently: within 1e-5 of the tensor's largest entry
                assert torch.allclose(two[kind][1][n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item()), (kind, n)


def test_bad_input_gives_clear_errors(demo_root, tiny_models, tmp_path):
    no_test = tmp_path / 'no_test'
    no_test.mkdir()
    for s in ('train', 'val'):
        shutil.copy(os.path.join(demo_root, f'memento_{s}_data.json'), no_test)
    (no_test / 'memento_test_data.json').write_text('[]')
    cases = [
        (flags(str(no_test), tiny_models, tmp_path / 'a'), 'no test videos'),
        (flags(demo_root, tiny_models, tmp_path / 'c', '--batch-size', '64'),
         '--batch-size 64 is larger than the 34 train\\+val videos'),
        (flags(demo_root, tiny_models, tmp_path / 'notes.txt'), 'notes.txt is a file, expected a folder')]
    (tmp_path / 'notes.txt').write_text('notes')
    for argv, message in cases:
        with pytest.raises(runs.UserError, match=message) as e:
            contrastive.train(contrastive.parse_args(argv))
        assert '\n' not in str(e.value)


def test_a_checkpoint_of_another_kind_is_bad_input(demo_root, tiny_models, tmp_path):
    with pytest.raises(runs.UserError, match="expected a CLIP checkpoint.*found ViT") as e:
        contrastive.train(contrastive.parse_args(['--data', demo_root, '--checkpoint', tiny_models['vit'],
                                                  '--out', str(tmp_path / 'b')]))
    assert '\n' not in str(e.value)


def test_ctrl_c_says_how_to_continue(demo_root, tiny_models, tmp_path):
    code, out = interrupted(['contrastive.py', '--data', demo_root, '--checkpoint', tiny_models['clip'], '--out',
                             tmp_path / 'run', '--batch-size', BATCH, '--lr', '1e-3', '--epochs', 50], after='epoch 1 |')
    assert code == 130 and 'the same command with --resume continues' in out.splitlines()[-1], out[-2000:]
    assert 'Traceback' not in out and os.path.exists(tmp_path / 'run' / 'checkpoint.pt')


def test_bfloat16_autocast_steps(demo_root, tiny_models, tmp_path):
    # the mixed-precision path a GPU takes by default, here on the CPU's bfloat16 autocast
    results = contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--dtype', 'bfloat16', '--max-steps', '3'))
    assert results['dtype'] == 'bfloat16' and [e['epoch'] for e in results['epochs']] == [0, 1]
    assert math.isfinite(results['epochs'][0]['test_loss']) and math.isfinite(results['epochs'][1]['train_loss'])


def test_a_bug_in_clip_loss_keeps_its_traceback_and_bad_input_is_one_line(demo_root, tiny_models, tmp_path):
    # a student's shape mistake in the loss: F.cross_entropy raises a ValueError, which must not read as bad input
    repo = student_copy(tmp_path / 'repo', {'contrastive.py': [(
        "    target = torch.arange(len(logits), device=logits.device)\n",
        "    target = torch.arange(len(logits) - 1, device=logits.device)\n")]})
    argv = [sys.executable, 'contrastive.py', *flags(demo_root, tiny_models, tmp_path / 'run')]
    r = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback (most recent call last)' in r.stderr, r.stderr[-2000:]
    assert re.search(r'contrastive\.py", line \d+, in clip_loss', r.stderr) and 'ValueError: Expected input batch' \
        in r.stderr.splitlines()[-1]
    # SigLIP's learnable bias added to CLIP: the loader names the key the checkpoint lacks, as bad input
    repo = student_copy(tmp_path / 'repo2', {'models.py': [(
        "        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))",
        "        self.logit_bias = nn.Parameter(torch.tensor(-10.0))\n"
        "        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))")]})
    r = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith('contrastive.py: error: ') and "1 missing keys: ['logit_bias']" in r.stderr


def test_an_edit_of_the_loss_is_refused_naming_it(demo_root, tiny_models, tmp_path):
    out = tmp_path / 'fclip'
    contrastive.train(run_args(demo_root, tiny_models, out, '--epochs', '0', '--max-steps', '2'))
    os.remove(out / 'results.json')  # as a run killed during epoch 1 leaves it
    repo = student_copy(tmp_path / 'repo', {'contrastive.py': [(  # the symmetric loss made one-sided
        "    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2",
        "    return F.cross_entropy(logits, target)")]})
    before = snapshot(out)
    argv = flags(demo_root, tiny_models, out, '--max-steps', '2', '--resume')
    r = subprocess.run([sys.executable, 'contrastive.py', *argv], cwd=repo, capture_output=True, text=True, timeout=300)
    line = r.stderr.strip()
    assert r.returncode == 2 and '\n' not in line and '(contrastive.py:clip_loss edited)' in line, \
        r.stdout[-2000:] + r.stderr[-2000:]
    assert snapshot(out) == before
    # the unchanged code continues it
    results = contrastive.train(contrastive.parse_args(argv))
    assert [e['epoch'] for e in results['epochs']] == [0, 1]


def test_a_higher_epochs_continues_a_finished_run(demo_root, tiny_models, tmp_path, capsys):
    contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--epochs', '0', '--max-steps', '2'))
    capsys.readouterr()
    results = contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--epochs', '1', '--max-steps', '2',
                                         '--resume'))
    assert 'resumed from' in capsys.readouterr().out
    assert [e['epoch'] for e in results['epochs']] == [0, 1] and not results['stopped_early']
    with open(tmp_path / 'results.json') as f:
        assert json.load(f)['epochs'] == results['epochs']
