"""Tests for tools/predict.py's scores (tiny models, demo data, CPU): python -m pytest tests/test_predict.py -q

The maps (--maps) are tests/test_maps.py's."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import data
import evaluate
import regress
from harness import runs
from harness.runs import UserError
from tools import demo, predict
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(demo_root, tiny_models, tmp_path_factory):
    """small regress.py runs: fine-tuned vision, frozen vision, frozen text (FCLIP flag), a batch-size search"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add spin-waits on a shared machine
    out = tmp_path_factory.mktemp('runs')
    common = ['--data', demo_root, '--folds', '2', '--epochs', '2', '--patience-start', '1', '--batch-size', '16',
              '--lr', '1e-3', '--device', 'cpu']
    flags = {'s2-vision': ['--strategy', '2', '--modality', 'vision', '--checkpoint', tiny_models['vit']],
             's3-vision': ['--strategy', '3', '--modality', 'vision', '--checkpoint', tiny_models['clip']],
             's5-text': ['--strategy', '5', '--modality', 'text', '--fclip', tiny_models['clip']],
             's3-text-search': ['--strategy', '3', '--modality', 'text', '--checkpoint', tiny_models['clip'],
                                '--batch-size', '8', '32']}  # fold models in bs8/ or bs32/
    for name, f in flags.items():
        regress.main(common + f + ['--out', str(out / name)])
    yield out
    torch.set_num_threads(threads)


def scores_of_test_split(trained, run_name):
    with open(trained / run_name / 'test_predictions.csv', newline='') as f:
        return {r['video_id']: float(r['score']) for r in csv.DictReader(f)}


@pytest.mark.parametrize('run_name', ['s2-vision', 's3-vision'])
def test_videos_score_as_in_training(trained, run_name, demo_root):
    # the run's own scores of the unlabelled test videos: predict must reproduce them from the mp4s
    videos = data.load_memento(demo_root).split('test')[:3]
    scores = predict.predict(trained / run_name, videos=[v.path for v in videos])
    expected = scores_of_test_split(trained, run_name)
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)
    assert scores == pytest.approx([expected[v.video_id] for v in videos], abs=1e-5)
    # 24 videos, 72 frames: more than one batch of 64, each video still its own frames' mean
    assert predict.predict(trained / run_name, videos=[v.path for v in videos] * 8) == pytest.approx(scores * 8,
                                                                                                    abs=1e-6)


@pytest.mark.parametrize('run_name', ['s5-text', 's3-text-search'])
def test_captions_score_as_in_training(trained, run_name, demo_root):
    videos = data.load_memento(demo_root).split('test')[:2]
    scores = predict.predict(trained / run_name, captions=[' || '.join(v.captions) for v in videos])
    expected = scores_of_test_split(trained, run_name)
    assert scores == pytest.approx([expected[v.video_id] for v in videos], abs=1e-5)
    one = predict.predict(trained / run_name, captions=[videos[0].captions[0]])  # a single caption is one item
    assert len(one) == 1 and 0 < one[0] < 1 and one[0] != pytest.approx(scores[0], abs=1e-9)


def test_cli_prints_and_writes_csv(trained, demo_root, tmp_path, capsys):
    paths = [v.path for v in data.load_memento(demo_root).split('test')[:2]]
    scores = predict.main([*paths, '--model', str(trained / 's2-vision'), '--csv', str(tmp_path / 'scores.csv')])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{trained / 's2-vision'}: strategy 2 vision, ViT") and out[1] == 'score\tvideo'
    printed = [line.split('\t') for line in out[2:] if '\t' in line]
    assert [p for _, p in printed] == paths and [float(s) for s, _ in printed] == pytest.approx(scores, abs=1e-4)
    with open(tmp_path / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['video'] for r in rows] == paths and [float(r['score']) for r in rows] == pytest.approx(scores, abs=1e-5)


