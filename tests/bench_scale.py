"""
Paper scale on one machine (issue 37): N synthetic videos in the official Memento10k layout through every
CPU stage of the pipeline, each stage in a process of its own, with its wall time, time per video, peak
memory (RSS) and disk:

    python tests/bench_scale.py --videos 1000 --report bench-scale-1000.md
    python tests/bench_scale.py --videos 10000 --workdir /scratch/bench --report bench-scale-10000.md
    python tests/bench_scale.py --videos 300 --stages frames captions pairs      # no embeddings
    python tests/bench_scale.py --videos 300 --stages s3-vision --dtype bfloat16   # one frozen strategy
    python tests/bench_scale.py --videos 24 --resolution 64x48 --tiny --head-epochs 3   # tests/test_bench_scale.py

The videos. A Memento10k clip lasts 3 s; we take 30 fps, the usual rate of web video, so that the decoder
meets 90 frames a clip (data.decode_frames decodes every frame to keep 3), and 640x360 (360p, 16:9), a usual
size of the short web clips Memento10k was cut from (--resolution for another: check a few of the real files
with ffprobe). Decoding time grows with the pixels and the bits of every frame, so the clips carry a moving
shape on a textured background with a grain that changes every frame, at --bitrate (1 Mbit/s, about what
such clips take as H.264), and their short side is not their long one, as in real clips (CLIP's
preprocessing crops the centre, ViT's squashes). A few hundred distinct clips (--distinct) are written with
libx264 through PyAV and hard-linked under the N names (copied where links fail): N = 10,000 takes a few
minutes on 2 cores, and the dataset's disk is the distinct clips'. The preset is veryfast, not ultrafast:
ultrafast turns off CABAC, the deblocking filter and B-frames, where a decoder spends its time on web video,
and its clips decode 2.4x faster (0.05 s against 0.12 s a 640x360 clip, measured side by side). The OS
caches those clips, so the frame stages read no disk: reading Memento10k's few GB once adds a minute or so
on an SSD. Each video gets its own 5 captions and score (tools/demo.py's scenes, captions and score
effects), split 70/15/15 as the official split (7,000 / 1,500 / 1,500), the test scores left out.

The stages, in order (--stages picks some: a name, or a part of names such as frames, captions, embed,
head, vision, s3-vision; what a picked stage reads is made first, by the stage that makes it):
  dataset, models     set-up, not the pipeline: the videos, and random checkpoints of the published sizes in
                      the Hugging Face layout (tools/demo.make_tiny with full-size overrides): ViT-B/32 in21k,
                      CLIP ViT-B/32 at 224 px, DistilBERT; --tiny: make_tiny's 32-wide ones
  frames-clip, -vit   python data.py --data D --prepare --family F: every video decoded into the frame cache
  captions-clip, -distilbert  every caption tokenised into the caption cache (data.caption_cache), by the
                      CLIP and DistilBERT checkpoints' tokenizers (trained on the captions: the cost is the
                      tokenizers library's)
  pairs               one stage 1 epoch of contrastive.PairBatchSampler over the train+val videos, batch 32
  embed-sS-M          python regress.py --strategy S --modality M --checkpoint FULL --epochs 1: a frozen
                      strategy's embeddings, computed once into the cache (the 5 one-epoch folds after them
                      take seconds; the note gives the embedding's own time, from regress's progress lines)
  head-sS-M           the same command with a new --out and the paper's epochs: the features come from the
                      cache, so this is the head's 5 folds (early stopping: 70 epochs at least)
                      S-M: s1-vision (ViT in21k), s3-vision (CLIP), s1-text (DistilBERT), s3-text (CLIP);
                      each at Table 6's batch size, halved while a fold has fewer training rows
  fusion              python -m tools.report RUNS: curves.png and the fusion of the best vision and text run
  ci                  python evaluate.py --score RUN: the s3-vision run's SRCC and its 95% CI (eq. 13)

The columns. time: the wall time of the stage's process, Python's start and imports included (seconds).
peak RSS: the largest resident set of the stage's process (os.wait4's ru_maxrss, taken by a small launcher
process: see LAUNCHER). It counts the pages of the memory-mapped caches the process touched (a frame cache of
10,000 videos is 4.5 GB), which the kernel drops when memory runs short, so anon, the peak of the process's
anonymous memory (RssAnon of /proc/PID/status, sampled every 0.1 s; Linux only), is the part that must fit.
Python with torch holds about 700 MB (300 MB anon) before any work; a child stage (dataset, models, captions,
pairs) imports this file, and with it regress and contrastive, as the scripts that build those caches do.
disk: what the stage added to the work folder, in allocated blocks, a hard-linked file once. cpu: the
process's user + system seconds (twice the time: both of 2 cores busy). Stages run one after the other, each
with FCLIP_CACHE set to WORKDIR/cache, HF_HUB_OFFLINE=1 and the threads torch picks; the report ends with the
machine: CPU, instruction set, cores, memory, versions.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import av
import numpy as np
import tokenizers
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT]

import contrastive  # noqa: E402 (needs the path above)
import data  # noqa: E402
import regress  # noqa: E402
from harness import checkpoints, runs  # noqa: E402
from tools import demo  # noqa: E402

SECONDS, FPS = 3, 30  # a Memento10k clip's length; the rate of its web video
MB = 1e6
# make_tiny's overrides that give the published architectures' sizes (random weights)
VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32)
FULL = {'vit': VIT_B32,
        'clip': dict(projection_dim=512, vision_config=VIT_B32, text_config=dict(
            hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
            max_position_embeddings=77, vocab_size=49408)),
        'distilbert': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
                           max_position_embeddings=512, vocab_size=30522)}
# the frozen runs: name -> (strategy, modality, checkpoint folder in WORKDIR/models)
FROZEN = {'s1-vision': (1, 'vision', 'vit'), 's3-vision': (3, 'vision', 'clip'),
          's1-text': (1, 'text', 'distilbert'), 's3-text': (3, 'text', 'clip')}

# -----------------------------------------------------------------------------
# what the child processes run: python -c "import bench_scale; bench_scale.FUNCTION(...)"

def encode(path, frames, grain, bitrate, preset):
    """(T, H, W, 3) uint8 frames + a grain that changes every frame -> an H.264 mp4 at about `bitrate`"""
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264', rate=FPS, options={'preset': preset})
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], 'yuv420p'
        stream.bit_rate = bitrate
        for i, frame in enumerate(frames):
            frame = np.clip(frame + grain[i % len(grain)], 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
        container.mux(stream.encode())

def split_sizes(n):
    """-> (train, val, test) videos: 70/15/15, as tools/demo.py and the official split (7,000/1,500/1,500)"""
    n_val = n_test = round(0.15 * n)
    return n - n_val - n_test, n_val, n_test

def write_dataset(root, n, width, height, distinct, bitrate, preset, seed):
    """n videos in the official layout under root/data: `distinct` clips in root/clips, hard-linked"""
    t0 = time.time()
    rng = np.random.default_rng(seed)
    clips, folder = os.path.join(root, 'clips'), os.path.join(root, 'data', 'videos')
    os.makedirs(clips)
    os.makedirs(folder)
    scale = max(1, height // 90)  # demo's scenes drawn at about 160x90, then enlarged
    h, w = -(-height // scale), -(-width // scale)
    grain = rng.normal(0, 4, (8, height, width, 3)).astype(np.int16)  # (8, H, W, 3)
    made = []
    for k in range(min(distinct, n)):
        scene = [str(rng.choice(list(d))) for d in (demo.SHAPES, demo.COLOURS, demo.BACKGROUNDS, demo.MOTIONS)]
        frames, _ = demo._scene(rng, *scene, h=h, w=w, t=SECONDS * FPS)  # (T, h, w, 3)
        frames = frames.repeat(scale, 1).repeat(scale, 2)[:, :height, :width]  # (T, H, W, 3)
        path = os.path.join(clips, f'clip-{k:04d}.mp4')
        encode(path, frames, grain, bitrate, preset)
        made.append((path, scene))
    split_of = np.array([s for s, k in zip(data.SPLITS, split_sizes(n)) for _ in range(k)])
    split_of = split_of[rng.permutation(n)]
    records, corpus = {s: [] for s in data.SPLITS}, []
    for i in range(n):
        path, (shape, colour, bg, motion) = made[i % len(made)]
        score = 0.75 + sum(demo.EFFECTS[a] for a in (shape, colour, bg, motion)) + rng.normal(0, 0.015)
        captions = [c.format(shape=rng.choice(demo.SHAPES[shape]), colour=colour, bg=bg,
                             motion=rng.choice(demo.MOTIONS[motion])) for c in demo.CAPTIONS]
        rec = {'filename': f"{motion.replace(' ', '-')}_scale-{i:06d}.mp4", 'captions': captions,
               'mem_score': round(float(np.clip(score, 0, 1)), 4)}
        try:
            os.link(path, os.path.join(folder, rec['filename']))
        except OSError:  # a file system without hard links
            shutil.copyfile(path, os.path.join(folder, rec['filename']))
        if split_of[i] == 'test':
            del rec['mem_score']
        records[str(split_of[i])].append(rec)
        corpus += captions
    for s in data.SPLITS:
        runs.write_json(os.path.join(root, 'data', data.OFFICIAL_FILES[s]), records[s])
    runs.write_bytes(os.path.join(root, 'captions.txt'), ('\n'.join(corpus) + '\n').encode())
    size = sum(os.path.getsize(p) for p, _ in made)
    print(f"bench_scale: {n} videos, {len(made)} distinct clips of {width}x{height} at {FPS} fps, "
          f"{size / len(made) / 1e3:.0f} kB a clip ({size * 8 / len(made) / SECONDS / 1e6:.2f} Mbit/s), "
          f"{n * size / len(made) / MB:.0f} MB as N files; {time.time() - t0:.1f} s")

def write_models(root, tiny):
    """random ViT, CLIP and DistilBERT in the Hugging Face layout under root/models, their tokenizers
    trained on the captions; --tiny: make_tiny's own sizes, else the published ones"""
    corpus = runs.read_text(os.path.join(root, 'captions.txt')).splitlines()
    for kind in ('vit', 'clip', 'distilbert'):
        t0 = time.time()
        model = demo.make_tiny(kind, os.path.join(root, 'models', kind), corpus, **({} if tiny else FULL[kind]))
        print(f"bench_scale: {kind} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
              f"in {time.time() - t0:.1f} s")

