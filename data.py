"""
Memento10k as it is on disk, frames decoded once into a cache (frames.py), tokenised captions,
video-level folds and stage 2's rows (paper 4.1-4.2); stage 1's pairs and their sampler are
contrastive.py's. demo.py writes a toy dataset.

    python data.py --data demo                           # summary of what is on disk
    python data.py --data demo --prepare --family clip   # decode every video once into the cache

Layouts, read into one table by load_memento:
  official:  memento_{train,val,test}_data.json (filename, mem_score, captions), videos/<filename>
  mediaeval: training_set|train_set, dev_set|development_set and test_set, each with
             <split>_scores.csv (target: scores_normalized_short_term) and
             <split>_text_descriptions.csv (description_0..4, or a caption a row in 'description');
             videos in Videos/ as <id>.mp4, <zero-padded id>.mp4 or the official name from the url
Excluded, with a line each in Memento.exclusions, so that frame and caption runs see one set of
videos: fewer than 5 captions (of more, the first 5 are kept, flagged), an empty or non-text
caption, a file name leading outside the dataset folder (never opened), in train/val a missing, NaN
or out-of-[0, 1] score. A video that does not decode keeps a zero row in the frame cache and a line
in FrameCache.failed (frames.py). Caches are pure functions of their inputs: built once under a
lock, written whole, rebuilt with a warning when unreadable (runs.cached).
"""
import argparse
import glob
import json
import math
import os
import zipfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

import frames
import runs
from runs import UserError, count

SPLITS = ('train', 'val', 'test')
N_CAPTIONS = 5  # captions per video in Memento10k (paper 4.1)
OFFICIAL_FILES = {s: f'memento_{s}_data.json' for s in SPLITS}
# demo.py's file: video file name -> its shape's box [x0, y0, x1, y1) in pixels, one per frame. A
# dataset folder that holds it is generated toy data, which the tables and figures then say
DEMO_BOXES = 'demo_boxes.json'
MEDIAEVAL_DIRS = {'train': ('training_set', 'train_set'), 'val': ('dev_set', 'development_set'),
                  'test': ('test_set',)}
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
    demo: bool = False       # demo.py's generated toy clips (the folder holds DEMO_BOXES)

    def split(self, name):
        return [v for v in self.videos if v.split == name]

    def labelled(self):
        return self.split('train') + self.split('val')  # all scored: _check excludes the others

    def summary(self):
        lines = [f"Memento10k at {self.root} ({self.layout} layout)"]
        for s in SPLITS:
            vs = self.split(s)
            lines.append(f"  {s:5s}: {len(vs)} videos, {sum(v.score is not None for v in vs)} "
                         f"scored, {sum(len(v.captions) for v in vs)} captions, "
                         f"{sum(v.path is not None for v in vs)} mp4 found on disk")
        lines.append(f"  excluded or flagged: {len(self.exclusions)}")
        lines += [f"    - {e}" for e in self.exclusions]
        return '\n'.join(lines)

def _shown(value):
    """a value read from a dataset file as the file spells it, cut short"""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + '...'

def _check(video_id, split, score, captions, file, exclusions):
    """-> the Video to keep, or None with the reason appended to exclusions"""
    where = f"{file}: video {video_id} ({split})"

    def exclude(reason):  # -> None
        exclusions.append(f"{where} excluded: {reason}")
    if not isinstance(captions, list):
        return exclude(f"captions is {_shown(captions)}, expected a list of {N_CAPTIONS} texts")
    if len(captions) < N_CAPTIONS:
        return exclude(f"{len(captions)} captions, expected {N_CAPTIONS}")
    if len(captions) > N_CAPTIONS:
        exclusions.append(f"{where} flagged: {len(captions)} captions, the first {N_CAPTIONS} "
                          f"are used")
        captions = captions[:N_CAPTIONS]
    for k, c in enumerate(captions):  # str(None) would train on the text "None"
        if not isinstance(c, str):
            return exclude(f"caption {k} is {_shown(c)}, expected text")
    captions = [c.strip() for c in captions]
    if not all(captions):
        return exclude(f"caption {captions.index('')} is empty")
    if split == 'test':  # unlabelled (paper 4.1.1)
        return Video(str(video_id), split, None, captions, None)
    try:
        value = None if isinstance(score, bool) else float(score)  # float(true) would be 1.0
    except (TypeError, ValueError):
        value = None
    if value is None:
        return exclude(f"missing score (found {score!r})")
    if not 0.0 <= value <= 1.0:  # also false for NaN
        return exclude(f"score {value} is not in [0, 1]")
    return Video(str(video_id), split, value, captions, None)

