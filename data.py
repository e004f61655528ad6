"""
Memento10k as users have it on disk, frames decoded once into a cache, tokenised captions,
video-level folds, contrastive pair batches, and a generated demo dataset (paper 4.1-4.2).

    python data.py --make-demo demo --videos 200 --seed 0     # Memento-shaped folder with real mp4s
    python data.py --data demo                                # summary of what is on disk
    python data.py --data demo --prepare --family clip        # decode every video once into the cache

Two layouts are read into the same table (load_memento):
  official:  memento_{train,val,test}_data.json (filename, url, mem_score, alpha, captions, action_labels)
             and videos/<filename>
  mediaeval: training_set|train_set, dev_set|development_set, test_set folders with <split>_scores.csv
             (target: scores_normalized_short_term) and <split>_text_descriptions.csv (wide
             description_0..4 or long video_id,video_url,description), videos in Videos/ named
             <id>.mp4, <zero-padded id>.mp4 or the official filename derived from the url.
Bad input: a duplicate video id or an unknown layout raises (naming the file and id / the files
looked for). A video with fewer than 5 captions, an empty caption, or (train/val) a missing, NaN or
out-of-[0, 1] score is excluded from every experiment, so frame and caption runs see the same
videos, and each exclusion is one line of Memento.exclusions and of the summary. More than 5
captions: the first 5 are kept and the video is flagged.
Frames: of T decoded frames, F are kept at i * (T - 1) // (F - 1) (F=3: first, middle, last). A clip
with fewer than F frames fails like a missing or corrupt mp4: a warning naming the file, a line in
FrameCache.failed (its row stays zero), and the other videos are extracted.
"""
import argparse
import csv
import glob
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

SPLITS = ('train', 'val', 'test')
N_CAPTIONS = 5  # captions per video in Memento10k (paper 4.1)
OFFICIAL_FILES = {s: f'memento_{s}_data.json' for s in SPLITS}
MEDIAEVAL_DIRS = {'train': ('training_set', 'train_set'), 'val': ('dev_set', 'development_set'),
                  'test': ('test_set',)}
# resize rule + normalisation per image family (paper 4.2; HF CLIPImageProcessor / ViTImageProcessor)
FAMILIES = {
    'clip': dict(resize='short_side_crop', interpolation=InterpolationMode.BICUBIC,
                 mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)),
    'vit': dict(resize='square', interpolation=InterpolationMode.BILINEAR,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}

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
    exclusions: list[str] = field(default_factory=list)  # one line per excluded/flagged video

    def split(self, name):
        return [v for v in self.videos if v.split == name]

    def labelled(self):
        # train then val, each in file order
        return [v for s in ('train', 'val') for v in self.split(s) if v.score is not None]

    def summary(self):
        lines = [f"Memento10k at {self.root} ({self.layout} layout)"]
        for s in SPLITS:
            vs = self.split(s)
            lines.append(f"  {s:5s}: {len(vs)} videos, {sum(v.score is not None for v in vs)} scored, "
                         f"{sum(len(v.captions) for v in vs)} captions, "
                         f"{sum(v.path is not None for v in vs)} mp4 found on disk")
        lines.append(f"  excluded or flagged: {len(self.exclusions)}")
        lines += [f"    - {e}" for e in self.exclusions]
        return '\n'.join(lines)


def _check(video_id, split, score, captions, file, exclusions):
    """Returns the Video to keep, or None with the reason appended to exclusions."""
    where = f"{file}: video {video_id} ({split})"
    if not isinstance(captions, list) or len(captions) < N_CAPTIONS:
        n = len(captions) if isinstance(captions, list) else 0
        exclusions.append(f"{where} excluded: {n} captions, expected {N_CAPTIONS}")
        return None
    if len(captions) > N_CAPTIONS:
        exclusions.append(f"{where} flagged: {len(captions)} captions, the first {N_CAPTIONS} are used")
        captions = captions[:N_CAPTIONS]
    captions = [str(c).strip() for c in captions]
    if not all(captions):
        exclusions.append(f"{where} excluded: caption {captions.index('')} is empty")
        return None
    if split == 'test':
        score = None  # the test split is unlabelled (paper 4.1.1)
    else:
        try:
            score = float(score)
        except (TypeError, ValueError):
            exclusions.append(f"{where} excluded: missing score (found {score!r})")
            return None
        if not 0.0 <= score <= 1.0:  # also false for NaN
            exclusions.append(f"{where} excluded: score {score} is not in [0, 1]")
            return None
    return Video(str(video_id), split, score, captions, None)