def tokenise(root, kind):
    """every caption through the tokenizer of root/models/kind into the caption cache, as the scripts do"""
    folder = os.path.join(root, 'models', kind)
    config, _ = checkpoints.read_config(folder)
    length = (config['text_config'] if kind == 'clip' else config)['max_position_embeddings']
    memento = data.load_memento(os.path.join(root, 'data'))
    t0 = time.time()
    cache = data.caption_cache(memento.videos, checkpoints.Tokenizer(folder, length))
    print(f"bench_scale: {cache.ids.shape[0]} videos x {cache.ids.shape[1]} captions, padded to "
          f"{cache.ids.shape[2]} tokens; cache built or read in {time.time() - t0:.1f} s")

def pair_epoch(root, batch_size):
    """one stage 1 epoch of pair order over the train+val videos, every batch drawn"""
    memento = data.load_memento(os.path.join(root, 'data'))
    n = len(memento.labelled())
    t0 = time.time()
    sampler = contrastive.PairBatchSampler(n, 3, data.N_CAPTIONS, min(batch_size, n))  # a batch: a pair a video
    sampler.set_epoch(1)
    pairs = sum(len(batch) for batch in sampler)
    print(f"bench_scale: {n} train+val videos, {len(sampler)} batches of {min(batch_size, n)}, {pairs} pairs; "
          f"the epoch's order in {time.time() - t0:.2f} s")

