"""
Score new videos, or captions, with a run of regress.py: each frame (or caption) is scored by every
fold model, the fold models are averaged, and the frames of a video are averaged (late fusion, paper
eq. 2-3). Frames are decoded and resized by the same data.py functions that filled the training cache.

    python predict.py clip1.mp4 clip2.mp4 --model results/s6-vision
    python predict.py --model results/s6-text --captions "a dog runs on the beach" "a man cooks pasta"
    python predict.py videos/*.mp4 --model results/s5-vision --csv scores.csv
    python predict.py clip1.mp4 --model results/s6-vision --explain maps     # maps/clip1_frame1.png ...
    python predict.py --model results/s6-text --captions "a dog runs on the beach" --explain maps

--explain draws memorability maps: for each frame scored, the frame beside the contribution of each of its
patches to its score, found by occlusion() (the mean over the fold models, as the score is); for captions it
prints each word's value, the drop of the caption's score without it. Each is one short function to change.

For a text run each --captions argument is one video; several captions of one video can be given
in one argument separated by '||', and are fused like the 5 captions of a Memento10k video.

A video that cannot be read is skipped with a warning naming it and why; the others are scored
(printed, and written to --csv, which holds only the scored videos), then the script exits with status 1.
"""
import argparse
import os
import sys
from dataclasses import dataclass

import av
import torch
from safetensors import SafetensorError
from matplotlib.figure import Figure
from safetensors.torch import load_file

