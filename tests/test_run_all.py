"""
run_all.sh --demo --fast from a clean folder, with extra flags and a launcher passed through; after an
edit of the code the same command reuses every step the edit does not reach and stops, in one line,
at the first it does; a real run on a machine without CUDA stops at its first GPU step; README's
commands that need only the demo, run as written against that demo.

    python -m pytest tests/test_run_all.py -q      # about three minutes on 2 cores
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import student_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_all(results, *flags, cwd=ROOT, **env):
    env = dict(os.environ, RESULTS=str(results), PYTHON=sys.executable, **env)
    return subprocess.run(['bash', os.path.join(cwd, 'run_all.sh'), *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope='module')
def fast_demo(tmp_path_factory):
    """run_all.sh --demo --fast into a fresh RESULTS/demo, FCLIP and the fine-tuned runs through a launcher
    that records its arguments, and flags passed to each stage -> (that folder, run_all's output, the launches)"""
    tmp = tmp_path_factory.mktemp('results')
    launch = tmp / 'launch'
    launch.write_text(f'#!/bin/sh\necho "$@" >> {tmp}/launches\nexec {sys.executable} "$@"\n')
    launch.chmod(0o755)
    results = tmp / 'demo'
    first = run_all(results, '--demo', '--fast', LAUNCH=str(launch), REGRESS_ARGS='--epochs 4 --verbose',
                    CONTRASTIVE_ARGS='--epochs 1')
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return results, first, (tmp / 'launches').read_text().splitlines()


def test_demo_pipeline_with_flags_and_a_launcher(fast_demo):
    results, first, launches = fast_demo
    assert 'toy dataset' in first.stdout and 'not the paper' in first.stdout  # it says plainly what the numbers are
    # the launcher ran FCLIP and the six fine-tuned runs, not the frozen ones (they embed once, on one process)
    assert sum(a.startswith('contrastive.py') for a in launches) == 1
    tuned = [re.search(r'--strategy (\d) --modality (\w+)', a).groups() for a in launches if a.startswith('regress')]
    assert sorted(tuned) == sorted((s, m) for s in '246' for m in ('vision', 'text'))
    # the flags reached each stage: FCLIP's one epoch, and the regress runs' cap of 4 epochs
    assert [e['epoch'] for e in json.load(open(results / 'fclip' / 'results.json'))['epochs']] == [0, 1]
    assert re.search(r'\| 0 \(No training\) \| – \| \d', (results / 'table5.md').read_text())
    rows = list(csv.DictReader(open(results / 'table6.csv')))
    assert len(rows) == 12, rows
    for s in range(1, 7):
        for m in ('vision', 'text'):
            res = json.load(open(results / f's{s}-{m}' / 'results.json'))
            assert (res['strategy'], res['modality'], len(res['srcc_folds'])) == (s, m, 5)
            assert res['max_epochs'] == 4 and max(res['epochs_per_fold']) <= 4
            preds = list(csv.DictReader(open(results / f's{s}-{m}' / 'predictions.csv')))
            assert preds and all(0 < float(r['prediction']) < 1 for r in preds)
    assert re.search(r'fold 0 \| epoch 4/4', first.stdout)  # --verbose reached them too
    assert (results / 'fclip' / 'model' / 'model.safetensors').exists()
    fusion = json.load(open(results / 'fusion.json'))
    assert -1 <= fusion['fused']['srcc_mean'] <= 1 and 'demo data' in fusion['note']
    assert 'demo data' in (results / 'table5.md').read_text() and 'demo data' in (results / 'table6.md').read_text()
    for png in ('fig3.png', 'curves.png'):  # the figures are promised outputs: whole PNG files
        assert (results / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and (results / png).stat().st_size > 10_000
    assert (results / 'table6.md').read_text().count('\n|') >= 13  # header rule + 12 rows
    assert not list(results.rglob('*.tmp'))  # every file written whole
    assert 'cuda' not in ' '.join(launches) and '--device cpu' in launches[0]  # the demo stays on the CPU


def test_an_edit_reuses_what_it_cannot_reach_and_stops_at_the_first_step_it_does(fast_demo, tmp_path):
    results, _, _ = fast_demo
    before = {p: p.stat().st_mtime_ns for p in results.rglob('*') if p.is_file()}
    repo = student_copy(tmp_path / 'repo', {'regress.py': [(  # the optimizer, as a student edits it
        "torch.optim.Adam(params, lr=args.lr, fused=True)",
        "torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1, fused=True)")]})
    shutil.copy(os.path.join(ROOT, 'run_all.sh'), repo)
    edited = run_all(results, '--demo', '--fast', cwd=repo, REGRESS_ARGS='--epochs 4 --verbose',
                     CONTRASTIVE_ARGS='--epochs 1')
    assert edited.returncode == 2, edited.stdout[-3000:] + edited.stderr[-3000:]
    # the steps before are reused in seconds (no file written), FCLIP included: the edit cannot reach it
    assert re.search(r'fclip: finished by an earlier run of these inputs .*reused', edited.stdout), edited.stdout
    assert '== strategy 1 vision (Table 6)' in edited.stdout and '== strategy 1 text' not in edited.stdout
    lines = edited.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith('regress.py: error:') and 'regress.py:train_fold edited' in lines[0]
    assert f'delete {results}/s1-vision' in lines[0] and "step 'strategy 1 vision (Table 6)' refused" in lines[1]
    assert 'RESULTS=' in lines[1]
    after = {p: p.stat().st_mtime_ns for p in results.rglob('*') if p.is_file()}
    assert after == before  # nothing of the old runs touched, nothing new beside them


def test_a_real_run_asks_for_a_gpu_and_says_so_in_one_line(fast_demo, tmp_path):
    results, _, _ = fast_demo
    r = run_all(tmp_path / 'real', str(results / 'data'))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[0]
    assert line.startswith('contrastive.py: error: --device cuda:') and 'torch.cuda.is_available() is False' in line
    assert "step 'FCLIP: contrastive adaptation (Table 5)' refused" in r.stderr


def test_default_results_folders(tmp_path):
    shutil.copy(os.path.join(ROOT, 'run_all.sh'), tmp_path)  # it runs from its own folder: here, with no scripts
    env = {k: v for k, v in os.environ.items() if k not in ('RESULTS', 'FCLIP_CACHE')}
    for flags, folder in ((['--demo'], 'demo'), (['--demo', '--fast'], 'demo-fast')):
        r = subprocess.run(['bash', 'run_all.sh', *flags], cwd=tmp_path, env=dict(env, PYTHON='false'),
                           capture_output=True, text=True)
        assert r.returncode == 1 and "step 'demo dataset' failed" in r.stderr, r.stdout + r.stderr
        assert f'dataset results/{folder}/data' in r.stdout


def test_failing_step_is_named(tmp_path):
    two = subprocess.run(['bash', os.path.join(ROOT, 'run_all.sh'), 'a', 'b'], cwd=ROOT, capture_output=True, text=True)
    assert two.returncode == 2 and 'one dataset folder, found a and b' in two.stderr
    bad = subprocess.run(['bash', os.path.join(ROOT, 'run_all.sh'), str(tmp_path / 'missing')], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert bad.returncode != 0 and 'is not a folder' in bad.stderr
    empty = tmp_path / 'empty'
    empty.mkdir()
    # given relative to the caller's folder, not the repository's
    bad = subprocess.run(['bash', os.path.join(ROOT, 'run_all.sh'), 'empty'], cwd=tmp_path, capture_output=True,
                         text=True, env=dict(os.environ, PYTHON=sys.executable, RESULTS='res'))
    assert bad.returncode == 2 and 'empty: unknown layout' in bad.stderr
    assert "step 'data summary and frame caches (CLIP's and ViT's preprocessing)' refused" in bad.stderr, bad.stderr


def test_run_all_needs_no_bash_4():
    """macOS ships bash 3.2: no associative arrays, no mapfile"""
    text = open(os.path.join(ROOT, 'run_all.sh')).read()
    assert 'declare -A' not in text and 'mapfile' not in text and 'readarray' not in text


def readme_commands():
    """-> (the commands of README's bash blocks that need nothing but command 1's demo, the others)"""
    with open(os.path.join(ROOT, 'README.md')) as f:
        blocks = re.findall(r'```bash\n(.*?)```', f.read(), re.S)
    lines = [line.strip() for b in blocks for line in b.replace('\\\n', ' ').splitlines()]
    commands = [line for line in lines if line and not line.startswith('#')]
    paths = [re.findall(r'(?<![\w/.-])((?:results|data)/[\w./*-]+)', c) for c in commands]
    demo = [c for c, p in zip(commands, paths) if p and all(x.startswith('results/demo/') for x in p)]
    return demo, [c for c in commands if c not in demo]


def test_readme_commands_work_right_after_command_1(fast_demo, tmp_path):
    """each command README prints that needs only the demo runs as written, from the repository's folder, right
    after `bash run_all.sh --demo` (here the fast demo stands in for it); any other command says on its line what
    it needs first (command 1 and 2 excepted: they are the set-up)"""
    results, _, _ = fast_demo
    demo, others = readme_commands()
    assert len(demo) >= 3, demo  # scoring videos, captions, comparing two runs
    for command in others:
        assert 'run_all.sh --demo' in command or 'pytest' in command or '  # ' in command, \
            f"README: {command!r} needs more than the demo and does not say what runs first"
    repo = student_copy(tmp_path / 'repo', {})
    os.symlink(results.parent, os.path.join(repo, 'results'))  # results/demo is the fast demo
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
    for command in demo:
        r = subprocess.run(['bash', '-c', command], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (command, r.stdout[-2000:], r.stderr[-2000:])
