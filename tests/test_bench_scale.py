"""
tests/bench_scale.py (issue 37) at a tiny N, so that it cannot rot: 24 videos of 64x48, tiny models, 3 epochs a
head, one stage of each kind. Every stage prints a row with its time and peak memory, in the table on stdout and
in the markdown report; a stage's memory is its own process's, its disk what it added. The benchmark itself
(1,000 and 10,000 videos) is a script, not a test.

    python -m pytest tests/test_bench_scale.py -x -q
"""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

import bench_scale

N = 24
STAGES = ['dataset', 'models', 'frames-clip', 'captions-distilbert', 'pairs', 'embed-s3-vision', 'head-s3-vision',
          'embed-s1-text', 'head-s1-text', 'fusion', 'ci']


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    """(stdout, the report, the work folder) of one tiny run"""
    tmp = tmp_path_factory.mktemp('bench_scale')
    argv = [sys.executable, bench_scale.__file__, '--videos', N, '--resolution', '64x48', '--distinct', 3, '--tiny',
            '--head-epochs', 3, '--stages', 'frames-clip', 'captions-distilbert', 'pairs', 's3-vision', 's1-text',
            'fusion', 'ci', '--workdir', tmp / 'work', '--keep', '--report', tmp / 'report.md']
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout, (tmp / 'report.md').read_text(), tmp / 'work'


def table(text):
    """stage -> its cells (time, per video, peak RSS, anon peak, disk, cpu, notes) from the markdown table in text"""
    lines = [line for line in text.splitlines() if line.startswith('| ')]
    assert lines[0].startswith('| stage | time (s) | per video (ms) | peak RSS (MB) |'), lines[:1]
    cells = [[c.strip() for c in line.strip('|').split(' | ')] for line in lines[1:]]
    return {c[0]: c[1:] for c in cells}


def test_every_stage_printed_a_time_and_a_peak_memory(bench):
    stdout, report, _ = bench
    for text in (stdout, report):
        rows = table(text)
        assert list(rows) == STAGES
        for stage, (seconds, per_video, rss, anon, disk, cpu, notes) in rows.items():
            assert float(seconds) > 0 and float(cpu) > 0, stage
            assert float(per_video) == pytest.approx(1e3 * float(seconds) / N, abs=1e3 * 0.05 / N + 0.01), stage
            assert float(rss) > 50, stage  # a Python process that imports torch holds more
            assert sys.platform != 'linux' or 0 < float(anon) <= float(rss), stage
            assert float(disk) >= 0, stage
            assert 'FAILED' not in notes, stage
    for stage in STAGES:  # a line as each stage ends, too
        assert re.search(rf"^== {stage}: [\d.]+ s, [\d.]+ ms a video, peak RSS \d+ MB", stdout, re.M), stage
    assert f"instruction set {torch.backends.cpu.get_cpu_capability()}" in report
    assert f"torch {torch.__version__}" in report


def test_what_each_stage_did(bench):
    _, report, work = bench
    rows = table(report)
    notes = {stage: cells[-1] for stage, cells in rows.items()}
    labelled = sum(bench_scale.split_sizes(N)[:2])
    assert f"{N} videos, 3 distinct clips of 64x48 at 30 fps" in notes['dataset']
    assert f"{N}/{N} videos" in notes['frames-clip']
    assert f"{N} videos x 5 captions" in notes['captions-distilbert']
    assert f"{labelled} train+val videos" in notes['pairs'] and f"{labelled * 15} pairs" in notes['pairs']
    assert f"embeddings of {N * 3} vision items" in notes['embed-s3-vision']  # the test videos' too
    assert f"embeddings of {N * 5} text items" in notes['embed-s1-text']
    for run in ('s3-vision', 's1-text'):  # the head's run embeds nothing: its features come from the cache
        assert 'epochs per fold [3, 3, 3, 3, 3]' in notes[f'head-{run}']
        assert 'embeddings of' not in notes[f'head-{run}']
        assert os.path.isfile(work / 'runs' / run / 'predictions.csv')
    assert 'fused' in notes['fusion'] and 'SRCC' in notes['ci']
    assert float(rows['frames-clip'][4]) > 0  # the frame cache's disk
    # every stage's caches in WORKDIR/cache (FCLIP_CACHE), none in the dataset's folder
    assert glob.glob(str(work / 'cache' / 'frames-clip-32px-3f-*.npy'))
    assert len(glob.glob(str(work / 'cache' / 'features-*.npy'))) == 2
    assert not glob.glob(str(work / 'data' / '*cache*'))


def test_a_stage_s_memory_and_disk_are_its_own(tmp_path):
    """os.wait4 gives each child's own peak: a small stage after a large one is not given the large one's
    (getrusage(RUSAGE_CHILDREN) would); disk counts allocated blocks, a hard link once"""
    env = dict(os.environ)
    big = bench_scale.measure([sys.executable, '-c', "import time; x = b'1' * 300_000_000; time.sleep(0.5)"],
                              env, tmp_path / 'big.log', echo=False)
    small = bench_scale.measure([sys.executable, '-c', "print('hello')"], env, tmp_path / 'small.log', echo=False)
    assert big['rc'] == small['rc'] == 0
    assert big['rss'] > 300e6 > 100e6 > small['rss']
    assert sys.platform != 'linux' or big['anon'] > 300e6
    assert small['lines'][0][1] == 'hello' and (tmp_path / 'small.log').read_text() == 'hello\n'
    failed = bench_scale.measure([sys.executable, '-c', 'raise SystemExit(3)'], env, tmp_path / 'f.log', echo=False)
    assert failed['rc'] == 3
    folder = tmp_path / 'disk'
    folder.mkdir()
    before = bench_scale.disk_bytes(folder)
    (folder / 'a').write_bytes(os.urandom(5_000_000))
    os.link(folder / 'a', folder / 'b')
    assert 5_000_000 <= bench_scale.disk_bytes(folder) - before < 5_200_000


def test_stages_bring_what_they_read():
    args = bench_scale.parse_args(['--videos', '300'])
    stages = bench_scale.plan(args, '/work', 210, {'clip': 224, 'vit': 224})
    assert bench_scale.picked(stages, ['pairs']) == ['dataset', 'pairs']
    assert bench_scale.picked(stages, ['s3-vision']) == ['dataset', 'models', 'frames-clip', 'embed-s3-vision',
                                                         'head-s3-vision']
    assert bench_scale.picked(stages, ['fusion']) == ['dataset', 'models', 'frames-vit', 'captions-distilbert',
                                                      'embed-s1-vision', 'head-s1-vision', 'embed-s1-text',
                                                      'head-s1-text', 'fusion']
    assert bench_scale.picked(stages, ['all']) == list(stages)
    with pytest.raises(bench_scale.runs.UserError, match="--stages frame: no such stage"):
        bench_scale.picked(stages, ['frame'])
    # Table 6's batch sizes where a fold holds enough rows, halved where not (300 videos: 168 a fold)
    assert stages['head-s3-vision'][0][stages['head-s3-vision'][0].index('--batch-size') + 1] == '256'
    assert bench_scale.batch_size(3, 'vision', 7000) == 1024 and bench_scale.batch_size(3, 'text', 7000) == 4096
    assert bench_scale.batch_size(1, 'text', 210) == 512
