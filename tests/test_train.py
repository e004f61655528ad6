"""
harness/train.py (the lr range test, inference in batches of similar length, gathered under DDP) and the machine
pieces of harness/runs.py (start and stop, the bfloat16 warning, the progress line), with contrastive.gather's
gradients across 2 gloo processes.

    python -m pytest tests/test_train.py -q
"""
import copy
import io
import itertools
import math
import os
import socket
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import contrastive
from harness import runs, train as training
from harness.runs import UserError


def constant_scaler():
    return torch.amp.GradScaler('cpu', enabled=False)  # float32: scale() is the identity


def step_numbers():
    return itertools.count()  # batches that are only the step's number


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
        model = torch.nn.Linear(d, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

        def loss_of(idx):
            return ((model(X[idx])[:, 0] - y[idx]) ** 2).mean()
        batches = (torch.randint(0, n, (64,), generator=g) for _ in itertools.count())
        best_lr, curve = training.lr_range_test(model, optimizer, loss_of, batches, constant_scaler())
        assert 0.022 < best_lr * lam < 0.2, (seed, best_lr * lam)
        # stopped early on divergence, which sets in above 2/lam
        assert len(curve) < 100 and curve[-1][0] > 2 / lam
        lrs = [c[0] for c in curve]
        assert lrs[0] == pytest.approx(1e-8) and all(b > a for a, b in zip(lrs, lrs[1:]))


def synthetic(model, optimizer, loss):
    """loss_of for a curve given as loss(lr): the lr of the step, read from the optimizer the test sets"""
    def loss_of(step):
        w = next(model.parameters())
        return 0 * w.sum() + loss(optimizer.param_groups[0]['lr'])
    return loss_of


def test_lr_range_test_noisy_curve():
    # loss falls as a sigmoid in log10(lr) centred on -4 (steepest there, symmetric), explodes
    # above 1e-1, with 10% multiplicative noise. A smoothed curve with lag (a plain running
    # average) would pick ~0.7 decades too high; the choice must stay within half a decade.
    for seed in range(5):
        rng = np.random.default_rng(seed)

        def loss(lr):
            x = math.log10(lr)
            clean = 0.2 + 2.0 / (1 + math.exp(3 * (x + 4))) + math.exp(4 * (x + 1))
            return clean * (1 + 0.1 * rng.standard_normal())
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        best_lr, curve = training.lr_range_test(model, optimizer, synthetic(model, optimizer, loss), step_numbers(),
                                                constant_scaler())
        assert -4.5 < math.log10(best_lr) < -3.5, (seed, best_lr)
        assert curve[-1][0] < 1.0  # stopped at the explosion


def test_steepest_descent_is_the_midpoint_of_the_steepest_region():
    lrs = np.geomspace(1e-8, 1.0, 100)
    x = np.log10(lrs)
    losses = np.clip(1.0 - 0.2 * (x + 6), 0.2, 1.0)  # flat, a straight descent from 1e-6 to 1e-2, flat
    lr, curve = training.steepest_descent(lrs.tolist(), losses.tolist())
    assert abs(math.log10(lr) + 4) < 0.1, lr
    assert [c[:2] for c in curve] == [[a, b] for a, b in zip(lrs.tolist(), losses.tolist())]
    assert len(curve[0]) == 3 and curve[50][2] == pytest.approx(losses[50], abs=0.02)  # smoothed, without lag


def test_lr_range_test_errors():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(UserError, match="never decreased between lr 1e-8 and 1.0e\\+00; set --lr by hand"):
        training.lr_range_test(model, optimizer, synthetic(model, optimizer, lambda lr: 1.0 + lr), step_numbers(),
                               constant_scaler())
    with pytest.raises(UserError, match="diverged after 0 steps"):
        training.lr_range_test(model, optimizer, synthetic(model, optimizer, lambda lr: float('nan')), step_numbers(),
                               constant_scaler())


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
    training.lr_range_test(model, optimizer, loss_of, batches, constant_scaler(), steps=40)
    assert max(biases) == pytest.approx(0.5)  # the cap was reached, and held
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert after['param_groups'] == state['param_groups']
    assert after['state'].keys() == state['state'].keys()
    for i, s in after['state'].items():
        assert all(torch.equal(v, state['state'][i][k]) for k, v in s.items()), i


def test_lr_range_test_sets_the_lr_of_every_parameter_group():
    # regress.py and contrastive.py build AdamW with two groups (weight decay on the matrices, none on
    # biases and norms): a test that grew the first group's lr only would measure half the model
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64)
    optimizer = torch.optim.AdamW([{'params': [model.weight], 'weight_decay': 0.1},
                                   {'params': [model.bias], 'weight_decay': 0.0, 'lr': 5e-4}], lr=1e-3)
    seen = []

    def loss_of(batch):
        seen.append([group['lr'] for group in optimizer.param_groups])
        return F.mse_loss(model(x[batch])[:, 0], y[batch])
    batches = (torch.randint(0, 64, (16,)) for _ in itertools.count())
    training.lr_range_test(model, optimizer, loss_of, batches, constant_scaler(), steps=30)
    grown = np.geomspace(1e-8, 1.0, 30)[:len(seen)]
    assert len(seen) >= 3 and np.allclose(seen, np.stack([grown, grown], 1), rtol=1e-12)
    assert [g['lr'] for g in optimizer.param_groups] == [1e-3, 5e-4]  # put back