def _read_official(root):
    rows, exclusions = [], []
    for s in SPLITS:
        file = os.path.join(root, OFFICIAL_FILES[s])
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file} is missing (official layout needs {list(OFFICIAL_FILES.values())})")
        with open(file) as f:
            records = json.load(f)
        for i, r in enumerate(records):
            for key in ('filename', 'captions'):
                if key not in r:
                    raise KeyError(f"{file}: record {i} has no key '{key}' (found {sorted(r)})")
            vid = r['filename'].removesuffix('.mp4')
            v = _check(vid, s, r.get('mem_score'), r['captions'], file, exclusions)
            rows.append((file, vid, v, [os.path.join(root, 'videos', r['filename'])]))
    return rows, exclusions


def _read_csv(file, required, unique=True):
    with open(file, newline='') as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise KeyError(f"{file}: missing columns {missing} (found {reader.fieldnames})")
        rows = list(reader)
    repeated = [i for i, n in Counter(r['video_id'] for r in rows).items() if n > 1]
    if unique and repeated:
        raise ValueError(f"{file}: duplicate video id {repeated[0]}")
    return rows


def _one(folder, pattern, required=True):
    found = sorted(glob.glob(os.path.join(folder, pattern)))
    if len(found) > 1:
        raise ValueError(f"{folder}: several files match {pattern}: {found}")
    if not found and required:
        raise FileNotFoundError(f"{folder}: no file matching {pattern} (e.g. train_{pattern[2:]})")
    return found[0] if found else None


def official_filename(url):
    """.../actions3/<category+with+plus>/<name>.mp4 -> <category-with-minus>_<name>.mp4"""
    category, name = url.rstrip('/').split('/')[-2:]
    return f"{category.replace('+', '-')}_{name}"


def _read_mediaeval(root):
    rows, exclusions = [], []
    for s in SPLITS:
        folder = next((os.path.join(root, d) for d in MEDIAEVAL_DIRS[s] if os.path.isdir(os.path.join(root, d))), None)
        if folder is None:
            raise FileNotFoundError(f"{root}: no folder {' or '.join(MEDIAEVAL_DIRS[s])} for the {s} split")
        text_file = _one(folder, '*_text_descriptions.csv')
        score_file = _one(folder, '*_scores.csv', required=s != 'test')
        scores, urls = {}, {}
        if score_file:
            for r in _read_csv(score_file, ['video_id', 'video_url', 'scores_normalized_short_term']):
                scores[r['video_id']] = r['scores_normalized_short_term']
                urls[r['video_id']] = r['video_url']
        with open(text_file, newline='') as f:
            header = next(csv.reader(f), [])
        wide = [f'description_{k}' for k in range(N_CAPTIONS)]
        captions = {}
        if all(c in header for c in wide):
            for r in _read_csv(text_file, ['video_id'] + wide):
                captions[r['video_id']] = [r[c] for c in wide]
        else:  # long format: one caption a row
            for r in _read_csv(text_file, ['video_id', 'description'], unique=False):
                captions.setdefault(r['video_id'], []).append(r['description'])
                urls.setdefault(r['video_id'], r.get('video_url'))
        dirs = [os.path.join(folder, 'Videos'), os.path.join(root, 'Videos')]
        for vid in list(scores) + [v for v in captions if v not in scores]:
            v = _check(vid, s, scores.get(vid), captions.get(vid, []), score_file or text_file, exclusions)
            names = [f'{vid}.mp4'] + ([f'{int(vid):05d}.mp4'] if vid.isdigit() else [])
            names += [official_filename(urls[vid])] if urls.get(vid) else []
            rows.append((score_file or text_file, vid, v, [os.path.join(d, n) for d in dirs for n in names]))
    return rows, exclusions


