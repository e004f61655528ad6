"""
Score new videos, or captions, with a run of regress.py: each frame (or caption) is scored by every
fold model, the fold models are averaged, and the frames of a video are averaged (late fusion, paper
eq. 2-3). Frames are decoded and resized by the same frames.py functions that filled the training
cache.

    python predict.py clip1.mp4 clip2.mp4 --model results/s6-vision
    python predict.py --model results/s6-text --captions "a dog runs on the beach" "a man cooks"
    python predict.py videos/*.mp4 --model results/s5-vision --csv scores.csv

Which patches of a frame, or words of a caption, raise a score: explain.py (memorability maps),
which loads a run with this file's functions.

For a text run each --captions argument is one video; several captions of one video can be given
in one argument separated by '||', and are fused like the 5 captions of a Memento10k video.

A video that cannot be read is skipped with a warning naming it and why; the others are scored
(printed, and written to --csv, which holds only the scored videos), then the script exits with
status 1.
"""
import argparse
import os
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import checkpoints
import evaluate
import frames
import models
import runs
import training
from runs import UserError


def run_arguments(p):
    """the flags that name a run and where its models score, shared with explain.py"""
    p.add_argument('--model', required=True,
                   help="output folder of regress.py, e.g. results/s6-vision")
    p.add_argument('--device', default=None,
                   help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument('--checkpoint', default=None, metavar='FOLDER',
                   help="frozen runs: the base encoder (folder or hub id), when it is no longer "
                        "where the run found it (default: the one in the run's results.json)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter)
    p.add_argument('videos', nargs='*', help="mp4 files to score (vision runs)")
    p.add_argument('--captions', nargs='+', default=None,
                   help="captions to score (text runs); '||' joins captions of one video")
    p.add_argument('--csv', default=None,
                   help="also write video,score to this file (its folder must exist)")
    run_arguments(p)
    args = p.parse_args(argv)
    if args.videos and args.captions:
        p.error("give video files or --captions, not both")
    if args.csv and os.path.isdir(args.csv):
        p.error(f"--csv {args.csv} is a folder; expected a file name such as "
                f"{os.path.join(args.csv, 'scores.csv')}")
    if args.csv and not os.path.isdir(os.path.dirname(os.path.abspath(args.csv))):
        p.error(f"--csv {args.csv}: the folder {os.path.dirname(os.path.abspath(args.csv))} "
                "does not exist")
    return args


def load_run(run_dir):
    """results.json of a regress.py run and its fold folders; a clear error when a piece is missing
    """
    path = os.path.join(run_dir, 'results.json')
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: --model must be an output folder of regress.py")
    results = runs.read_json(path, expect=dict)
    required = ('kind', 'strategy', 'modality', 'encoder', 'frozen', 'folds', 'frames',
                'checkpoint', 'srcc_mean')
    for key in required:
        if key not in results:
            raise UserError(f"{path}: missing key {key!r}; is it a results.json of regress.py?")
    if results['kind'] != 'regress':
        raise UserError(f"{path}: kind is {results['kind']!r}, "
                        "expected 'regress' (a regress.py run)")
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
    """a fold's RegressionHead; errors name the file, and each wrong key with its expected and found
    shape"""
    try:
        sd = load_file(path)
    except SafetensorError as e:
        raise UserError(f"{path}: truncated or corrupt ({e}); delete {os.path.dirname(path)} "
                        "and rerun regress.py's command to train this fold again") from None
    head = models.RegressionHead(dim)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    wrong = [f"{k}: expected {expected.get(k, 'no such key')}, found {found.get(k, 'none')}"
             for k in sorted(expected.keys() | found.keys()) if expected.get(k) != found.get(k)]
    if wrong:
        raise UserError(f"{path} is not a head for this run's {dim}-dim encoder: "
                        f"{'; '.join(wrong)}")
    head.load_state_dict(sd)
    return head


def load_frozen(run_dir, results, fold, checkpoint=None):
    """the base encoder of a frozen run: --checkpoint, else the folder the run resolved, else what
    it was given; refused when its weights are not the ones the run's folds (fold: one of them) were
    trained on"""
    # checkpoint_path is gone if the run came from elsewhere
    src = checkpoint or results.get('checkpoint_path', '')
    src = src if checkpoint or os.path.isdir(src) else results['checkpoint']
    try:
        base = checkpoints.from_pretrained(src, results.get('pooling'))  # the run's, --pooling's
    except UserError as e:
        hint = '' if '--checkpoint' in str(e) else '; if it has moved, pass --checkpoint FOLDER'
        raise UserError(f"{run_dir} was trained on the frozen encoder {src}, which does not load: "
                                f"{e}{hint}") from None
    # a finished fold's record holds the run's identity
    record = os.path.join(fold, 'checkpoint.pt')
    trained = runs.read_state(record)['identity']['checkpoint content']
    runs.check_identity({'checkpoint content': trained},
                        {'checkpoint content': checkpoints.checkpoint_identity(src)}, src,
                        f"it is not the encoder {run_dir} was trained on; "
                        "pass --checkpoint with that one")
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
    """(F, 3, S, S) uint8: the frames regress.py trained on (frames.frame_cache uses the same two
    calls)"""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a video file")
    if not os.path.isfile(path):
        raise UserError(f"video {path} not found")
    try:
        decoded = frames.decode_frames(path, n_frames)  # (F, H, W, 3)
    except UserError as e:
        raise UserError(f"video {path} is unreadable: {e}") from None
    return frames.resize_crop(decoded, family, size)


def caption_items(captions):
    """--captions arguments -> (caption, index of its argument) pairs: '||' separates the
    captions of one video"""
    items = [(c.strip(), i) for i, text in enumerate(captions)
             for c in text.split('||') if c.strip()]
    empty = sorted(set(range(len(captions))) - {i for _, i in items})
    if empty:
        raise UserError(f"--captions argument {empty[0] + 1} ({captions[empty[0]]!r}) "
                        "holds no caption")
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
        raise UserError(f"--checkpoint is for frozen runs; {run_dir} fine-tuned its encoder, "
                        "kept in each fold folder")


def fold_models(run_dir, results, folds, device, checkpoint=None):
    """yields each fold's model (paper eq. 1: the fold's head on the normalised embedding; inputs ->
    (B,) scores), its encoder and the folder of its tokenizer; one fold at a time, a frozen encoder
    loaded once for all folds"""
    if results['frozen']:
        src, shared = load_frozen(run_dir, results, folds[0], checkpoint)
        shared = shared.to(device)
    for fold in folds:
        if not results['frozen']:
            src = os.path.join(fold, 'encoder')
            shared = checkpoints.from_pretrained(src).to(device)
        enc = models.encoder_for(shared, results['modality'])
        model = models.Regressor(enc, enc.embed_dim, trainable=False)
        model.head = load_head(os.path.join(fold, 'head.safetensors'), enc.embed_dim)
        yield model.to(device).eval(), enc, src


def read_videos(paths, n_frames, enc):
    """-> (N, 3, S, S) uint8 frames of the videos that can be read, as `enc` takes them, and the
    index in `paths` of each frame's video; a warning names each video skipped"""
    decoded = {}
    for i, p in enumerate(paths):
        try:
            decoded[i] = read_video(p, n_frames, enc.image_family, enc.image_size)
        except UserError as e:
            print(f"warning: {e}; skipped", file=sys.stderr)
    if not decoded:
        raise UserError(f"none of the {len(paths)} videos could be read (see the warnings above)")
    return torch.cat(list(decoded.values())), [i for i, f in decoded.items() for _ in range(len(f))]


@torch.no_grad()
def predict(run_dir, videos=(), captions=(), device='cpu', batch_size=64, checkpoint=None):
    """-> one memorability score per video (or per --captions argument), in input order; None
    for a video that could not be read (a warning on stderr names it and why)"""
    results, folds = load_run(run_dir)
    check_inputs(run_dir, results, videos, captions, checkpoint)
    items = caption_items(captions) if captions else None
    clip_frames, ids, preds = None, None, []
    for model, enc, src in fold_models(run_dir, results, folds, device, checkpoint):
        if results['modality'] == 'vision':
            if clip_frames is None:
                # (V * F, 3, S, S) uint8
                clip_frames, owners = read_videos(videos, results['frames'], enc)
            batches = clip_frames.split(batch_size)
            pixels = (frames.to_pixel_values(b.to(device), enc.image_family) for b in batches)
            preds.append(torch.cat([model(x).cpu() for x in pixels]))  # (V * F,)
        else:  # captions in batches of similar length, each trimmed to its longest: little padding
            if ids is None:  # (N, T), padded to the longest: every fold's tokenizer is the run's
                ids, mask = checkpoints.load_tokenizer(src)([c for c, _ in items])
                owners = [i for _, i in items]
            def encode(b):
                t = int(mask[b].sum(1).max())
                return model(ids[b, :t].to(device), mask[b, :t].to(device))
            preds.append(training.encode_by_length(
                encode, torch.arange(len(ids)), mask.sum(1), batch_size))
    # mean of the folds, then eq. 2-3
    scores = dict(zip(*evaluate.fuse(torch.stack(preds).mean(0).numpy(), owners)))
    return [float(scores[i]) if i in scores else None for i in range(len(captions or videos))]


def run_summary(run_dir):
    """the run in one line, printed above its scores"""
    results = load_run(run_dir)[0]
    return (f"{run_dir}: strategy {results['strategy']} {results['modality']}, "
            f"{results['encoder']}, validation SRCC {results['srcc_mean']:.3f}; "
            f"a score is the mean of its {results['folds']} fold models, 0-1")


def exit_if_unscored(names, scores, script):
    """exit status 1, once the scores are printed and written, when some videos could not be read"""
    missing = sum(s is None for s in scores)
    if missing:
        raise SystemExit(f"{script}: error: {missing} of {len(names)} videos could not be read "
                         "and have no score (see the warnings above)")


def main(argv=None):
    """prints (and with --csv writes) one score per video or --captions argument -> the scores.
    Exits with status 1 after writing them when a video could not be read."""
    args = parse_args(argv)
    args.device = pick_device(args.device)
    names = args.captions or args.videos
    scores = predict(args.model, args.videos, args.captions or (), args.device,
                     checkpoint=args.checkpoint)
    print(run_summary(args.model))
    print(f"score\t{'caption' if args.captions else 'video'}")
    scored = [(n, s) for n, s in zip(names, scores) if s is not None]
    for name, s in scored:
        print(f"{s:.4f}\t{name}")
    if args.csv:
        runs.write_csv(args.csv, ['video', 'score'], [[n, f'{s:.6f}'] for n, s in scored])
        print(f"wrote {args.csv}")
    exit_if_unscored(names, scores, 'predict.py')
    return scores


if __name__ == '__main__':
    runs.script(main, 'predict.py', "nothing was written; run the same command again")
