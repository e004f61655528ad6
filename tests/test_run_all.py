"""
run_all.sh --demo --fast from a clean folder, then a rerun that skips every finished step; README's
commands that need only the demo, run as written against that demo.

    python -m pytest tests/test_run_all.py -q      # about a minute on 2 cores
"""
import csv
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import student_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_all(results):
    env = dict(os.environ, RESULTS=str(results), PYTHON=sys.executable)
    return subprocess.run(['bash', os.path.join(ROOT, 'run_all.sh'), '--demo', '--fast'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope='module')
def fast_demo(tmp_path_factory):
    """run_all.sh --demo --fast into a fresh RESULTS/demo -> (that folder, run_all's output)"""
    results = tmp_path_factory.mktemp('results') / 'demo'
    first = run_all(results)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return results, first


def test_demo_pipeline_then_rerun_skips(fast_demo):
    results, first = fast_demo
    assert 'toy dataset' in first.stdout and 'not the paper' in first.stdout  # it says plainly what the numbers are

    # Table 5: epoch 0 and the two demo epochs; Table 6: all 12 runs, each with 5 fold SRCCs
    table5 = (results / 'table5.md').read_text()
    assert re.search(r'\| 0 \(No training\) \| – \| \d', table5) and '| 2 |' in table5
    rows = list(csv.DictReader(open(results / 'table6.csv')))
    assert len(rows) == 12, rows
    for s in range(1, 7):
        for m in ('vision', 'text'):
            res = json.load(open(results / f's{s}-{m}' / 'results.json'))
            assert (res['strategy'], res['modality'], len(res['srcc_folds'])) == (s, m, 5)
    assert (results / 'fclip' / 'model' / 'model.safetensors').exists()
    fusion = json.load(open(results / 'fusion.json'))
    assert -1 <= fusion['fused']['srcc_mean'] <= 1
    for png in ('fig3.png', 'curves.png'):  # the figures are promised outputs: whole PNG files
        assert (results / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and (results / png).stat().st_size > 10_000
    assert (results / 'table6.md').read_text().count('\n|') >= 13  # header rule + 12 rows
    for s in range(1, 7):
        for m in ('vision', 'text'):
            preds = list(csv.DictReader(open(results / f's{s}-{m}' / 'predictions.csv')))
            assert preds and all(0 < float(r['prediction']) < 1 for r in preds)
    assert not list(results.rglob('*.tmp'))  # every file written whole

    # a rerun finds every step done and only rebuilds the tables
    before = {p: p.stat().st_mtime_ns for p in results.rglob('results.json')}
    second = run_all(results)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    skipped = re.findall(r'^== (.+): done already', second.stdout, re.M)
    assert len(skipped) == 1 + 1 + 1 + 12, second.stdout  # dataset, the tiny models, FCLIP, 12 regress runs
    assert before == {p: p.stat().st_mtime_ns for p in results.rglob('results.json')}

    # FCLIP interrupted after its last checkpoint (no results.json yet): a rerun continues it, not refuses it
    (results / 'fclip' / 'results.json').unlink()
    third = run_all(results)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert 'resumed from' in third.stdout and (results / 'fclip' / 'results.json').exists()

    # the full demo into the fast demo's folder would skip every step and keep the small runs: refused
    env = dict(os.environ, RESULTS=str(results), PYTHON=sys.executable)
    full = subprocess.run(['bash', os.path.join(ROOT, 'run_all.sh'), '--demo'], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert full.returncode == 2 and 'holds runs made with other settings' in full.stderr, full.stderr


def test_default_results_folders(tmp_path):
    import shutil
    shutil.copy(os.path.join(ROOT, 'run_all.sh'), tmp_path)  # it runs from its own folder: here, with no scripts
    env = {k: v for k, v in os.environ.items() if k != 'RESULTS'}
    for flags, folder in ((['--demo'], 'demo'), (['--demo', '--fast'], 'demo-fast')):
        r = subprocess.run(['bash', 'run_all.sh', *flags], cwd=tmp_path, env=dict(env, PYTHON='false'),
                           capture_output=True, text=True)
        assert r.returncode == 1 and "step 'demo dataset' failed" in r.stderr, r.stdout + r.stderr
        settings = (tmp_path / 'results' / folder / 'run_all.settings').read_text()
        assert settings.startswith(f'data=results/{folder}/data')


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
    assert bad.returncode != 0
    assert "step 'data summary and frame caches (CLIP and ViT preprocessing)' failed" in bad.stderr, bad.stderr


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
    """each command README prints that needs only the demo runs as written, from the repository's
    folder, right after `bash run_all.sh --demo` (here the fast demo stands in for it); any other
    command says on its line what it needs first (command 1 and 2 excepted: they are the set-up)"""
    results, _ = fast_demo
    demo, others = readme_commands()
    assert len(demo) >= 3, demo  # scoring videos, captions, drawing maps
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

