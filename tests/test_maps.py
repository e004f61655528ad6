"""Tests for tools/predict.py --maps, the memorability maps and the words' values (tiny models, demo data, CPU):

    python -m pytest tests/test_maps.py -q -s -n 0   # in one process, printing the measured in-box mass, chance and correlations

The runs learn from the demo's shape-only variant (python -m tools.demo dataset --shape-only): its score comes from
the shape and its colour alone, inside the box tools/demo.py records for every frame, so a map of what the model uses
should put its mass there; and from the same model with re-initialised weights it should not be the same map.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from safetensors.torch import save_file
from scipy.stats import spearmanr

import data
import models
import regress
from harness import runs
from tools import demo, predict

# the tests' fast path, a little longer than test_predict.py's: 10 epochs on 120 videos are what make the vision run
# learn the shape (SRCC ~0.4), where 3 epochs on 40 videos learn nothing a map could show
FAST = ['--folds', '2', '--epochs', '10', '--patience-start', '3', '--patience', '3', '--batch-size', '16',
        '--lr', '1e-3', '--device', 'cpu']


@pytest.fixture(scope='module')
def shape_runs(tmp_path_factory):
    """a 120-video shape-only demo, tiny encoders, and regress.py runs on it: fine-tuned and frozen CLIP vision,
    fine-tuned DistilBERT text -> (demo folder, run name -> folder, tiny model type -> folder)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add spin-waits on a shared machine
    out = tmp_path_factory.mktemp('maps')
    root = str(out / 'demo')
    demo.make_demo(root, 120, seed=0, shape_only=True)
    corpus = runs.read_text(os.path.join(root, 'captions.txt')).splitlines()
    tiny = {t: str(out / t) for t in ('clip', 'distilbert')}
    for t, folder in tiny.items():
        demo.make_tiny(t, folder, corpus)
    flags = {'s4-vision': ['--strategy', '4', '--modality', 'vision', '--checkpoint', tiny['clip']],
             's3-vision': ['--strategy', '3', '--modality', 'vision', '--checkpoint', tiny['clip']],
             's2-text': ['--strategy', '2', '--modality', 'text', '--checkpoint', tiny['distilbert']]}
    for name, f in flags.items():
        regress.main(['--data', root, *FAST, *f, '--out', str(out / name)])
    yield root, {name: str(out / name) for name in flags}, tiny
    torch.set_num_threads(threads)


def held_out(root):
    """the demo's test videos, whose scores the runs never saw"""
    return [v.path for v in data.load_memento(root).split('test')]


def test_the_demo_records_its_shape_and_has_a_shape_only_variant(tmp_path):
    frames, boxes = demo._scene(np.random.default_rng(0), 'triangle', 'red', 'dark', 'bouncing up')  # (T, H, W, 3)
    for frame, (x0, y0, x1, y1) in zip(frames, boxes):
        ys, xs = np.nonzero((frame == demo.COLOURS['red']).all(-1))  # the shape's pixels
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
    assert len(set(map(tuple, boxes[:, 1::2].tolist()))) > 10  # it bounces: the box moves up and down
    demo.make_demo(str(tmp_path / 'all'), 6, seed=3)
    demo.make_demo(str(tmp_path / 'shape'), 6, seed=3, shape_only=True)
    every, shape = (data.load_memento(str(tmp_path / d)) for d in ('all', 'shape'))
    assert [v.captions for v in every.videos] == [v.captions for v in shape.videos]  # the same clips, other scores
    # the score differs by the background's and the motion's effects: files are named MOTION_...,
    # and the first caption ends "on a BACKGROUND background"
    for v, w in zip(every.labelled(), shape.labelled()):
        motion, background = os.path.basename(v.path).split('_')[0].replace('-', ' '), v.captions[0].split()[-2]
        assert v.score - w.score == pytest.approx(demo.EFFECTS[background] + demo.EFFECTS[motion], abs=2e-4)
    with open(tmp_path / 'shape' / data.DEMO_BOXES) as f:
        boxes = json.load(f)
    assert {name: len(b) for name, b in boxes.items()} == {os.path.basename(v.path): 90 for v in shape.videos}


