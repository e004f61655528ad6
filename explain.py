"""
Memorability maps: which patches of a frame, or which words of a caption, raise the score that a
run of regress.py gives. Scoring is predict.py's; this script loads the run with predict.py's
functions and asks the same fold models.

    python explain.py clip1.mp4 --model results/s6-vision --out maps    # maps/clip1_frame1.png
    python explain.py --model results/s6-text --captions "a dog runs on the beach" --out maps

For each frame a vision run scores (first, middle, last): the frame as the encoder takes it beside
its map, each patch's contribution to the frame's score, found by occlusion() and averaged over the
fold models as the score is, drawn opaque on one colour scale for the video's frames. For captions:
each word's value, the drop of the caption's score without it, printed and written to
OUT_DIR/words.csv. Each is one short function to change; the method and its checks are in
docs/memorability-maps.md.

An earlier run's maps or words.csv in OUT_DIR are never overwritten: the command is refused before
any work, naming the file. A video that cannot be read is skipped with a warning; the others are
drawn, then the script exits with status 1.
"""
import argparse
import glob
import os
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure

import figures
import frames
import runs
from predict import (caption_items, check_inputs, exit_if_unscored, fold_models, load_run,
                     pick_device, predict, read_videos, run_arguments, run_summary)
from runs import UserError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter)
    p.add_argument('videos', nargs='*', help="mp4 files whose frames to map (vision runs)")
    p.add_argument('--captions', nargs='+', default=None,
                   help="captions whose words to weigh (text runs); '||' joins the captions of "
                        "one video")
    p.add_argument('--out', required=True, metavar='OUT_DIR',
                   help="folder for the maps (VIDEO_frame1.png ...) or words.csv; made if missing")
    run_arguments(p)
    args = p.parse_args(argv)
    if args.videos and args.captions:
        p.error("give video files or --captions, not both")
    parent = os.path.dirname(os.path.abspath(args.out))
    if os.path.isfile(args.out):
        p.error(f"--out {args.out} is a file; expected a folder for the maps")
    if not os.path.isdir(parent):
        p.error(f"--out {args.out}: the folder {parent} does not exist")
    stems = [stem(v) for v in args.videos]  # the maps' file names
    twice = [v for v, s in zip(args.videos, stems) if stems.count(s) > 1]
    if twice:
        same = os.path.join(args.out, stem(twice[0]))
        p.error(f"{twice[0]} and {twice[1]} would draw the same {same}_frame*.png; give each video "
                f"once, by its own name")
    return args


def stem(video):
    return os.path.splitext(os.path.basename(video))[0]


def check_fresh(args):
    """refused before any work: a file of an earlier run in --out that this command would write"""
    names = [glob.escape(stem(v)) + '_frame*.png' for v in args.videos]
    for pattern in ['words.csv'] if args.captions else names:
        found = sorted(glob.glob(os.path.join(glob.escape(args.out), pattern)))
        if found:
            raise UserError(f"{found[0]} exists (an earlier run's); explain.py does not overwrite "
                            f"it: give another --out, or delete it")


# -----------------------------------------------------------------------------
# the maps: which patches of a frame, or which words of a caption, raise its score

def occlusion(model, pixels, patch):
    """The maps' method: occlusion (Zeiler and Fergus, "Visualizing and understanding convolutional
    networks", ECCV 2014) on the encoder's grid of patches. Each patch in turn is painted in the
    frame's mean colour; its contribution is the frame's score minus its score without the patch
    (positive: the patch raises the score). Exact and for any model, at the cost of 1 + P forward
    passes per frame (P patches: 49 for ViT-B/32).
    pixels (F, 3, S, S) normalised -> scores (F,), maps (F, S // patch, S // patch)"""
    g = pixels.shape[-1] // patch
    squares = torch.eye(g * g, dtype=torch.bool, device=pixels.device).view(-1, 1, g, g)
    squares = squares.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (P, 1, S, S)
    scores, maps = [], []
    for x in pixels:  # (3, S, S): one batch per frame, the frame and its P occluded copies
        occluded = torch.where(squares, x.mean((1, 2), keepdim=True), x)  # (P, 3, S, S)
        y = model(torch.cat([x[None], occluded]))  # (1 + P,)
        scores.append(y[0])
        maps.append(y[0] - y[1:])
    return torch.stack(scores), torch.stack(maps).view(-1, g, g)


@dataclass
class VideoMaps:
    """what explain.py draws for one video"""
    score: float           # the video's score (eq. 2-3), as predict() gives it
    frame_scores: list     # (F,) each frame's score, the mean of the fold models
    maps: torch.Tensor     # (F, g, g) each patch's contribution to its frame's score, fold mean
    frames: torch.Tensor   # (F, 3, S, S) uint8, the frames as the encoder took them


@torch.no_grad()
def explain_videos(run_dir, videos, device='cpu', checkpoint=None):
    """-> VideoMaps per video, in input order; None for a video that could not be read"""
    results, folds = load_run(run_dir)
    check_inputs(run_dir, results, videos, (), checkpoint)
    clip_frames, scores, maps = None, [], []
    for model, enc, _ in fold_models(run_dir, results, folds, device, checkpoint):
        if clip_frames is None:
            # (V * F, 3, S, S) uint8
            clip_frames, owners = read_videos(videos, results['frames'], enc)
        pixels = frames.to_pixel_values(clip_frames.to(device), enc.image_family)
        s, m = occlusion(model, pixels, enc.config.patch_size)
        scores.append(s.cpu())
        maps.append(m.cpu())
    scores = torch.stack(scores).mean(0)  # (V * F,) the folds' mean
    maps = torch.stack(maps).mean(0)  # (V * F, g, g)
    owners = torch.tensor(owners)  # (V * F,) the video of each frame
    return [VideoMaps(float(scores[owners == i].mean()), scores[owners == i].tolist(),
                      maps[owners == i], clip_frames[owners == i]) if i in owners else None
            for i in range(len(videos))]