# -----------------------------------------------------------------------------
# measuring a stage

def disk_bytes(folder, skip=('logs',)):
    """bytes the files under folder take on disk (allocated blocks), a hard-linked file once"""
    seen, total = set(), 0
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not (dirpath == folder and d in skip)]
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total

# A child's peak RSS (ru_maxrss) starts at its parent's resident size: the kernel keeps the high-water mark of the
# memory a fork copied through the exec. Forked from this process, which holds torch, every stage would show at
# least its size; so each stage runs under this launcher, a bare Python of about 10 MB, which waits for it
# (os.wait4: the stage's own peak), samples its anonymous memory (RssAnon, Linux), and writes both to a JSON file
LAUNCHER = """
import json, os, subprocess, sys, threading
out, argv = sys.argv[1], sys.argv[2:]
stage, done, anon = subprocess.Popen(argv), threading.Event(), []
def sample():
    while not done.wait(0.1):
        try:
            with open(f'/proc/{stage.pid}/status') as f:
                anon.extend(int(line.split()[1]) * 1024 for line in f if line.startswith('RssAnon:'))
        except OSError:
            return
threading.Thread(target=sample, daemon=True).start()
_, status, usage = os.wait4(stage.pid, 0)
done.set()
stage.returncode = os.waitstatus_to_exitcode(status)
rss = usage.ru_maxrss * (1 if sys.platform == 'darwin' else 1024)  # bytes on macOS, KiB on Linux
with open(out, 'w') as f:
    json.dump({'rc': stage.returncode, 'cpu': usage.ru_utime + usage.ru_stime, 'rss': rss,
               'anon': max(anon, default=None)}, f)
sys.exit(stage.returncode)
"""

