"""
Benchmarks against references measured in the same run, one section per subcommand:

    python tests/bench.py models           # our CLIP ViT-B/32 towers vs transformers (sdpa)
    python tests/bench.py data             # frame extraction, cache size, cached pass vs decoding pass
    python tests/bench.py contrastive      # one FCLIP training step, ours vs transformers' CLIPModel
    python tests/bench.py regress          # frozen head with vs without the feature cache, fine-tuning
    python tests/bench.py text             # frozen text extraction: length-bucketed vs dataset order
    python tests/bench.py models --quick   # fewer iterations
    python tests/bench.py models --compile # also the vision tower under torch.compile
    python tests/bench.py models --profile # also the vision forward's time by operator

Add a section by writing `def bench_NAME(args)` and an entry in SECTIONS.
"""
import argparse
import ctypes
import functools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

def timeit(fns, iters, device, warmup=1):
    """median seconds per call of each fn, calls interleaved so that load from other jobs hits all alike"""
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    for fn in fns * warmup:
        fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, t in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]

@functools.cache
def timed_dtypes(device):
    """the dtypes worth timing on device: bfloat16 only where it has native support. On a CPU with AVX2 alone a
    bfloat16 matmul runs ~150x slower than float32, and its rows would take most of an hour"""
    from harness import runs
    slowdown = runs.warn_slow_bfloat16() if device == 'cpu' else 1
    if slowdown > 3:
        print(f"skipping the {device} bfloat16 rows: a bfloat16 matmul runs {slowdown:.0f}x slower than float32 on "
              f"this CPU ({torch.backends.cpu.get_cpu_capability()}, no native bfloat16)")
        return ('float32',)
    return ('float32', 'bfloat16')

def matmul_gflops(m, k, n, dtype, device, iters):
    """plain (m, k) @ (k, n) throughput: the ceiling a transformer's linears can reach"""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    return 2 * m * k * n / timeit([lambda: a @ b], iters, device)[0] / 1e9

def encoder_flops(tokens, seqs, T, C, M, layers):
    """forward FLOPs of `layers` blocks on `seqs` sequences of T tokens (tokens = seqs * T)"""
    linear = 2 * tokens * (4 * C * C + 2 * C * M)  # qkv + out proj + mlp
    attention = 2 * 2 * seqs * T * T * C          # q @ k^T and att @ v
    return layers * (linear + attention)

def keep_freed_memory():
    """An allocator exercise, measured by `models` below (~1.1x on a ViT-B/32 forward, too little to keep in the
    scripts): make glibc keep freed memory in the process. By default it hands the big blocks of a batch's
    activations back to the OS and the next batch page-faults them in again. Process-wide and not undone;
    returns False where there is no glibc mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # macOS, Windows, musl
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mmap = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)  # older glibc: at most 32 MiB
    return bool(mmap and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))

def allocator_exercise(iters, B):
    """page faults, kernel and wall time per CLIP ViT-B/32 forward (random weights) with glibc's default allocator,
    then after keep_freed_memory()"""
    import models
    torch.manual_seed(0)
    visual, px = models.CLIP(models.CLIPConfig()).visual.eval(), torch.randn(B, 3, 224, 224)
    def vision_forward():
        with torch.no_grad():
            visual(px)
    def faults_and_seconds():  # -> page faults, kernel seconds (all threads), wall seconds per forward
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        s = timeit([vision_forward], iters, 'cpu')[0]
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return (r1.ru_minflt - r0.ru_minflt) / (iters + 1), (r1.ru_stime - r0.ru_stime) / (iters + 1), s
    default, kept, after = faults_and_seconds(), keep_freed_memory(), faults_and_seconds()
    print("cpu vision forward float32 in a fresh process, page faults, kernel time and wall time per forward: "
          "glibc's default allocator {:.0f}, {:.3f} s, {:.3f} s; after keep_freed_memory() {:.0f}, {:.3f} s, {:.3f} s "
          "({:.2f}x)".format(*default, *after, default[2] / after[2]) + ('' if kept else ' (no glibc: nothing changed)'))

def save_hf_clip(folder):
    """transformers' CLIPModel of full size (ViT-B/32) with random weights, saved to folder -> the model"""
    import transformers as hf
    ref = hf.CLIPModel(hf.CLIPConfig())
    ref.save_pretrained(folder)
    return ref