def explain_captions(run_dir, captions, device='cpu', checkpoint=None):
    """the value of each word: the caption's score minus its score without the word (leave-one-out,
    the occlusion of words; Li, Monroe and Jurafsky, "Understanding neural networks through
    representation erasure", 2016).
    -> per --captions argument, per caption: (caption, its score, [(word, value), ...])"""
    items = caption_items(captions)
    words = [c.split() for c, _ in items]
    short = [(c, i) for (c, i), w in zip(items, words) if len(w) < 2]
    if short:
        raise UserError(f"--captions argument {short[0][1] + 1}: {short[0][0]!r} has one word; "
                        "explain.py compares a caption with and without each word, so it needs two "
                        "words or more")
    dropped = [' '.join(w[:k] + w[k + 1:]) for w in words for k in range(len(w))]  # less each word
    whole = [c for c, _ in items]
    scores = predict(run_dir, captions=whole + dropped, device=device, checkpoint=checkpoint)
    without = iter(scores[len(items):])
    explained = [(c, s, [(word, s - next(without)) for word in w])
                 for c, s, w in zip(whole, scores[:len(items)], words)]
    return [[e for e, (_, i) in zip(explained, items) if i == arg] for arg in range(len(captions))]


def frame_beside_map(m, k, name):
    """frame k of a video beside its map -> the Figure. The map is opaque, on one colour scale for
    the video's frames, so that a colour means what the colour bar says; the patch grid, drawn on
    both, places a square of the map on the frame"""
    lim = max(float(m.maps.abs().max()), 1e-6)
    img = m.frames[k].permute(1, 2, 0).numpy()  # (S, S, 3) uint8
    g, size = m.maps.shape[-1], img.shape[0]
    fig = Figure(figsize=(7, 3.4), layout='constrained')
    left, right = fig.subplots(1, 2)
    left.imshow(img)
    shown = right.imshow(m.maps[k].numpy(), cmap='RdBu_r', vmin=-lim, vmax=lim,  # (g, g) stretched
                         interpolation='nearest', extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    edges = np.arange(g + 1) * size / g - 0.5
    for ax, colour in ((left, 'white'), (right, 'grey')):
        ax.set_xticks(edges)
        ax.set_yticks(edges)
        ax.tick_params(length=0, labelbottom=False, labelleft=False)
        ax.grid(color=colour, linewidth=0.6, alpha=0.6)
    left.set_title('frame, as the encoder takes it', fontsize=10)
    right.set_title('memorability map (occlusion of patches)', fontsize=10)
    bar = fig.colorbar(shown, ax=right, shrink=0.9)
    bar.set_label("contribution to the frame's score\n(its drop when the patch is occluded)",
                  fontsize=9)
    fig.suptitle(f"{name}, frame {k + 1} of {len(m.frames)}: score {m.frame_scores[k]:.3f} "
                 f"(video: {m.score:.3f})", fontsize=11)
    return fig


def save_maps(m, name, prefix):
    """one PNG per frame, PREFIX_frame1.png ... -> the paths written"""
    paths = [f'{prefix}_frame{k + 1}.png' for k in range(len(m.frames))]
    for k, path in enumerate(paths):
        figures.save_png(frame_beside_map(m, k, name), path)
    return paths


def main(argv=None):
    """prints each video's score and the maps drawn, or each caption's words with their values (and
    writes words.csv) -> the scores. Exits with status 1, after drawing the others, when a video
    could not be read."""
    args = parse_args(argv)
    check_fresh(args)
    args.device = pick_device(args.device)
    names = args.captions or args.videos
    if args.captions:
        found = explain_captions(args.model, args.captions, args.device, args.checkpoint)
        scores = [sum(s for _, s, _ in f) / len(f) for f in found]  # eq. 2-3: its captions' mean
    else:
        found = explain_videos(args.model, args.videos, args.device, args.checkpoint)
        scores = [None if m is None else m.score for m in found]
    os.makedirs(args.out, exist_ok=True)
    print(run_summary(args.model))
    print(f"score\t{'caption' if args.captions else 'video'}")
    for name, s, f in zip(names, scores, found):
        if s is None:
            continue
        print(f"{s:.4f}\t{name}")
        if args.captions:  # each caption's score, then each word with its value
            for _, cs, values in f:
                print(f"    {cs:.4f} " + ' '.join(f"{w}({v:+.4f})" for w, v in values))
        else:
            paths = save_maps(f, os.path.basename(name), os.path.join(args.out, stem(name)))
            print('    wrote ' + ' '.join(paths))
    if args.captions:
        path = os.path.join(args.out, 'words.csv')
        rows = [[i + 1, c, w, f'{v:.6f}']
                for i, f in enumerate(found) for c, _, vs in f for w, v in vs]
        runs.write_csv(path, ['argument', 'caption', 'word', 'value'], rows)
        print(f"wrote {path}")
    exit_if_unscored(names, scores, 'explain.py')
    return scores


if __name__ == '__main__':
    runs.script(main, 'explain.py', "the maps drawn so far are kept; delete them, or give another "
                "--out, and run the same command again")