def measure(argv, env, log_path, echo=True):
    """runs argv from the repository under LAUNCHER -> dict(seconds, rc, cpu: its user + system seconds, rss and
    anon: its peaks in bytes (anon None where not sampled), lines [(seconds since the start, line)]); its output
    goes to log_path and, indented, to stdout"""
    usage_path = f'{log_path}.usage.json'
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, '-c', LAUNCHER, usage_path, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    with open(log_path, 'w') as log:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip('\n')))
            log.write(line)
            if echo:
                print(f"  | {line}", end='', flush=True)
    proc.wait()
    seconds = time.perf_counter() - t0
    proc.stdout.close()
    with open(usage_path) as f:
        usage = json.load(f)
    return dict(seconds=seconds, lines=lines, **usage)

# -----------------------------------------------------------------------------
# the stages

def child(function, *args):
    return [sys.executable, '-c', f"import bench_scale; bench_scale.{function}(*{args!r})"]

def batch_size(strategy, modality, labelled, folds=5):
    """Table 6's batch size, halved while it exceeds a fold's training rows (regress refuses it then)"""
    per_video = 3 if modality == 'vision' else data.N_CAPTIONS
    n_train = labelled * (folds - 1) // folds * per_video
    bs = regress.STRATEGIES[strategy].batch_size[modality]
    while bs > n_train and bs > 1:
        bs //= 2
    return bs