# -----------------------------------------------------------------------------
# DDP, 2 gloo processes: contrastive.gather's gradients, infer's gather, the range test's one curve

def make_problem():
    g = torch.Generator().manual_seed(0)
    lin_i, lin_t = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    for p in [*lin_i.parameters(), *lin_t.parameters()]:
        p.data = torch.randn(p.shape, generator=g)
    scale = torch.nn.Parameter(torch.tensor(math.log(10)))  # CLIP's logit scale
    return lin_i, lin_t, scale, torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


class Table(torch.nn.Module):
    """rows -> table[rows]: a network whose output names the rows it was given"""
    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, rows):
        return self.table[rows]


def items():
    """a stand-in for data.Items of 7 rows, as infer() reads them"""
    return SimpleNamespace(device=torch.device('cpu'), length=torch.tensor([3, 1, 2, 5, 4, 7, 6]),
                           inputs=lambda rows: (rows,))


IDX = torch.tensor([5, 0, 6, 2, 1, 4, 3])  # shards of 4 and 3 rows


def ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    started = runs.start('cpu', None)
    assert started[:2] == (rank, world) and started[2].type == 'cpu' and started[3] == 'float32'
    assert runs.is_main() == (rank == 0) and runs.rank_world() == (rank, world)
    lin_i, lin_t, scale, x, t = make_problem()
    x = x.chunk(world)[rank].clone().requires_grad_()
    t = t.chunk(world)[rank]
    loss = contrastive.clip_loss(contrastive.gather(lin_i(x)), contrastive.gather(lin_t(t)), scale)
    loss.backward()
    grads = [p.grad for p in [*lin_i.parameters(), *lin_t.parameters(), scale]]
    for g in grads:  # what DDP does: average over ranks
        torch.distributed.all_reduce(g)
        g /= world
    whole = training.infer(Table(torch.arange(7) * 10.0), items(), IDX, 'float32', 2)
    rows = training.infer(Table(torch.arange(21.0).view(7, 3)), items(), IDX, 'float32', 3)  # (7, 3) embeddings
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def loss_of(step):  # each rank its own loss: 10 - step on rank 0, 11 - step on rank 1
        return 0 * model.weight.sum() + 10.0 - step + rank
    lr, curve = training.lr_range_test(model, optimizer, loss_of, step_numbers(), constant_scaler(), steps=6)
    torch.save({'loss': loss.detach(), 'grads': grads, 'x_grad': x.grad, 'whole': whole, 'rows': rows,
                'lr': lr, 'curve': curve}, os.path.join(out_dir, f'{rank}.pt'))
    runs.stop()


