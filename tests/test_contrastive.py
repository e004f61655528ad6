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

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import contrastive
import data
import demo
import frames
import runs
import training
from conftest import student_copy
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (pytest fixtures)

BATCH = 6  # the 40-video demo has 6 test videos, and a batch holds one pair per video


def run_args(demo_root, tiny_models, out, *extra):
    return contrastive.parse_args(['--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(out),
                                   '--batch-size', str(BATCH), '--lr', '1e-3', '--epochs', '1', '--log-every', '60',
                                   *extra])


def weights(out):
    return runs.read_state(os.path.join(out, 'checkpoint.pt'))['model']


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
    args = run_args(demo_root, tiny_models, tmp_path / 'out', '--dtype', 'float16', '--cache', str(tmp_path / 'cache'))
    with pytest.raises(runs.UserError, match="float16 needs a CUDA device"):
        contrastive.train(args)
    assert not os.path.exists(tmp_path / 'cache')  # no frame was decoded


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
    results = contrastive.train(run_args(demo_root, {'clip': folder}, tmp_path / 'run'))
    assert results['chosen_epoch'] == 1
    exported = checkpoints.from_pretrained(os.path.join(tmp_path, 'run', 'model')).logit_scale.item()
    assert exported != pytest.approx(4.6052, abs=1e-6) and 0 <= exported <= math.log(100)


def test_one_epoch_lowers_the_test_loss(run1):
    out, results, _ = run1
    epochs = results['epochs']
    assert [e['epoch'] for e in epochs] == [0, 1]
    assert epochs[0]['train_loss'] is None and epochs[1]['train_loss'] > 0
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
    ours = checkpoints.from_pretrained(folder)
    ref = transformers.CLIPModel.from_pretrained(folder).eval()
    # the exported weights are those of the chosen epoch (1, the last: the checkpoint's)
    for k, v in weights(out).items():
        assert torch.equal(ours.state_dict()[k], v), k
    pairs = pairs_of(demo_root, 'test', folder, ours.image_size)
    pixel_values, input_ids, attention_mask = pairs.batch([(v, 1, v % 5) for v in range(len(pairs))], 'cpu')
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=pixel_values)
        ref_txt = ref.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        ref_img, ref_txt = [getattr(x, 'pooler_output', x) for x in (ref_img, ref_txt)]
        assert torch.allclose(ours.encode_image(pixel_values), ref_img, atol=1e-5)
        assert torch.allclose(ours.encode_text(input_ids, attention_mask), ref_txt, atol=1e-5)


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
    assert results['chosen_epoch'] == 1
    assert [e['lr'] for e in results['epochs']] == [1e-3] * 4 + [pytest.approx(1e-4)]
    ckpt = runs.read_state(os.path.join(tmp_path, 'checkpoint.pt'))
    assert ckpt['optimizer']['param_groups'][0]['lr'] == pytest.approx(1e-4)
    # model/ holds epoch 1, not the last epoch's weights
    exported = checkpoints.from_pretrained(os.path.join(tmp_path, 'model')).state_dict()
    assert not all(torch.equal(exported[k], v) for k, v in ckpt['model'].items())


