"""Tests for training.py: python -m pytest tests/test_training.py -q"""
import copy
import io
import itertools
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import training
from training import EarlyStopping, Progress, autocast_setup


def run_finder(step, **kw):
    """LRRangeTest's loop as its docstring writes it, with step(lr) -> loss training one batch"""
    finder = training.LRRangeTest(**kw)
    for lr in finder:
        finder.record(step(lr))
    return finder.result()


def quiet(*args):
    pass


# -----------------------------------------------------------------------------
# lr range test

def test_lr_range_test_linear_regression_known_answer():
    # minibatch SGD on y = Xw + noise, X ~ N(0, s^2 I): loss Hessian H = 2 X^T X / n, top eigenvalue
    # lam ~ 2 s^2. One step at lr shrinks the excess loss by (1 - lr lam)^2 ~ exp(-2 lr lam) and
    # diverges for lr > 2/lam. The lrs grow by m = 1e8^(1/99) per step, so the excess loss at lr
    # is ~ exp(-c lr) with c = 2 lam m/(m-1) = 11.9 lam. Its slope in log lr, -u exp(-u) with
    # u = c lr, is steepest at u = 1 and at least half as steep for u in [0.23, 2.68]: the
    # geometric midpoint is u = 0.79, lr = 0.066/lam. We accept a factor 3 either side, far
    # below the divergence at 2/lam and far above lrs that do not move the loss.
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        d, n, s = 8, 4096, 10.0
        X = torch.randn(n, d, generator=g) * s
        y = X @ torch.randn(d, generator=g) + 0.1 * s * torch.randn(n, generator=g)
        lam = torch.linalg.eigvalsh(2 * X.T @ X / n).max().item()
        w = torch.zeros(d, requires_grad=True)
        opt = torch.optim.SGD([w], lr=1.0)

        def step(lr):
            idx = torch.randint(0, n, (64,), generator=g)
            opt.param_groups[0]['lr'] = lr
            loss = ((X[idx] @ w - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

        best_lr, curve = run_finder(step, log=quiet)
        assert 0.022 < best_lr * lam < 0.2, (seed, best_lr * lam)
        # stopped early on divergence, which sets in above 2/lam
        assert len(curve) < 100 and curve[-1][0] > 2 / lam
        lrs = [c[0] for c in curve]
        assert lrs[0] == pytest.approx(1e-8) and all(b > a for a, b in zip(lrs, lrs[1:]))


def test_lr_range_test_noisy_curve():
    # loss falls as a sigmoid in log10(lr) centred on -4 (steepest there, symmetric), explodes
    # above 1e-1, with 10% multiplicative noise. A smoothed curve with lag (a plain running
    # average) would pick ~0.7 decades too high; the choice must stay within half a decade.
    for seed in range(5):
        rng = np.random.default_rng(seed)

        def step(lr):
            x = math.log10(lr)
            clean = 0.2 + 2.0 / (1 + math.exp(3 * (x + 4))) + math.exp(4 * (x + 1))
            return clean * (1 + 0.1 * rng.standard_normal())

        best_lr, curve = run_finder(step, log=quiet)
        assert -4.5 < math.log10(best_lr) < -3.5, (seed, best_lr)
        assert curve[-1][0] < 1.0  # stopped at the explosion


def test_lr_range_test_errors():
    with pytest.raises(ValueError, match="never decreased"):
        run_finder(lambda lr: 1.0 + lr, log=quiet)
    with pytest.raises(ValueError, match="diverged"):
        run_finder(lambda lr: float('nan'), log=quiet)


def test_lr_range_test_steps_the_callers_optimizer_and_puts_it_back():
    # the run's optimizer takes the range test's steps, its hooks with it (contrastive.py clamps the
    # temperature after each step); its state and the weights are put back after
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64) + 3  # an offset that pushes the bias up
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.mse_loss(model(x)[:, 0], y).backward()
    optimizer.step()  # a state to put back
    optimizer.zero_grad()

    def cap(optimizer, args, kwargs):
        with torch.no_grad():
            model.bias.clamp_(max=0.5)
    optimizer.register_step_post_hook(cap)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    biases = []

    def loss_of(batch):
        biases.append(model.bias.item())
        return F.mse_loss(model(x[batch])[:, 0], y[batch])
    batches = (torch.randint(0, 64, (16,)) for _ in itertools.count())
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    training.lr_range_test(model, optimizer, loss_of, batches, scaler, steps=40, log=quiet)
    assert max(biases) == pytest.approx(0.5)  # the cap was reached, and held
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert after['param_groups'] == state['param_groups']
    assert after['state'].keys() == state['state'].keys()
    for i, s in after['state'].items():
        assert all(torch.equal(v, state['state'][i][k]) for k, v in s.items()), i


# -----------------------------------------------------------------------------
# early stopping

def run_stopper(stopper, values, first_epoch=1):
    for epoch, v in enumerate(values, start=first_epoch):
        if stopper.step(v, epoch):
            return epoch
    return None


def test_early_stopping_epoch_50_rule():
    # paper 4.3.1: no improvement for 20 consecutive epochs after the 50th -> stop
    values = [0.5] + [0.4] * 199  # best at epoch 1, never again
    assert run_stopper(EarlyStopping(20, 'max', start_epoch=50), values) == 70
    stopper = EarlyStopping(20, 'max', start_epoch=50)
    assert not any(stopper.step(v, e) for e, v in enumerate(values[:69], start=1))  # not at 50, nor at 69
    assert stopper.best == 0.5 and stopper.best_epoch == 1
    # an improvement at epoch 60 restarts the count: stop at 80
    values = [0.5] + [0.4] * 58 + [0.6] + [0.4] * 140
    assert run_stopper(EarlyStopping(20, 'max', start_epoch=50), values) == 80
    # without the start epoch the same curve stops at 21
    assert run_stopper(EarlyStopping(20, 'max'), [0.5] + [0.4] * 100) == 21


def test_early_stopping_min_mode_table5():
    # paper 4.3: patience 6 on the test loss; Table 5 test losses, then worse ones
    losses = [1.93658, 0.4209, 0.4538, 0.4814, 0.4858, 0.5736, 0.5710, 0.58, 0.59]
    stopper = EarlyStopping(6, 'min')
    assert run_stopper(stopper, losses, first_epoch=0) == 7
    assert stopper.best == 0.4209 and stopper.best_epoch == 1 and not stopper.improved


def test_early_stopping_nan_and_state():
    stopper = EarlyStopping(3, 'max')
    stopper.step(float('nan'), 1)
    assert not stopper.improved and stopper.best is None
    stopper.step(0.3, 2)
    assert stopper.improved and stopper.best_epoch == 2
    stopper.step(float('nan'), 3)
    assert not stopper.improved and stopper.best == 0.3
    resumed = EarlyStopping(3, 'max')
    resumed.load_state_dict(stopper.state_dict())
    assert [resumed.step(0.1, 4), resumed.step(0.1, 5)] == [False, True]
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(3, 'maximum')


# -----------------------------------------------------------------------------
# autocast

def test_autocast_setup_cpu():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    ctx, scaler = autocast_setup('cpu', 'bfloat16')
    with ctx():
        assert (a @ b).dtype == torch.bfloat16
    assert not scaler.is_enabled()
    ctx, scaler = autocast_setup(torch.device('cpu'), 'float32')
    with ctx():
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="float16 needs a CUDA"):
        autocast_setup('cpu', 'float16')
    with pytest.raises(ValueError, match="dtype must be one of"):
        autocast_setup('cpu', 'fp16')