def _read_official(root):
    """-> rows (file, video id, Video or None, [(folder, name)] of its mp4), exclusions"""
    rows, exclusions = [], []
    for s in SPLITS:
        file = os.path.join(root, OFFICIAL_FILES[s])
        if not os.path.exists(file):
            raise UserError(f"{file} is missing (the official layout needs "
                            f"{list(OFFICIAL_FILES.values())})")
        for i, r in enumerate(runs.read_json(file, expect=list, what='Memento10k split file')):
            if not isinstance(r, dict):
                raise UserError(f"{file}: record {i} is {_shown(r)}, expected an object with "
                                f"filename and captions")
            for key in ('filename', 'captions'):
                if key not in r:
                    raise UserError(f"{file}: record {i} has no key '{key}' (found {sorted(r)})")
            name = r['filename']
            if not isinstance(name, str) or not name:
                raise UserError(f"{file}: record {i}: filename is {_shown(name)}, expected a file "
                                f"name")
            vid = name.removesuffix('.mp4')
            v = _check(vid, s, r.get('mem_score'), r['captions'], file, exclusions)
            rows.append((file, vid, v, [(os.path.join(root, 'videos'), name)]))
    return rows, exclusions

def _unique_ids(file, rows):
    """rows of a CSV with a row a video, unchanged; a video id seen twice raises"""
    repeated = [i for i, n in Counter(r['video_id'] for r in rows).items() if n > 1]
    if repeated:
        raise UserError(f"{file}: duplicate video id {repeated[0]}")
    return rows

def _one(folder, pattern, required=True):
    found = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
    if len(found) > 1:
        raise UserError(f"{folder}: several files match {pattern}: {found}")
    if not found and required:
        raise UserError(f"{folder}: no file matching {pattern} (e.g. train_{pattern[2:]})")
    return found[0] if found else None

def official_filename(url):
    """.../actions3/<category+with+plus>/<name>.mp4 -> <category-with-minus>_<name>.mp4, or None"""
    parts = url.rstrip('/').split('/')
    return f"{parts[-2].replace('+', '-')}_{parts[-1]}" if len(parts) >= 2 else None

def _read_mediaeval(root):
    """-> rows and exclusions as _read_official's"""
    rows, exclusions = [], []
    wide = [f'description_{k}' for k in range(N_CAPTIONS)]
    for s in SPLITS:
        found = [d for d in (os.path.join(root, n) for n in MEDIAEVAL_DIRS[s]) if os.path.isdir(d)]
        if not found:
            raise UserError(f"{root}: no folder {' or '.join(MEDIAEVAL_DIRS[s])} for the {s} split")
        text_file = _one(found[0], '*_text_descriptions.csv')
        score_file = _one(found[0], '*_scores.csv', required=s != 'test')
        file = score_file or text_file
        columns = ['video_id', 'video_url', 'scores_normalized_short_term']
        scored = _unique_ids(score_file, runs.read_csv(score_file, columns)) if score_file else []
        scores = {r['video_id']: r['scores_normalized_short_term'] for r in scored}
        urls = {r['video_id']: r['video_url'] for r in scored}
        text = runs.read_csv(text_file, ['video_id'])
        header = list(text[0]) if text else []
        if all(c in header for c in wide):
            captions = {r['video_id']: [r[c] for c in wide] for r in _unique_ids(text_file, text)}
        elif text and 'description' not in header:
            raise UserError(f"{text_file}: expected the columns {wide} (one row per video) or "
                            f"'description' (one row per caption); the header has {header}")
        else:  # long format: one caption a row
            captions = {}
            for r in text:
                captions.setdefault(r['video_id'], []).append(r['description'])
                urls.setdefault(r['video_id'], r.get('video_url'))
        dirs = [os.path.join(found[0], 'Videos'), os.path.join(root, 'Videos')]
        for vid in list(scores) + [v for v in captions if v not in scores]:
            v = _check(vid, s, scores.get(vid), captions.get(vid, []), file, exclusions)
            padded = f'{int(vid):05d}.mp4' if vid.isascii() and vid.isdigit() else None
            official = official_filename(urls[vid]) if urls.get(vid) else None
            names = [n for n in (f'{vid}.mp4', padded, official) if n]
            rows.append((file, vid, v, [(d, n) for d in dirs for n in names]))
    return rows, exclusions

