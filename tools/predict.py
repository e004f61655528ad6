"""
Score new videos or captions with a regress.py run: every fold's model scores every frame (taken as
in training), then the folds' mean, then the frames' (eq. 2-3); a --captions argument is a video,
its captions joined by '||'. --maps draws each frame beside each patch's contribution to its score
(occlusion), or weighs each word of a caption (docs/memorability-maps.md). An unreadable video is
skipped with a warning, the others scored, then the exit status is 1.

    python -m tools.predict clip1.mp4 clip2.mp4 --model results/s6-vision [--csv scores.csv]
    python -m tools.predict --captions "a dog runs on the beach" --model results/s6-text
    python -m tools.predict clip1.mp4 --model results/s4-vision --maps maps/   # maps/clip1_frame1.png
    python -m tools.predict --captions "a dog runs" --model results/s2-text --maps maps/  # words.csv
"""
import argparse
import glob
import os
import sys

import numpy as np
import torch
from matplotlib.figure import Figure
from safetensors import SafetensorError
from safetensors.torch import load_file

import data
import evaluate
import models
from harness import checkpoints, runs, train as training
from harness.runs import UserError

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter)
    p.add_argument('videos', nargs='*', help="mp4 files to score (vision runs)")
    p.add_argument('--captions', nargs='+', help="captions to score (text runs); '||' joins the "
                                                 "captions of one video")
    p.add_argument('--model', required=True, help="a regress.py output folder: results/s6-vision")
    p.add_argument('--csv', help="also write video,score to this file")
    p.add_argument('--maps', metavar='OUT', help="draw each frame's map (or weigh each word) in OUT")
    p.add_argument('--device', choices=['auto', 'cuda', 'cpu'], default='auto',
                   help="auto: cuda when torch finds a GPU, else cpu")
    p.add_argument('--checkpoint', metavar='FOLDER', help="frozen runs: the base encoder, when it "
                   "is no longer where the run found it (default: the one in its results.json)")
    args = p.parse_args(argv)
    for flag, path, what in (('--csv', args.csv, 'file'), ('--maps', args.maps, 'folder')):
        if path and (os.path.isdir(path) if what == 'file' else os.path.isfile(path)):
            p.error(f"{flag} {path}: expected a {what}")
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not "
                    f"exist")
    if args.videos and args.captions or not (args.videos or args.captions):
        p.error("give video files, or --captions for a text run (not both)")
    stems = [os.path.splitext(os.path.basename(v))[0] for v in args.videos]
    if args.maps and (twice := [v for v, s in zip(args.videos, stems) if stems.count(s) > 1]):
        p.error(f"{twice[0]} and {twice[1]} would draw the same maps; give each video once")
    return args

def load_run(run_dir, videos, captions, checkpoint):
    """-> a regress.py run's results.json, key.json, fold folders, checked before a model loads"""
    results = runs.read_json(os.path.join(run_dir, 'results.json'), expect=dict)
    key = runs.read_json(os.path.join(run_dir, 'key.json'), expect=dict)
    need = ('strategy', 'modality', 'encoder', 'frozen', 'folds', 'folds_dir', 'frames',
            'checkpoint', 'checkpoint_path', 'pooling', 'srcc_mean')
    missing = [k for k in need if k not in results] + [k for k in ('checkpoint',) if k not in key]
    if results.get('kind') != 'regress' or missing:
        raise UserError(f"{run_dir}: not a finished regress.py run (results.json kind "
                        f"{results.get('kind')!r}, missing {missing}); --model names its --out")
    if results['modality'] == 'vision' and captions or results['modality'] == 'text' and videos:
        raise UserError(f"{run_dir} is a {results['modality']} run: give "
                        + ("video files" if captions else "--captions, not video files"))
    runs.require(not checkpoint or results['frozen'], f"--checkpoint is for frozen runs; {run_dir} "
                 f"fine-tuned its encoder, kept in each fold's folder")
    folds = [os.path.normpath(os.path.join(run_dir, results['folds_dir'], f'fold{k}'))
             for k in range(results['folds'])]
    need = ['head.safetensors'] + ([] if results['frozen'] else ['encoder/model.safetensors'])
    missing = [f"{fold}/{f}" for fold in folds for f in need if not os.path.isfile(f"{fold}/{f}")]
    if missing:
        raise UserError(f"{run_dir} has no trained model: {missing[0]} is missing (did regress.py "
                        f"finish its {results['folds']} folds?)")
    return results, key, folds