def test_gather_gives_one_processs_gradients_over_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    # forked: the children start with this process's modules, not a fresh import of torch and the stage
    mp.start_processes(ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method='fork')
    # a single process holding the whole batch
    lin_i, lin_t, scale, x, t = make_problem()
    x.requires_grad_()
    assert contrastive.gather(x) is x  # the identity without a process group
    loss = contrastive.clip_loss(lin_i(x), lin_t(t), scale)
    loss.backward()
    grads = [p.grad for p in [*lin_i.parameters(), *lin_t.parameters(), scale]]
    results = [torch.load(tmp_path / f'{rank}.pt') for rank in range(2)]
    for rank, res in enumerate(results):
        torch.testing.assert_close(res['loss'], loss.detach())
        for got, want in zip(res['grads'], grads):
            torch.testing.assert_close(got, want)
        # each rank's slot sums the gradients of both ranks' (identical) losses
        torch.testing.assert_close(res['x_grad'], 2 * x.grad.chunk(2)[rank])
        assert res['whole'].tolist() == (IDX * 10.0).tolist()  # every rank, back in idx order
        assert torch.equal(res['rows'], torch.arange(21.0).view(7, 3)[IDX])
        assert [c[1] for c in res['curve']] == [10.5, 9.5, 8.5, 7.5, 6.5, 5.5]  # the ranks' mean, each step
    assert results[0]['lr'] == results[1]['lr']  # one curve, one lr: the ranks stop and choose together


def test_start_single_process(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert runs.start('auto', None) == (0, 1, torch.device('cpu'), 'float32')
    assert runs.start('cpu', 'float32') == (0, 1, torch.device('cpu'), 'float32')
    assert runs.is_main() and runs.rank_world() == (0, 1) and not torch.distributed.is_initialized()
    runs.stop()  # nothing to leave
    assert torch.equal(training.infer(Table(torch.arange(21.0).view(7, 3)), items(), IDX, 'float32', 3),
                       torch.arange(21.0).view(7, 3)[IDX])


# -----------------------------------------------------------------------------
# the device and its precision, with torch.cuda stood in: nothing here touches a GPU

@pytest.fixture
def machine(monkeypatch):
    """torch.cuda as on a machine with a GPU; .bf16: native bfloat16; .emulated: bfloat16 only emulated.
    The devices set are recorded in .devices"""
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    gpu = SimpleNamespace(bf16=True, emulated=False, devices=[])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                        lambda including_emulation=True: gpu.bf16 or gpu.emulated and including_emulation)
    monkeypatch.setattr(torch.cuda, 'set_device', gpu.devices.append)
    return gpu


def test_start_picks_the_dtype_of_the_device(machine):
    assert runs.start('auto', None) == (0, 1, torch.device('cuda', 0), 'bfloat16')
    assert machine.devices == [torch.device('cuda', 0)]
    assert runs.start('cuda', 'float32')[2:] == (torch.device('cuda', 0), 'float32')  # a dtype given: kept
    machine.bf16 = False  # a GPU without bfloat16 (V100, T4)
    assert runs.start('cuda', None)[3] == 'float16'
    machine.emulated = True  # bfloat16 emulated: as slow as without, float16 it is
    assert runs.start('auto', None)[3] == 'float16'
    assert runs.start('cpu', None)[2:] == (torch.device('cpu'), 'float32')  # --device cpu on a GPU machine
    assert len(machine.devices) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_start_on_a_real_gpu(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    rank, world, device, dtype = runs.start('auto', None)
    assert (rank, world, device) == (0, 1, torch.device('cuda', 0))
    assert dtype == ('bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16')
    a = torch.randn(4, 4, device=device)
    with torch.autocast('cuda', getattr(torch, dtype)):
        assert (a @ a).dtype == getattr(torch, dtype)


def test_start_refuses_what_the_machine_cannot_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: pytest.fail(f"set_device({device})"))
    with pytest.raises(UserError) as e:
        runs.start('cuda', None)
    message = str(e.value)
    assert f"--device cuda: torch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no GPU" in message
    monkeypatch.setattr(torch.version, 'cuda', None)  # a CPU-only build says so
    with pytest.raises(UserError, match=r"\(a CPU-only build: install one built for CUDA\) finds no GPU"):
        runs.start('cuda', None)
    assert 'torch.cuda.is_available() is False' in message and '--device cpu' in message and '\n' not in message
    for device in ('cpu', 'auto'):
        with pytest.raises(UserError, match=r"--dtype float16 needs a CUDA device .*use --dtype bfloat16 or float32"):
            runs.start(device, 'float16')


