"""
The CUDA paths, skipped without a GPU. A GPU user runs this first, before hours of training:

    python -m pytest tests/test_cuda.py -q -s -n 0  # in one process, printing the peak memory of fine-tuning ViT-B/32

Our towers on CUDA equal CPU float32; one training step of each script in bfloat16 and in float16 with
a GradScaler (finite loss, weights changed); no host sync inside either training loop (sync debug mode
'error'); fused Adam; one compiled step; the peak memory of fine-tuning ViT-B/32 + head at batch 128 in
bfloat16; two NCCL processes equal one where 2 GPUs exist.
"""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import contrastive
import data
import models
import regress
from harness import runs
from tools import demo
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
           patch_size=32)


@pytest.fixture(scope='module')
def full_clip(demo_root, tmp_path_factory):
    """a CLIP with ViT-B/32's full-size image tower, random weights"""
    corpus = [c.strip() for c in open(os.path.join(demo_root, 'captions.txt')) if c.strip()]
    folder = str(tmp_path_factory.mktemp('b32') / 'clip')
    demo.make_tiny('clip', folder, corpus, projection_dim=512, vision_config=B32)
    return folder


def test_towers_on_cuda_equal_cpu_float32(full_clip):
    torch.backends.cuda.matmul.allow_tf32 = False  # a float32 comparison, not TF32's 10-bit mantissa
    torch.backends.cudnn.allow_tf32 = False
    clip = data.load_encoder(full_clip)[0]
    g = torch.Generator().manual_seed(0)
    px = torch.randn(4, 3, 224, 224, generator=g)
    ids = torch.randint(0, clip.config.text_config.vocab_size - 2, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cpu = clip.visual(px), clip.text(ids, mask)
        clip.cuda()
        gpu = clip.visual(px.cuda()), clip.text(ids.cuda(), mask.cuda())
    for a, b in zip(cpu, gpu):
        assert (a - b.cpu()).abs().max().item() < 1e-4


def weights(folder):
    return runs.read_state(os.path.join(folder, 'checkpoint.pt'))['model']


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
@pytest.mark.parametrize('compile_', [False, True])
def test_contrastive_step(dtype, compile_, demo_root, tiny_models, tmp_path):
    if compile_ and dtype == 'float16':
        pytest.skip("one compiled step is enough")
    before = data.load_encoder(tiny_models['clip'])[0].state_dict()
    argv = ['--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(tmp_path), '--batch-size', '6',
            '--lr', '1e-3', '--epochs', '1', '--max-steps', '2', '--dtype', dtype] + (['--compile'] if compile_ else [])
    res = contrastive.train(contrastive.parse_args(argv))
    assert res['dtype'] == dtype and math.isfinite(res['epochs'][1]['test_loss'])
    after = weights(tmp_path)
    assert any(not torch.equal(after[k].cpu(), v) for k, v in before.items())  # the steps changed the weights
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_regress_fine_tuning_step(dtype, demo_root, tiny_models, tmp_path):
    res = regress.main(['--data', demo_root, '--out', str(tmp_path), '--strategy', '4', '--modality', 'vision',
                        '--checkpoint', tiny_models['clip'], '--folds', '2', '--epochs', '1', '--batch-size', '16',
                        '--lr', '1e-3', '--dtype', dtype])
    assert res['dtype'] == dtype and all(math.isfinite(r) for r in res['srcc_folds'])
    tuned = data.load_encoder(str(tmp_path / 'fold0' / 'encoder'))[0].state_dict()
    start = data.load_encoder(tiny_models['clip'])[0].state_dict()
    assert any(not torch.equal(tuned[k], start[k]) for k in start if k.startswith('visual.'))


def armed(monkeypatch, in_loop, after_loop):
    """torch.cuda.set_sync_debug_mode('error') from each call of in_loop (module or class, name: called in every
    step of the inner loop) to the next call of after_loop (what an epoch does after its last step): a host sync
    inside the loop, after the first step's optimizer step, raises. -> the list of the steps run armed"""
    calls = []

    def arm(f):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode('error')
            calls.append(f.__name__)
            return f(*args, **kwargs)
        return wrapped

    def disarm(f):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode('default')
            return f(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(*in_loop, arm(getattr(*in_loop)))
    monkeypatch.setattr(*after_loop, disarm(getattr(*after_loop)))
    return calls


def test_the_training_loops_never_wait_for_the_host(demo_root, tiny_models, tmp_path):
    try:
        with pytest.MonkeyPatch.context() as m:
            steps = armed(m, (torch.amp.GradScaler, 'step'), (contrastive, 'test_loss'))
            argv = ['--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(tmp_path / 'fclip'),
                    '--batch-size', '6', '--lr', '1e-3', '--epochs', '1', '--max-steps', '5', '--log-every', '1e9']
            contrastive.train(contrastive.parse_args(argv))
            assert len(steps) == 5  # every step of epoch 1 ran armed
        for strategy, modality in ((4, 'vision'), (4, 'text'), (3, 'vision')):  # fine-tuned; frozen, embedded once
            with pytest.MonkeyPatch.context() as m:
                steps = armed(m, (torch.amp.GradScaler, 'step'), (torch.Tensor, 'tolist'))  # the epoch's one read
                regress.main(['--data', demo_root, '--out', str(tmp_path / f's{strategy}-{modality}'), '--strategy',
                              str(strategy), '--modality', modality, '--checkpoint', tiny_models['clip'], '--folds',
                              '2', '--epochs', '1', '--batch-size', '8', '--lr', '1e-3'])
                assert len(steps) >= 4, (strategy, modality, steps)
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_fused_adam_matches_the_loop_implementation():
    torch.manual_seed(0)
    w = [torch.randn(64, 64, device='cuda', requires_grad=True) for _ in range(2)]
    ref = [p.detach().clone().requires_grad_() for p in w]
    fused, loop = torch.optim.Adam(w, lr=1e-3, fused=True), torch.optim.Adam(ref, lr=1e-3, foreach=False)
    for _ in range(3):
        for params, opt in ((w, fused), (ref, loop)):
            (params[0] @ params[1]).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(w, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fine_tuning_vit_b32_memory_at_batch_128(full_clip):
    clip = data.load_encoder(full_clip)[0].cuda()
    enc = models.encoder_for(clip, 'vision')  # as regress.py gives it to the Regressor
    net = models.Regressor(enc, clip.visual.embed_dim, trainable=True).cuda().train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-6, fused=True)
    scaler = torch.amp.GradScaler('cuda', enabled=False)  # bfloat16 needs none, as the scripts set it
    px, target = torch.randn(128, 3, 224, 224, device='cuda'), torch.rand(128, device='cuda')
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second step holds Adam's state too
        with torch.autocast('cuda', torch.bfloat16):
            pred = net(px)
        loss = torch.nn.functional.mse_loss(pred, target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"\npeak memory, fine-tuning ViT-B/32 + head, batch 128, bfloat16 autocast: {peak:.2f} GiB "
          f"on {torch.cuda.get_device_name()}")
    assert math.isfinite(loss.item()) and peak < 24


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_processes_equal_one(demo_root, tiny_models, tmp_path):
    flags = ['--data', demo_root, '--strategy', '4', '--modality', 'text', '--checkpoint', tiny_models['clip'],
             '--epochs', '2', '--patience-start', '1', '--batch-size', '16', '--lr', '1e-3', '--folds', '2',
             '--dtype', 'float32']
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                           f'--master_port={port}', os.path.join(ROOT, 'regress.py'), *flags,
                           '--out', str(tmp_path / 'ddp')], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two = json.load(open(tmp_path / 'ddp' / 'results.json'))
    one = regress.main([*flags, '--out', str(tmp_path / 'one')])
    assert two['srcc_folds'] == pytest.approx(one['srcc_folds'], abs=1e-4)  # TF32 and reduction order differ