import data
import evaluate
import models
import runs
import training
from runs import UserError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter)
    p.add_argument('videos', nargs='*', help="mp4 files to score (vision runs)")
    p.add_argument('--model', required=True, help="output folder of regress.py, e.g. results/s6-vision")
    p.add_argument('--captions', nargs='+', default=None,
                   help="captions to score (text runs); '||' joins captions of one video")
    p.add_argument('--csv', default=None, help="also write video,score to this file (its folder must exist)")
    p.add_argument('--explain', default=None, metavar='OUT_DIR',
                   help="also draw each frame's memorability map into OUT_DIR (vision runs; occlusion of patches), or "
                        "print each word's value (--captions, text runs) and write OUT_DIR/words.csv")
    p.add_argument('--device', default=None, help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument('--checkpoint', default=None, metavar='FOLDER',
                   help="frozen runs: the base encoder (folder or hub id), when it is no longer where the run found it "
                        "(default: the one in the run's results.json)")
    args = p.parse_args(argv)
    if args.videos and args.captions:
        p.error("give video files or --captions, not both")
    if args.csv and os.path.isdir(args.csv):
        p.error(f"--csv {args.csv} is a folder; expected a file name such as {os.path.join(args.csv, 'scores.csv')}")
    if args.csv and not os.path.isdir(os.path.dirname(os.path.abspath(args.csv))):
        p.error(f"--csv {args.csv}: the folder {os.path.dirname(os.path.abspath(args.csv))} does not exist")
    if args.explain and os.path.isfile(args.explain):
        p.error(f"--explain {args.explain} is a file; expected a folder for the maps")
    if args.explain and not os.path.isdir(os.path.dirname(os.path.abspath(args.explain))):
        p.error(f"--explain {args.explain}: the folder {os.path.dirname(os.path.abspath(args.explain))} does not exist")
    stems = [os.path.splitext(os.path.basename(v))[0] for v in args.videos]  # the maps' file names
    twice = [v for v, stem in zip(args.videos, stems) if stems.count(stem) > 1]
    if args.explain and twice:
        p.error(f"--explain: {twice[0]} and {twice[1]} would draw the same {args.explain}/"
                f"{os.path.splitext(os.path.basename(twice[0]))[0]}_frame*.png; give each video once, by its own name")
    return args


def load_run(run_dir):
    """results.json of a regress.py run and its fold folders; a clear error when a piece is missing"""
    path = os.path.join(run_dir, 'results.json')
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --model must be an output folder of regress.py")
    results = runs.read_json(path, expect=dict)
    for key in ('kind', 'modality', 'frozen', 'folds', 'frames', 'checkpoint'):
        if key not in results:
            raise UserError(f"{path}: missing key {key!r}; is it a results.json of regress.py?")
    if results['kind'] != 'regress':
        raise UserError(f"{path}: kind is {results['kind']!r}, expected 'regress' (a regress.py run)")
    folds = []
    for k in range(results['folds']):
        fold = os.path.normpath(os.path.join(run_dir, results.get('folds_dir', '.'), f'fold{k}'))
        need = [os.path.join(fold, 'head.safetensors'), os.path.join(fold, 'checkpoint.pt')]
        need += [] if results['frozen'] else [os.path.join(fold, 'encoder', 'model.safetensors')]
        missing = [p for p in need if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{run_dir} has no trained model: {missing[0]} is missing "
                                    f"(did regress.py finish its {results['folds']} folds?)")
        folds.append(fold)
    return results, folds


def load_head(path, dim):
    """a fold's RegressionHead; errors name the file, and each wrong key with its expected and found shape"""
    try:
        sd = load_file(path)
    except SafetensorError as e:
        raise UserError(f"{path}: truncated or corrupt ({e}); delete {os.path.dirname(path)} and rerun "
                         f"regress.py's command to train this fold again") from None
    head = models.RegressionHead(dim)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    wrong = [f"{k}: expected {expected.get(k, 'no such key')}, found {found.get(k, 'none')}"
             for k in sorted(expected.keys() | found.keys()) if expected.get(k) != found.get(k)]
    if wrong:
        raise UserError(f"{path} is not a head for this run's {dim}-dim encoder: {'; '.join(wrong)}")
    head.load_state_dict(sd)
    return head


def load_frozen(run_dir, results, fold, checkpoint=None):
    """the base encoder of a frozen run: --checkpoint, else the folder the run resolved, else what it was given;
    refused when its weights are not the ones the run's folds (fold: one of them) were trained on"""
    src = checkpoint or results.get('checkpoint_path', '')  # checkpoint_path is gone if the run came from elsewhere
    src = src if checkpoint or os.path.isdir(src) else results['checkpoint']
    try:
        base = models.from_pretrained(src)
    except UserError as e:
        hint = '' if '--checkpoint' in str(e) else '; if it has moved, pass --checkpoint FOLDER'
        raise UserError(f"{run_dir} was trained on the frozen encoder {src}, which does not load: "
                                f"{e}{hint}") from None
    record = os.path.join(fold, 'checkpoint.pt')  # a finished fold's record holds the run's identity
    trained = runs.read_state(record)['identity']['checkpoint content']
    runs.check_identity({'checkpoint content': trained}, {'checkpoint content': models.checkpoint_identity(src)}, src,
                        f"it is not the encoder {run_dir} was trained on; pass --checkpoint with that one")
    return src, base


def pick_device(name):
    """--device checked before any work: None is cuda when there is one, else cpu"""
    gpus = torch.cuda.device_count()
    if name is None:
        return 'cuda' if gpus else 'cpu'
    available = ['cpu'] + (['cuda'] + [f'cuda:{i}' for i in range(gpus)] if gpus else [])
    available += ['mps'] if torch.backends.mps.is_available() else []
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device type torch knows
        device = None
    if device is None or (device.type != 'cpu' and str(device) not in available):
        raise UserError(f"--device {name}: expected one of {', '.join(available)} on this machine")
    return name


def read_video(path, n_frames, family, size):
    """(F, 3, S, S) uint8: the frames regress.py trained on (data.frame_cache uses the same two calls)"""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a video file")
    if not os.path.isfile(path):
        raise UserError(f"video {path} not found")
    try:
        return data.resize_crop(data.decode_frames(path, n_frames), family, size)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"video {path} is unreadable: {e}") from e


def caption_items(captions):
    """--captions arguments -> (caption, index of its argument) pairs: '||' separates the captions of one video"""
    items = [(c.strip(), i) for i, text in enumerate(captions) for c in text.split('||') if c.strip()]
    empty = sorted(set(range(len(captions))) - {i for _, i in items})
    if empty:
        raise UserError(f"--captions argument {empty[0] + 1} ({captions[empty[0]]!r}) holds no caption")
    return items