def test_bfloat16_on_a_cpu_without_it_warns_once(monkeypatch, capsys):
    training.warn_slow_bfloat16.cache_clear()
    monkeypatch.setattr(training, 'cpu_bfloat16_slowdown', lambda: 148.0)  # an AVX2-only CPU, as measured on one
    for _ in range(3):
        training.autocast_setup('cpu', 'bfloat16')
    training.autocast_setup('cpu', 'float32')
    err = capsys.readouterr().err
    assert err.count('warning') == 1 and 'bfloat16 matmuls run 148x slower than float32 on this CPU' in err, err
    training.warn_slow_bfloat16.cache_clear()
    monkeypatch.setattr(training, 'cpu_bfloat16_slowdown', lambda: 0.5)  # AVX-512 BF16 or AMX: no word
    training.autocast_setup('cpu', 'bfloat16')
    assert capsys.readouterr().err == ''
    training.warn_slow_bfloat16.cache_clear()
    assert 0 < training.cpu_bfloat16_slowdown() < 1000  # the probe itself measures a ratio


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_setup_cuda_float16():
    ctx, scaler = autocast_setup('cuda', 'float16')
    a = torch.randn(4, 4, device='cuda')
    with ctx():
        assert (a @ a).dtype == torch.float16
    assert scaler.is_enabled()


# -----------------------------------------------------------------------------
# DDP: gather with gradients, 2 gloo processes

