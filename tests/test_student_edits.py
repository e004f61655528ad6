"""
A result never outlives the code that made it (issue 35): each test edits a copy of the repository as a student
would, then runs the same command on the same --out. An edit of what computes the result is refused in one line
naming the function (or the flag), never answered with the old run; an edit that changes nothing the code does (a
comment, a reflowed line) or that computes no part of it (a figure, the progress line) keeps the finished run; a
frozen encoder's features are reused after an edit that cannot change them, and computed anew after one that can,
as the frames are after an edit of their preprocessing or a video repaired on disk.

    python -m pytest tests/test_student_edits.py -q
"""
import ast
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import student_copy
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ['--folds', '2', '--epochs', '2', '--patience-start', '1', '--patience', '1', '--batch-size', '16',
         '--lr', '1e-3']

# edits as a student makes them, each in its file -> the function the refusal names
EDITS = {
    'regress.py:train_fold': ('regress.py', "torch.optim.Adam(params, lr=args.lr, fused=True)",
                              "torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1, fused=True)"),
    'regress.py:STRATEGIES': ('regress.py', "dict(vision=2e-3, text=1e-3), dict(vision=1024, text=512)",
                              "dict(vision=2e-3, text=3e-3), dict(vision=1024, text=512)"),  # Table 6's lr, 1
    'data.py:fuse': ('data.py', "    mean = np.bincount(inverse, weights=np.asarray(pred, dtype=np.float64)) "
                                "/ np.bincount(inverse)",
                     "    mean = np.array([np.median(np.asarray(pred)[inverse == v]) for v in range(len(uniq))])"),
    # shared with contrastive.py, in the key of every run of regress.py, whatever its --lr
    'harness/train.py:lr_range_test': ('harness/train.py', "avg = 0.9 * avg + 0.1 * loss",
                                       "avg = 0.98 * avg + 0.02 * loss"),
    'harness/train.py:encode_by_length': ('harness/train.py', "order = torch.argsort(lengths, stable=True)",
                                          "order = torch.argsort(lengths, stable=True, descending=True)"),
}
# edits of what computes no result of regress.py: the figures, the report, the progress line
KEPT = {
    'evaluate.py:fig3': ('evaluate.py', '    ax.grid(axis="y", alpha=0.3)\n',
                         '    ax.grid(axis="y", alpha=0.3)\n    ax.axhline(0, color="grey", linewidth=0.5)\n'),
    'tools/report.py:curves': ('tools/report.py', '        ax.grid(alpha=0.3)\n', '        ax.grid(alpha=0.5)\n'),
    'harness/runs.py:Progress': ('harness/runs.py', 'f"eta {hms(eta)}"]', 'f"eta {hms(eta)}", f"done {self.done}"]'),
}


def run(repo, out, cache, demo_root, *flags):
    """`python regress.py` from the copy `repo` (one thread, as a shared machine wants)"""
    return subprocess.run([sys.executable, 'regress.py', '--data', str(demo_root), '--out', str(out), '--cache',
                           str(cache), *map(str, flags), *QUICK], cwd=repo, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))


def text_flags(tiny_models):  # strategy 1 (frozen) on the captions
    return ['--strategy', 1, '--modality', 'text', '--checkpoint', tiny_models['distilbert']]


def vision_flags(tiny_models):  # strategy 3 (frozen) on the frames
    return ['--strategy', 3, '--modality', 'vision', '--checkpoint', tiny_models['clip']]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def finished(tmp_path_factory, cache, demo_root, tiny_models):
    """a finished text run of the unchanged code, and the feature cache it filled: -> (out, its printout)"""
    out = tmp_path_factory.mktemp('finished') / 'run'
    r = run(ROOT, out, cache, demo_root, *text_flags(tiny_models))
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r.stdout


@pytest.fixture(scope='module')
def finished_vision(tmp_path_factory, cache, demo_root, tiny_models):
    """a finished vision run of the unchanged code: -> (out, its printout)"""
    out = tmp_path_factory.mktemp('finished-vision') / 'run'
    r = run(ROOT, out, cache, demo_root, *vision_flags(tiny_models))
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r.stdout