def test_evaluate_scores_a_runs_predictions(trained, capsys):
    # issue 40: `evaluate.py --score RUN` reads the run's predictions.csv with the default columns, and gives the
    # SRCC regress.py reports: srcc_pooled over every video, srcc_folds fold by fold
    run = trained / 's2-vision'
    results = runs.read_json(run / 'results.json')
    with open(run / 'predictions.csv', newline='') as f:
        folds = [int(row['fold']) for row in csv.DictReader(f)]
    r = evaluate.main(['--score', str(run)])
    out = capsys.readouterr().out.splitlines()
    n = results['n_videos']
    lo, hi = evaluate.fisher_ci(results['srcc_pooled'], n)
    assert r == pytest.approx(results['srcc_pooled'], abs=1e-12)
    assert out[:2] == [f"{run}: {n} videos", f"SRCC {r:.4f} ({lo:.4f}, {hi:.4f})"]
    want = []
    for k, s in enumerate(results['srcc_folds']):
        lo, hi = evaluate.fisher_ci(s, folds.count(k))
        want.append(f"  fold {k}: SRCC {s:.4f} ({lo:.4f}, {hi:.4f}), {folds.count(k)} videos")
    assert out[2:] == want
    # two runs of the same videos compare: the same true scores, matched by id
    d = evaluate.main(['--compare', str(run), str(trained / 's3-vision')])
    assert d['n'] == n and d['srcc_a'] == pytest.approx(results['srcc_pooled'], abs=1e-12)
    assert d['srcc_b'] == pytest.approx(runs.read_json(trained / 's3-vision' / 'results.json')['srcc_pooled'],
                                        abs=1e-12)


def test_evaluate_reads_real_runs(trained, tmp_path, capsys):
    # regress.py's results.json carries the strategy's Table 6 and Fig. 3 names, and no 'ci': evaluate computes it
    results = runs.read_json(trained / 's2-vision' / 'results.json')
    assert (results['name'], results['figure']) == ('Adapted Unimodal', 'Unimodal-SFT') and 'ci' not in results
    evaluate.main([str(trained), '--out', str(tmp_path)])
    md = (tmp_path / 'table6.md').read_text().splitlines()
    assert md[0] == evaluate.DEMO_NOTE  # runs on demo data say so (issue 36)
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in md[md.index(next(
        line for line in md if line.startswith('| Strategy'))) + 2:]]
    assert [r[0] for r in rows] == ['2 - Adapted Unimodal', '3 - CLIP-Based', '', '5 - FCLIP-Based']
    srcc = results['srcc_mean']
    lo, hi = evaluate.fisher_ci(srcc, results['n_videos'])
    assert rows[0][4].strip('*') == f"{srcc:.3f} ({lo:.3f}, {hi:.3f})"
    assert (tmp_path / 'fig3.png').is_file()


def test_bad_input(trained, demo_root, tmp_path):
    video = data.load_memento(demo_root).split('test')[0].path
    with pytest.raises(UserError, match='none of the 1 videos could be read'):
        predict.predict(trained / 's3-vision', videos=[str(tmp_path / 'missing.mp4')])
    with pytest.raises(UserError, match='vision run'):
        predict.predict(trained / 's3-vision', captions=['a red circle'])
    with pytest.raises(UserError, match='text run'):
        predict.predict(trained / 's5-text', videos=[video])
    with pytest.raises(UserError, match='results.json: JSON file not found'):
        predict.predict(tmp_path, videos=[video])
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(trained / 's2-vision', unfinished)
    os.remove(unfinished / 'fold1' / 'encoder' / 'model.safetensors')
    with pytest.raises(UserError, match='has no trained model.*fold1/encoder/model.safetensors is missing'):
        predict.predict(unfinished, videos=[video])
    with pytest.raises(SystemExit) as e:
        predict.main([video, '--captions', 'a caption', '--model', str(trained / 's3-vision')])
    assert e.value.code == 2