def plan(args, work, labelled, image_size):
    """-> {stage: (command, [stages it reads])} in the order they run"""
    D = os.path.join(work, 'data')
    stages = {'dataset': (child('write_dataset', work, args.videos, args.width, args.height, args.distinct,
                                args.bitrate, args.preset, args.seed), []),
              'models': (child('write_models', work, args.tiny), ['dataset'])}
    for family in ('clip', 'vit'):
        stages[f'frames-{family}'] = ([sys.executable, 'data.py', '--data', D, '--prepare', '--family', family,
                                       '--size', str(image_size[family])], ['models'])
    for kind in ('clip', 'distilbert'):
        stages[f'captions-{kind}'] = (child('tokenise', work, kind), ['models'])
    stages['pairs'] = (child('pair_epoch', work, 32), ['dataset'])
    for name, (s, modality, kind) in FROZEN.items():
        common = [sys.executable, 'regress.py', '--strategy', str(s), '--modality', modality, '--data', D,
                  '--checkpoint', os.path.join(work, 'models', kind), '--device', 'cpu', '--dtype', args.dtype,
                  '--batch-size', str(batch_size(s, modality, labelled))]
        family = 'clip' if kind == 'clip' else 'vit'
        reads = f'frames-{family}' if modality == 'vision' else f'captions-{kind}'
        stages[f'embed-{name}'] = (common + ['--out', os.path.join(work, 'embed', name), '--epochs', '1'], [reads])
        epochs = ['--epochs', str(args.head_epochs)] if args.head_epochs else []  # else the paper's
        stages[f'head-{name}'] = (common + ['--out', os.path.join(work, 'runs', name)] + epochs, [f'embed-{name}'])
    heads = [f'head-{name}' for name in FROZEN]
    stages['fusion'] = ([sys.executable, '-m', 'tools.report', os.path.join(work, 'runs')], heads)
    stages['ci'] = ([sys.executable, 'evaluate.py', '--score', os.path.join(work, 'runs', 's3-vision')],
                    ['head-s3-vision'])
    return stages

def picked(stages, words):
    """the stages a word of --stages names (the stage, or a part of its name between dashes), with what each
    reads, in order; the fusion reads a vision and a text run: those picked, else s1-vision and s1-text"""
    chosen = {s for s in stages for w in words
              if w == 'all' or w == s or f'-{w}-' in f'-{s}-'}
    unknown = [w for w in words if w != 'all' and not any(w == s or f'-{w}-' in f'-{s}-' for s in stages)]
    if unknown:
        raise runs.UserError(f"--stages {' '.join(unknown)}: no such stage; the stages are {', '.join(stages)}")
    todo = list(chosen)
    while todo:
        stage = todo.pop()
        reads = stages[stage][1]
        if stage == 'fusion':  # one vision and one text run
            have = [r for r in reads if r in chosen]
            reads = [next((r for r in have if m in r), f'head-s1-{m}') for m in ('vision', 'text')]
        for r in reads:
            if r not in chosen:
                chosen.add(r)
                todo.append(r)
    return [s for s in stages if s in chosen]

def note(stage, result, work):
    """what a stage's output says about it, in a few words"""
    lines = [line for _, line in result['lines']]
    said = [line.removeprefix('bench_scale: ') for line in lines if line.startswith('bench_scale: ')]
    if stage.startswith('frames'):
        said += [m.group(0) for line in lines for m in [re.search(r'\d+/\d+ videos', line)] if m]
    if stage.startswith('embed'):  # from the line before the fill to its last progress line
        start = next((t for t, line in result['lines'] if re.match(r'strategy \d', line)), None)
        fills = [(t, m) for t, line in result['lines']
                 for m in [re.match(r'(vision|text) items (\d+)/(\d+) \| ([\d.]+)', line)] if m]
        if start is not None and fills and fills[-1][1].group(2) == fills[-1][1].group(3):
            t, m = fills[-1]  # the fill's own rate, and the time from the run's first line to its last row
            said.append(f"embeddings of {m.group(3)} {m.group(1)} items at {float(m.group(4)):.1f} items/s, "
                        f"{t - start:.1f} s from regress's 'strategy' line")
        elif not fills:
            said.append("no embedding progress line (under 5 s, or read from the cache)")
    if stage.startswith(('embed', 'head')):
        path = os.path.join(work, 'embed' if stage.startswith('embed') else 'runs', stage.split('-', 1)[1],
                            'results.json')
        if os.path.exists(path):
            r = runs.read_json(path)
            said.append(f"batch {r['batch_size']}, epochs per fold {r['epochs_per_fold']}, "
                        f"srcc {r['srcc_mean']:.3f}")
    if stage in ('fusion', 'ci'):
        said += [line.strip() for line in lines if line.startswith(('fused', 'SRCC'))]
    if result['rc']:
        said.append(f"FAILED (exit {result['rc']}): {lines[-1] if lines else ''}")
    return '; '.join(said)