def test_start_warns_about_slow_bfloat16_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    warned = []
    monkeypatch.setattr(runs, 'warn_slow_bfloat16', lambda: warned.append(1))
    assert runs.start('cpu', 'bfloat16')[3] == 'bfloat16' and warned == [1]
    runs.start('cpu', 'float32')
    assert warned == [1]


@pytest.fixture
def fresh_warning():
    runs.warn_slow_bfloat16.cache_clear()
    yield
    runs.warn_slow_bfloat16.cache_clear()  # (a stand-in's answer is not the machine's)


def test_bfloat16_on_a_cpu_without_it_warns_once(monkeypatch, capsys, fresh_warning):
    slow = {torch.bfloat16: 1.48, torch.float32: 0.01}  # an AVX2-only CPU, as measured on one: 148x
    # timeit.repeat(f, ...): f a matmul, its result's dtype says which
    monkeypatch.setattr(runs.timeit, 'repeat', lambda f, number, repeat: [slow[f().dtype]] * repeat)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for _ in range(3):
        runs.start('cpu', 'bfloat16')
    runs.start('cpu', 'float32')
    err = capsys.readouterr().err
    assert err.count('warning') == 1 and 'bfloat16 matmuls run 148x slower than float32 on this CPU' in err, err
    runs.warn_slow_bfloat16.cache_clear()
    slow[torch.bfloat16] = 0.005  # AVX-512 BF16 or AMX: no word
    runs.start('cpu', 'bfloat16')
    assert capsys.readouterr().err == ''
    monkeypatch.undo()
    runs.warn_slow_bfloat16.cache_clear()
    assert 0 < runs.warn_slow_bfloat16() < 1000  # the probe itself measures a ratio


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


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """runs' time.time(), moved by hand"""
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(runs, 'time', SimpleNamespace(time=lambda: now.t))
    return now


def terminal(monkeypatch):
    """stdout a terminal, in the test itself (pytest sets its own between the fixtures and the test): the line
    must not depend on it"""
    monkeypatch.setattr(sys, 'stdout', Terminal())
    return sys.stdout


def test_progress_prints_one_line_per_interval(clock, monkeypatch):
    out = terminal(monkeypatch)
    p = runs.Progress(total=1000, unit='pairs', every=10)
    for step in range(1, 26):  # 10 pairs a second for 25 seconds
        clock.t += 1
        p.update(10, epoch=1, loss=torch.tensor(0.5 / step))  # a tensor: read when printed
    assert out.getvalue() == ('epoch 1 | loss 0.05 | 10.0 pairs/s | eta 0:01:30\n'
                                     'epoch 1 | loss 0.025 | 10.0 pairs/s | eta 0:01:20\n')  # never a \r


def test_progress_line_fields(clock, monkeypatch):
    out = terminal(monkeypatch)
    p = runs.Progress(total=100, unit='pairs', every=0)
    clock.t += 2
    p.update(10, epoch=1, step=1, loss=0.123456, lr=2.75e-4)
    assert out.getvalue() == 'epoch 1 | step 1 | loss 0.1235 | lr 0.000275 | 5.0 pairs/s | eta 0:00:18\n'
    p = runs.Progress(total=100, every=1e9)
    for _ in range(10):
        clock.t += 1
        p.update(10, loss=1.0)
    assert out.getvalue().count('\n') == 1  # no line before one interval
    monkeypatch.setattr(runs, 'is_main', lambda: False)  # rank 1 of a DDP run
    p = runs.Progress(total=100, every=0)
    clock.t += 1
    p.update(10, loss=1.0)
    assert out.getvalue().count('\n') == 1
    assert runs.hms(3725.9) == '1:02:05' and runs.hms(math.inf) == '?'
