"""
Every default that the paper gives, read from each script's parser (one table), and each script's --help
saying where a default comes from:

    python -m pytest tests/test_defaults.py -q
"""
import subprocess
import sys

import pytest

import contrastive
import regress

# (script, argv, flag attribute, the paper's value, where the paper gives it)
PAPER = [
    (contrastive, [], 'batch_size', 32, '4.3'),
    (contrastive, [], 'lr', 'auto', '4.3: Smith range test over [1e-8, 1]'),
    (contrastive, [], 'patience', 6, '4.3: early stopping after six epochs'),
    (contrastive, [], 'plateau_patience', 3, '4.3: reduce on plateau, three epochs'),
    (contrastive, [], 'plateau_factor', 0.1, '4.3: by a factor of ten'),
    (contrastive, [], 'grad_clip', 0.0, '4.3: no clipping'),
    (contrastive, [], 'frames', 3, '4.1.1: first, middle, last'),
    (contrastive, [], 'checkpoint', 'openai/clip-vit-base-patch32', 'Table 3'),
    (regress, ['--strategy', '1', '--modality', 'text'], 'epochs', 200, '4.3.1'),
    (regress, ['--strategy', '1', '--modality', 'text'], 'patience', 20, '4.3.1'),
    (regress, ['--strategy', '1', '--modality', 'text'], 'patience_start', 50, '4.3.1: after the 50th epoch'),
    (regress, ['--strategy', '1', '--modality', 'text'], 'folds', 5, '4.3.1: K = 5'),
    (regress, ['--strategy', '1', '--modality', 'text'], 'frames', 3, '4.1.1'),
    (regress, ['--strategy', '1', '--modality', 'text'], 'grad_clip', 0.0, '4.3.1: no clipping'),
]


@pytest.mark.parametrize('script, argv, attr, value, where', PAPER, ids=[f"{s.__name__}.{a}" for s, _, a, _, _ in PAPER])
def test_default_is_the_papers(script, argv, attr, value, where):
    parse = getattr(script, 'parse_args', None) or script.get_args
    assert getattr(parse(argv), attr) == value, where


@pytest.mark.parametrize('strategy, modality', [(s, m) for s in range(1, 7) for m in ('vision', 'text')])
def test_regress_defaults_are_table6_and_table3(strategy, modality):
    args = regress.get_args(['--strategy', str(strategy), '--modality', modality])
    lr, sizes, _ = regress.hyperparameters(args, frozen=strategy % 2 == 1)
    assert (lr, sizes) == (regress.TABLE6[strategy, modality][0], [regress.TABLE6[strategy, modality][1]])
    if strategy < 5:
        expected = {(1, 'vision'): 'google/vit-base-patch32-224-in21k', (1, 'text'): 'distilbert-base-uncased'}.get(
            ((strategy + 1) // 2 * 2 - 1, modality), 'openai/clip-vit-base-patch32')
        assert regress.resolve_checkpoint(args) == expected


@pytest.mark.parametrize('script', ['contrastive.py', 'regress.py'])
def test_help_says_where_each_default_comes_from(script):
    out = subprocess.run([sys.executable, script, '--help'], capture_output=True, text=True, timeout=60).stdout
    out = ' '.join(out.split())  # argparse wraps lines
    for phrase in ('paper 4.3', 'ours', 'does not clip' if script == 'contrastive.py' else 'no clipping'):
        assert phrase in out, (script, phrase)


@pytest.mark.parametrize('script', ['contrastive.py', 'regress.py', 'predict.py', 'demo.py', 'data.py',
                                    'evaluate.py'])
@pytest.mark.parametrize('flag', ['--help', '--no-such-flag'])
def test_help_and_a_wrong_flag_answer_before_torch_is_imported(script, flag):
    code = (f"import runpy, sys; sys.argv = [{script!r}, {flag!r}]\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('exit', code, 'torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith(f"exit {0 if flag == '--help' else 2} torch loaded: False"), (r.stdout, r.stderr)


BAD_VALUES = [
    (contrastive, ['--batch-size', '1'], '--batch-size: expected at least 2, found 1'),  # no negatives: loss 0
    (contrastive, ['--plateau-factor', '2'], '--plateau-factor: expected a number >= 0 and < 1, found 2'),
    (contrastive, ['--grad-clip', '-1'], '--grad-clip: expected a number >= 0, found -1'),
    (regress, ['--strategy', '2', '--modality', 'text', '--grad-clip', 'x'], "--grad-clip: expected a number, found 'x'"),
]


@pytest.mark.parametrize('script, argv, message', BAD_VALUES, ids=[' '.join(a[-2:]) for _, a, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_the_flag(script, argv, message, capsys):
    parse = getattr(script, 'parse_args', None) or script.get_args
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