def box_cover(root, video, n_frames, enc):
    """(F, g, g): how much of each patch the shape's box covers in the frames the run scores; the box is drawn on
    the video's frames and resized and cropped by data.resize_crop, as the frames are"""
    with open(os.path.join(root, data.DEMO_BOXES)) as f:
        boxes = json.load(f)[os.path.basename(video)]  # one per frame of the video
    masks = np.zeros_like(data.decode_frames(video, n_frames))  # (F, H, W, 3)
    for mask, i in zip(masks, data.frame_indices(len(boxes), n_frames)):
        x0, y0, x1, y1 = boxes[i]
        mask[y0:y1, x0:x1] = 255
    inside = data.resize_crop(masks, enc.image_family, enc.image_size)[:, :1].float() / 255  # (F, 1, S, S)
    return F.avg_pool2d(inside, enc.config.patch_size)[:, 0]


def in_box(root, videos, found, enc):
    """found: predict(..., maps=True)'s per video (frames, frame scores, maps) -> the maps' mean share of
    |contribution| inside the box, and the box's mean share of the frame (chance)"""
    mass, chance = [], []
    for video, (_, _, maps) in zip(videos, found):
        cover = box_cover(root, video, len(maps), enc)  # (F, g, g)
        size = maps.abs()
        mass += ((size * cover).sum((1, 2)) / size.sum((1, 2))).tolist()
        chance += cover.mean((1, 2)).tolist()
    return float(np.mean(mass)), float(np.mean(chance))


def vision_encoder(folder):
    return models.encoder_for(data.load_encoder(folder)[0], 'vision')


def test_maps_put_their_mass_on_the_shape(shape_runs):
    root, run, tiny = shape_runs
    videos = held_out(root)
    learnt = runs.read_json(os.path.join(run['s4-vision'], 'results.json'))['srcc_mean']
    assert learnt > 0.3, f"the run learnt too little (SRCC {learnt:.3f}) for its maps to show what it uses"
    scores, found = predict.predict(run['s4-vision'], videos, maps=True)
    assert scores == pytest.approx(predict.predict(run['s4-vision'], videos), abs=1e-6)  # the maps' scores are its
    for score, (frames, frame_scores, maps) in zip(scores, found):
        assert maps.shape == (3, 4, 4) and frames.shape == (3, 3, 32, 32) and frames.dtype == torch.uint8  # 8 px
        assert score == pytest.approx(float(frame_scores.mean()), abs=1e-6)  # eq. 2-3: the mean of its frames
    mass, chance = in_box(root, videos, found, vision_encoder(tiny['clip']))
    print(f"\ns4-vision: in-box mass {mass:.3f} against chance {chance:.3f} over {len(videos)} test videos")
    assert mass > 2 * chance


def test_the_figure_is_drawn(shape_runs, tmp_path, capsys):
    root, run, _ = shape_runs
    video = held_out(root)[0]
    scores = predict.main([video, '--model', run['s4-vision'], '--maps', str(tmp_path / 'maps')])
    stem = os.path.splitext(os.path.basename(video))[0]
    pngs = [tmp_path / 'maps' / f'{stem}_frame{k}.png' for k in (1, 2, 3)]  # first, middle, last
    assert sorted(tmp_path.glob('maps/*')) == pngs
    assert all(p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and p.stat().st_size > 10_000 for p in pngs)
    out = capsys.readouterr().out
    assert f"{scores[0]:.4f}\t{video}" in out and str(pngs[2]) in out
    assert scores == pytest.approx(predict.predict(run['s4-vision'], [video]), abs=1e-6)
    drawn = [p.read_bytes() for p in pngs]
    code, err = one_line_error([video, '--model', run['s4-vision'], '--maps', str(tmp_path / 'maps')], capsys)
    assert code == 2 and err == (f"tools/predict.py: error: {pngs[0]} exists (an earlier run's); it is never "
                                 f"overwritten: give another --maps, or delete it")  # the same command again
    assert [p.read_bytes() for p in pngs] == drawn