def snapshot(folder):
    """every file's bytes and modification time"""
    return {os.path.join(d, f): (open(os.path.join(d, f), 'rb').read(), os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, fs in os.walk(folder) for f in fs}


def refusal(r, out):
    """the one line of a refused rerun on `out`"""
    assert r.returncode == 2 and 'finished by an earlier run' not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip()
    assert '\n' not in line and line.startswith(f'regress.py: error: {out} holds a run of other inputs ('), line
    assert line.endswith(f"give another --out, or delete {out} to start over"), line
    return line


def reused(r, out):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"{out}: finished by an earlier run of these inputs, reused" in r.stdout, r.stdout[-2000:]
    assert 'fold 0' not in r.stdout  # nothing trained


def returns(file, function):
    """the lines of `function` in `file` that return, as they are written"""
    with open(os.path.join(ROOT, file)) as f:
        text = f.read()
    [node] = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == function]
    lines = text.splitlines()
    found = [lines[n.lineno - 1] for n in ast.walk(node) if isinstance(n, ast.Return)]
    assert found and all(line.strip().startswith('return ') for line in found), found
    return found


def features(cache):
    return sorted(f for f in os.listdir(cache) if f.startswith('features-') and f.endswith('.npy'))


def predictions(out):
    with open(os.path.join(out, 'predictions.csv'), newline='') as f:
        return {r['video_id']: float(r['prediction']) for r in csv.DictReader(f)}


@pytest.mark.parametrize('name', sorted(EDITS))
def test_an_edit_of_what_the_run_computes_with_is_refused_naming_it(name, finished, cache, tmp_path, demo_root,
                                                                    tiny_models):
    out, _ = finished
    file, old, new = EDITS[name]
    repo = student_copy(tmp_path / 'repo', {file: [(old, new)]})
    before = snapshot(out)
    line = refusal(run(repo, out, cache, demo_root, *text_flags(tiny_models)), out)
    assert f"other inputs ({name} edited)" in line, line
    assert snapshot(out) == before  # nothing of the old run touched, no new fold beside the old ones


def test_a_new_flag_is_part_of_the_key(finished, cache, tmp_path, demo_root, tiny_models):
    out, _ = finished
    # a flag added without a word anywhere else: the run that sets it is not the run that did not have it
    repo = student_copy(tmp_path / 'repo', {'regress.py': [(
        "    p.add_argument('--verbose',",
        "    p.add_argument('--weight-decay', type=float, default=0.0, help=\"Adam's L2 penalty\")\n"
        "    p.add_argument('--verbose',")]})
    before = snapshot(out)
    line = refusal(run(repo, out, cache, demo_root, *text_flags(tiny_models), '--weight-decay', '0.1'), out)
    assert '--weight-decay: None then, 0.1 now' in line, line
    assert snapshot(out) == before


def test_edits_that_change_no_result_keep_the_finished_run(finished, cache, tmp_path, demo_root, tiny_models):
    # a comment, a reflowed line, a docstring; a figure's colour, the report, the progress line (no part of a
    # fold): all in one copy, so hours of training are kept
    out, _ = finished
    changes = {'regress.py': [
        ("    optimizer = torch.optim.Adam(params, lr=args.lr, fused=True)  # one kernel a step, any device",
         "    # the paper's optimizer (4.3.1), as a student notes it\n"
         "    optimizer = torch.optim.Adam(params,\n"
         "                                 lr=args.lr, fused=True)"),
        ('    """One fold (paper 4.3.1): ', '    """One fold of k (paper 4.3.1): ')]}
    for file, old, new in KEPT.values():
        changes.setdefault(file, []).append((old, new))
    repo = student_copy(tmp_path / 'repo', changes)
    before = snapshot(out)
    reused(run(repo, out, cache, demo_root, *text_flags(tiny_models)), out)
    assert snapshot(out) == before


def test_a_frozen_run_reuses_its_features_after_an_edit_of_the_optimizer(finished, cache, tmp_path, demo_root,
                                                                         tiny_models):
    out, printout = finished
    assert 'text items 200/200' in printout  # the first run computed them
    before = features(cache)
    file, old, new = EDITS['regress.py:train_fold']
    repo = student_copy(tmp_path / 'repo', {file: [(old, new)]})
    r = run(repo, tmp_path / 'new', cache, demo_root, *text_flags(tiny_models))  # the edited code, a new --out
    assert r.returncode == 0 and 'text items' not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert features(cache) == before
    assert 'finished by an earlier run' not in r.stdout and 'fold 1: val srcc' in r.stdout  # trained anew, AdamW


