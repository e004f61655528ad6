"""
Memento10k on disk (paper 4.1-4.2): videos, scores and captions; frames preprocessed as the paper
does and captions tokenised, each once into a cache; the encoders; folds by video; stage 2's rows.

    python data.py --data DIR                           # what is there, what was excluded and why
    python data.py --data DIR --prepare --family clip   # decode every video once into the cache

Layouts, read into one table by load_memento:
  official:  memento_{train,val,test}_data.json (filename, mem_score, captions), videos/<filename>
  mediaeval: training_set|train_set, dev_set|development_set, test_set: <split>_scores.csv (target
             scores_normalized_short_term), <split>_text_descriptions.csv (description_0..4, or a
             caption a row in 'description'); Videos/<id>.mp4, <zero-padded id>.mp4 or as in the url
Excluded, a line each in Memento.exclusions (frame and caption runs see one set of videos): fewer
than 5 captions (of more, the first 5 kept, flagged), an empty or non-text caption, a file name
leading outside the dataset folder (never opened), in train/val a missing, NaN or out-of-[0, 1]
score. An undecodable video is a zero row of the frame cache and a line in FrameCache.failed. The
dataset folder is only read; the caches, in runs.cache_dir(), are named by the key of their inputs.
"""
import argparse
import functools
import glob
import io
import json
import math
import os
import zipfile
from collections import Counter
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F

import models
from harness import checkpoints, runs
from harness.runs import UserError, count

SPLITS = ('train', 'val', 'test')
N_CAPTIONS = 5  # captions per video in Memento10k (paper 4.1)
OFFICIAL_FILES = {s: f'memento_{s}_data.json' for s in SPLITS}
MEDIAEVAL_DIRS = {'train': ('training_set', 'train_set'), 'val': ('dev_set', 'development_set'),
                  'test': ('test_set',)}
# tools/demo.py's file (video file -> its shape's box per frame): a folder with it holds toy data
DEMO_BOXES = 'demo_boxes.json'

# -----------------------------------------------------------------------------
# the table
@dataclass
class Video:
    video_id: str
    split: str               # 'train' | 'val' | 'test'
    score: float | None      # mem_score / scores_normalized_short_term; None for test
    captions: list[str]      # 5
    path: str | None         # mp4 on disk, or None (captions-only use)

@dataclass
class Memento:
    root: str
    layout: str              # 'official' | 'mediaeval'
    videos: list[Video]
    exclusions: list[str]    # one line per excluded or flagged video
    demo: bool = False       # tools/demo.py's generated toy clips (the folder holds DEMO_BOXES)

    def split(self, name):
        return [v for v in self.videos if v.split == name]

    def labelled(self):
        return self.split('train') + self.split('val')  # all scored: check() excludes the others

    def key(self):
        """the table's content: another split, score or caption of a video is another dataset"""
        return runs.fingerprint([[v.video_id, v.split, v.score, v.captions] for v in self.videos])

    def summary(self):
        lines = [f"Memento10k at {self.root} ({self.layout} layout)"]
        for s in SPLITS:
            vs = self.split(s)
            lines.append(f"  {s:5s}: {len(vs)} videos, {sum(v.score is not None for v in vs)} "
                         f"scored, {sum(len(v.captions) for v in vs)} captions, "
                         f"{sum(v.path is not None for v in vs)} mp4 found on disk")
        return '\n'.join(lines + [f"  excluded or flagged: {len(self.exclusions)}"]
                         + [f"    - {e}" for e in self.exclusions])

def shown(value):
    """a value read from a dataset file as the file spells it, cut short"""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + '...'