def check_inputs(run_dir, results, videos, captions, checkpoint):
    """the inputs against the run, before any model is loaded"""
    if not videos and not captions:
        raise UserError("nothing to score: give video files, or --captions for a text run")
    if results['modality'] == 'vision' and captions:
        raise UserError(f"{run_dir} is a vision run: give video files, not --captions")
    if results['modality'] == 'text' and not captions:
        raise UserError(f"{run_dir} is a text run: give --captions \"TEXT\" ..., not video files")
    if checkpoint and not results['frozen']:
        raise UserError(f"--checkpoint is for frozen runs; {run_dir} fine-tuned its encoder, kept in each fold folder")


def fold_models(run_dir, results, folds, device, checkpoint=None):
    """yields each fold's model (paper eq. 1: the fold's head on the normalised embedding; inputs -> (B,) scores),
    its encoder and the folder of its tokenizer; one fold at a time, a frozen encoder loaded once for all folds"""
    if results['frozen']:
        src, shared = load_frozen(run_dir, results, folds[0], checkpoint)
        shared = shared.to(device)
    for fold in folds:
        if not results['frozen']:
            src = os.path.join(fold, 'encoder')
            shared = models.from_pretrained(src).to(device)
        enc = models.encoder_for(shared, results['modality'])
        model = models.Regressor(models.Normalized(enc), enc.embed_dim, trainable=False)
        model.head = load_head(os.path.join(fold, 'head.safetensors'), enc.embed_dim)
        yield model.to(device).eval(), enc, src


def read_videos(paths, n_frames, enc):
    """-> (N, 3, S, S) uint8 frames of the videos that can be read, as `enc` takes them, and the index in `paths`
    of each frame's video; a warning names each video skipped"""
    frames = {}
    for i, p in enumerate(paths):
        try:
            frames[i] = read_video(p, n_frames, enc.image_family, enc.image_size)
        except UserError as e:
            print(f"predict.py: warning: {e}; skipped", file=sys.stderr)
    if not frames:
        raise UserError(f"none of the {len(paths)} videos could be read (see the warnings above)")
    return torch.cat(list(frames.values())), [i for i, f in frames.items() for _ in range(len(f))]


@torch.no_grad()
def predict(run_dir, videos=(), captions=(), device='cpu', batch_size=64, checkpoint=None):
    """-> one memorability score per video (or per --captions argument), in input order; None for a video that
    could not be read (a warning on stderr names it and why)"""
    results, folds = load_run(run_dir)
    check_inputs(run_dir, results, videos, captions, checkpoint)
    items = caption_items(captions) if captions else None
    frames, preds = None, []
    for model, enc, src in fold_models(run_dir, results, folds, device, checkpoint):
        if results['modality'] == 'vision':
            if frames is None:
                frames, owners = read_videos(videos, results['frames'], enc)  # (V * F, 3, S, S) uint8
            preds.append(torch.cat([model(data.to_pixel_values(frames[i:i + batch_size].to(device), enc.image_family))
                                    .cpu() for i in range(0, len(frames), batch_size)]))  # (V * F,)
        else:  # captions in batches of similar length, each trimmed to its longest: little padding
            ids, mask = models.load_tokenizer(src)([c for c, _ in items])  # (N, T), padded to the longest
            owners = [i for _, i in items]
            def encode(b):
                t = int(mask[b].sum(1).max())
                return model(ids[b, :t].to(device), mask[b, :t].to(device))
            preds.append(training.encode_by_length(encode, torch.arange(len(ids)), mask.sum(1), batch_size))
    scores = dict(zip(*evaluate.fuse(torch.stack(preds).mean(0).numpy(), owners)))  # mean of the folds, then eq. 2-3
    return [float(scores[i]) if i in scores else None for i in range(len(captions or videos))]


# -----------------------------------------------------------------------------
# memorability maps: which patches of a frame, or which words of a caption, raise its score

