"""
The GPU never waits for the host: no training loop reads a tensor's value once per step. On a GPU each such read
(Tensor.item, .cpu(), .tolist(), float(t), bool(t), int(t)) makes the host wait until the device has finished
the step, so the next batch is never prepared while the step runs. This test needs no GPU: it counts the reads
of a whole run of each stage at two batch sizes, one with 3-4x the steps of the other. The counts must be equal:
a constant per epoch, whatever the number of steps (progress lines, which read the loss, are switched off).
tests/test_cuda.py runs the same loops under torch.cuda.set_sync_debug_mode('error') where a GPU is present.

    python -m pytest tests/test_host_reads.py -q
"""
import collections

import pytest
import torch

import contrastive
import regress
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)

READS = ('item', 'cpu', 'tolist', '__float__', '__bool__', '__int__', '__index__')


def count_reads(monkeypatch, run):
    """run() with every tensor read on the host counted -> {where: count}, where = the calling file and line"""
    counts = collections.Counter()

    def counting(name, method):
        def read(self, *args, **kwargs):
            frame = __import__('sys')._getframe(1)
            counts[f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {name}"] += 1
            return method(self, *args, **kwargs)
        return read
    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        run()
    return counts


def repo_only(counts):
    """the reads made by this repository's code (torch's own internals are not the loop's)"""
    return {k: n for k, n in counts.items() if k.split(':')[0] in
            ('contrastive.py', 'regress.py', 'training.py', 'data.py', 'models.py', 'evaluate.py', 'runs.py')}


def test_stage1_reads_nothing_per_step(demo_root, tiny_models, tmp_path, monkeypatch):
    def run(batch, out):
        return lambda: contrastive.train(contrastive.parse_args([
            '--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(tmp_path / out), '--lr', '1e-3',
            '--batch-size', str(batch), '--epochs', '2', '--log-every', '1e9']))
    many, few = count_reads(monkeypatch, run(2, 'b2')), count_reads(monkeypatch, run(6, 'b6'))  # 255 and 85 steps
    assert sum(many.values()) == sum(few.values()), (many - few, repo_only(many))
    # epochs 0-2: the test loss and the temperature each, the training loss of epochs 1 and 2
    assert sum(repo_only(many).values()) == 8, repo_only(many)


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