def fold_models(run_dir, results, key, folds, device, checkpoint=None):
    """yields each fold's model (eq. 1: inputs -> (B,) scores) and its encoder's folder; a frozen
    base encoder is loaded once, and refused when its files are not those the folds trained on"""
    if results['frozen']:
        src = checkpoint or results['checkpoint_path']
        src = src if checkpoint or os.path.isdir(src) else results['checkpoint']
        try:
            base, src = data.load_encoder(src, results['pooling'])
        except UserError as e:
            raise UserError(f"{e}; if the frozen encoder has moved, pass --checkpoint FOLDER") from None
        if found := runs.changes(key['checkpoint'], runs.content(src, checkpoints.FILES)):
            raise UserError(f"{src} is not the encoder {run_dir} was trained on ({found[0]}); "
                            f"pass --checkpoint with that one")
    for fold in folds:
        if not results['frozen']:
            base, src = data.load_encoder(os.path.join(fold, 'encoder'))
        encoder = models.encoder_for(base, results['modality'])
        model = models.Regressor(encoder, encoder.embed_dim, trainable=False)
        path = os.path.join(fold, 'head.safetensors')
        try:
            head = load_file(path)
        except SafetensorError as e:
            raise UserError(f"{path}: truncated or corrupt ({e}); delete {fold} and rerun "
                            f"regress.py's command to train it again") from None
        wrong = runs.mismatches(head, model.head.state_dict())
        runs.require(not wrong, f"{path} is not a head of this run's {encoder.embed_dim}-dim "
                     f"encoder: {'; '.join(wrong)}")
        model.head.load_state_dict(head)
        yield model.to(device).eval(), src

def read_videos(paths, n_frames, encoder):
    """-> (N, 3, S, S) uint8 frames of the readable videos, each frame's video (others: warned)"""
    frames, owners = [], []
    for i, path in enumerate(paths):
        try:
            if not os.path.isfile(path):
                raise UserError("not found" if not os.path.isdir(path) else "a folder, not a video")
            frames.append(data.read_frames(path, n_frames, encoder.image_family, encoder.image_size))
            owners += [i] * n_frames
        except UserError as e:
            print(f"warning: video {path} is unreadable: {e}; skipped", file=sys.stderr)
    runs.require(frames, f"none of the {len(paths)} videos could be read (see the warnings above)")
    return torch.cat(frames), owners

def split_captions(captions):
    """--captions arguments -> (caption, its argument) pairs: '||' parts a video's captions"""
    items = [(c.strip(), i) for i, text in enumerate(captions) for c in text.split('||') if c.strip()]
    if empty := sorted(set(range(len(captions))) - {i for _, i in items}):
        raise UserError(f"--captions argument {empty[0] + 1} ({captions[empty[0]]!r}) holds no "
                        f"caption")
    return items

def occlusion(model, pixels, patch):
    """the maps' method (Zeiler and Fergus, ECCV 2014) on the encoder's patch grid: a patch's
    contribution is the frame's score minus its score with the patch painted in the frame's mean
    colour (positive: the patch raises the score); 1 + P passes a frame (P = 49 for ViT-B/32).
    pixels (F, 3, S, S) normalised -> scores (F,), maps (F, S // patch, S // patch)"""
    g = pixels.shape[-1] // patch
    squares = torch.eye(g * g + 1, dtype=torch.bool, device=pixels.device)[:, 1:]  # row 0: no patch
    squares = squares.reshape(-1, 1, g, g).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    # (1 + P, 1, S, S): one batch a frame, the frame itself then its P occluded copies -> (F, 1 + P)
    y = torch.stack([model(torch.where(squares, x.mean((1, 2), keepdim=True), x)) for x in pixels])
    return y[:, 0], (y[:, :1] - y[:, 1:]).view(-1, g, g)

@torch.no_grad()
def predict(run_dir, videos=(), captions=(), device='cpu', checkpoint=None, maps=False):
    """-> a score per video (or --captions argument) in input order, None for an unreadable video;
    with maps, per video also frames (F, 3, S, S) uint8, scores (F,), maps (F, g, g), folds' mean"""
    results, key, folds = load_run(run_dir, videos, captions, checkpoint)
    items = split_captions(captions) if captions else None
    pixels, ids, preds, drawn = None, None, [], []
    for model, src in fold_models(run_dir, results, key, folds, device, checkpoint):
        encoder = model.encoder
        if items:  # in batches of similar length, each cut to its longest: little padding
            if ids is None:  # every fold's tokenizer is the run's
                tokenizer = checkpoints.Tokenizer(src, encoder.config.max_position_embeddings)
                (ids, mask), owners = tokenizer([c for c, _ in items]), [i for _, i in items]
            def encode(b):
                t = int(mask[b].sum(1).max())
                return model(ids[b, :t].to(device), mask[b, :t].to(device))
            preds.append(training.encode_by_length(encode, torch.arange(len(ids)), mask.sum(1), 64))
            continue
        if pixels is None:
            frames, owners = read_videos(videos, results['frames'], encoder)  # (V * F, 3, S, S)
            pixels = data.to_pixel_values(frames.to(device), encoder.image_family)
        if maps:  # (V * F,) scores, (V * F, g, g) maps
            scores, patches = (t.cpu() for t in occlusion(model, pixels, encoder.config.patch_size))
            drawn.append(patches)
        preds.append(scores if maps else torch.cat([model(x).cpu() for x in pixels.split(64)]))
    frame_scores = torch.stack(preds).mean(0)  # the folds' mean, then eq. 2-3
    scores = dict(zip(*data.fuse(frame_scores.numpy(), owners)))
    out = [float(scores[i]) if i in scores else None for i in range(len(captions or videos))]
    if not maps:
        return out
    owners, drawn = np.array(owners), torch.stack(drawn).mean(0)
    return out, [(frames[owners == i], frame_scores[owners == i], drawn[owners == i])
                 if i in scores else None for i in range(len(videos))]