# -----------------------------------------------------------------------------

def bench_models(args):
    import transformers as hf
    import data
    from conftest import wheel_members
    from harness import checkpoints
    from test_models import CAPTIONS, SENTENCES, clip_tokenizer_json

    torch.manual_seed(0)
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    iters = 3 if args.quick else 10
    B = args.batch
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_clip(tmp)  # full-size ViT-B/32, random weights
        ref = hf.CLIPModel.from_pretrained(tmp, attn_implementation='sdpa').eval()
        ours = data.load_encoder(tmp)[0]
        bpe = os.path.join(wheel_members('open-clip-torch', 'open_clip/bpe_simple_vocab_16e6.txt.gz'),
                           'open_clip', 'bpe_simple_vocab_16e6.txt.gz')
        clip_tokenizer_json(bpe, os.path.join(tmp, 'tokenizer.json'))
        tok = checkpoints.Tokenizer(tmp, ours.config.text_config.max_position_embeddings)
    captions = [(CAPTIONS + SENTENCES)[i % 9] for i in range(B)]
    ids, mask = tok(captions)                                # both: padded to the batch's longest caption
    ids77 = torch.full((B, 77), 49407)                       # the 'text@77' row: padded to 77, as CLIP pipelines do
    ids77[:, :ids.shape[1]], mask77 = ids, torch.zeros(B, 77, dtype=torch.long)
    mask77[:, :ids.shape[1]] = mask
    px = torch.randn(B, 3, 224, 224)
    v, t = ours.config.vision_config, ours.config.text_config
    n_patch = (v.image_size // v.patch_size) ** 2
    vis_flops = encoder_flops(B * (n_patch + 1), B, n_patch + 1, v.hidden_size, v.intermediate_size, v.num_hidden_layers) \
        + 2 * B * n_patch * v.hidden_size * 3 * v.patch_size ** 2
    txt_flops = encoder_flops(ids.numel(), B, ids.shape[1], t.hidden_size, t.intermediate_size, t.num_hidden_layers)
    print(f"batch {B}, captions padded to the batch's longest, {ids.shape[1]} tokens, in both; the text@77 row: "
          f"ours at {ids.shape[1]} tokens against ours padded to 77 (padding's saving, not kernels'), {iters} iterations, "
          f"torch {torch.__version__}, transformers {hf.__version__} ({ref.config._attn_implementation}), "
          f"{torch.get_num_threads()} threads")
    rows = []  # with glibc's default allocator, as the scripts run
    for device in devices:
        ours.to(device), ref.to(device)
        for dtype in timed_dtypes(device):
            ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == 'bfloat16' else nullcontext
            cases = {
                'vision': (lambda: ours.visual(px.to(device)),
                           lambda: ref.get_image_features(pixel_values=px.to(device)), vis_flops),
                'text': (lambda: ours.text(ids.to(device), mask.to(device)),
                         lambda: ref.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device)), txt_flops),
                'text@77': (lambda: ours.text(ids.to(device), mask.to(device)),
                            lambda: ours.text(ids77.to(device), mask77.to(device)), txt_flops),
            }
            for tower, (f_ours, f_ref, flops) in cases.items():
                for backward in (False, True):
                    def run(f):
                        with ctx(), (nullcontext() if backward else torch.no_grad()):
                            out = f()
                            out = out.pooler_output if hasattr(out, 'pooler_output') else out
                        if backward:
                            out.float().square().mean().backward()
                            ours.zero_grad(set_to_none=True)  # (the text@77 row runs ours on both sides)
                            ref.zero_grad(set_to_none=True)
                    s_ours, s_ref = timeit([lambda: run(f_ours), lambda: run(f_ref)], iters, device)
                    gflops = flops * (3 if backward else 1) / s_ours / 1e9
                    rows.append((device, tower, 'fwd+bwd' if backward else 'fwd', dtype, B / s_ours, B / s_ref, gflops))
    # the matmul ceiling is measured last: on CPU a plain bfloat16 matmul slowed every later model timing
    mm = {(d, dt): matmul_gflops(B * (n_patch + 1), v.hidden_size, v.intermediate_size, getattr(torch, dt), d, max(iters, 3))
          for d in devices for dt in timed_dtypes(d)}
    print(f"{'device':6} {'tower':7} {'pass':8} {'dtype':8} {'ours/s':>8} {'hf/s':>8} {'ours/hf':>7} "
          f"{'GFLOP/s':>8} {'matmul':>8} {'%mm':>5}   (text@77: hf/s is ours padded to 77)")
    for device, tower, kind, dtype, ours_s, ref_s, gflops in rows:
        m = mm[device, dtype]
        print(f"{device:6} {tower:7} {kind:8} {dtype:8} {ours_s:8.1f} {ref_s:8.1f} {ours_s / ref_s:6.2f}x "
              f"{gflops:8.1f} {m:8.1f} {100 * gflops / m:4.0f}%")
    for device in [d for d in devices if 'bfloat16' in timed_dtypes(d)]:
        for tower in ('vision', 'text'):
            fp32, bf16 = ([r[4] for r in rows if r[:4] == (device, tower, 'fwd', dt)][0] for dt in ('float32', 'bfloat16'))
            print(f"{device} {tower} forward: ours bfloat16 autocast / ours float32 = {bf16 / fp32:.2f}x")
    # the ceiling, timed interleaved with the forward so that load from other jobs hits both alike
    # (the table's matmul column, measured minutes apart from its rows, moved 369-440 GFLOP/s across runs)
    a, b = torch.randn(B * (n_patch + 1), v.hidden_size), torch.randn(v.hidden_size, v.intermediate_size)
    for device in devices:
        ours.to(device)
        a, b, pxd = a.to(device), b.to(device), px.to(device)
        fns = {'eager': lambda: ours.visual(pxd)}
        if args.compile:  # the layernorms, activations and residual adds fused by inductor
            compiled = torch.compile(ours.visual)
            fns['torch.compile'] = lambda: compiled(pxd)
        with torch.no_grad():
            secs = timeit([lambda: a @ b] + list(fns.values()), iters, device, warmup=2)
        m = 2 * a.shape[0] * a.shape[1] * b.shape[1] / secs[0] / 1e9
        print(f"{device} vision forward float32 against the matmul timed alongside ({m:.0f} GFLOP/s): " + ', '.join(
            f"{name} {vis_flops / s / 1e9:.0f} GFLOP/s ({100 * vis_flops / s / 1e9 / m:.0f}%)" for name, s in zip(fns, secs[1:])))
    # in a fresh process: keep_freed_memory cannot be undone, and within a run glibc's thresholds adapt by themselves
    sys.stdout.flush()
    subprocess.run([sys.executable, '-c', f'import bench; bench.allocator_exercise({iters}, {B})'], cwd=HERE, check=True)
    if args.profile:  # where a forward's time goes, by operator; the linears are aten::addmm
        from torch.profiler import ProfilerActivity, profile
        ours.cpu()
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                ours.visual(px)
        print(f"cpu vision forward float32, {iters} forwards:")
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=10))


