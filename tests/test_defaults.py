"""
Every default that the paper gives, read from each script's parser (one table), and each script's --help
saying where a default comes from:

    python -m pytest tests/test_defaults.py -q
"""
import subprocess
import sys

import pytest

import contrastive
import data
import evaluate
import regress
from regress import STRATEGIES
from tools import demo, predict, report

# the paper's Table 6 (lr, batch size) and Table 3 (encoders), written out here as the paper prints them
TABLE6 = {(1, 'vision'): (2e-3, 1024), (1, 'text'): (1e-3, 512), (2, 'vision'): (3e-5, 128),
          (2, 'text'): (1e-5, 256), (3, 'vision'): (1e-3, 1024), (3, 'text'): (1e-3, 4096),
          (4, 'vision'): (2e-6, 128), (4, 'text'): (2e-6, 256), (5, 'vision'): (1e-3, 2048),
          (5, 'text'): (2e-3, 512), (6, 'vision'): (2e-6, 128), (6, 'text'): (3e-6, 512)}
TABLE3 = {(s, 'vision'): 'google/vit-base-patch32-224-in21k' for s in (1, 2)} | {
    (s, 'text'): 'distilbert-base-uncased' for s in (1, 2)} | {
    (s, m): 'openai/clip-vit-base-patch32' for s in (3, 4) for m in ('vision', 'text')}

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
    parse = script.parse_args
    assert getattr(parse(argv), attr) == value, where


@pytest.mark.parametrize('strategy, modality', [(s, m) for s in range(1, 7) for m in ('vision', 'text')])
def test_regress_defaults_are_table6_and_table3(strategy, modality):
    args = regress.parse_args(['--strategy', str(strategy), '--modality', modality])
    row = STRATEGIES[strategy]
    lr, sizes = row.lr[modality], row.batch_sizes(modality, args.batch_size)
    assert (lr, sizes) == (TABLE6[strategy, modality][0], [TABLE6[strategy, modality][1]])
    assert row.encoder(modality) == TABLE3.get((strategy, modality), regress.FCLIP)


@pytest.mark.parametrize('script', ['contrastive.py', 'regress.py'])
def test_help_says_where_each_default_comes_from(script):
    out = subprocess.run([sys.executable, script, '--help'], capture_output=True, text=True, timeout=60).stdout
    out = ' '.join(out.split())  # argparse wraps lines
    for phrase in ('paper 4.3', 'ours', 'does not clip' if script == 'contrastive.py' else 'no clipping'):
        assert phrase in out, (script, phrase)


# every script's --help (tools/demo.py's per subcommand), read from its parser in this process
HELP = {'data.py': data.main, 'contrastive.py': contrastive.parse_args, 'regress.py': regress.parse_args,
        'evaluate.py': evaluate.main, 'tools/predict.py': predict.parse_args, 'tools/report.py': report.main,
        'tools/demo.py dataset': lambda a: demo.parse_args(['dataset', *a]),
        'tools/demo.py models': lambda a: demo.parse_args(['models', *a])}


@pytest.mark.parametrize('name', HELP)
def test_help_shows_no_empty_default(name, capsys):
    # a required flag, an on/off switch or a None says nothing by its default: runs.HelpFormatter leaves it out
    with pytest.raises(SystemExit) as e:
        HELP[name](['--help'])
    out = ' '.join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert e.value.code == 0 and '(default: ' in out  # the other defaults are still shown
    assert '(default: None)' not in out and '(default: False)' not in out and '(default: True)' not in out


def test_data_help_names_its_flags_without_empty_defaults():
    out = subprocess.run([sys.executable, 'data.py', '--help'], capture_output=True, text=True, timeout=60).stdout
    out = ' '.join(out.split())
    assert '--data DIR Memento10k folder (official or MediaEval layout) --prepare decode' in out
    assert '(default: None)' not in out and '(default: False)' not in out and '(paper 4.2: 224) (default: 224)' in out


BAD_VALUES = [
    (contrastive, ['--batch-size', '1'], '--batch-size: expected a number >= 2, found 1'),  # no negatives: loss 0
    (contrastive, ['--plateau-factor', '2'], '--plateau-factor: expected a number >= 0 and < 1, found 2'),
    (contrastive, ['--grad-clip', '-1'], '--grad-clip: expected a number >= 0, found -1'),
    (regress, ['--strategy', '2', '--modality', 'text', '--grad-clip', 'x'], "--grad-clip: expected a number, found 'x'"),
    (regress, ['--strategy', '2', '--modality', 'text', '--epochs', '1.5'],
     "--epochs: expected a whole number, found '1.5'"),
    (regress, ['--strategy', '2', '--modality', 'text', '--device', 'tpu'], "--device: invalid choice: 'tpu'"),
]


@pytest.mark.parametrize('script, argv, message', BAD_VALUES, ids=[' '.join(a[-2:]) for _, a, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_the_flag(script, argv, message, capsys):
    parse = script.parse_args
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