def test_a_results_json_without_a_key_names_it(trained, demo_root, tmp_path):
    video = data.load_memento(demo_root).split('test')[0].path
    run = tmp_path / 'run'
    shutil.copytree(trained / 's3-vision', run)
    results = runs.read_json(run / 'results.json')
    del results['modality']
    (run / 'results.json').write_text(json.dumps(results))
    with pytest.raises(UserError, match=r"not a finished regress.py run \(results.json kind 'regress', missing \['modality'\]\)"):
        predict.predict(run, videos=[video])


def test_an_unreadable_video_is_skipped_and_the_others_scored(trained, demo_root, tmp_path, capsys):
    video = data.load_memento(demo_root).split('test')[0].path
    broken, folder, missing = tmp_path / 'broken.mp4', tmp_path / 'clips.mp4', tmp_path / 'missing.mp4'
    broken.write_bytes(b'not a video at all' * 100)
    folder.mkdir()
    alone = predict.predict(trained / 's3-vision', videos=[video])
    inputs = [str(broken), video, str(folder), str(missing)]
    with pytest.raises(SystemExit, match='3 of 4 videos could not be read'):
        predict.main([*inputs, '--model', str(trained / 's3-vision'), '--csv', str(tmp_path / 'scores.csv')])
    out, err = capsys.readouterr()
    assert f'video {broken} is unreadable' in err and f'video {missing} is unreadable: not found' in err
    assert f'video {folder} is unreadable: a folder, not a video' in err
    assert [line.split('\t')[1] for line in out.splitlines()[2:] if '\t' in line] == [video]  # after the header
    with open(tmp_path / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['video'] for r in rows] == [video] and float(rows[0]['score']) == pytest.approx(alone[0], abs=1e-5)
    assert predict.predict(trained / 's3-vision', videos=inputs) == [None, pytest.approx(alone[0], abs=1e-6), None,
                                                                      None]