def test_an_edit_of_models_py_embeds_the_features_anew(finished, cache, tmp_path, demo_root, tiny_models):
    out, _ = finished
    before = features(cache)
    repo = student_copy(tmp_path / 'repo', {'models.py': [(  # TextEncoder's [CLS] state, scaled: another feature
        "        if self.pooling == 'cls':\n            return x[:, 0]",
        "        if self.pooling == 'cls':\n            return 2 * x[:, 0]")]})
    r = run(repo, tmp_path / 'new', cache, demo_root, *text_flags(tiny_models))
    assert r.returncode == 0 and 'text items 200/200' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(set(features(cache)) - set(before)) == 1
    line = refusal(run(repo, out, cache, demo_root, *text_flags(tiny_models)), out)
    assert 'models.py:TextEncoder edited' in line, line


def test_an_edit_of_the_frames_preprocessing_decodes_them_anew(finished_vision, cache, tmp_path, demo_root,
                                                               tiny_models):
    out, printout = finished_vision
    assert 'videos 40/40' in printout
    repo = student_copy(tmp_path / 'repo', {'data.py': [  # every frame data.resize_crop returns, negated
        (line, line.replace('return ', 'return 255 - ', 1)) for line in returns('data.py', 'resize_crop')]})
    r = run(repo, tmp_path / 'new', cache, demo_root, *vision_flags(tiny_models))
    assert r.returncode == 0 and 'videos 40/40' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]  # decoded anew
    srcc = [json.load(open(o / 'results.json'))['srcc_folds'] for o in (out, tmp_path / 'new')]
    assert srcc[0] != srcc[1]
    before = snapshot(out)
    line = refusal(run(repo, out, cache, demo_root, *vision_flags(tiny_models)), out)
    assert 'data.py:resize_crop edited' in line or 'frames: ' in line or 'rows: ' in line, line
    assert snapshot(out) == before


def test_a_repaired_video_is_decoded_and_joins_a_new_run(cache, tmp_path, demo_root, tiny_models):
    root = tmp_path / 'data'
    shutil.copytree(demo_root, root)
    name = json.load(open(root / 'memento_train_data.json'))[0]['filename']
    (root / 'videos' / name).write_bytes(b'not an mp4, a download cut short')
    r = run(ROOT, tmp_path / 'run', cache, root, *vision_flags(tiny_models))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    vid = name.removesuffix('.mp4')
    assert f"skipping video {vid}" in r.stdout and vid not in predictions(tmp_path / 'run')
    shutil.copy(os.path.join(demo_root, 'videos', name), root / 'videos' / name)  # the good file, downloaded again
    before = snapshot(tmp_path / 'run')
    refused = run(ROOT, tmp_path / 'run', cache, root, *vision_flags(tiny_models))
    assert 'rows: ' in refusal(refused, tmp_path / 'run')  # the frames' key holds every video's file
    assert snapshot(tmp_path / 'run') == before
    r = run(ROOT, tmp_path / 'new', cache, root, *vision_flags(tiny_models))
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'videos 40/40' in refused.stdout + r.stdout and 'skipping video' not in r.stdout  # decoded anew
    assert set(predictions(tmp_path / 'new')) == set(predictions(tmp_path / 'run')) | {vid}


def test_contrastive_resume_after_an_edit_is_refused_naming_it(tmp_path, demo_root, tiny_models):
    out = tmp_path / 'fclip'
    flags = ['--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(out), '--batch-size', '6',
             '--lr', '1e-3', '--resume']
    env = dict(os.environ, OMP_NUM_THREADS='1')

    def contrastive(repo, epochs):
        return subprocess.run([sys.executable, 'contrastive.py', *flags, '--epochs', str(epochs)], cwd=repo,
                              capture_output=True, text=True, timeout=300, env=env)
    first = contrastive(ROOT, 1)
    assert first.returncode == 0, first.stderr[-2000:]
    os.remove(out / 'results.json')  # as if it had died after its epoch-1 checkpoint
    repo = student_copy(tmp_path / 'repo', {'contrastive.py': [(  # the symmetric loss made one-sided
        "    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2",
        "    return F.cross_entropy(logits, target)")]})
    r = contrastive(repo, 2)
    assert r.returncode == 2 and '(contrastive.py:clip_loss edited)' in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert '\n' not in r.stderr.strip()
    same = contrastive(ROOT, 2)  # a higher --epochs on the same code continues the run
    assert same.returncode == 0 and 'resumed from' in same.stdout, same.stdout[-2000:] + same.stderr[-2000:]
    assert [e['epoch'] for e in json.load(open(out / 'results.json'))['epochs']] == [0, 1, 2]
