"""
A result never outlives the code that made it: each test edits a copy of the repository as a student would, then
runs the same command on the same --out. The edit is refused naming the file (or the flag), never answered with
the old folds; an edit that changes nothing the code does (a comment, a reflowed line) keeps them; a frozen
encoder's features are reused after an edit that cannot change them.

    python -m pytest tests/test_student_edits.py -q
"""
import os
import subprocess
import sys

import pytest

from conftest import student_copy
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ['--folds', '2', '--epochs', '2', '--patience-start', '1', '--patience', '1', '--batch-size', '16',
         '--lr', '1e-3']

# one edit per file, as a student makes it: what each changes is part of every result regress.py gives
EDITS = {
    'regress.py': ("    optimizer = torch.optim.Adam(params, lr=lr, fused=True)",
                   "    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, fused=True)"),
    'training.py': ("            self.improved = value > self.best if self.mode == 'max' else value < self.best",
                    "            self.improved = value >= self.best if self.mode == 'max' else value <= self.best"),
    'evaluate.py': ("    mean = np.bincount(inverse, weights=pred) / np.bincount(inverse)",
                    "    mean = np.array([np.median(pred[inverse == v]) for v in range(len(uniq))])"),
    'strategies.py': ("dict(vision=2e-3, text=1e-3), dict(vision=1024, text=512)",  # Table 6's lr of strategy 1
                      "dict(vision=2e-3, text=3e-3), dict(vision=1024, text=512)"),
}


def regress(repo, out, cache, tiny_models, demo_root, *extra):
    """regress.py from the copy `repo`: strategy 1 (frozen) on the captions, 2 folds of 2 epochs"""
    return subprocess.run([sys.executable, 'regress.py', '--data', demo_root, '--out', str(out), '--cache', str(cache),
                           '--strategy', '1', '--modality', 'text', '--checkpoint', tiny_models['distilbert'],
                           *QUICK, *extra], cwd=repo, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def finished(tmp_path_factory, demo_root, tiny_models):
    """a finished run of the unchanged code, and the feature cache it filled: -> (out, cache, its printout)"""
    root = tmp_path_factory.mktemp('finished')
    r = regress(ROOT, root / 'run', root / 'cache', tiny_models, demo_root)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / 'run', root / 'cache', r.stdout


def snapshot(folder):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs}


@pytest.mark.parametrize('file', sorted(EDITS))
def test_an_edit_of_any_file_the_script_runs_is_refused_naming_it(file, finished, tmp_path, demo_root, tiny_models):
    out, cache, _ = finished
    repo = student_copy(tmp_path / 'repo', {file: [EDITS[file]]})
    before = snapshot(out)
    r = regress(repo, out, cache, tiny_models, demo_root)
    assert r.returncode == 2 and 'finished by an earlier run' not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip()
    assert '\n' not in line and f"({file} edited)" in line and f"give another --out, or delete {out}" in line, line
    assert snapshot(out) == before  # nothing of the old run touched, no new fold beside the old ones


def test_a_new_flag_is_part_of_the_identity(finished, tmp_path, demo_root, tiny_models):
    out, cache, _ = finished
    # a flag added without a word anywhere else: the run that sets it is not the run that did not have it
    repo = student_copy(tmp_path / 'repo', {'regress.py': [(
        "    p.add_argument('--verbose',",
        "    p.add_argument('--weight-decay', type=float, default=0.0, help=\"Adam's L2 penalty\")\n"
        "    p.add_argument('--verbose',")]})
    r = regress(repo, out, cache, tiny_models, demo_root, '--weight-decay', '0.1')
    assert r.returncode == 2 and '--weight-decay: None then, 0.1 now' in r.stderr, r.stderr[-2000:]


def test_a_comment_or_a_reflowed_line_keeps_the_finished_folds(finished, tmp_path, demo_root, tiny_models):
    out, cache, _ = finished
    repo = student_copy(tmp_path / 'repo', {'regress.py': [(
        "    optimizer = torch.optim.Adam(params, lr=lr, fused=True)",
        "    # the paper's optimizer (4.3.1), as a student notes it\n"
        "    optimizer = torch.optim.Adam(params,\n"
        "                                 lr=lr, fused=True)")]})
    r = regress(repo, out, cache, tiny_models, demo_root)
    assert r.returncode == 0 and r.stdout.count('finished by an earlier run') == 2, r.stdout[-2000:] + r.stderr


def test_a_frozen_run_reuses_its_features_after_an_edit_of_the_optimizer(finished, tmp_path, demo_root,
                                                                         tiny_models):
    out, cache, printout = finished
    assert 'embedded' in printout  # the first run computed them
    features = sorted(f for f in os.listdir(cache) if f.startswith('features-'))
    repo = student_copy(tmp_path / 'repo', {'regress.py': [EDITS['regress.py']]})
    r = regress(repo, tmp_path / 'new', cache, tiny_models, demo_root)  # the edited code, in a new --out
    assert r.returncode == 0 and 'embedded' not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(f for f in os.listdir(cache) if f.startswith('features-')) == features
    assert 'finished by an earlier run' not in r.stdout  # every fold trained anew, with AdamW


def test_an_edit_of_models_py_embeds_the_features_anew(finished, tmp_path, demo_root, tiny_models):
    out, cache, _ = finished
    repo = student_copy(tmp_path / 'repo', {'models.py': [(  # the [CLS] state, scaled: another feature
        "        if self.pooling == 'cls':\n            return x[:, 0]",
        "        if self.pooling == 'cls':\n            return 2 * x[:, 0]")]})
    r = regress(repo, tmp_path / 'new', cache, tiny_models, demo_root)
    assert r.returncode == 0 and 'embedded' in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_contrastive_resume_after_an_edit_is_refused_naming_it(tmp_path, demo_root, tiny_models):
    flags = ['--data', demo_root, '--checkpoint', tiny_models['clip'], '--out', str(tmp_path / 'fclip'),
             '--batch-size', '6', '--lr', '1e-3', '--resume']
    first = subprocess.run([sys.executable, 'contrastive.py', *flags, '--epochs', '1'], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    repo = student_copy(tmp_path / 'repo', {'contrastive.py': [(  # the symmetric loss made one-sided
        "    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2",
        "    return F.cross_entropy(logits, target)")]})
    r = subprocess.run([sys.executable, 'contrastive.py', *flags, '--epochs', '2'], cwd=repo, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and '(contrastive.py edited)' in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    same = subprocess.run([sys.executable, 'contrastive.py', *flags, '--epochs', '2'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # a higher --epochs on the same code continues the run
    assert same.returncode == 0 and 'resumed from' in same.stdout, same.stdout[-2000:] + same.stderr[-2000:]