def clip_loss(img, txt):
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T * 10  # (B, B)
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def make_problem():
    g = torch.Generator().manual_seed(0)
    lin_i, lin_t = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    for p in [*lin_i.parameters(), *lin_t.parameters()]:
        p.data = torch.randn(p.shape, generator=g)
    return lin_i, lin_t, torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


def ddp_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    r, ws, device = training.ddp_setup()
    assert (r, ws, device.type) == (rank, world_size, 'cpu') and training.is_main() == (rank == 0)
    lin_i, lin_t, x, t = make_problem()
    x = x.chunk(world_size)[rank].clone().requires_grad_()
    t = t.chunk(world_size)[rank]
    loss = clip_loss(training.gather_with_grad(lin_i(x)), training.gather_with_grad(lin_t(t)))
    loss.backward()
    grads = [p.grad for p in [*lin_i.parameters(), *lin_t.parameters()]]
    for g in grads:  # what DDP does: average over ranks
        torch.distributed.all_reduce(g)
        g /= world_size
    whole = training.gather_strided((torch.arange(7) * 10.0)[rank::world_size], 7, device)  # shards of 4 and 3 items
    rows = training.gather_strided(torch.arange(21.0).view(7, 3)[rank::world_size], 7, device)  # (7, 3) embeddings
    torch.save({'loss': loss.detach(), 'grads': grads, 'x_grad': x.grad, 'whole': whole, 'rows': rows},
               os.path.join(out_dir, f'{rank}.pt'))
    training.ddp_cleanup()


def test_gather_with_grad_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    # single process, whole batch
    lin_i, lin_t, x, t = make_problem()
    x.requires_grad_()
    assert training.gather_with_grad(x) is x and training.gather_strided(x, 8, 'cpu') is x  # identity without a group
    loss = clip_loss(lin_i(x), lin_t(t))
    loss.backward()
    grads = [p.grad for p in [*lin_i.parameters(), *lin_t.parameters()]]
    for rank in range(2):
        res = torch.load(tmp_path / f'{rank}.pt')
        torch.testing.assert_close(res['loss'], loss.detach())
        assert res['whole'].tolist() == [0, 10, 20, 30, 40, 50, 60]  # every rank, back in idx order
        assert torch.equal(res['rows'], torch.arange(21.0).view(7, 3))
        for got, want in zip(res['grads'], grads):
            torch.testing.assert_close(got, want)
        # each rank's slot sums the gradients of both ranks' (identical) losses
        torch.testing.assert_close(res['x_grad'], 2 * x.grad.chunk(2)[rank])


def test_ddp_setup_single_process(monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    assert training.ddp_setup()[:2] == (0, 1) and training.is_main()


# -----------------------------------------------------------------------------
# encoding, progress

def test_encode_by_length_keeps_the_order_and_pads_less():
    lengths = torch.tensor([5, 1, 9, 3, 7, 2, 8, 4])
    seen = []

    def encode(idx):
        seen.append(lengths[idx].tolist())
        return idx.float()[:, None] * 10  # (b, 1)
    out = training.encode_by_length(encode, torch.arange(8), lengths, batch_size=3)
    assert out[:, 0].tolist() == [0, 10, 20, 30, 40, 50, 60, 70]  # back in the original order
    assert seen == [[1, 2, 3], [4, 5, 7], [8, 9]]  # batches of similar length


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_piped_one_line_per_interval():
    out = Stream(tty=False)
    p = Progress(total=100, unit='pairs', every=0, stream=out)
    p.update(10, epoch=1, step=1, loss=0.123456, lr=2.75e-4)
    line = out.getvalue().splitlines()[-1]
    assert line.startswith('epoch 1 | step 1 | loss 0.1235 | lr 0.000275 | ') and 'pairs/s' in line and 'eta 0:' in line
    out = Stream(tty=False)
    p = Progress(total=100, every=1e9, stream=out)
    for _ in range(10):
        p.update(10, loss=1.0)
    p.done_line('epoch 1 | test loss 0.5')
    assert out.getvalue().splitlines() == ['epoch 1 | test loss 0.5']  # no progress line before one interval


def test_progress_rewrites_one_line_on_a_terminal():
    out = Stream(tty=True)
    p = Progress(total=100, stream=out)
    p.update(10, loss=1.0)
    assert out.getvalue() == ''  # not before half a second
    p.last = -1e9  # as if half a second had passed
    p.update(10, loss=0.5)
    p.last = -1e9
    p.update(10, loss=0.25)
    p.done_line('fold 0: val srcc 0.5')
    text = out.getvalue()
    assert text.count('\n') == 1 and text.count('\r') >= 2 and text.endswith('\rfold 0: val srcc 0.5\n')