def occlusion(model, pixels, patch):
    """The maps' method: occlusion (Zeiler and Fergus, "Visualizing and understanding convolutional networks",
    ECCV 2014) on the encoder's grid of patches. Each patch in turn is painted in the frame's mean colour; its
    contribution is the frame's score minus its score without the patch (positive: the patch raises the score).
    Exact and for any model, at the cost of 1 + P forward passes per frame (P patches: 49 for ViT-B/32).
    pixels (F, 3, S, S) normalised -> scores (F,), maps (F, S // patch, S // patch)"""
    g = pixels.shape[-1] // patch
    squares = torch.eye(g * g, dtype=torch.bool, device=pixels.device).view(-1, 1, g, g)  # (P, 1, g, g)
    squares = squares.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (P, 1, S, S): True on patch k
    scores, maps = [], []
    for x in pixels:  # (3, S, S): one batch per frame, the frame and its P occluded copies
        y = model(torch.cat([x[None], torch.where(squares, x.mean((1, 2), keepdim=True), x)]))  # (1 + P,)
        scores.append(y[0])
        maps.append(y[0] - y[1:])
    return torch.stack(scores), torch.stack(maps).view(-1, g, g)


@dataclass
class VideoMaps:
    """what predict.py --explain draws for one video"""
    score: float           # the video's score (eq. 2-3), as predict() gives it
    frame_scores: list     # (F,) each frame's score, the mean of the fold models
    maps: torch.Tensor     # (F, g, g) each patch's contribution to its frame's score, the mean of the fold models
    frames: torch.Tensor   # (F, 3, S, S) uint8, the frames as the encoder took them


@torch.no_grad()
def explain_videos(run_dir, videos, device='cpu', checkpoint=None):
    """-> VideoMaps per video, in input order; None for a video that could not be read"""
    results, folds = load_run(run_dir)
    check_inputs(run_dir, results, videos, (), checkpoint)
    frames, scores, maps = None, [], []
    for model, enc, _ in fold_models(run_dir, results, folds, device, checkpoint):
        if frames is None:
            frames, owners = read_videos(videos, results['frames'], enc)  # (V * F, 3, S, S) uint8
        s, m = occlusion(model, data.to_pixel_values(frames.to(device), enc.image_family), enc.config.patch_size)
        scores.append(s.cpu())
        maps.append(m.cpu())
    scores, maps = torch.stack(scores).mean(0), torch.stack(maps).mean(0)  # (V * F,), (V * F, g, g): folds' mean
    owners = torch.tensor(owners)  # (V * F,) the video of each frame
    return [VideoMaps(float(scores[owners == i].mean()), scores[owners == i].tolist(), maps[owners == i],
                      frames[owners == i]) if i in owners else None for i in range(len(videos))]


def explain_captions(run_dir, captions, device='cpu', checkpoint=None):
    """the value of each word: the caption's score minus its score without the word (leave-one-out, the occlusion
    of words; Li, Monroe and Jurafsky, "Understanding neural networks through representation erasure", 2016).
    -> per --captions argument, per caption: (caption, its score, [(word, value), ...])"""
    items = caption_items(captions)
    words = [c.split() for c, _ in items]
    short = [(c, i) for (c, i), w in zip(items, words) if len(w) < 2]
    if short:
        raise UserError(f"--captions argument {short[0][1] + 1}: {short[0][0]!r} has one word; --explain compares a "
                        "caption with and without each word, so it needs two words or more")
    dropped = [' '.join(w[:k] + w[k + 1:]) for w in words for k in range(len(w))]  # each caption less each word
    scores = predict(run_dir, captions=[c for c, _ in items] + dropped, device=device, checkpoint=checkpoint)
    whole, without = scores[:len(items)], iter(scores[len(items):])
    explained = [(c, s, [(word, s - next(without)) for word in w]) for (c, _), s, w in zip(items, whole, words)]
    return [[e for e, (_, i) in zip(explained, items) if i == arg] for arg in range(len(captions))]