def test_a_bad_head_file_names_the_file_and_key(trained, demo_root, tmp_path):
    video = data.load_memento(demo_root).split('test')[0].path
    run = tmp_path / 'run'
    shutil.copytree(trained / 's3-vision', run)  # frozen: the fold folders hold only heads
    head = os.path.join(predict.load_run(run, [video], (), None)[2][0], 'head.safetensors')
    with open(head, 'rb') as f:
        whole = f.read()
    with open(head, 'wb') as f:
        f.write(whole[:len(whole) // 2])
    with pytest.raises(UserError, match=r'fold0/head.safetensors: truncated or corrupt'):
        predict.predict(run, videos=[video])
    # a key missing: the keys then and now
    save_file({'ln.weight': torch.ones(3), 'ln.bias': torch.zeros(3), 'fc.weight': torch.zeros(1, 3)}, head)
    with pytest.raises(UserError, match=r"head.safetensors is not a head of this run's \d+-dim encoder: keys "
                                        r"\['fc.weight', 'ln.bias', 'ln.weight'\] then, \['fc.bias', 'fc.weight', "
                                        r"'ln.bias', 'ln.weight'\] now"):
        predict.predict(run, videos=[video])
    # the same keys, another shape: each wrong key with its shape then and now
    save_file({'ln.weight': torch.ones(3), 'ln.bias': torch.zeros(3), 'fc.weight': torch.zeros(1, 3),
               'fc.bias': torch.zeros(1)}, head)
    with pytest.raises(UserError, match=r"head.safetensors is not a head of this run's (\d+)-dim encoder: "
                                        r"ln.weight: shape \(3,\) then, \((\d+),\) now; .*fc.weight: shape \(1, 3\) "
                                        r"then, \(1, \d+\) now"):
        predict.predict(run, videos=[video])


def test_csv_and_device_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    nothing = ['clip.mp4', '--model', str(tmp_path / 'no-run')]  # any work would fail on the missing run first
    with pytest.raises(SystemExit) as e:
        predict.main([*nothing, '--csv', str(tmp_path)])
    assert e.value.code == 2 and f'--csv {tmp_path}: expected a file' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        predict.main([*nothing, '--csv', str(tmp_path / 'new' / 'scores.csv')])
    assert e.value.code == 2 and f"the folder {tmp_path / 'new'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / 'new').exists()
    for device in ('cuda:1', 'banana'):  # --device auto, cuda or cpu
        with pytest.raises(SystemExit) as e:
            predict.main([*nothing, '--device', device])
        assert e.value.code == 2 and f"--device: invalid choice: '{device}'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(UserError, match=r'^--device cuda: torch .* finds no GPU: torch.cuda.is_available\(\) is '
                                        r'False.*or run with --device cpu$'):
        predict.main([*nothing, '--device', 'cuda'])
    with pytest.raises(UserError, match='no-run/results.json: JSON file not found'):  # auto: the CPU, then the run
        predict.main(nothing)


def test_a_bad_csv_names_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict.main(['clip.mp4', '--model', str(tmp_path / 'no-run'), '--csv', str(tmp_path)])
    assert f'--csv {tmp_path}' in capsys.readouterr().err


def test_checkpoint_replaces_a_moved_frozen_encoder(trained, demo_root, tiny_models, tmp_path, capsys):
    video = data.load_memento(demo_root).split('test')[0].path
    run = tmp_path / 'run'
    shutil.copytree(trained / 's3-vision', run)
    with open(run / 'results.json') as f:
        results = json.load(f)
    assert results['frozen']
    results['checkpoint'] = results['checkpoint_path'] = str(tmp_path / 'moved-away')
    with open(run / 'results.json', 'w') as f:
        json.dump(results, f)
    with pytest.raises(UserError, match='moved-away: no such folder; if the frozen encoder has moved, pass --checkpoint'):
        predict.predict(run, videos=[video])
    scores = predict.main([video, '--model', str(run), '--checkpoint', tiny_models['clip']])
    assert scores == pytest.approx(predict.predict(trained / 's3-vision', videos=[video]), abs=1e-6)
    with pytest.raises(UserError, match='--checkpoint is for frozen runs'):
        predict.main([video, '--model', str(trained / 's2-vision'), '--checkpoint', tiny_models['vit']])
    # another encoder of the same shape (here: re-created with other weights) is refused, not used in silence
    with open(os.path.join(demo_root, 'captions.txt')) as f:
        demo.make_tiny('clip', str(tmp_path / 'other'), f.read().splitlines(), seed=1)
    with pytest.raises(UserError, match=r"other is not the encoder .*run was trained on \(model.safetensors: .* then, "
                                        r".* now\); pass --checkpoint with that one"):
        predict.main([video, '--model', str(run), '--checkpoint', str(tmp_path / 'other')])


def test_a_moved_frozen_encoder_says_to_pass_checkpoint(trained, demo_root, tmp_path):
    video = data.load_memento(demo_root).split('test')[0].path
    run = tmp_path / 'run'
    shutil.copytree(trained / 's3-vision', run)
    results = runs.read_json(run / 'results.json')
    results['checkpoint'] = results['checkpoint_path'] = str(tmp_path / 'moved-away')
    (run / 'results.json').write_text(json.dumps(results))
    with pytest.raises(UserError, match='moved-away.*pass --checkpoint'):
        predict.predict(run, videos=[video])


def test_the_command_line(trained, demo_root, tmp_path):
    # the one real command line of this file: `python -m tools.predict` scores the videos it can read, warns of
    # the others, and ends in one line with exit status 1
    video = data.load_memento(demo_root).split('test')[0].path
    missing = str(tmp_path / 'missing.mp4')
    res = subprocess.run([sys.executable, '-m', 'tools.predict', video, missing, '--model', str(trained / 's3-vision'),
                          '--device', 'cpu'], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert res.stderr.splitlines() == [f"warning: video {missing} is unreadable: not found; skipped",
                                       "tools/predict.py: error: 1 of 2 videos could not be read and have no score (see the "
                                       "warnings above)"]
    score, name = res.stdout.splitlines()[-1].split('\t')
    assert name == video and float(score) == pytest.approx(predict.predict(trained / 's3-vision', [video])[0],
                                                           abs=1e-4)