def load_memento(root):
    """Reads either layout (see the module docstring) into a Memento table."""
    official = [os.path.join(root, f) for f in OFFICIAL_FILES.values()]
    mediaeval = [os.path.join(root, d) for s in SPLITS for d in MEDIAEVAL_DIRS[s]]
    if any(os.path.exists(f) for f in official):
        layout, (rows, exclusions) = 'official', _read_official(root)
    elif any(os.path.isdir(d) for d in mediaeval):
        layout, (rows, exclusions) = 'mediaeval', _read_mediaeval(root)
    else:
        raise FileNotFoundError(f"{root}: unknown layout; looked for the files {official} "
                                f"and the folders {mediaeval}")
    videos, seen = [], {}
    for file, vid, v, candidates in rows:
        if vid in seen:
            raise ValueError(f"{file}: duplicate video id {vid} (first seen in {seen[vid]})")
        seen[vid] = file
        if v is None:
            continue
        v.path = next((p for p in candidates if os.path.isfile(p)), None)
        videos.append(v)
    return Memento(root, layout, videos, exclusions)

# -----------------------------------------------------------------------------
# frames: decoded once, resized/cropped for the encoder family, kept uint8 on disk

def frame_indices(n_total, n_frames):
    """Evenly spaced, first and last included: i * (T - 1) // (F - 1); F=3 -> first, middle, last."""
    if n_frames == 1:
        return [(n_total - 1) // 2]
    return [i * (n_total - 1) // (n_frames - 1) for i in range(n_frames)]


def decode_frames(path, n_frames):
    """(F, H, W, 3) uint8 frames of an mp4. A clip with fewer than F frames raises ValueError:
    repeating frames would add duplicate pairs, and such a clip is usually truncated."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = 'AUTO'
        frames = list(container.decode(stream))
    if len(frames) < n_frames:
        raise ValueError(f"has {len(frames)} frames, fewer than the {n_frames} requested")
    return np.stack([frames[i].to_ndarray(format='rgb24') for i in frame_indices(len(frames), n_frames)])


def resize_crop(frames, family, size):
    """(F, H, W, 3) uint8 -> (F, 3, size, size) uint8, the resize/crop of the HF image processors."""
    spec = FAMILIES[family]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (F, 3, H, W)
    h, w = x.shape[-2:]
    if spec['resize'] == 'short_side_crop':
        long = int(size * max(h, w) / min(h, w))
        x = TF.resize(x, [size, long] if h <= w else [long, size], spec['interpolation'], antialias=True)
        top, left = int((x.shape[-2] - size) / 2), int((x.shape[-1] - size) / 2)
        return x[..., top:top + size, left:left + size].contiguous()
    return TF.resize(x, [size, size], spec['interpolation'], antialias=True)


def to_pixel_values(frames, family):
    """uint8 (..., 3, S, S) -> normalised float32 on the same device."""
    spec = FAMILIES[family]
    mean = torch.tensor(spec['mean'], device=frames.device).view(3, 1, 1)
    std = torch.tensor(spec['std'], device=frames.device).view(3, 1, 1)
    return (frames.float() / 255.0 - mean) / std


def _atomic_json(obj, path):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, 'w') as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _hash(obj):
    return hashlib.sha1(json.dumps(obj).encode()).hexdigest()[:12]


@dataclass
class FrameCache:
    frames: np.ndarray       # uint8 (N, F, 3, S, S) memmap, rows aligned with video_ids; failed rows are 0
    video_ids: list[str]
    failed: dict[str, str]   # video_id -> reason (no mp4, corrupt, too short)
    path: str

    def batch(self, rows, frames=None):
        """uint8 tensor (B, F, 3, S, S) of video rows, or (B, 3, S, S) of (row, frame) pairs; a copy."""
        rows = np.asarray(rows)
        return torch.from_numpy(self.frames[rows] if frames is None else self.frames[rows, np.asarray(frames)])


def frame_cache_path(videos, family, size, n_frames, cache_dir):
    key = _hash([[v.video_id, os.path.basename(v.path or '')] for v in videos])
    return os.path.join(cache_dir, f"frames-{family}-{size}px-{n_frames}f-{key}.npy")


PROGRESS_EVERY_S = 5  # progress line + resumable checkpoint interval


def frame_cache(videos, family, size, n_frames=3, cache_dir='cache', log=print):
    """Decodes every video once into cache_dir (rows aligned with videos), or opens the cache.
    Pass memento.videos (all splits, as --prepare does) so every script shares one cache, and run
    it on one process (rank 0) before the others read it."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, found {family!r}")
    path = frame_cache_path(videos, family, size, n_frames, cache_dir)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        _extract(videos, family, size, n_frames, path, log)
    with open(path.removesuffix('.npy') + '.failed.json') as f:
        return FrameCache(np.load(path, mmap_mode='r'), [v.video_id for v in videos], json.load(f), path)


def _extract(videos, family, size, n_frames, path, log):
    """The .npy appears (os.replace) only when complete; until then rows go to .partial.npy, and a
    progress json written after each flush lets an interrupted run resume where it stopped."""
    base = path.removesuffix('.npy')
    partial, progress_file = base + '.partial.npy', base + '.progress.json'
    shape = (len(videos), n_frames, 3, size, size)
    done, failed = set(), {}
    if os.path.exists(partial) and os.path.exists(progress_file):
        with open(progress_file) as f:
            progress = json.load(f)
        done, failed = set(progress['done']), progress['failed']
        frames = np.lib.format.open_memmap(partial, mode='r+')
        assert frames.shape == shape, f"{partial}: shape {frames.shape}, expected {shape}"
        log(f"resuming {partial}: {len(done)}/{len(videos)} videos done")
    else:  # a partial file without progress is never trusted
        frames = np.lib.format.open_memmap(partial, mode='w+', dtype=np.uint8, shape=shape)
    todo = [i for i in range(len(videos)) if i not in done]
    t0 = last = time.time()
    for n, i in enumerate(todo, 1):
        v = videos[i]
        try:
            if v.path is None:
                raise FileNotFoundError("no mp4 on disk")
            frames[i] = resize_crop(decode_frames(v.path, n_frames), family, size).numpy()
        except (av.FFmpegError, OSError, ValueError) as e:
            failed[v.video_id] = f"{v.path or v.video_id}: {e}"
            log(f"warning: skipped video {v.video_id} ({v.path or 'no mp4 on disk'}): {e}")
        done.add(i)
        if time.time() - last > PROGRESS_EVERY_S or n == len(todo):
            frames.flush()  # rows reach the disk before the progress file says they are done
            _atomic_json({'done': sorted(done), 'failed': failed}, progress_file)
            rate = n / max(time.time() - t0, 1e-6)
            log(f"frames {len(done)}/{len(videos)} videos | {rate:.1f} videos/s | "
                f"{rate * n_frames:.0f} frames/s | ETA {(len(todo) - n) / rate:.0f}s")
            last = time.time()
    frames.flush()
    del frames
    _atomic_json(failed, base + '.failed.json')
    os.replace(partial, path)
    if os.path.exists(progress_file):
        os.remove(progress_file)

# -----------------------------------------------------------------------------
# captions: tokenised once per tokenizer

PROBE = ["A Probe, with punctuation: 3 words!", "memorability " * 600]  # the long one shows truncation


@dataclass
class CaptionCache:
    ids: np.ndarray          # int32 (N, 5, L), padded to the longest caption of the whole set
    mask: np.ndarray         # uint8 (N, 5, L)
    video_ids: list[str]
    path: str

    def batch(self, rows, captions):
        """Video rows and caption indices -> (input_ids, attention_mask) LongTensors (B, T), T the batch's longest."""
        ids, mask = self.ids[rows, captions], self.mask[rows, captions]  # (B, L)
        t = int(mask.sum(1).max())
        return torch.from_numpy(ids[:, :t]).long(), torch.from_numpy(mask[:, :t]).long()


def caption_cache(videos, tokenizer, cache_dir='cache', chunk=4096):
    """tokenizer(list[str]) -> (input_ids, attention_mask) padded to the batch's longest. The cache
    key hashes the captions and the tokenizer's output on a probe (vocabulary, truncation), so any
    tokenizer can be used without naming it."""
    texts = [c for v in videos for c in v.captions]
    probe = [t.numpy().tobytes().hex() for t in tokenizer(PROBE + texts[:16])]
    path = os.path.join(cache_dir, f"captions-{_hash([texts, probe])}.npz")
    ids_of = [v.video_id for v in videos]
    if not os.path.exists(path):
        parts = [tokenizer(texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
        length = max(p[0].shape[1] for p in parts)
        pads = [p[0][p[1] == 0] for p in parts]
        pad = int(next((p[0] for p in pads if len(p)), 0))  # the tokenizer's own pad id
        ids = np.full((len(texts), length), pad, np.int32)
        mask = np.zeros((len(texts), length), np.uint8)
        row = 0
        for i, m in parts:
            ids[row:row + len(i), :i.shape[1]], mask[row:row + len(i), :i.shape[1]] = i.numpy(), m.numpy()
            row += len(i)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, 'wb') as f:
            np.savez(f, ids=ids.reshape(len(videos), N_CAPTIONS, -1), mask=mask.reshape(len(videos), N_CAPTIONS, -1))
        os.replace(tmp, path)
    with np.load(path) as z:
        return CaptionCache(z['ids'], z['mask'], ids_of, path)

# -----------------------------------------------------------------------------
# folds and contrastive batches

def make_folds(videos, k=5, seed=0, cache_dir='cache'):
    """video_id -> fold in [0, k), by video (paper 4.1.2, 4.3.1), stored so every script shares them."""
    unlabelled = [v.video_id for v in videos if v.score is None]
    if unlabelled:
        raise ValueError(f"folds are over labelled videos; {len(unlabelled)} have no score, e.g. {unlabelled[0]}")
    ids = sorted(v.video_id for v in videos)
    if len(ids) < k:
        raise ValueError(f"{len(ids)} labelled videos, fewer than k={k} folds")
    path = os.path.join(cache_dir, f"folds-k{k}-seed{seed}-{_hash(ids)}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)['folds']
    perm = np.random.default_rng(seed).permutation(len(ids))
    folds = {ids[j]: int(n % k) for n, j in enumerate(perm)}
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_json({'k': k, 'seed': seed, 'folds': folds}, path)
    return folds


class PairBatchSampler:
    """Global batches of (video, frame, caption) index triples (paper 3.2, 4.1.1): each of the
    n_frames * n_captions pairs of every video once per epoch, never two pairs of one video in a
    batch; only the epoch's last batch may be short. Each rank of a DDP run takes its contiguous slice of every batch.
    The epoch is P = F * C rounds; in each round every video gives one of its shuffled pairs, in a
    random order, except that videos already in the batch left open by the previous round go last.
    state_dict() counts the batches yielded in the epoch; the epoch advances after its last batch."""

    def __init__(self, n_videos, n_frames=3, n_captions=5, batch_size=32, seed=0):
        if batch_size > n_videos:
            raise ValueError(f"batch_size {batch_size} > {n_videos} videos: a batch would hold two pairs of one video")
        self.n_videos, self.n_frames, self.n_captions = n_videos, n_frames, n_captions
        self.batch_size, self.seed, self.epoch, self.step = batch_size, seed, 0, 0

    def __len__(self):
        return math.ceil(self.n_videos * self.n_frames * self.n_captions / self.batch_size)

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def state_dict(self):
        return {'epoch': self.epoch, 'step': self.step}

    def load_state_dict(self, state):
        self.epoch, self.step = state['epoch'], state['step']

    def _epoch(self):
        n, p, b = self.n_videos, self.n_frames * self.n_captions, self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        pair_order = rng.permuted(np.tile(np.arange(p), (n, 1)), axis=1)  # (n, P)
        videos, prev = [], None
        for r in range(p):
            order = rng.permutation(n)
            open_ = (r * n) % b
            if open_:
                last = np.isin(order, prev[-open_:])
                order = np.concatenate([order[~last], order[last]])
            videos.append(order)
            prev = order
        v = np.concatenate(videos)  # (n * P,)
        pairs = pair_order[v, np.repeat(np.arange(p), n)]
        return np.stack([v, pairs // self.n_captions, pairs % self.n_captions], 1)  # (n * P, 3)

    def __iter__(self):
        triples = self._epoch().tolist()
        for i in range(self.step, len(self)):
            self.step = i + 1
            yield [tuple(t) for t in triples[i * self.batch_size:(i + 1) * self.batch_size]]
        self.epoch, self.step = self.epoch + 1, 0

# -----------------------------------------------------------------------------
# demo dataset: simple scenes whose memorability depends on what they show

SHAPES = {'circle': ('circle', 'disc', 'round shape', 'ball'), 'square': ('square', 'box', 'block', 'square tile'),
          'triangle': ('triangle', 'three-sided shape', 'wedge', 'triangular shape')}
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (50, 80, 220), 'yellow': (235, 210, 40)}
BACKGROUNDS = {'dark': (25, 25, 35), 'light': (225, 225, 215), 'grassy': (70, 125, 55)}
MOTIONS = {'standing still': ('stays still', 'does not move', 'rests in place'),
           'sliding across': ('slides across the frame', 'moves from one side to the other', 'glides sideways'),
           'bouncing up': ('bounces up and down', 'jumps repeatedly', 'hops up and down')}
# memorability effects (scores are 0.75 + effects + noise, Memento-like range)
EFFECTS = {'circle': 0.06, 'square': 0.0, 'triangle': -0.05, 'red': 0.05, 'green': -0.04, 'blue': -0.01,
           'yellow': 0.02, 'dark': -0.03, 'light': 0.02, 'grassy': 0.0,
           'standing still': -0.07, 'sliding across': 0.02, 'bouncing up': 0.07}
CAPTIONS = ("a {colour} {shape} {motion} on a {bg} background",
            "the video shows a {colour} {shape} that {motion}",
            "on a {bg} screen a {shape} coloured {colour} {motion}",
            "simple animation: {colour} {shape}, {bg} backdrop, it {motion}",
            "there is a {shape} in {colour} and it {motion} over a {bg} scene")


def _scene(rng, shape, colour, bg, motion, h=48, w=64, t=90):
    """(T, H, W, 3) uint8 frames of one scene."""
    base = np.array(BACKGROUNDS[bg], np.float32) * (0.85 + 0.3 * np.linspace(0, 1, h))[:, None, None]
    img = np.broadcast_to(base, (h, w, 3)) + rng.normal(0, 6, (h, w, 3))  # static texture
    r, k = rng.uniform(6, 10), np.arange(t)
    lo, hi = r + (w - h) / 2 + 2, w - r - (w - h) / 2 - 2  # inside CLIP's centre crop
    cx, cy = np.full(t, rng.uniform(lo, hi)), np.full(t, rng.uniform(r + 2, h - r - 2))
    if motion == 'sliding across':
        cx = np.linspace(lo, hi, t)[::rng.choice([-1, 1])]
    elif motion == 'bouncing up':
        cy = h - r - 2 - (h - 2 * r - 4) * np.abs(np.sin(np.pi * k / rng.uniform(25, 45)))
    yy, xx = np.mgrid[:h, :w]
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]  # (T, H, W)
    inside = {'circle': dx ** 2 + dy ** 2 <= r ** 2,
              'square': (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85),
              'triangle': (dy <= r * 0.8) & (np.abs(dx) <= (dy + r) * 0.6)}[shape]
    frames = np.where(inside[..., None], np.array(COLOURS[colour], np.float32), img[None])
    return np.clip(frames, 0, 255).astype(np.uint8)


def _write_mp4(path, frames, fps=30):
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264', rate=fps, options={'preset': 'ultrafast'})
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], 'yuv420p'
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        container.mux(stream.encode())


def make_demo(root, n_videos, seed):
    """Official layout + real 3 s mp4s (64x48, 30 fps) + captions.txt, splits 70/15/15, deterministic."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'videos'), exist_ok=True)
    n_val = n_test = round(0.15 * n_videos)
    split_of = np.array(['train'] * (n_videos - n_val - n_test) + ['val'] * n_val + ['test'] * n_test)
    split_of = split_of[rng.permutation(n_videos)]
    records, corpus = {s: [] for s in SPLITS}, []
    for i in range(n_videos):
        shape, colour, bg, motion = (str(rng.choice(list(d))) for d in (SHAPES, COLOURS, BACKGROUNDS, MOTIONS))
        score = 0.75 + sum(EFFECTS[a] for a in (shape, colour, bg, motion)) + rng.normal(0, 0.015)
        captions = [c.format(shape=rng.choice(SHAPES[shape]), colour=colour, bg=bg, motion=rng.choice(MOTIONS[motion]))
                    for c in CAPTIONS]
        name = f"demo-{seed}-{i:05d}.mp4"
        rec = {'filename': f"{motion.replace(' ', '-')}_{name}",
               'url': f"https://example.invalid/memento/actions3/{motion.replace(' ', '+')}/{name}",
               'mem_score': round(float(np.clip(score, 0.0, 1.0)), 4), 'alpha': round(float(rng.uniform(-0.012, 0)), 6),
               'captions': captions, 'action_labels': [motion]}
        _write_mp4(os.path.join(root, 'videos', rec['filename']), _scene(rng, shape, colour, bg, motion))
        if split_of[i] == 'test':
            del rec['mem_score']
        records[str(split_of[i])].append(rec)
        corpus += captions
    for s in SPLITS:
        with open(os.path.join(root, OFFICIAL_FILES[s]), 'w') as f:
            json.dump(records[s], f, indent=1)
    with open(os.path.join(root, 'captions.txt'), 'w') as f:
        f.write('\n'.join(corpus) + '\n')

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--make-demo', metavar='DIR', help="write a demo dataset (official layout, real mp4s) to DIR")
    p.add_argument('--videos', type=int, default=200, help="number of demo videos")
    p.add_argument('--seed', type=int, default=0, help="demo dataset seed")
    p.add_argument('--data', metavar='DIR', help="Memento10k folder (official or MediaEval layout) to summarise")
    p.add_argument('--prepare', action='store_true', help="decode every video into the frame cache")
    p.add_argument('--family', default='clip', choices=list(FAMILIES), help="image family: resize/crop rule (paper 4.2)")
    p.add_argument('--size', type=int, default=224, help="image size (paper 4.2: 224)")
    p.add_argument('--frames', type=int, default=3, help="frames per video, evenly spaced (paper 4.1.1: first, middle, last)")
    p.add_argument('--cache', default=None, help="cache folder; None means DIR/cache")
    args = p.parse_args(argv)
    if not (args.make_demo or args.data):
        p.error("give --make-demo DIR or --data DIR")
    if args.make_demo:
        t0 = time.time()
        make_demo(args.make_demo, args.videos, args.seed)
        print(f"wrote {args.videos} demo videos to {args.make_demo} in {time.time() - t0:.1f}s")
    if args.data:
        m = load_memento(args.data)
        print(m.summary())
        cache = args.cache or os.path.join(args.data, 'cache')
        videos = m.videos  # all splits: the one cache every script reads
        if args.prepare:
            fc = frame_cache(videos, args.family, args.size, args.frames, cache)
            print(f"  frames cached: {len(videos) - len(fc.failed)}/{len(videos)} videos in {fc.path}")
            for vid, reason in fc.failed.items():
                print(f"    - failed {vid}: {reason}")
        else:
            path = frame_cache_path(videos, args.family, args.size, args.frames, cache)
            print(f"  frames cached: {'yes, ' + path if os.path.exists(path) else 'no (run with --prepare)'}")


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as e:  # bad input: the message says what and where
        raise SystemExit(f"data.py: error: {e}")