def test_resume_after_an_epoch_equals_an_uninterrupted_run(run1, demo_root, tiny_models, tmp_path):
    # a run that ended after epoch 0 (as one killed during epoch 1 leaves its folder), then resumed
    first = contrastive.train(run_args(demo_root, tiny_models, tmp_path / 'run', '--epochs', '0'))
    assert [e['epoch'] for e in first['epochs']] == [0]
    # the same data and weights reached by other paths, and the dtype named that the CPU takes anyway: the same run
    resumed = contrastive.train(run_args(os.path.join(demo_root, ''), {'clip': str(shutil.copytree(
        tiny_models['clip'], tmp_path / 'clip-copy'))}, tmp_path / 'run', '--resume', '--dtype', 'float32'))
    full_out, full, _ = run1
    assert [e['epoch'] for e in resumed['epochs']] == [0, 1]
    for a, b in zip(resumed['epochs'], full['epochs']):
        assert a == b  # train and test loss, lr, temperature: bitwise
    full_w, resumed_w = weights(full_out), weights(tmp_path / 'run')
    for k in full_w:
        assert torch.equal(resumed_w[k], full_w[k]), k
    # a resume with other settings is refused, naming the flag, and changes nothing on disk
    before = snapshot(tmp_path / 'run')
    with pytest.raises(ValueError, match='--batch-size: 6 then, 4 now'):
        contrastive.train(contrastive.parse_args(['--data', demo_root, '--checkpoint', tiny_models['clip'], '--resume',
                                                  '--out', str(tmp_path / 'run'), '--batch-size', '4', '--lr', '1e-3']))
    with pytest.raises(ValueError, match='--lr: 0.001 then, 0.01 now'):
        contrastive.train(run_args(demo_root, tiny_models, tmp_path / 'run', '--resume', '--lr', '1e-2'))
    assert snapshot(tmp_path / 'run') == before


def snapshot(folder):
    """every file under folder -> its bytes"""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_rerun_into_a_finished_run_refuses_and_keeps_it(run1, demo_root, tiny_models, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(run1[0], out)
    before = snapshot(out)
    with pytest.raises(ValueError, match='holds a run already; --resume continues it'):
        contrastive.train(run_args(demo_root, tiny_models, out))
    assert snapshot(out) == before  # the trained FCLIP model and its results are untouched


def test_a_diverging_run_is_an_error_naming_the_epoch(demo_root, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(contrastive, 'test_loss', lambda *a: math.nan)
    with pytest.raises(ValueError, match='epoch 0: test_loss is nan'):
        contrastive.train(run_args(demo_root, tiny_models, tmp_path))
    assert not (tmp_path / 'results.json').exists()


def test_paper_defaults():
    args = contrastive.parse_args([])
    # paper 4.3: batch 32, range test, plateau 3 x 0.1, early stopping 6, no clipping; 4.1.1: 3 frames
    assert (args.batch_size, args.lr, args.plateau_patience, args.plateau_factor, args.patience, args.grad_clip,
            args.frames, args.loss) == (32, 'auto', 3, 0.1, 6, 0.0, 3, 'ce')


def test_plateau_cuts_after_n_bad_epochs():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w], lr=1.0)
    sched = training.plateau_scheduler(opt, 'min', patience=3, factor=0.1)
    lrs = []
    for loss in [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]:  # best at the 2nd epoch, then bad epochs
        sched.step(loss)
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs == [1.0, 1.0, 1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1)]  # cut at the third bad epoch


def pairs_of(root, split, clip_dir, image_size):
    """contrastive.Pairs of one split, read from the caches of the whole dataset as train() builds them"""
    memento, cache = data.load_memento(root), os.path.join(root, 'cache')
    frame_store = frames.frame_cache(memento.videos, 'clip', image_size, 3, cache, log=lambda *a: None)
    captions = data.caption_cache(memento.videos, checkpoints.load_tokenizer(clip_dir), cache)
    return contrastive.Pairs(frame_store, captions, memento.split(split))


def loss_and_grads(clip_dir, root, batch, kind, rank=0, world=1):
    """loss of one global batch as contrastive.train computes it, and the gradients DDP leaves on every rank"""
    clip = checkpoints.from_pretrained(clip_dir).train()
    pairs = pairs_of(root, 'train', clip_dir, clip.image_size)
    model = DDP(clip) if world > 1 else clip
    mine = batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]  # the sampler's slice for this rank
    img, txt, logit_scale = model(*pairs.batch(mine, torch.device('cpu')))
    loss = contrastive.clip_loss(training.gather_with_grad(img), training.gather_with_grad(txt), logit_scale, kind)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in clip.named_parameters()}


def _ddp_worker(rank, world, port, argv, clip_dir, root, batch, result_file):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
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
        training.ddp_cleanup()


