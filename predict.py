"""
Score new videos, or captions, with a run of regress.py: each frame (or caption) is scored by every
fold model, the fold models are averaged, and the frames of a video are averaged (late fusion, paper
eq. 2-3). Frames are decoded and resized by the same data.py functions that filled the training cache.

    python predict.py clip1.mp4 clip2.mp4 --model results/s6-vision
    python predict.py --model results/s6-text --captions "a dog runs on the beach" "a man cooks pasta"
    python predict.py videos/*.mp4 --model results/s5-vision --csv scores.csv

For a text run each --captions argument is one video; several captions of one video can be given
in one argument separated by '||', and are fused like the 5 captions of a Memento10k video.
"""
import argparse


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('videos', nargs='*', help="mp4 files to score (vision runs)")
    p.add_argument('--model', required=True, help="output folder of regress.py, e.g. results/s6-vision")
    p.add_argument('--captions', nargs='+', default=None,
                   help="captions to score (text runs); '||' joins captions of one video")
    p.add_argument('--csv', default=None, help="also write video,score to this file")
    p.add_argument('--device', default=None, help="torch device (default: cuda when there is one, else cpu)")
    args = p.parse_args(argv)
    if args.videos and args.captions:
        p.error("give video files or --captions, not both")
    return args


if __name__ == '__main__':
    ARGS = get_args()  # --help and a wrong flag answer before torch is imported (2-4 s)

import os  # noqa: E402

import av  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import files  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402


def load_run(run_dir):
    """results.json of a regress.py run and its fold folders; a clear error when a piece is missing"""
    path = os.path.join(run_dir, 'results.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --model must be an output folder of regress.py")
    results = files.read_json(path, expect=dict)
    for key in ('kind', 'modality', 'frozen', 'folds', 'frames', 'checkpoint'):
        if key not in results:
            raise KeyError(f"{path}: missing key {key!r}; is it a results.json of regress.py?")
    if results['kind'] != 'regress':
        raise ValueError(f"{path}: kind is {results['kind']!r}, expected 'regress' (a regress.py run)")
    folds = []
    for k in range(results['folds']):
        fold = os.path.join(run_dir, results.get('folds_dir', '.'), f'fold{k}')
        need = [os.path.join(fold, 'head.safetensors')]
        need += [] if results['frozen'] else [os.path.join(fold, 'encoder', 'model.safetensors')]
        missing = [p for p in need if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{run_dir} has no trained model: {missing[0]} is missing "
                                    f"(did regress.py finish its {results['folds']} folds?)")
        folds.append(fold)
    return results, folds


def read_video(path, n_frames, family, size):
    """(F, 3, S, S) uint8: the frames regress.py trained on (data.frame_cache uses the same two calls)"""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path} not found")
    try:
        return data.resize_crop(data.decode_frames(path, n_frames), family, size)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ValueError(f"video {path} is unreadable: {e}") from e


@torch.no_grad()
def predict(run_dir, videos=(), captions=(), device='cpu', batch_size=64):
    """-> one memorability score per video (or per --captions argument), in input order"""
    results, folds = load_run(run_dir)
    modality, inputs = results['modality'], list(captions) if captions else list(videos)
    if not inputs:
        raise ValueError("nothing to score: give video files, or --captions for a text run")
    if modality == 'vision' and captions:
        raise ValueError(f"{run_dir} is a vision run: give video files, not --captions")
    if modality == 'text' and not captions:
        raise ValueError(f"{run_dir} is a text run: give --captions \"TEXT\" ..., not video files")
    if modality == 'text':  # (item, owner) pairs: several captions of one video are fused
        items = [(c.strip(), i) for i, text in enumerate(inputs) for c in text.split('||') if c.strip()]
        empty = sorted(set(range(len(inputs))) - {i for _, i in items})
        if empty:
            raise ValueError(f"--captions argument {empty[0] + 1} ({inputs[empty[0]]!r}) holds no caption")
    frozen_src = results.get('checkpoint_path', '')  # the resolved folder, unless the run came from another machine
    frozen_src = frozen_src if os.path.isdir(frozen_src) else results['checkpoint']
    shared, frames, preds = None, None, []
    for fold in folds:
        src = frozen_src if results['frozen'] else os.path.join(fold, 'encoder')
        if shared is None or not results['frozen']:  # a frozen encoder is the same in every fold
            shared = models.from_pretrained(src).to(device)
        enc = models.encoder_for(shared, modality)
        head = models.RegressionHead(enc.embed_dim).to(device)
        head.load_state_dict(load_file(os.path.join(fold, 'head.safetensors')))
        if modality == 'vision':
            if frames is None:
                frames = [read_video(p, results['frames'], enc.image_family, enc.image_size) for p in inputs]
                owners = [i for i, f in enumerate(frames) for _ in range(len(f))]
                frames = torch.cat(frames)  # (V * F, 3, S, S) uint8
            x = [(data.to_pixel_values(frames[i:i + batch_size].to(device), enc.image_family),)
                 for i in range(0, len(frames), batch_size)]
        else:
            ids, mask = models.load_tokenizer(src)([c for c, _ in items])  # (N, T), padded to the longest
            owners = [i for _, i in items]
        enc.eval()
        if modality == 'vision':
            preds.append(torch.cat([head(enc(*b)).float().cpu() for b in x]))  # (items,)
        else:  # captions in batches of similar length, each trimmed to its longest: little padding
            def encode(b):
                t = int(mask[b].sum(1).max())
                return head(enc(ids[b, :t].to(device), mask[b, :t].to(device)))
            preds.append(training.encode_by_length(encode, torch.arange(len(ids)), mask.sum(1), batch_size))
    _, fused = evaluate.fuse(torch.stack(preds).mean(0).numpy(), owners)  # mean of the folds, then eq. 2-3
    return [float(s) for s in fused]


def score(args):
    """prints (and with --csv writes) one score per video or --captions argument; -> the scores"""
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    names = args.captions or args.videos
    scores = predict(args.model, args.videos, args.captions or (), args.device)
    for name, s in zip(names, scores):
        print(f"{s:.4f}\t{name}")
    if args.csv:
        files.write_csv(args.csv, ['video', 'score'], [[n, f'{s:.6f}'] for n, s in zip(names, scores)])
        print(f"wrote {args.csv}")
    return scores


def main(argv=None):
    return score(get_args(argv))


if __name__ == '__main__':
    try:
        score(ARGS)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise SystemExit(f"predict.py: error: {e}")
