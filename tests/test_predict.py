"""Tests for predict.py (tiny models, demo data, CPU): python -m pytest tests/test_predict.py -q"""
import ast
import csv
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import data
import demo
import predict
import regress
from runs import UserError
from fixtures_demo import demo_root, tiny_models  # noqa: F401 (session fixtures)


@pytest.fixture(scope='module')
def runs(demo_root, tiny_models, tmp_path_factory):
    """small regress.py runs: fine-tuned vision, frozen vision, frozen text (FCLIP flag), a batch-size search"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add spin-waits on a shared machine
    out = tmp_path_factory.mktemp('runs')
    common = ['--data', demo_root, '--folds', '2', '--epochs', '2', '--patience-start', '1', '--batch-size', '16', '--lr', '1e-3']
    flags = {'s2-vision': ['--strategy', '2', '--modality', 'vision', '--checkpoint', tiny_models['vit']],
             's3-vision': ['--strategy', '3', '--modality', 'vision', '--checkpoint', tiny_models['clip']],
             's5-text': ['--strategy', '5', '--modality', 'text', '--fclip', tiny_models['clip']],
             's3-text-search': ['--strategy', '3', '--modality', 'text', '--checkpoint', tiny_models['clip'],
                                '--batch-size', '8', '32']}  # fold models in bs8/ or bs32/
    for name, f in flags.items():
        regress.main(common + f + ['--out', str(out / name)])
    yield out
    torch.set_num_threads(threads)


def scores_of_test_split(runs, run_name):
    with open(runs / run_name / 'test_predictions.csv', newline='') as f:
        return {r['video_id']: float(r['score']) for r in csv.DictReader(f)}


@pytest.mark.parametrize('run_name', ['s2-vision', 's3-vision'])
def test_videos_score_as_in_training(runs, run_name, demo_root):
    # the run's own scores of the unlabelled test videos: predict.py must reproduce them from the mp4s
    videos = data.load_memento(demo_root).split('test')[:3]
    scores = predict.predict(runs / run_name, videos=[v.path for v in videos], batch_size=4)  # 9 frames: 3 batches
    expected = scores_of_test_split(runs, run_name)
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)
    assert scores == pytest.approx([expected[v.video_id] for v in videos], abs=1e-5)


@pytest.mark.parametrize('run_name', ['s5-text', 's3-text-search'])
def test_captions_score_as_in_training(runs, run_name, demo_root):
    videos = data.load_memento(demo_root).split('test')[:2]
    scores = predict.predict(runs / run_name, captions=[' || '.join(v.captions) for v in videos])
    expected = scores_of_test_split(runs, run_name)
    assert scores == pytest.approx([expected[v.video_id] for v in videos], abs=1e-5)
    one = predict.predict(runs / run_name, captions=[videos[0].captions[0]])  # a single caption is one item
    assert len(one) == 1 and 0 < one[0] < 1 and one[0] != pytest.approx(scores[0], abs=1e-9)


def test_cli_prints_and_writes_csv(runs, demo_root, tmp_path, capsys):
    paths = [v.path for v in data.load_memento(demo_root).split('test')[:2]]
    scores = predict.main([*paths, '--model', str(runs / 's2-vision'), '--csv', str(tmp_path / 'scores.csv')])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{runs / 's2-vision'}: strategy 2 vision, ViT") and out[1] == 'score\tvideo'
    printed = [line.split('\t') for line in out[2:] if '\t' in line]
    assert [p for _, p in printed] == paths and [float(s) for s, _ in printed] == pytest.approx(scores, abs=1e-4)
    with open(tmp_path / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['video'] for r in rows] == paths and [float(r['score']) for r in rows] == pytest.approx(scores, abs=1e-5)


def test_bad_input(runs, demo_root, tmp_path):
    video = data.load_memento(demo_root).split('test')[0].path
    with pytest.raises(ValueError, match='none of the 1 videos could be read'):
        predict.predict(runs / 's3-vision', videos=[str(tmp_path / 'missing.mp4')])
    with pytest.raises(ValueError, match='vision run'):
        predict.predict(runs / 's3-vision', captions=['a red circle'])
    with pytest.raises(ValueError, match='text run'):
        predict.predict(runs / 's5-text', videos=[video])
    with pytest.raises(UserError, match='results.json not found'):
        predict.predict(tmp_path, videos=[video])
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(runs / 's2-vision', unfinished)
    os.remove(unfinished / 'fold1' / 'encoder' / 'model.safetensors')
    with pytest.raises(UserError, match='has no trained model.*fold1'):
        predict.predict(unfinished, videos=[video])
    with pytest.raises(SystemExit):
        predict.main([video, '--captions', 'a caption', '--model', str(runs / 's3-vision')])



def test_an_unreadable_video_is_skipped_and_the_others_scored(runs, demo_root, tmp_path, capsys):
    video = data.load_memento(demo_root).split('test')[0].path
    broken, folder, missing = tmp_path / 'broken.mp4', tmp_path / 'clips.mp4', tmp_path / 'missing.mp4'
    broken.write_bytes(b'not a video at all' * 100)
    folder.mkdir()
    alone = predict.predict(runs / 's3-vision', videos=[video])
    inputs = [str(broken), video, str(folder), str(missing)]
    with pytest.raises(SystemExit, match='3 of 4 videos could not be read'):
        predict.main([*inputs, '--model', str(runs / 's3-vision'), '--csv', str(tmp_path / 'scores.csv')])
    out, err = capsys.readouterr()
    assert 'broken.mp4 is unreadable' in err and 'missing.mp4 not found' in err
    assert f'{folder} is a folder, not a video file' in err
    assert [line.split('\t')[1] for line in out.splitlines()[2:] if '\t' in line] == [video]  # after the header
    with open(tmp_path / 'scores.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['video'] for r in rows] == [video] and float(rows[0]['score']) == pytest.approx(alone[0], abs=1e-5)
    assert predict.predict(runs / 's3-vision', videos=inputs) == [None, pytest.approx(alone[0], abs=1e-6), None, None]


def test_a_bad_head_file_names_the_file_and_key(runs, demo_root, tmp_path):
    video = data.load_memento(demo_root).split('test')[0].path
    run = tmp_path / 'run'
    shutil.copytree(runs / 's3-vision', run)  # frozen: the fold folders hold only heads
    head = os.path.join(predict.load_run(run)[1][0], 'head.safetensors')
    with open(head, 'rb') as f:
        whole = f.read()
    with open(head, 'wb') as f:
        f.write(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r'fold0/head.safetensors: truncated or corrupt'):
        predict.predict(run, videos=[video])
    save_file({'ln.weight': torch.ones(3), 'ln.bias': torch.zeros(3), 'fc.weight': torch.zeros(1, 3)}, head)
    with pytest.raises(ValueError, match=r'head.safetensors is not a head .*fc.bias: expected \(1,\), found none; '
                                         r'fc.weight: expected \(1, \d+\), found \(1, 3\)'):
        predict.predict(run, videos=[video])


def test_predict_scores_only(capsys):
    # the memorability maps are explain.py's, which imports this file's loaders: never the reverse
    with pytest.raises(SystemExit) as e:
        predict.parse_args(['clip.mp4', '--model', 'run', '--explain', 'maps'])
    assert e.value.code == 2 and 'unrecognized arguments: --explain maps' in capsys.readouterr().err
    tree = ast.parse(open(os.path.join(os.path.dirname(predict.__file__), 'predict.py')).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert 'explain' not in imported and not hasattr(predict, 'occlusion') and not hasattr(predict, 'draw')


def test_csv_and_device_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    nothing = ['clip.mp4', '--model', str(tmp_path / 'no-run')]  # any work would fail on the missing run first
    with pytest.raises(SystemExit) as e:
        predict.main([*nothing, '--csv', str(tmp_path)])
    assert e.value.code == 2 and f'--csv {tmp_path} is a folder' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        predict.main([*nothing, '--csv', str(tmp_path / 'new' / 'scores.csv')])
    assert e.value.code == 2 and f"{tmp_path / 'new'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / 'new').exists()
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    for device in ('cuda', 'cuda:1', 'banana'):
        with pytest.raises(ValueError, match=f'--device {device}: expected one of cpu on this machine'):
            predict.main([*nothing, '--device', device])
    assert predict.pick_device(None) == 'cpu' and predict.pick_device('cpu') == 'cpu'
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert predict.pick_device('cuda:0') == 'cuda:0' and predict.pick_device(None) == 'cuda'
    with pytest.raises(ValueError, match='--device cuda:1: expected one of cpu, cuda, cuda:0 on'):
        predict.pick_device('cuda:1')


def test_checkpoint_replaces_a_moved_frozen_encoder(runs, demo_root, tiny_models, tmp_path, capsys):
    video = data.load_memento(demo_root).split('test')[0].path
    run = tmp_path / 'run'
    shutil.copytree(runs / 's3-vision', run)
    with open(run / 'results.json') as f:
        results = json.load(f)
    assert results['frozen']
    results['checkpoint'] = results['checkpoint_path'] = str(tmp_path / 'moved-away')
    with open(run / 'results.json', 'w') as f:
        json.dump(results, f)
    with pytest.raises(UserError, match='frozen encoder .*moved-away.*pass --checkpoint FOLDER'):
        predict.predict(run, videos=[video])
    scores = predict.main([video, '--model', str(run), '--checkpoint', tiny_models['clip']])
    assert scores == pytest.approx(predict.predict(runs / 's3-vision', videos=[video]), abs=1e-6)
    with pytest.raises(ValueError, match='--checkpoint is for frozen runs'):
        predict.main([video, '--model', str(runs / 's2-vision'), '--checkpoint', tiny_models['vit']])
    # another encoder of the same shape (here: re-created with other weights) is refused, not used in silence
    with open(os.path.join(demo_root, 'captions.txt')) as f:
        demo.make_tiny('clip', str(tmp_path / 'other'), f.read().splitlines(), seed=1)
    with pytest.raises(ValueError, match=r"other.*checkpoint content model.safetensors: .* then, .* now.*not the encoder"):
        predict.main([video, '--model', str(run), '--checkpoint', str(tmp_path / 'other')])