def check(video_id, split, score, captions, file, exclusions):
    """-> the Video to keep, or None with the reason appended to exclusions"""
    where = f"{file}: video {video_id} ({split})"
    first = captions[:N_CAPTIONS] if isinstance(captions, list) else []
    wrong = [k for k, c in enumerate(first) if not isinstance(c, str)]  # str(None) would be "None"
    texts = [c for c in first if isinstance(c, str)]
    try:  # float(true) would be 1.0
        value = None if isinstance(score, bool) or split == 'test' else float(score)
    except (TypeError, ValueError):
        value = None
    reason = (
        f"captions is {shown(captions)}, expected a list of {N_CAPTIONS} texts"
        if not isinstance(captions, list) else
        f"{len(captions)} captions, expected {N_CAPTIONS}" if len(captions) < N_CAPTIONS else
        f"caption {wrong[0]} is {shown(first[wrong[0]])}, expected text" if wrong else
        f"caption {[c.strip() for c in texts].index('')} is empty" if not all(map(str.strip, texts))
        else None if split == 'test' else
        f"missing score (found {score!r})" if value is None else
        f"score {value} is not in [0, 1]" if not 0.0 <= value <= 1.0 else None)  # NaN too
    if reason:
        return exclusions.append(f"{where} excluded: {reason}")
    if len(captions) > N_CAPTIONS:
        exclusions.append(f"{where} flagged: {len(captions)} captions, the first {N_CAPTIONS} are used")
    return Video(str(video_id), split, value, [c.strip() for c in texts], None)

def read_official(root):
    """-> rows (file, video id, Video or None, [(folder, name)] of its mp4), exclusions"""
    rows, exclusions = [], []
    for s in SPLITS:
        file = os.path.join(root, OFFICIAL_FILES[s])
        runs.require(os.path.exists(file), f"{file} is missing (the official layout needs "
                     f"{list(OFFICIAL_FILES.values())})")
        for i, r in enumerate(runs.read_json(file, expect=list, what='Memento10k split file')):
            runs.require(isinstance(r, dict) and {'filename', 'captions'} <= r.keys(), f"{file}: record "
                         f"{i} is {shown(r)}, expected an object with the keys filename and captions")
            name = r['filename']
            if not isinstance(name, str) or not name:
                raise UserError(f"{file}: record {i}: filename is {shown(name)}, expected a name")
            vid = name.removesuffix('.mp4')
            v = check(vid, s, r.get('mem_score'), r['captions'], file, exclusions)
            rows.append((file, vid, v, [(os.path.join(root, 'videos'), name)]))
    return rows, exclusions

def one(folder, pattern, required=True):
    found = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
    runs.require(len(found) == 1 or not required and not found, f"{folder}: {len(found)} files "
                 f"match {pattern} {found}; expected one (e.g. train_{pattern[2:]})")
    return found[0] if found else None

def official_filename(url):
    """.../actions3/<category+with+plus>/<name>.mp4 -> <category-with-minus>_<name>.mp4, or None"""
    parts = url.rstrip('/').split('/')
    return f"{parts[-2].replace('+', '-')}_{parts[-1]}" if len(parts) >= 2 else None

def by_id(file, rows):
    """rows of a CSV with a row a video, unchanged; a video id seen twice raises"""
    repeated = [i for i, n in Counter(r['video_id'] for r in rows).items() if n > 1]
    if repeated:
        raise UserError(f"{file}: duplicate video id {repeated[0]}")
    return rows

def read_mediaeval(root):
    """-> rows and exclusions as read_official's"""
    rows, exclusions = [], []
    wide = [f'description_{k}' for k in range(N_CAPTIONS)]
    for s in SPLITS:
        found = [d for d in (os.path.join(root, n) for n in MEDIAEVAL_DIRS[s]) if os.path.isdir(d)]
        runs.require(found, f"{root}: no folder {' or '.join(MEDIAEVAL_DIRS[s])} for the {s} split")
        text_file = one(found[0], '*_text_descriptions.csv')
        score_file = one(found[0], '*_scores.csv', required=s != 'test')
        columns = ['video_id', 'video_url', 'scores_normalized_short_term']
        scored = by_id(score_file, runs.read_csv(score_file, columns)) if score_file else []
        scores = {r['video_id']: r['scores_normalized_short_term'] for r in scored}
        urls = {r['video_id']: r['video_url'] for r in scored}
        text = runs.read_csv(text_file, ['video_id'])
        header = list(text[0]) if text else []
        if all(c in header for c in wide):
            captions = {r['video_id']: [r[c] for c in wide] for r in by_id(text_file, text)}
        elif text and 'description' not in header:
            raise UserError(f"{text_file}: expected the columns {wide} (a row a video) or "
                            f"'description' (a row a caption); the header has {header}")
        else:  # long format: one caption a row
            captions = {}
            for r in text:
                captions.setdefault(r['video_id'], []).append(r['description'])
                urls.setdefault(r['video_id'], r.get('video_url'))
        dirs = [os.path.join(found[0], 'Videos'), os.path.join(root, 'Videos')]
        for vid in list(scores) + [v for v in captions if v not in scores]:
            file = score_file or text_file
            v = check(vid, s, scores.get(vid), captions.get(vid, []), file, exclusions)
            padded = f'{int(vid):05d}.mp4' if vid.isascii() and vid.isdigit() else None
            official = urls.get(vid) and official_filename(urls[vid])
            names = [n for n in (f'{vid}.mp4', padded, official) if n]
            rows.append((file, vid, v, [(d, n) for d in dirs for n in names]))
    return rows, exclusions