def draw(m, name, prefix):
    """one figure per frame, PREFIX_frame1.png ...: the frame as the encoder took it beside its map, on one colour
    scale for the video's frames; -> the paths written"""
    lim = max(float(m.maps.abs().max()), 1e-6)
    paths = [f'{prefix}_frame{k + 1}.png' for k in range(len(m.frames))]
    for k, (frame, score, patches) in enumerate(zip(m.frames, m.frame_scores, m.maps)):
        fig = Figure(figsize=(6.4, 3.1), layout='constrained')
        left, right = fig.subplots(1, 2)
        img = frame.permute(1, 2, 0).numpy()  # (S, S, 3) uint8
        left.imshow(img)
        right.imshow(img.mean(-1), cmap='gray', vmin=0, vmax=255)  # the frame in grey under the map, to place it
        shown = right.imshow(patches.numpy(), cmap='RdBu_r', vmin=-lim, vmax=lim, alpha=0.6, interpolation='nearest',
                             extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
        left.set_title('frame, as the encoder takes it', fontsize=9)
        right.set_title('memorability map (occlusion of patches)', fontsize=9)
        for ax in (left, right):
            ax.set_axis_off()
        bar = fig.colorbar(shown, ax=right, shrink=0.9)
        bar.set_label("contribution to the frame's score\n(its drop when the patch is occluded)", fontsize=8)
        fig.suptitle(f"{name}, frame {k + 1} of {len(m.frames)}: score {score:.3f} (video: {m.score:.3f})", fontsize=10)
        evaluate.save_png(fig, paths[k])
    return paths


def score(args):
    """prints (and with --csv writes) one score per video or --captions argument; with --explain, draws each video's
    maps or prints each caption's words with their values. -> the scores. Exits with status 1 after writing them
    when a video could not be read."""
    args.device = pick_device(args.device)
    names = args.captions or args.videos
    maps, words = [None] * len(names), [None] * len(names)
    if args.explain and args.captions:
        words = explain_captions(args.model, args.captions, args.device, args.checkpoint)
        scores = [sum(s for _, s, _ in found) / len(found) for found in words]  # eq. 2-3: the mean of its captions
    elif args.explain:
        maps = explain_videos(args.model, args.videos, args.device, args.checkpoint)
        scores = [None if m is None else m.score for m in maps]
    else:
        scores = predict(args.model, args.videos, args.captions or (), args.device, checkpoint=args.checkpoint)
    if args.explain:
        os.makedirs(args.explain, exist_ok=True)
    results = load_run(args.model)[0]
    print(f"{args.model}: strategy {results.get('strategy', '?')} {results['modality']}, "
          f"{results.get('encoder', '?')}, validation SRCC {results.get('srcc_mean', float('nan')):.3f}; "
          f"a score is the mean of its {results['folds']} fold models, 0-1")
    print(f"score\t{'caption' if args.captions else 'video'}")
    for name, s, m, found in zip(names, scores, maps, words):
        if s is not None:
            print(f"{s:.4f}\t{name}")
        for _, cs, values in found or []:  # a caption's score, then each word with its value
            print(f"    {cs:.4f} " + ' '.join(f"{w}({v:+.4f})" for w, v in values))
        if m is not None:
            prefix = os.path.join(args.explain, os.path.splitext(os.path.basename(name))[0])
            print('    wrote ' + ' '.join(draw(m, os.path.basename(name), prefix)))
    if args.explain and args.captions:
        path = os.path.join(args.explain, 'words.csv')
        rows = [[i + 1, c, w, f'{v:.6f}'] for i, found in enumerate(words) for c, _, vs in found for w, v in vs]
        runs.write_csv(path, ['argument', 'caption', 'word', 'value'], rows)
        print(f"wrote {path}")
    scored = [(n, s) for n, s in zip(names, scores) if s is not None]
    if args.csv:
        runs.write_csv(args.csv, ['video', 'score'], [[n, f'{s:.6f}'] for n, s in scored])
        print(f"wrote {args.csv}")
    if len(scored) < len(names):
        raise SystemExit(f"predict.py: error: {len(names) - len(scored)} of {len(names)} videos could not be read "
                         "and have no score (see the warnings above)")
    return scores


def main(argv=None):
    return score(parse_args(argv))


if __name__ == '__main__':
    runs.script(main, 'predict.py', "nothing was written; run the same command again")