def load_memento(root):
    """Reads either layout (the module docstring) into a Memento table."""
    if not os.path.isdir(root):
        what = ' (it is a file)' if os.path.exists(root) else ''
        raise UserError(f"{root}: no such folder{what}. Give the Memento10k folder with --data "
                        f"DIR, link it where the scripts look by default (ln -s "
                        f"/path/to/Memento10k data/memento10k), or try the pipeline on a generated "
                        f"toy dataset: bash run_all.sh --demo")
    official = [os.path.join(root, f) for f in OFFICIAL_FILES.values()]
    mediaeval = [os.path.join(root, d) for s in SPLITS for d in MEDIAEVAL_DIRS[s]]
    if any(os.path.exists(f) for f in official):
        layout, read = 'official', _read_official
    elif any(os.path.isdir(d) for d in mediaeval):
        layout, read = 'mediaeval', _read_mediaeval
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
        # the path as the dataset spells it (the frame cache's key holds its name), checked resolved
        found = [os.path.join(*c) for c, p in zip(candidates, resolved) if os.path.isfile(p)]
        v.path = found[0] if found else None
        videos.append(v)
    demo = os.path.isfile(os.path.join(root, DEMO_BOXES))
    return Memento(root, layout, videos, exclusions, demo)

def to_device(x, device):
    """x on device; to a GPU through pinned memory, so that the copy queues behind the running step
    and the host goes on preparing the next batch (from pageable memory the host waits for it)"""
    device = torch.device(device)
    return x.pin_memory().to(device, non_blocking=True) if device.type == 'cuda' else x.to(device)

# -----------------------------------------------------------------------------
# captions: tokenised once per tokenizer

@dataclass
class CaptionCache:
    ids: np.ndarray          # int32 (N, 5, L), padded to the longest caption of the whole set
    mask: np.ndarray         # uint8 (N, 5, L)
    video_ids: list[str]
    path: str

    def batch(self, rows, captions):
        """video rows, caption indices -> input_ids, attention_mask long (B, T), T the longest"""
        ids, mask = self.ids[rows, captions], self.mask[rows, captions]  # (B, L) each
        t = int(mask.sum(1).max())
        return torch.from_numpy(ids[:, :t]).long(), torch.from_numpy(mask[:, :t]).long()

def caption_cache(videos, tokenizer, cache_dir='cache', log=print):
    """tokenizer(list[str]) -> (input_ids, attention_mask) padded to the longest. The key hashes the
    captions and tokenizer.key, the content the tokenizer was built from (a checkpoint's Tokenizer:
    its tokenizer.json and maximum length): a changed vocabulary or truncation tokenises again."""
    texts = [c for v in videos for c in v.captions]
    path = os.path.join(cache_dir, f"captions-{runs.fingerprint([texts, tokenizer.key])}.npz")
    return runs.cached(path, lambda p: _read_captions(p, [v.video_id for v in videos]),
                       lambda p: _write_captions(p, texts, tokenizer), log)