def reinitialised(run, out, corpus):
    """a copy of a fine-tuned CLIP run whose fold encoders and heads are drawn anew (Adebayo et al.'s model
    randomisation test): the same architecture, nothing learnt"""
    shutil.copytree(run, out)
    for k, fold in enumerate(predict.load_run(out, ['clip.mp4'], (), None)[2]):
        model = demo.make_tiny('clip', os.path.join(fold, 'encoder'), corpus, seed=k + 1)
        torch.manual_seed(k + 1)
        save_file(models.RegressionHead(models.encoder_for(model, 'vision').embed_dim).state_dict(),
                  os.path.join(fold, 'head.safetensors'))
    return out


def rank_correlation(maps, others):
    """Spearman's rho of two lists of (F, g, g) maps, frame by frame, averaged over the frames"""
    return float(np.mean([spearmanr(a.flatten(), b.flatten())[0] for m, o in zip(maps, others) for a, b in zip(m, o)]))


@torch.no_grad()
def test_maps_depend_on_what_the_model_learnt(shape_runs, tmp_path):
    # Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018: a map that stays the same when the weights
    # are re-initialised shows the image, not the model
    root, run, tiny = shape_runs
    videos = held_out(root)
    corpus = runs.read_text(os.path.join(root, 'captions.txt')).splitlines()
    scores, trained = predict.predict(run['s4-vision'], videos, maps=True)
    random_scores, random = predict.predict(reinitialised(run['s4-vision'], tmp_path / 'random', corpus), videos,
                                            maps=True)
    rho = rank_correlation([m for *_, m in trained], [m for *_, m in random])
    rho_abs = rank_correlation([m.abs() for *_, m in trained], [m.abs() for *_, m in random])
    results, key, folds = predict.load_run(run['s4-vision'], videos, (), None)  # how much the folds' maps agree
    per_fold = []
    for model, _ in predict.fold_models(run['s4-vision'], results, key, folds, 'cpu'):
        enc = model.encoder
        pixels = data.to_pixel_values(predict.read_videos(videos, results['frames'], enc)[0], enc.image_family)
        per_fold.append(predict.occlusion(model, pixels, enc.config.patch_size)[1])
    mass, chance = in_box(root, videos, random, vision_encoder(tiny['clip']))
    print(f"\nre-initialised s4-vision: rank correlation with the trained maps {rho:.3f} (of |maps| {rho_abs:.3f}; "
          f"fold 0's with fold 1's {rank_correlation([per_fold[0]], [per_fold[1]]):.3f}) over {len(videos)} videos; "
          f"in-box mass {mass:.3f} against chance {chance:.3f}")
    assert abs(rho) < 0.5
    assert scores != pytest.approx(random_scores, abs=1e-3)
    # predict's maps are the folds' mean of occlusion()'s
    np.testing.assert_allclose(torch.cat([m for *_, m in trained]), (per_fold[0] + per_fold[1]) / 2, atol=1e-6)


def test_occlusion_by_hand():
    # a model that scores a frame by its pixel (0, 0) of channel 0: only the patch holding it contributes, by the
    # value it loses when painted in the frame's mean colour
    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)  # (F, 3, S, S), 2 px patches
    scores, maps = predict.occlusion(lambda x: x[:, 0, 0, 0], pixels, 2)
    assert scores.tolist() == [0.0, 48.0] and maps.shape == (2, 2, 2)
    means = pixels[:, 0].mean((1, 2))  # the frame's mean colour, channel 0
    want = torch.zeros(2, 2, 2)
    want[:, 0, 0] = pixels[:, 0, 0, 0] - means
    torch.testing.assert_close(maps, want)


def words_csv(path):
    return runs.read_csv(str(path), required=('argument', 'caption', 'word', 'value'))


