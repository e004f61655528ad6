"""
Frames as the paper takes them (4.1.1: the first, middle and last of each clip) and preprocesses
them (4.2: resized and cropped for the encoder's family, then normalised), decoded once into a uint8
cache that every script shares:

    python data.py --data DIR --prepare --family clip vit   # fills the cache, resumable

A video that does not decode (missing, corrupt, too short) keeps a zero row and a line in
FrameCache.failed; the cache is rebuilt only when such a video has changed since. The extraction
writes a partial file with a unique name and a progress file after each interval, so an interrupted
run resumes where it stopped; the .npy appears whole, when complete (runs.cached holds the lock).
"""
import functools
import glob
import os
import time
from dataclasses import dataclass

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

import runs
from runs import UserError

# resize + normalisation per image family. clip: paper 4.2, CLIP's own (HF CLIPImageProcessor:
# short side to 224, centre crop). vit: the paper gives CLIP's only, so strategies 1-2 use the
# in21k checkpoint's own (HF ViTImageProcessor: a square resize, mean and std 0.5), our reading.
FAMILIES = {
    'clip': dict(resize='short_side_crop', interpolation='bicubic',
                 mean=(0.48145466, 0.4578275, 0.40821073),
                 std=(0.26862954, 0.26130258, 0.27577711)),
    'vit': dict(resize='square', interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3),
}

MAX_ASPECT = 8  # long side / short side beyond which only the centre is resized (videos: ~2.4)
PROGRESS_EVERY_S = 5  # progress line + resumable checkpoint interval