def _write_captions(path, texts, tokenizer):
    ids, mask = tokenizer(texts)  # (N * 5, L), every caption at once: L is the set's longest
    shape = (len(texts) // N_CAPTIONS, N_CAPTIONS, ids.shape[1])
    ids = ids.numpy().astype(np.int32).reshape(shape)
    mask = mask.numpy().astype(np.uint8).reshape(shape)
    runs.atomic_write(path, lambda f: np.savez(f, ids=ids, mask=mask))

def _read_captions(path, video_ids):
    try:
        with np.load(path) as z:
            ids, mask = z['ids'], z['mask']
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: unreadable caption cache ({e})") from None
    if ids.shape[:2] != (len(video_ids), N_CAPTIONS) or mask.shape != ids.shape:
        raise UserError(f"{path}: caption cache of ids {ids.shape} and mask {mask.shape}, expected "
                        f"({len(video_ids)}, {N_CAPTIONS}, length) each")
    return CaptionCache(ids, mask, video_ids, path)

# -----------------------------------------------------------------------------
# folds

def make_folds(videos, k=5, seed=0, cache_dir='cache', log=print):
    """video_id -> fold in [0, k), by video (paper 4.1.2, 4.3.1), stored for every script to share
    """
    unlabelled = [v.video_id for v in videos if v.score is None]
    if unlabelled:
        raise UserError(f"folds are over labelled videos; {len(unlabelled)} have no score, "
                        f"e.g. {unlabelled[0]}")
    ids = sorted(v.video_id for v in videos)
    if len(ids) < k:
        raise UserError(f"{len(ids)} labelled videos, fewer than k={k} folds")
    path = os.path.join(cache_dir, f"folds-k{k}-seed{seed}-{runs.fingerprint(ids)}.json")
    perm = np.random.default_rng(seed).permutation(len(ids))
    folds = {ids[j]: int(n % k) for n, j in enumerate(perm)}
    return runs.cached(path, lambda p: _read_folds(p, ids, k),
                       lambda p: runs.write_json(p, {'k': k, 'seed': seed, 'folds': folds}), log)

def _read_folds(path, ids, k):
    folds = runs.read_json(path, expect=dict).get('folds')
    if not isinstance(folds, dict) or sorted(folds) != ids or \
            not all(type(f) is int and 0 <= f < k for f in folds.values()):
        raise UserError(f"{path}: expected 'folds' to map each of the {len(ids)} video ids to a "
                        f"fold in [0, {k})")
    return folds

# -----------------------------------------------------------------------------
# stage 2's rows: every frame or caption with its video, score and fold

class Items:
    """Every frame (vision: of the videos that decoded) or caption (text), a row each (paper 4.1.2),
    with its video, the video's score, its fold (-1: an unlabelled test video) and its length in
    tokens (0 for a frame). store: the FrameCache (family: its image family) or CaptionCache of
    videos; folds: video_id -> fold. Once `features` is set (a frozen encoder's embeddings, computed
    once), inputs() gives those."""

    def __init__(self, videos, store, folds, device, family=None):
        if store.video_ids != [v.video_id for v in videos]:
            raise UserError(f"{store.path}: its rows are not the {len(videos)} videos given, "
                            f"in order")
        self.videos, self.store, self.device = videos, store, device
        self.family, self.features = family, None
        self.modality = 'vision' if isinstance(store, frames.FrameCache) else 'text'
        failed = store.failed if self.modality == 'vision' else {}
        keep = [i for i, v in enumerate(videos) if v.video_id not in failed]
        per_video = store.frames.shape[1] if self.modality == 'vision' else store.ids.shape[1]
        self.video = torch.tensor(keep, dtype=torch.long).repeat_interleave(per_video)  # (N,) row
        self.sub = torch.arange(per_video).repeat(len(keep))  # (N,) frame or caption index
        score = torch.tensor([math.nan if v.score is None else v.score for v in videos])
        self.target = score[self.video]  # (N,) on the CPU: a batch's scores go with its inputs
        fold = torch.tensor([folds.get(v.video_id, -1) for v in videos], dtype=torch.long)
        self.fold = fold[self.video]  # (N,)
        self.length = torch.zeros(len(self.video), dtype=torch.long)  # (N,) tokens, 0 for a frame
        if self.modality == 'text':
            tokens = store.mask[self.video, self.sub].sum(-1)  # (N,)
            self.length = torch.from_numpy(tokens.astype(np.int64))
        self.key = os.path.basename(store.path)  # the cache's name hashes videos and preprocessing

    def __len__(self):
        return len(self.video)

    def split(self, fold):
        """-> (training rows, validation rows) of a fold: the other folds' labelled rows, its own"""
        train = torch.where((self.fold >= 0) & (self.fold != fold))[0]
        return train, torch.where(self.fold == fold)[0]

    def inputs(self, idx):
        """encoder inputs of the rows idx (a CPU tensor) on the device: (pixel_values,),
        (input_ids, attention_mask) or, once `features` is set, (features,)"""
        if self.features is not None:  # index_select: 4x faster than [idx]
            return (self.features.index_select(0, to_device(idx, self.device)),)
        v, s = self.video[idx].numpy(), self.sub[idx].numpy()
        if self.modality == 'vision':
            pixels = to_device(self.store.batch(v, s), self.device)  # (B, 3, S, S) uint8
            return (frames.to_pixel_values(pixels, self.family),)
        ids, mask = self.store.batch(v, s)  # (B, T) trimmed to the batch's longest caption
        return to_device(ids, self.device), to_device(mask, self.device)

    def targets(self, idx):
        """the scores (B,) of the rows idx on the device"""
        return to_device(self.target[idx], self.device)

def length_batches(rows, length, batch_size, gen):
    """rows (N,) reordered so that each run of batch_size holds rows of similar length, the batches
    in random order and a short last batch kept last: the same rows, less padding"""
    batches = rows[torch.argsort(length[rows], stable=True)].split(batch_size)  # shuffled within
    full = len(batches) - (len(batches[-1]) < batch_size)
    shuffled = [batches[i] for i in torch.randperm(full, generator=gen)]
    return torch.cat(shuffled + list(batches[full:]))

# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=runs.HelpFormatter)
    p.add_argument('--data', metavar='DIR', required=True,
                   help="Memento10k folder (official or MediaEval layout) to summarise")
    p.add_argument('--prepare', action='store_true', help="decode every video into the frame cache")
    p.add_argument('--family', nargs='+', default=['clip'], choices=list(frames.FAMILIES),
                   help="image family: clip = CLIP's preprocessing (paper 4.2); vit = the in21k "
                        "checkpoint's own (ours: the paper gives CLIP's only)")
    p.add_argument('--size', type=count(1), default=224,
                   help="image size (paper 4.2: 224)")
    p.add_argument('--frames', type=count(1), default=3,
                   help="frames per video, evenly spaced (paper 4.1.1: the first, middle and last)")
    p.add_argument('--cache', help="cache folder (default: DIR/cache)")
    return p.parse_args(argv)

def main(argv=None):
    args = parse_args(argv)
    m = load_memento(args.data)
    print(m.summary())
    cache = args.cache or os.path.join(args.data, 'cache')
    videos = m.videos  # all splits: the one cache every script reads
    if args.prepare:
        for family in args.family:
            fc = frames.frame_cache(videos, family, args.size, args.frames, cache)
            done = len(videos) - len(fc.failed)
            print(f"  frames cached ({family}): {done}/{len(videos)} videos in {fc.path}")
            for vid, reason in fc.failed.items():
                print(f"    - failed {vid}: {reason} (once put right, it is decoded again)")
        return
    # any family, size and frames
    npy = frames.frame_cache_path(videos, '*', '*', '*', glob.escape(cache))
    done = sorted(glob.glob(npy))
    stopped = sorted(glob.glob(npy.removesuffix('.npy') + '.progress.json'))
    print(f"  frames cached: {len(done) if done else 'no (run with --prepare)'}")
    for path in done:
        print(f"    - {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB)")
    for path in stopped:
        print(f"    - stopped before its end, --prepare with its flags resumes it: {path}")

if __name__ == '__main__':
    runs.script(main, 'data.py', "--prepare with the same flags resumes the extraction")