def test_word_values(shape_runs, tmp_path, capsys):
    root, run, _ = shape_runs
    videos = data.load_memento(root).split('test')
    arguments = [' || '.join(v.captions[:2]) for v in videos]  # two captions per argument
    scores = predict.main(['--model', run['s2-text'], '--captions', *arguments, '--maps', str(tmp_path / 'all')])
    rows = words_csv(tmp_path / 'all' / 'words.csv')
    captions = [c.strip() for a in arguments for c in a.split('||')]
    assert [(int(r['argument']), r['caption']) for r in rows] == [
        (i // 2 + 1, c) for i, c in enumerate(captions) for _ in c.split()]  # each caption's words, in order
    assert [r['word'] for r in rows] == [w for c in captions for w in c.split()]
    # a word's value is the drop of the caption's score without it
    caption = captions[0]
    score, without = predict.predict(run['s2-text'], captions=[caption, ' '.join(caption.split()[1:])])
    assert float(rows[0]['value']) == pytest.approx(score - without, abs=1e-6)
    # an argument's score: its captions' mean (eq. 2-3), as predict gives it
    assert scores == pytest.approx(predict.predict(run['s2-text'], captions=arguments), abs=1e-6)
    # the shape-only demo's score comes from the shape and its colour: the words naming them weigh the most
    named = set(demo.COLOURS) | {w for names in demo.SHAPES.values() for name in names for w in name.split()}
    weight = {kind: np.mean([abs(float(r['value'])) for r in rows if (r['word'] in named) == kind])
              for kind in (True, False)}
    with capsys.disabled():
        print(f"\nmean |value| of the words naming the shape or colour {weight[True]:.4f}, of the others "
              f"{weight[False]:.4f}")
    assert weight[True] > 2 * weight[False]
    capsys.readouterr()
    scores = predict.main(['--model', run['s2-text'], '--captions', videos[0].captions[0],
                           '--maps', str(tmp_path / 'words')])
    out = capsys.readouterr().out
    assert f"{scores[0]:.4f}\t{videos[0].captions[0]}" in out
    assert all(f"{w}(" in out for w in videos[0].captions[0].split())
    assert [r['word'] for r in words_csv(tmp_path / 'words' / 'words.csv')] == videos[0].captions[0].split()


def test_an_unreadable_video_is_skipped_and_the_others_drawn(shape_runs, tmp_path):
    root, run, _ = shape_runs
    video = held_out(root)[0]
    scores, found = predict.predict(run['s3-vision'], [str(tmp_path / 'missing.mp4'), video], maps=True)  # frozen
    assert scores[0] is None and found[0] is None and found[1][2].shape == (3, 4, 4)
    assert scores[1] == pytest.approx(predict.predict(run['s3-vision'], [video])[0], abs=1e-6)
    with pytest.raises(SystemExit, match='1 of 2 videos could not be read'):
        predict.main([str(tmp_path / 'missing.mp4'), video, '--model', run['s3-vision'], '--maps', str(tmp_path)])
    assert len(list(tmp_path.glob('*_frame*.png'))) == 3


def one_line_error(argv, capsys):
    """tools/predict.py's __main__ on argv: -> its exit code and the last line of stderr, which must be the only line
    that is not argparse's usage"""
    with pytest.raises(SystemExit) as e:
        runs.script(lambda: predict.main(argv), 'tools/predict.py', "run the same command again")
    err = capsys.readouterr().err.strip().splitlines()
    assert 'Traceback' not in ''.join(err) and all(line.startswith(('usage:', ' ')) for line in err[:-1])
    return e.value.code, err[-1]


def test_bad_input_ends_in_one_line(shape_runs, tmp_path, capsys):
    root, run, _ = shape_runs
    video = held_out(root)[0]
    code, err = one_line_error([video, '--model', run['s2-text'], '--maps', str(tmp_path / 'maps')], capsys)
    assert code == 2 and err == (f"tools/predict.py: error: {run['s2-text']} is a text run: give --captions, not "
                                 "video files")
    missing = tmp_path / 'no' / 'maps'
    code, err = one_line_error([video, '--model', run['s4-vision'], '--maps', str(missing)], capsys)
    assert code == 2 and err.endswith(f"--maps {missing}: the folder {missing.parent} does not exist")
    (tmp_path / 'file').write_text('')
    code, err = one_line_error([video, '--model', run['s4-vision'], '--maps', str(tmp_path / 'file')], capsys)
    assert code == 2 and err.endswith(f"--maps {tmp_path / 'file'}: expected a folder")
    copy = tmp_path / 'other' / os.path.basename(video)
    copy.parent.mkdir()
    shutil.copy(video, copy)
    code, err = one_line_error([video, str(copy), '--model', run['s4-vision'], '--maps', str(tmp_path)], capsys)
    assert code == 2 and err.endswith(f"{video} and {copy} would draw the same maps; give each video once")
    code, err = one_line_error(['--model', run['s2-text'], '--captions', 'a red ball', 'ball',
                                '--maps', str(tmp_path)], capsys)
    assert code == 2 and err == ("tools/predict.py: error: --captions argument 2 ('ball'): a word's value needs a "
                                 "caption of two words or more")
    code, err = one_line_error(['--model', run['s4-vision'], '--captions', 'a red ball', '--maps', str(tmp_path)],
                               capsys)
    assert code == 2 and err.endswith("is a vision run: give video files")
    assert not missing.parent.exists() and not list(tmp_path.glob('*.png')) and not (tmp_path / 'words.csv').exists()


def test_bad_maps_name_the_flag_and_the_videos(tmp_path, capsys):
    missing = tmp_path / 'no' / 'maps'
    code, err = one_line_error(['clip.mp4', '--model', 'run', '--maps', str(missing)], capsys)
    assert f"--maps {missing}" in err
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    code, err = one_line_error([str(tmp_path / 'a' / 'clip.mp4'), str(tmp_path / 'b' / 'clip.mp4'), '--model', 'run',
                                '--maps', str(tmp_path)], capsys)
    assert f"{tmp_path / 'a' / 'clip.mp4'} and {tmp_path / 'b' / 'clip.mp4'}" in err


def test_an_earlier_run_is_refused_before_any_work(tmp_path, capsys):
    # the run folder does not exist: any work would fail on it, so the refusal comes first
    maps, nothing = tmp_path / 'maps', ['--model', str(tmp_path / 'no-run'), '--device', 'cpu']
    maps.mkdir()
    (maps / 'clip_frame2.png').write_bytes(b'an earlier map')
    (maps / 'other_frame1.png').write_bytes(b'another video\'s map')
    code, err = one_line_error(['videos/clip.mp4', 'new.mp4', *nothing, '--maps', str(maps)], capsys)
    assert code == 2 and err == (f"tools/predict.py: error: {maps / 'clip_frame2.png'} exists (an earlier run's); "
                                 "it is never overwritten: give another --maps, or delete it")
    (maps / 'words.csv').write_text('argument,caption,word,value\n')
    code, err = one_line_error([*nothing, '--captions', 'a red ball', '--maps', str(maps)], capsys)
    assert code == 2 and err.startswith(f"tools/predict.py: error: {maps / 'words.csv'} exists")
    assert (maps / 'clip_frame2.png').read_bytes() == b'an earlier map'
    code, err = one_line_error(['new.mp4', *nothing, '--maps', str(maps)], capsys)  # nothing of new.mp4 there
    assert code == 2 and err.endswith(f"{tmp_path / 'no-run' / 'results.json'}: JSON file not found")


def test_the_map_is_opaque_beside_the_frame():
    # a +0.023 patch must look half as strong as a +0.048 one: each pixel of the map is the colour bar's colour
    frame = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    values = torch.tensor([[[0.048, 0.023], [-0.012, 0.0]]])  # (F, g, g) with g = 2: 16 px patches
    fig = predict.draw_map('clip.mp4', 0, frame, torch.tensor([0.8]), values, 0.8)
    left, right, bar = fig.axes
    assert [len(left.images), len(right.images)] == [1, 1]  # the frame on the left, the map alone on the right
    assert np.array_equal(left.images[0].get_array(), frame[0].permute(1, 2, 0).numpy())
    shown = right.images[0]
    assert shown.get_alpha() in (None, 1) and shown.get_clim() == pytest.approx((-0.048, 0.048))
    assert shown.cmap.name == 'RdBu_r' and bar.get_ylim() == pytest.approx((-0.048, 0.048))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())  # (H, W, 4), row 0 at the top
    for (i, j), value in np.ndenumerate(values[0].numpy()):
        x, y = right.transData.transform((8 + 16 * j - 0.5, 8 + 16 * i - 0.5))  # the patch's centre
        seen = pixels[pixels.shape[0] - int(round(y)), int(round(x))]
        want = np.array(shown.cmap(shown.norm(value))) * 255
        np.testing.assert_allclose(seen, want, atol=2)
    assert fig.get_suptitle() == 'clip.mp4, frame 1 of 1: score 0.800 (video: 0.800)'