def machine():
    """the CPU (model, family, instruction set torch uses), cores, memory and library versions"""
    info = {}
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                info.setdefault(key.strip(), value.strip())
    flags = info.get('flags', '').split()
    bf16 = [f for f in ('avx512_bf16', 'amx_bf16') if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9 if hasattr(os, 'sysconf') else 0
    return (f"{info.get('model name') or platform.processor() or platform.machine()} (family "
            f"{info.get('cpu family', '?')}, model {info.get('model', '?')}), instruction set "
            f"{torch.backends.cpu.get_cpu_capability()} (torch.backends.cpu.get_cpu_capability()), bfloat16 "
            f"instructions: {', '.join(bf16) or 'none'}; {cores} cores ({os.cpu_count()} online), "
            f"{torch.get_num_threads()} torch threads, {memory:.1f} GB of memory; {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, PyAV "
            f"{av.__version__}, tokenizers {tokenizers.__version__}")

def table(rows, n):
    header = ['stage', 'time (s)', 'per video (ms)', 'peak RSS (MB)', 'anon peak (MB)', 'disk (MB)', 'cpu (s)',
              'notes']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for stage, r, disk, text in rows:
        anon = '-' if r['anon'] is None else f"{r['anon'] / MB:.0f}"
        lines.append(f"| {stage} | {r['seconds']:.1f} | {1e3 * r['seconds'] / n:.2f} | {r['rss'] / MB:.0f} | "
                     f"{anon} | {disk / MB:.1f} | {r['cpu']:.1f} | {text} |")
    return '\n'.join(lines)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=runs.HelpFormatter)
    p.add_argument('--videos', type=runs.count(14), required=True,
                   help="N, the number of videos (14 at least: 10 labelled ones make 5 folds of 2)")
    p.add_argument('--workdir', help="the work folder, new or empty (default: a new folder in the temporary "
                                     "folder); it holds the videos, models, caches (FCLIP_CACHE) and runs")
    p.add_argument('--keep', action='store_true', help="keep the work folder (a --workdir made here is "
                                                       "deleted at the end without it; one given is kept)")
    p.add_argument('--report', metavar='FILE', help="also write the table, as markdown, to FILE")
    p.add_argument('--stages', nargs='+', default=['all'],
                   help="stages to run, by name or a part of it (frames, captions, pairs, embed, head, vision, "
                        "s3-vision, fusion, ci), with what they read; the set-up stages always run")
    p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32',
                   help="regress.py's --dtype for the embeddings and heads (bfloat16: where the CPU has "
                        "bfloat16 instructions; on AVX2 alone it is many times slower)")
    p.add_argument('--resolution', default='640x360', metavar='WxH', help="the videos' size (even numbers)")
    p.add_argument('--distinct', type=runs.count(1), default=300, help="distinct clips, hard-linked under the "
                                                                       "N names")
    p.add_argument('--bitrate', type=runs.count(1000), default=1_000_000, help="the clips' H.264 bit rate")
    p.add_argument('--preset', default='veryfast', help="libx264's preset: veryfast keeps what a decoder spends "
                   "its time on in web video (CABAC, the deblocking filter, B-frames); ultrafast drops them and "
                   "its clips decode about 2x faster than real ones")
    p.add_argument('--head-epochs', type=runs.count(1), default=None,
                   help="regress.py's --epochs for the heads (default: its own, the paper's 200 with early "
                        "stopping)")
    p.add_argument('--tiny', action='store_true', help="make_tiny's 32-wide models at 32 px instead of the "
                                                      "published sizes (the test's smoke run)")
    p.add_argument('--seed', type=int, default=0, help="the dataset's seed")
    args = p.parse_args(argv)
    m = re.fullmatch(r'(\d+)x(\d+)', args.resolution)
    if not m or int(m.group(1)) % 2 or int(m.group(2)) % 2 or min(map(int, m.groups())) < 16:
        p.error(f"--resolution {args.resolution}: expected WxH, even numbers of 16 or more (H.264's 4:2:0)")
    args.width, args.height = map(int, m.groups())
    return args