def bench_data(args):
    """frames/s of extraction, cache size, one pass over the cached frames vs one pass decoding the mp4s, and the
    input path of a training step: FrameCache.batch of random (video, frame) pairs + to_device + to_pixel_values
    (x * scale + shift), batch 128 at 224 px, against the four-op form (x / 255 - mean) / std in the same run"""
    from itertools import cycle
    import numpy as np
    import data
    from tools import demo
    n, family, size, n_frames, batch = (40 if args.quick else 200), 'clip', 224, 3, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = os.path.join(tmp, 'demo'), os.path.join(tmp, 'cache')  # the caches never in the dataset
        t = time.perf_counter()
        demo.make_demo(root, n, seed=0)
        t_demo = time.perf_counter() - t
        videos = data.load_memento(root).videos
        t = time.perf_counter()
        fc = data.frame_cache(videos, family, size, n_frames, cache, log=lambda s: None)
        t_extract = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(0, n, batch):
            fc.batch(range(i, min(i + batch, n)))
        t_cached = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(0, n, batch):
            torch.stack([data.resize_crop(data.decode_frames(v.path, n_frames), family, size)
                         for v in videos[i:i + batch]])
        t_decode = time.perf_counter() - t
        mib = os.path.getsize(fc.path) / 2 ** 20
        print(f"demo dataset of {n} videos (3 s, 64x48, 30 fps) written in {t_demo:.1f} s")
        print(f"extraction ({family}, {size}px, {n_frames} frames): {n * n_frames / t_extract:.0f} frames/s "
              f"({n / t_extract:.0f} videos/s), cache {mib:.1f} MiB ({mib / n:.2f} MiB a video)")
        print(f"one pass over the cache {t_cached:.3f} s vs one pass decoding the mp4s {t_decode:.2f} s: "
              f"{t_decode / t_cached:.0f}x faster")
        # the input path: both versions draw the same random pairs, calls interleaved
        B, iters = 128, (5 if args.quick else 20)
        rng = np.random.default_rng(0)
        draws = [(rng.integers(0, n, B), rng.integers(0, n_frames, B)) for _ in range(iters + 1)]
        for device in ['cpu'] + (['cuda'] if torch.cuda.is_available() else []):
            mean, std = (torch.tensor(data.FAMILIES[family][k], device=device).view(3, 1, 1) for k in ('mean', 'std'))
            def readable(rows, subs):  # the formula as written, on a plain fancy-indexed copy
                x = torch.from_numpy(fc.frames[rows, subs]).to(device)
                return (x.float() / 255.0 - mean) / std
            def ours(rows, subs):  # as Items.inputs: pinned memory and a non-blocking copy to a GPU
                return data.to_pixel_values(data.to_device(fc.batch(rows, subs), device), family)
            diff = (ours(*draws[0]) - readable(*draws[0])).abs().max().item()
            calls = [cycle(draws), cycle(draws)]
            s_ours, s_ref = timeit([lambda: ours(*next(calls[0])), lambda: readable(*next(calls[1]))], iters, device)
            print(f"input path on {device}, {B} random (video, frame) pairs of the {size}px cache -> normalised "
                  f"float32 batch: FrameCache.batch + to_pixel_values {B / s_ours:,.0f} frames/s, the four-op form "
                  f"{B / s_ref:,.0f} frames/s ({s_ref / s_ours:.2f}x); max |difference| {diff:.1e}")
        # what the CPU does per batch when a GPU normalises: the uint8 gather (pinned where CUDA is present)
        gathers = cycle(draws)
        s_gather = timeit([lambda: fc.batch(*next(gathers))], iters, 'cpu')[0]
        print(f"input path, the CPU's part when the GPU normalises: FrameCache.batch of {B} random pairs, uint8"
              f"{', pinned' if torch.cuda.is_available() else ''}: {B / s_gather:,.0f} frames/s")


def bench_contrastive_step(args):
    from bench_contrastive import bench_contrastive
    bench_contrastive(quick=args.quick, batch=args.batch)


def bench_regress_runs(args):
    from bench_regress import bench_regress
    bench_regress(quick=args.quick)


def bench_text_extraction(args):
    from bench_text import bench_text
    bench_text(quick=args.quick)


SECTIONS = {'models': bench_models, 'data': bench_data, 'contrastive': bench_contrastive_step, 'regress': bench_regress_runs,
            'text': bench_text_extraction}

if __name__ == '__main__':
    fmt = type('fmt', (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument('section', choices=sorted(SECTIONS), help='which benchmark to run')
    parser.add_argument('--quick', action='store_true', help='fewer iterations (a smoke run, noisy numbers)')
    parser.add_argument('--batch', type=int, default=32, help='batch size (paper 4.3: 32)')
    parser.add_argument('--compile', action='store_true', help='models: also time the vision tower under torch.compile')
    parser.add_argument('--profile', action='store_true', help='models: also print where a vision forward spends its time, by operator')
    args = parser.parse_args()
    SECTIONS[args.section](args)