def load_memento(root):
    """Reads either layout (the module docstring) into a Memento table."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: no such folder{' (it is a file)' * os.path.exists(root)}. Give "
                        f"the Memento10k folder with --data DIR, link it where the scripts look by "
                        f"default (ln -s /path/to/Memento10k data/memento10k), or try the pipeline "
                        f"on a generated toy dataset: bash run_all.sh --demo")
    official = [os.path.join(root, f) for f in OFFICIAL_FILES.values()]
    mediaeval = [os.path.join(root, d) for s in SPLITS for d in MEDIAEVAL_DIRS[s]]
    if any(os.path.exists(f) for f in official):
        layout, read = 'official', read_official
    elif any(os.path.isdir(d) for d in mediaeval):
        layout, read = 'mediaeval', read_mediaeval
    else:
        raise UserError(f"{root}: unknown layout; looked for the files {official} and the folders "
                        f"{mediaeval}")
    rows, exclusions = read(root)
    videos, seen = [], {}
    for file, vid, v, candidates in rows:
        if vid in seen:
            raise UserError(f"{file}: duplicate video id {vid} (first seen in {seen[vid]})")
        seen[vid] = file
        if v is None:
            continue
        resolved = [runs.inside(folder, name) for folder, name in candidates]
        if None in resolved:  # a name from a dataset file must not reach outside it: never opened
            folder, name = candidates[resolved.index(None)]
            exclusions.append(f"{file}: video {vid} ({v.split}) excluded: the file name {name!r} "
                              f"leads outside {folder}")
            continue
        found = [os.path.join(*c) for c, p in zip(candidates, resolved) if os.path.isfile(p)]
        v.path = found[0] if found else None
        videos.append(v)
    return Memento(root, layout, videos, exclusions, os.path.isfile(f"{root}/{DEMO_BOXES}"))

def to_device(x, device):
    """x on device; to a GPU through pinned memory, so that the copy queues behind the running
    step and the host goes on preparing the next batch (from pageable memory the host waits)"""
    cuda = torch.device(device).type == 'cuda'
    return x.pin_memory().to(device, non_blocking=True) if cuda else x.to(device)

# -----------------------------------------------------------------------------
# frames: the first, middle and last of a clip (4.1.1), resized and cropped for the encoder (4.2)
# clip: paper 4.2, CLIP's own (HF CLIPImageProcessor: short side to 224, centre crop). vit: ours,
# the in21k checkpoint's own for strategies 1-2 (HF ViTImageProcessor: square resize, mean, std 0.5)
FAMILIES = {
    'clip': dict(resize='short_side_crop', interpolation='bicubic',
                 mean=(0.48145466, 0.4578275, 0.40821073),
                 std=(0.26862954, 0.26130258, 0.27577711)),
    'vit': dict(resize='square', interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3),
}
MAX_ASPECT = 8  # long side / short side beyond which only the centre is resized (videos: ~2.4)

def frame_indices(n_total, n_frames):
    """evenly spaced, first and last included: i * (T - 1) // (F - 1); F=3: first, middle, last"""
    if n_frames == 1:
        return [(n_total - 1) // 2]
    return [i * (n_total - 1) // (n_frames - 1) for i in range(n_frames)]

def decode_frames(path, n_frames):
    """(F, H, W, 3) uint8 frames of an mp4. An unreadable file, or a clip of fewer than F frames
    (usually truncated; repeated frames would add duplicate pairs), is bad input."""
    try:  # only the decoder's calls: PyAV's errors and a file that cannot be opened
        with av.open(path) as container:
            runs.require(container.streams.video, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = 'AUTO'
            frames = list(container.decode(stream))
    except (av.FFmpegError, OSError) as e:
        raise UserError(str(e)) from None
    if len(frames) < n_frames:
        raise UserError(f"has {len(frames)} frames, fewer than the {n_frames} requested")
    picked = frame_indices(len(frames), n_frames)
    return np.stack([frames[i].to_ndarray(format='rgb24') for i in picked])

def resize_crop(frames, family, size):
    """(F, H, W, 3) uint8 -> (F, 3, size, size) uint8, the HF image processors' resize and crop
    (torch's antialiased uint8 kernels). Beyond MAX_ASPECT only the centre, all that reaches the
    crop, is resized: a 2000x2 clip would be 224x224,000 (450 MB for 3 frames); only such differ."""
    spec = FAMILIES[family]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (F, 3, H, W)
    h, w = x.shape[-2:]
    if spec['resize'] == 'square':
        shape = (size, size)
    else:
        cut_h, cut_w = (max(n - MAX_ASPECT * min(h, w), 0) // 2 for n in (h, w))
        x = x[..., cut_h:h - cut_h, cut_w:w - cut_w]  # as much cut from both ends: the centre stays
        h, w = x.shape[-2:]
        long = int(size * max(h, w) / min(h, w))
        shape = (size, long) if h <= w else (long, size)
    if shape != (h, w):
        x = F.interpolate(x, shape, mode=spec['interpolation'], align_corners=False, antialias=True)
    top, left = int((x.shape[-2] - size) / 2), int((x.shape[-1] - size) / 2)
    return x[..., top:top + size, left:left + size].contiguous()

def read_frames(path, n_frames, family, size):
    """(F, 3, S, S) uint8: a video as the frame cache holds it, and as tools/predict.py scores it"""
    runs.require(path is not None, "no mp4 on disk")
    return resize_crop(decode_frames(path, n_frames), family, size)

@functools.cache
def affine(family, device):
    """(scale, shift), (3, 1, 1) float32 on device: (x / 255 - mean) / std == x * scale + shift,
    made once (a copy to a GPU at every batch would make the host wait)"""
    mean, std = (torch.tensor(FAMILIES[family][k], dtype=torch.float64).view(3, 1, 1)
                 for k in ('mean', 'std'))
    return (1 / (255 * std)).float().to(device), (-mean / std).float().to(device)

def to_pixel_values(frames, family):
    """uint8 (..., 3, S, S) -> (x / 255 - mean) / std, float32, on the same device"""
    scale, shift = affine(family, frames.device)
    return frames.float() * scale + shift

@dataclass
class FrameCache:
    frames: np.ndarray       # uint8 (N, F, 3, S, S) memmap, rows aligned with video_ids, failed: 0
    video_ids: list[str]
    failed: dict[str, str]   # video_id -> reason (no mp4, corrupt, too short)
    path: str
    key: str                 # of all it comes from: the videos' files, the preprocessing, its code

    def batch(self, rows, frames=None):
        """uint8 (B, F, 3, S, S) of video rows, or (B, 3, S, S) of (row, frame) pairs, on the CPU"""
        rows = np.asarray(rows)
        return torch.from_numpy(self.frames[rows] if frames is None else self.frames[rows, frames])

def frame_cache(videos, family, size, n_frames=3, cache=None, log=print):
    """Decodes every video once (rows aligned with videos) or opens the cache. Given memento.videos
    (all splits, as --prepare), every script shares one; a repaired video is decoded again."""
    files = [[v.video_id, v.path and os.path.basename(v.path), runs.stamp(v.path)] for v in videos]
    key = runs.fingerprint({'videos': files, 'family': family, 'size': size, 'frames': n_frames,
                            'code': runs.code(read_frames)})
    path = os.path.join(runs.cache_dir(cache), f"frames-{family}-{size}px-{n_frames}f-{key}.npy")
    shape = (len(videos), n_frames, 3, size, size)
    def rows(i, j):  # a video a block; one that does not decode: a zero row and a note
        try:
            return read_frames(videos[i].path, n_frames, family, size).numpy()[None], {}
        except UserError as e:
            reason = f"{videos[i].path}: {e}" if videos[i].path else str(e)
            log(f"warning: skipped video {videos[i].video_id}: {reason}")
            return 0, {videos[i].video_id: reason}
    def read(path):
        frames, failed = runs.read_array(path)
        runs.require(frames.shape == shape, f"{path}: frame cache of {frames.shape}, expected {shape}")
        return FrameCache(frames, [v.video_id for v in videos], failed, path, key)
    return runs.cached(path, read, lambda p: runs.fill(p, shape, np.uint8, rows, log, 'videos'), log)

# -----------------------------------------------------------------------------
# the encoders and the captions
def load_encoder(name, pooling=None):
    """a hub name or folder -> (our network with the published weights, the folder read)"""
    folder = checkpoints.snapshot(name)
    config, pooling = checkpoints.read_config(folder, pooling)
    return checkpoints.load_weights(models.build(config, pooling), folder), folder

@dataclass
class CaptionCache:
    ids: np.ndarray          # int32 (N, 5, L), padded to the longest caption of the whole set
    mask: np.ndarray         # uint8 (N, 5, L)
    video_ids: list[str]
    path: str
    key: str                 # of all it comes from: the captions, the tokenizer and its code

    def batch(self, rows, captions):
        """video rows, caption indices -> input_ids, attention_mask long (B, T), T the longest"""
        ids, mask = self.ids[rows, captions], self.mask[rows, captions]  # (B, L) each
        t = int(mask.sum(1).max())
        return torch.from_numpy(ids[:, :t]).long(), torch.from_numpy(mask[:, :t]).long()

def caption_cache(videos, tokenizer, cache=None, log=print):
    """every caption tokenised once, rows aligned with videos"""
    texts = [c for v in videos for c in v.captions]
    key = runs.fingerprint([texts, tokenizer.key, runs.code(type(tokenizer))])
    path = os.path.join(runs.cache_dir(cache), f"captions-{key}.npz")
    def build(path):
        ids, mask = tokenizer(texts)  # (N * 5, L), every caption at once: L is the set's longest
        shape, buf = (len(videos), N_CAPTIONS, ids.shape[1]), io.BytesIO()
        np.savez(buf, ids=ids.numpy().astype(np.int32).reshape(shape),
                 mask=mask.numpy().astype(np.uint8).reshape(shape))
        runs.write_bytes(path, buf.getvalue())
    def read(path):
        try:
            with np.load(path) as z:
                ids, mask = z['ids'], z['mask']
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: unreadable caption cache ({e})") from None
        runs.require(ids.shape[:2] == (len(videos), N_CAPTIONS) and mask.shape == ids.shape,
                     f"{path}: caption cache of {ids.shape}, expected ({len(videos)}, {N_CAPTIONS}, L)")
        return CaptionCache(ids, mask, [v.video_id for v in videos], path, key)
    return runs.cached(path, read, build, log)

# -----------------------------------------------------------------------------
# folds and stage 2's rows: every frame or caption with its video, score and fold
def make_folds(videos, k=5, seed=0):
    """video_id -> fold in [0, k), by video (paper 4.1.2, 4.3.1): the ids in a seeded order"""
    assert all(v.score is not None for v in videos), "folds are of labelled videos (memento.labelled())"
    ids = sorted(v.video_id for v in videos)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(n % k) for n, j in enumerate(order)}

def fuse(pred, video):
    """late fusion (paper eq. 2-3): the predictions of frames or captions (N,) and their videos (N,)
    -> (the videos in first-seen order, each video's mean prediction (V,) float64)"""
    uniq, first, inverse = np.unique(np.asarray(video), return_index=True, return_inverse=True)
    mean = np.bincount(inverse, weights=np.asarray(pred, dtype=np.float64)) / np.bincount(inverse)
    order = np.argsort(first)
    return uniq[order].tolist(), mean[order]

class Items:
    """Every frame (vision: of the videos that decoded) or caption, a row each (paper 4.1.2), with
    its video, score, fold (-1: unlabelled test) and length in tokens (0: a frame). store: the
    FrameCache (family: its image family) or CaptionCache of videos; folds: video_id -> fold."""
    def __init__(self, videos, store, folds, device, family=None):
        self.videos, self.store, self.device, self.family = videos, store, device, family
        self.features = None  # once set, a frozen encoder's embeddings: inputs() gives those
        self.modality = 'vision' if isinstance(store, FrameCache) else 'text'
        keep = [i for i, v in enumerate(videos) if v.video_id not in getattr(store, 'failed', {})]
        per_video = store.frames.shape[1] if self.modality == 'vision' else store.ids.shape[1]
        self.video = torch.tensor(keep, dtype=torch.long).repeat_interleave(per_video)  # (N,)
        self.sub = torch.arange(per_video).repeat(len(keep))  # (N,) frame or caption index
        score = torch.tensor([math.nan if v.score is None else v.score for v in videos])
        self.target = score[self.video]  # (N,) on the CPU: a batch's scores go with its inputs
        self.fold = torch.tensor([folds.get(v.video_id, -1) for v in videos])[self.video]  # (N,)
        self.length = torch.zeros(len(self.video), dtype=torch.long)  # (N,) tokens, 0 for a frame
        if self.modality == 'text':
            self.length = torch.from_numpy(store.mask[self.video, self.sub].sum(-1, dtype=np.int64))

    def __len__(self):
        return len(self.video)

    def split(self, fold):
        """-> (training rows, validation rows) of a fold: the other folds' labelled rows, its own"""
        return torch.where((self.fold >= 0) & (self.fold != fold))[0], torch.where(self.fold == fold)[0]

    def inputs(self, idx):
        """rows idx (CPU) -> device: (pixel_values,), (input_ids, attention_mask) or (features,)"""
        if self.features is not None:  # index_select: 4x faster than [idx]
            return (self.features.index_select(0, to_device(idx, self.device)),)
        v, s = self.video[idx].numpy(), self.sub[idx].numpy()
        if self.modality == 'vision':
            pixels = to_device(self.store.batch(v, s), self.device)  # (B, 3, S, S) uint8
            return (to_pixel_values(pixels, self.family),)
        ids, mask = self.store.batch(v, s)  # (B, T) trimmed to the batch's longest caption
        return to_device(ids, self.device), to_device(mask, self.device)

    def targets(self, idx):
        """the scores (B,) of the rows idx on the device"""
        return to_device(self.target[idx], self.device)

# -----------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=runs.HelpFormatter)
    p.add_argument('--data', metavar='DIR', required=True,
                   help="Memento10k folder (official or MediaEval layout)")
    p.add_argument('--prepare', action='store_true', help="decode every video into the cache")
    p.add_argument('--family', nargs='+', default=['clip'], choices=list(FAMILIES),
                   help="image family: clip = CLIP's preprocessing (paper 4.2); vit = the in21k "
                        "checkpoint's own (ours: the paper gives CLIP's only)")
    p.add_argument('--size', type=count(1), default=224, help="image size (paper 4.2: 224)")
    p.add_argument('--frames', type=count(1), default=3,
                   help="frames per video, evenly spaced (paper 4.1.1: first, middle, last)")
    p.add_argument('--cache', help="the caches' folder (default: FCLIP_CACHE, else "
                                   "~/.cache/fclip-memorability)")
    args = p.parse_args(argv)
    m = load_memento(args.data)
    print(m.summary())
    for family in args.family if args.prepare else []:  # all splits: the cache every script reads
        fc = frame_cache(m.videos, family, args.size, args.frames, args.cache)
        n = len(m.videos)
        print(f"  frames cached ({family}): {n - len(fc.failed)}/{n} videos in {fc.path}")
        for vid, reason in fc.failed.items():
            print(f"    - failed {vid}: {reason} (decoded again once the file changes)")

if __name__ == '__main__':
    runs.script(main, 'data.py', "--prepare with the same flags resumes the extraction")