def frame_indices(n_total, n_frames):
    """evenly spaced, first and last included: i * (T - 1) // (F - 1); F=3: first, middle, last"""
    if n_frames == 1:
        return [(n_total - 1) // 2]
    return [i * (n_total - 1) // (n_frames - 1) for i in range(n_frames)]

def decode_frames(path, n_frames):
    """(F, H, W, 3) uint8 frames of an mp4. A file the decoder cannot read, or a clip of fewer than
    F frames, is bad input (repeating frames would add duplicate pairs, and such a clip is usually
    truncated)."""
    try:  # only the decoder's calls: PyAV's errors and a file that cannot be opened
        with av.open(path) as container:
            if not container.streams.video:
                raise UserError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = 'AUTO'
            frames = list(container.decode(stream))
        if len(frames) < n_frames:
            raise UserError(f"has {len(frames)} frames, fewer than the {n_frames} requested")
        picked = frame_indices(len(frames), n_frames)
        return np.stack([frames[i].to_ndarray(format='rgb24') for i in picked])
    except (av.FFmpegError, OSError) as e:
        raise UserError(str(e)) from None

def resize_crop(frames, family, size):
    """(F, H, W, 3) uint8 -> (F, 3, size, size) uint8, the resize/crop of the HF image processors.
    Beyond MAX_ASPECT the source is first cut to its centre, all that reaches the crop: a 2000x2
    clip would resize to 224x224,000 (450 MB for 3 frames). Only such clips differ from theirs."""
    spec = FAMILIES[family]
    mode = InterpolationMode(spec['interpolation'])
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (F, 3, H, W)
    if spec['resize'] == 'square':
        return TF.resize(x, [size, size], mode, antialias=True)
    h, w = x.shape[-2:]
    cut_h, cut_w = (max(n - MAX_ASPECT * min(h, w), 0) // 2 for n in (h, w))
    x = x[..., cut_h:h - cut_h, cut_w:w - cut_w]  # as much cut from both ends: the centre stays
    h, w = x.shape[-2:]
    long = int(size * max(h, w) / min(h, w))
    x = TF.resize(x, [size, long] if h <= w else [long, size], mode, antialias=True)
    top, left = int((x.shape[-2] - size) / 2), int((x.shape[-1] - size) / 2)
    return x[..., top:top + size, left:left + size].contiguous()

@functools.cache
def _affine(family, device):
    """(scale, shift), (3, 1, 1) float32 on device: (x / 255 - mean) / std == x * scale + shift"""
    mean = torch.tensor(FAMILIES[family]['mean'], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(FAMILIES[family]['std'], dtype=torch.float64).view(3, 1, 1)
    return (1 / (255 * std)).float().to(device), (-mean / std).float().to(device)

def to_pixel_values(frames, family):
    """uint8 (..., 3, S, S) -> (x / 255 - mean) / std, float32 (..., 3, S, S) on the same device"""
    scale, shift = _affine(family, frames.device)
    return frames.float() * scale + shift

@dataclass
class FrameCache:
    frames: np.ndarray       # uint8 (N, F, 3, S, S) memmap, rows aligned with video_ids, failed: 0
    video_ids: list[str]
    failed: dict[str, str]   # video_id -> reason (no mp4, corrupt, too short)
    path: str

    def batch(self, rows, frames=None):
        """uint8 (B, F, 3, S, S) of video rows, or (B, 3, S, S) of (row, frame) pairs, on the CPU"""
        rows = np.asarray(rows)
        return torch.from_numpy(self.frames[rows] if frames is None else self.frames[rows, frames])

def frame_cache_path(videos, family, size, n_frames, cache_dir):
    key = runs.fingerprint([[v.video_id, os.path.basename(v.path or '')] for v in videos])
    return os.path.join(cache_dir, f"frames-{family}-{size}px-{n_frames}f-{key}.npy")

def frame_cache(videos, family, size, n_frames=3, cache_dir='cache', log=print):
    """Decodes every video once into cache_dir (rows aligned with videos), or opens the cache. Pass
    memento.videos (all splits, as --prepare does) so that every script shares one cache."""
    path = frame_cache_path(videos, family, size, n_frames, cache_dir)
    shape = (len(videos), n_frames, 3, size, size)
    return runs.cached(path, lambda p: _read_frames(p, videos, shape),
                       lambda p: _extract(videos, family, size, n_frames, p, log), log)

def _read_frames(path, videos, shape):
    try:
        frames = np.lib.format.open_memmap(path, mode='r')
        failed = runs.read_json(path.removesuffix('.npy') + '.failed.json', expect=dict)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable frame cache ({e})") from None
    if frames.shape != shape or frames.dtype != np.uint8:
        raise UserError(f"{path}: frame cache of {frames.dtype} {frames.shape}, expected uint8 "
                        f"{shape}")
    # a video that failed, replaced since (by ctime: `cp -p` keeps the mtime), is decoded again
    fixed = [v.path for v in videos if v.video_id in failed and v.path and os.path.isfile(v.path)
             and os.stat(v.path).st_ctime > os.path.getmtime(path)]
    if fixed:
        raise UserError(f"{path}: {len(fixed)} video(s) that failed to decode have changed since, "
                        f"such as {fixed[0]}")
    return FrameCache(frames, [v.video_id for v in videos], failed, path)

def _interrupted_extraction(progress_file, shape):
    """-> (partial file, its rows, the videos done, the failed) of an extraction a killed run left;
    a UserError says why it cannot go on"""
    progress = runs.read_json(progress_file, expect=dict)
    kinds = dict(partial=str, done=list, failed=dict)
    if any(not isinstance(progress.get(k), kind) for k, kind in kinds.items()):
        raise UserError(f"{progress_file}: expected {list(kinds)}, found {sorted(progress)}")
    partial = os.path.join(os.path.dirname(progress_file), os.path.basename(progress['partial']))
    try:
        frames = np.lib.format.open_memmap(partial, mode='r+')
    except (OSError, ValueError) as e:  # gone, or not a whole .npy file
        raise UserError(f"{partial}: {e}") from None
    if frames.shape != shape:
        raise UserError(f"{partial} holds {frames.shape}, expected {shape}")
    return partial, frames, set(progress['done']), progress['failed']


def _extract(videos, family, size, n_frames, path, log):
    """Rows go to a partial file of a unique name; after each flush a progress json names it and the
    rows done, so a killed run resumes where it stopped. The .npy appears (os.replace) only when
    complete. Runs under the cache's lock: no other process writes these files meanwhile."""
    shape = (len(videos), n_frames, 3, size, size)
    base = path.removesuffix('.npy')
    progress_file = base + '.progress.json'
    done, failed, frames = set(), {}, None
    if os.path.exists(progress_file):
        try:
            partial, frames, done, failed = _interrupted_extraction(progress_file, shape)
            log(f"resuming {partial}: {len(done)}/{len(videos)} videos done")
        except UserError as e:  # a progress file or partial of its own kind: start afresh
            log(f"warning: cannot resume from {progress_file} ({e}); extracting every video")
    if frames is None:
        partial = f"{base}.{os.urandom(4).hex()}.partial.npy"  # unique: never one shared file
        frames = np.lib.format.open_memmap(partial, mode='w+', dtype=np.uint8, shape=shape)
    for stale in glob.glob(glob.escape(base) + '*.partial.npy'):  # of runs killed before progress
        if os.path.basename(stale) != os.path.basename(partial):
            os.remove(stale)
    todo = [i for i in range(len(videos)) if i not in done]
    t0 = last = time.time()
    for n, i in enumerate(todo, 1):
        v = videos[i]
        try:
            if v.path is None:
                raise UserError("no mp4 on disk")
            decoded = decode_frames(v.path, n_frames)  # (F, H, W, 3)
        except UserError as e:
            failed[v.video_id] = f"{v.path}: {e}" if v.path else str(e)
            log(f"warning: skipped video {v.video_id}: {failed[v.video_id]}")
        else:
            frames[i] = resize_crop(decoded, family, size).numpy()
        done.add(i)
        if time.time() - last > PROGRESS_EVERY_S or n == len(todo):
            frames.flush()  # rows reach the disk before the progress file says they are done
            runs.write_json(progress_file, {'partial': os.path.basename(partial),
                                             'done': sorted(done), 'failed': failed})
            rate = n / max(time.time() - t0, 1e-6)
            log(f"frames {len(done)}/{len(videos)} videos | {rate:.1f} videos/s | "
                f"{rate * n_frames:.0f} frames/s | eta {runs.hms((len(todo) - n) / rate)}")
            last = time.time()
    del frames
    runs.write_json(base + '.failed.json', failed)
    os.replace(partial, path)
    if os.path.exists(progress_file):
        os.remove(progress_file)
