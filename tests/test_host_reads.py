"""
The GPU never waits for the host: no training loop reads a tensor's value once per step. On a GPU each such read
(Tensor.item, .cpu(), .tolist(), float(t), bool(t), int(t)) makes the host wait until the device has finished
the step, so the next batch is never prepared while the step runs. This test needs no GPU: it counts the reads
of a whole run of each stage twice, once with 3-4x the steps of the other (stage 1: --max-steps, stage 2: the batch
size). The counts must be equal: a constant per epoch, whatever the number of steps (progress lines, which read
the loss, are switched off).
tests/test_cuda.py runs the same loops under torch.cuda.set_sync_debug_mode('error') where a GPU is present.

    python -m pytest tests/test_host_reads.py -q
"""
import collections
import math
import os
import sys

import pytest
import torch

import contrastive
import data
import regress
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READS = ('item', 'cpu', 'tolist', '__float__', '__bool__', '__int__', '__index__')
# the files of this repository that a run executes (torch's own internals are not the loop's)
OURS = ('contrastive.py', 'regress.py', 'data.py', 'models.py', 'evaluate.py')


def count_reads(monkeypatch, run):
    """run() with every tensor read on the host counted -> {where: count}, where = the calling file (relative to
    the repository when it is ours) and line"""
    counts = collections.Counter()

    def counting(name, method):
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            counts[f"{os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno} {name}"] += 1
            return method(self, *args, **kwargs)
        return read
    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        run()
    return counts


def repo_only(counts):
    """the reads made by this repository's code: the scripts and harness/"""
    return {k: n for k, n in counts.items() if k.split(':')[0] in OURS
            or os.path.dirname(k.split(':')[0]) == 'harness'}


def test_stage1_reads_nothing_per_step(demo_root, tiny_models, tmp_path, monkeypatch):
    results = {}

    def run(steps):
        return lambda: results.setdefault(steps, contrastive.train(contrastive.parse_args([
            '--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(tmp_path / str(steps)), '--lr',
            '1e-3', '--batch-size', '6', '--max-steps', str(steps), '--epochs', '2', '--log-every', '1e9'])))
    many, few = count_reads(monkeypatch, run(12)), count_reads(monkeypatch, run(3))
    exports = {steps: exported(r['epochs']) for steps, r in results.items()}
    assert exports[12] == exports[3], exports  # an export reads every tensor: as many in both runs
    assert sum(many.values()) == sum(few.values()), (many - few, repo_only(many))
    ours = repo_only(many)
    # epochs 0-2: the test loss, the skipped steps and the temperature each, the training loss of epochs 1 and 2
    assert sum(n for k, n in ours.items() if k.startswith('contrastive.py:')) == 11, ours
    # and each export copies every tensor of the model to the host (checkpoints.hf_files), nothing else of ours
    n_tensors = len(data.load_encoder(tiny_models['clip'])[0].state_dict())
    assert sum(n for k, n in ours.items() if not k.startswith('contrastive.py:')) == n_tensors * len(exports[12]), ours


def exported(epochs):
    """the epochs whose model contrastive.py exported: each of a lower test loss than every one before"""
    best, out = math.inf, []
    for e in epochs:
        if e['test_loss'] < best:
            best, out = e['test_loss'], out + [e['epoch']]
    return out


@pytest.mark.parametrize('strategy', [4, 3])  # fine-tuned, and frozen (features computed once)
def test_stage2_reads_nothing_per_step(strategy, demo_root, tiny_models, tmp_path, monkeypatch):
    def run(batch, out):
        return lambda: regress.main(['--data', demo_root, '--out', str(tmp_path / out), '--strategy', str(strategy),
                                     '--modality', 'text', '--checkpoint', tiny_models['clip'], '--folds', '2',
                                     '--epochs', '2', '--patience-start', '2', '--batch-size', str(batch),
                                     '--lr', '1e-3'])
    run(32, 'warm')()  # the caches, built once, read what they read on any run
    many, few = count_reads(monkeypatch, run(8, 'b8')), count_reads(monkeypatch, run(32, 'b32'))
    assert sum(many.values()) == sum(few.values()), (many - few, repo_only(many))