def draw_map(name, k, frames, scores, maps, video_score):
    """frame k of a video beside its map, opaque, on one colour scale for the video's frames, the
    patch grid drawn on both -> the Figure"""
    lim, size, g = max(float(maps.abs().max()), 1e-6), frames.shape[-1], maps.shape[-1]
    fig = Figure(figsize=(7, 3.4), layout='constrained')
    left, right = fig.subplots(1, 2)
    left.imshow(frames[k].permute(1, 2, 0).numpy())
    shown = right.imshow(maps[k].numpy(), cmap='RdBu_r', vmin=-lim, vmax=lim,  # (g, g) stretched
                         interpolation='nearest', extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    for ax, colour in ((left, 'white'), (right, 'grey')):
        ax.set(xticks=np.arange(g + 1) * size / g - 0.5, yticks=np.arange(g + 1) * size / g - 0.5)
        ax.tick_params(length=0, labelbottom=False, labelleft=False)
        ax.grid(color=colour, linewidth=0.6, alpha=0.6)
    left.set_title('frame, as the encoder takes it', fontsize=10)
    right.set_title('memorability map (occlusion of patches)', fontsize=10)
    fig.colorbar(shown, ax=right, shrink=0.9).set_label(
        "contribution to the frame's score\n(its drop when the patch is occluded)", fontsize=9)
    fig.suptitle(f"{name}, frame {k + 1} of {len(frames)}: score {scores[k]:.3f} (video: "
                 f"{video_score:.3f})", fontsize=11)
    return fig

def main(argv=None):
    """prints (and writes) a score per video or --captions argument, with --maps the maps or the
    words' values -> the scores; exit status 1 once written when a video could not be read"""
    args = parse_args(argv)
    stems = [os.path.splitext(os.path.basename(v))[0] for v in args.videos]
    for pat in (['words.csv'] if args.captions else [f"{s}_frame*.png" for s in stems]):
        if args.maps and (earlier := sorted(glob.glob(os.path.join(glob.escape(args.maps), pat)))):
            raise UserError(f"{earlier[0]} exists (an earlier run's); it is never overwritten: "
                            f"give another --maps, or delete it")
    device = runs.start(args.device, 'float32')[2]
    captions = args.captions or ()
    if args.maps and captions:  # each word's value: the caption's score less its score without it
        items = split_captions(captions)
        words = [c.split() for c, _ in items]
        if short := [(i + 1, c) for (c, i), w in zip(items, words) if len(w) < 2]:
            raise UserError(f"--captions argument {short[0][0]} ({short[0][1]!r}): a word's value "
                            f"needs a caption of two words or more")
        less = [' '.join(w[:k] + w[k + 1:]) for w in words for k in range(len(w))]
        found = predict(args.model, (), [c for c, _ in items] + less, device, args.checkpoint)
        without = iter(found[len(items):])
        values = [(i + 1, c, word, s - next(without)) for (c, i), s, w in zip(items, found, words)
                  for word in w]
        scores = [np.mean([s for (_, i), s in zip(items, found) if i == a]) for a in range(
            len(captions))]
    elif args.maps:
        scores, drawn = predict(args.model, args.videos, (), device, args.checkpoint, maps=True)
    else:
        scores = predict(args.model, args.videos, captions, device, args.checkpoint)
    results = runs.read_json(os.path.join(args.model, 'results.json'))
    print(f"{args.model}: strategy {results['strategy']} {results['modality']}, "
          f"{results['encoder']}, validation SRCC {results['srcc_mean']:.3f}; a score is the mean "
          f"of its {results['folds']} fold models, 0-1\nscore\t{'caption' if captions else 'video'}")
    names = captions or args.videos
    for n, (name, s) in enumerate(zip(names, scores)):
        if s is not None:
            print(f"{s:.4f}\t{name}")
        if args.maps and captions:
            print('    ' + ' '.join(f"{w}({v:+.4f})" for a, _, w, v in values if a == n + 1))
        elif args.maps and s is not None:
            paths = [os.path.join(args.maps, f"{stems[n]}_frame{k + 1}.png")
                     for k in range(len(drawn[n][0]))]
            for k, path in enumerate(paths):
                evaluate.save_png(draw_map(os.path.basename(name), k, *drawn[n], s), path)
            print('    wrote ' + ' '.join(paths))
    if args.maps and captions:
        runs.write_csv(os.path.join(args.maps, 'words.csv'), ['argument', 'caption', 'word',
                                                               'value'], values)
    if args.csv:
        runs.write_csv(args.csv, ['video', 'score'],
                       [[n, f'{s:.6f}'] for n, s in zip(names, scores) if s is not None])
    if missing := sum(s is None for s in scores):
        raise SystemExit(f"tools/predict.py: error: {missing} of {len(names)} videos could not be read "
                         f"and have no score (see the warnings above)")
    return scores

if __name__ == '__main__':
    runs.script(main, 'tools/predict.py', "nothing was written; run the same command again")