def main(argv=None):
    args = parse_args(argv)
    size = 32 if args.tiny else 224  # the models' image size (make_tiny's, ViT-B/32's)
    labelled = sum(split_sizes(args.videos)[:2])
    order = picked(plan(args, 'WORKDIR', labelled, {'clip': size, 'vit': size}), args.stages)  # before any folder
    if args.workdir and os.path.exists(args.workdir) and (os.path.isfile(args.workdir) or os.listdir(args.workdir)):
        raise runs.UserError(f"--workdir {args.workdir}: not an empty folder; give a new one (each stage "
                             f"measures its work from nothing: no cache of an earlier run)")
    made = not args.workdir or not os.path.exists(args.workdir)  # deleted at the end, unless --keep
    work = args.workdir or tempfile.mkdtemp(prefix=f'bench-scale-{args.videos}-')
    os.makedirs(os.path.join(work, 'logs'), exist_ok=True)
    stages = plan(args, work, labelled, {'clip': size, 'vit': size})
    env = dict(os.environ, FCLIP_CACHE=os.path.join(work, 'cache'), HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1',
               PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    print(f"bench_scale: {args.videos} videos ({args.distinct} distinct clips, {args.resolution}, {FPS} fps, "
          f"{SECONDS} s), stages {', '.join(order)}; work folder {work}", flush=True)
    rows, failed = [], False
    try:
        for stage in order:
            print(f"\n== {stage}: {' '.join(stages[stage][0])}", flush=True)
            before = disk_bytes(work)
            result = measure(stages[stage][0], env, os.path.join(work, 'logs', f'{stage}.log'))
            disk = disk_bytes(work) - before
            rows.append((stage, result, disk, note(stage, result, work)))
            print(f"== {stage}: {result['seconds']:.1f} s, {1e3 * result['seconds'] / args.videos:.2f} ms a "
                  f"video, peak RSS {result['rss'] / MB:.0f} MB (anon {(result['anon'] or 0) / MB:.0f} MB), "
                  f"disk {disk / MB:+.1f} MB, cpu {result['cpu']:.1f} s", flush=True)
            if result['rc']:
                failed = True
                print(f"bench_scale: stage {stage} failed (exit {result['rc']}); its log: "
                      f"{os.path.join(work, 'logs', stage + '.log')}", file=sys.stderr)
                break
        command = ' '.join(sys.argv[1:] if argv is None else map(str, argv))
        text = (f"# bench_scale: {args.videos} videos\n\n`python tests/bench_scale.py {command}`\n\n"
                f"{args.videos} videos ({min(args.distinct, args.videos)} distinct clips hard-linked), "
                f"{args.width}x{args.height}, {FPS} fps, {SECONDS} s, H.264 ({args.preset}) at "
                f"{args.bitrate / 1e6:g} Mbit/s; "
                f"{'tiny' if args.tiny else 'full-size'} models, {args.dtype}; "
                f"{time.strftime('%Y-%m-%d %H:%M')}\n\n{table(rows, args.videos)}\n\n"
                f"time: the stage's process, Python's start included; peak RSS: its largest resident set, the "
                f"memory-mapped caches' pages it touched included (the kernel drops those when memory runs "
                f"short); anon peak: its anonymous memory, the part that must fit; disk: what it added; cpu: its "
                f"user + system seconds\n\nmachine: {machine()}\n\n"
                f"total disk of the work folder: {disk_bytes(work) / MB:.0f} MB\n")
        print('\n' + text)
        if args.report:
            runs.write_bytes(args.report, text.encode())
            print(f"wrote {args.report}")
    finally:
        if made and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif made:
            print(f"kept {work}")
    if failed:
        raise SystemExit(1)

if __name__ == '__main__':
    runs.script(main, 'tests/bench_scale.py', "the stages start again from nothing: give a new --workdir")