def test_two_gloo_processes_equal_one(stopped, demo_root, tiny_models, tmp_path):
    n_train = len(data.load_memento(demo_root).split('train'))
    batch = next(iter(contrastive.PairBatchSampler(n_train, 3, 5, 8, seed=0)))
    # one process first: this also fills the frame cache the two ranks then read
    one = {kind: loss_and_grads(tiny_models['clip'], demo_root, batch, kind) for kind in ('ce', 'bce')}
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    argv = ['--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(tmp_path / 'ddp'), '--batch-size',
            str(BATCH), '--lr', '1e-3', '--epochs', '1', '--max-steps', '3']
    mp.spawn(_ddp_worker, args=(2, port, argv, tiny_models['clip'], demo_root, batch, str(tmp_path / 'grads')), nprocs=2)
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
    with pytest.raises(ValueError, match='no test videos'):
        contrastive.train(run_args(str(no_test), tiny_models, tmp_path / 'a'))
    with pytest.raises(ValueError, match="expected a CLIP checkpoint.*found ViT"):
        contrastive.train(contrastive.parse_args(['--data', demo_root, '--checkpoint', tiny_models['vit'],
                                                  '--out', str(tmp_path / 'b')]))
    with pytest.raises(ValueError, match='--batch-size 64 is larger than the 34 train\\+val videos'):
        contrastive.train(run_args(demo_root, tiny_models, tmp_path / 'c', '--batch-size', '64'))
    (tmp_path / 'notes.txt').write_text('notes')
    with pytest.raises(ValueError, match='notes.txt is a file, expected a folder'):
        contrastive.train(run_args(demo_root, tiny_models, tmp_path / 'notes.txt'))


def test_ctrl_c_says_how_to_continue(demo_root, tiny_models, tmp_path):
    from conftest import interrupted
    code, out = interrupted(['contrastive.py', '--data', demo_root, '--checkpoint', tiny_models['clip'], '--out',
                             tmp_path / 'run', '--batch-size', BATCH, '--lr', '1e-3', '--epochs', 50], after='epoch 1 |')
    assert code == 130 and 'the same command with --resume continues' in out.splitlines()[-1], out[-2000:]
    assert 'Traceback' not in out and os.path.exists(tmp_path / 'run' / 'checkpoint.pt')


def test_bfloat16_autocast_steps(demo_root, tiny_models, tmp_path):
    # the mixed-precision path a GPU takes by default, here on the CPU's bfloat16 autocast
    results = contrastive.train(run_args(demo_root, tiny_models, tmp_path, '--dtype', 'bfloat16', '--max-steps', '3'))
    assert results['dtype'] == 'bfloat16' and [e['epoch'] for e in results['epochs']] == [0, 1]
    assert math.isfinite(results['epochs'][0]['test_loss'])


def test_a_bug_in_clip_loss_keeps_its_traceback_and_bad_input_is_one_line(demo_root, tiny_models, tmp_path):
    # a student's shape mistake in the loss: F.cross_entropy raises a ValueError, which must not read as bad input
    repo = student_copy(tmp_path / 'repo', {'contrastive.py': [(
        "    target = torch.arange(len(logits), device=logits.device)\n",
        "    target = torch.arange(len(logits) - 1, device=logits.device)\n")]})
    argv = [sys.executable, 'contrastive.py', '--data', demo_root, '--checkpoint', tiny_models['clip'], '--lr', '1e-3',
            '--batch-size', str(BATCH), '--out', str(tmp_path / 'run'), '--epochs', '1']
    r = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback (most recent call last)' in r.stderr, r.stderr[-2000:]
    assert re.search(r'contrastive\.py", line \d+, in clip_loss', r.stderr) and 'ValueError: Expected input batch' \
        in r.stderr.splitlines()[-1]
    # SigLIP's learnable bias added to CLIP: the loader names the key the checkpoint lacks, in one line of bad input
    repo = student_copy(tmp_path / 'repo2', {'models.py': [(
        "        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))",
        "        self.logit_bias = nn.Parameter(torch.tensor(-10.0))\n"
        "        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))")]})
    r = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith('contrastive.py: error: ') and "1 missing keys: ['logit_bias']" in r.stderr
