"""
A Memento-shaped demo dataset and tiny random-weight checkpoints, for run_all.sh and the tests.

    python -m tools.demo dataset data/demo --videos 500 --seed 0   # official layout, mp4s, captions
    python -m tools.demo models clip vit distilbert --out data/models --corpus data/demo/captions.txt

dataset: 3 s clips of a coloured shape that stands, slides or bounces on a background, scored by
shape, colour, background and motion, which each clip's 5 captions name; demo_boxes.json holds the
shape's box in every frame, to check memorability maps against (--shape-only: the score set by the
shape and its colour alone, all inside that box). models: random-init encoders 32 wide, 2 deep, a
BPE tokenizer trained on the captions, in the published weights' Hugging Face layout. Each folder
keeps the key of all it comes from: the same command reuses it, another is refused, naming why.
"""
import argparse
import os
import re
import time

import av
import numpy as np
import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

import models
from data import DEMO_BOXES, OFFICIAL_FILES, SPLITS
from harness import checkpoints, runs

# -----------------------------------------------------------------------------
# demo dataset: simple scenes whose memorability depends on what they show
SHAPES = {'circle': ('circle', 'disc', 'round shape', 'ball'),
          'square': ('square', 'box', 'block', 'square tile'),
          'triangle': ('triangle', 'three-sided shape', 'wedge', 'triangular shape')}
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (50, 80, 220), 'yellow': (235, 210, 40)}
BACKGROUNDS = {'dark': (25, 25, 35), 'light': (225, 225, 215), 'grassy': (70, 125, 55)}
MOTIONS = {'standing still': ('stays still', 'does not move', 'rests in place'),
           'sliding across': ('slides across the frame', 'moves from one side to the other',
                              'glides sideways'),
           'bouncing up': ('bounces up and down', 'jumps repeatedly', 'hops up and down')}
# memorability effects (scores are 0.75 + effects + noise, Memento-like range)
EFFECTS = {'circle': 0.06, 'square': 0.0, 'triangle': -0.05,
           'red': 0.05, 'green': -0.04, 'blue': -0.01, 'yellow': 0.02,
           'dark': -0.03, 'light': 0.02, 'grassy': 0.0,
           'standing still': -0.07, 'sliding across': 0.02, 'bouncing up': 0.07}
CAPTIONS = ("a {colour} {shape} {motion} on a {bg} background",
            "the video shows a {colour} {shape} that {motion}",
            "on a {bg} screen a {shape} coloured {colour} {motion}",
            "simple animation: {colour} {shape}, {bg} backdrop, it {motion}",
            "there is a {shape} in {colour} and it {motion} over a {bg} scene")

def _scene(rng, shape, colour, bg, motion, h=48, w=64, t=90):
    """-> (T, H, W, 3) uint8 frames of one scene, (T, 4) int boxes [x0, y0, x1, y1) of its shape"""
    shade = 0.85 + 0.3 * np.linspace(0, 1, h)[:, None, None]  # (H, 1, 1): lighter to the bottom
    base = np.array(BACKGROUNDS[bg], np.float32) * shade
    img = np.broadcast_to(base, (h, w, 3)) + rng.normal(0, 6, (h, w, 3))  # static texture
    r, k = rng.uniform(6, 10), np.arange(t)
    lo, hi = r + (w - h) / 2 + 2, w - r - (w - h) / 2 - 2  # inside CLIP's centre crop
    cx, cy = np.full(t, rng.uniform(lo, hi)), np.full(t, rng.uniform(r + 2, h - r - 2))
    if motion == 'sliding across':
        cx = np.linspace(lo, hi, t)[::rng.choice([-1, 1])]
    elif motion == 'bouncing up':
        cy = h - r - 2 - (h - 2 * r - 4) * np.abs(np.sin(np.pi * k / rng.uniform(25, 45)))
    dx, dy = np.arange(w) - cx[:, None, None], np.arange(h)[:, None] - cy[:, None, None]
    inside = {'circle': dx ** 2 + dy ** 2 <= r ** 2,  # (T, H, W) of dx (T, 1, W), dy (T, H, 1)
              'square': (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85),
              'triangle': (dy <= r * 0.8) & (np.abs(dx) <= (dy + r) * 0.6)}[shape]
    frames = np.where(inside[..., None], np.array(COLOURS[colour], np.float32), img[None])
    cols, rows = inside.any(1), inside.any(2)  # (T, W), (T, H): where the shape has a pixel
    boxes = np.stack([cols.argmax(1), rows.argmax(1),
                      w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)], 1)
    return np.clip(frames, 0, 255).astype(np.uint8), boxes

def _write_mp4(path, frames, fps=30):
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264', rate=fps, options={'preset': 'ultrafast'})
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], 'yuv420p'
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')))
        container.mux(stream.encode())

def make_demo(root, n_videos, seed, shape_only=False):
    """Official layout, real 3 s mp4s (64x48, 30 fps), captions.txt and DEMO_BOXES, split 70/15/15,
    deterministic. shape_only: the score ignores background and motion (the same draws, clips)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'videos'), exist_ok=True)
    n_val = round(0.15 * n_videos)  # and as many test videos
    split_of = np.repeat(SPLITS, [n_videos - 2 * n_val, n_val, n_val])[rng.permutation(n_videos)]
    records, corpus, boxes = {s: [] for s in SPLITS}, [], {}
    for i in range(n_videos):
        # the draws in this order, one after the other: the same seed gives the same dataset
        shape, colour, bg, motion = (str(rng.choice(list(d)))
                                     for d in (SHAPES, COLOURS, BACKGROUNDS, MOTIONS))
        effects = (shape, colour) if shape_only else (shape, colour, bg, motion)
        score = 0.75 + sum(EFFECTS[a] for a in effects) + rng.normal(0, 0.015)
        captions = [c.format(shape=rng.choice(SHAPES[shape]), colour=colour, bg=bg,
                             motion=rng.choice(MOTIONS[motion])) for c in CAPTIONS]
        name = f"demo-{seed}-{i:05d}.mp4"
        rec = {'filename': f"{motion.replace(' ', '-')}_{name}",
               'url': f"https://example.invalid/memento/actions3/{motion.replace(' ', '+')}/{name}",
               'mem_score': round(float(np.clip(score, 0.0, 1.0)), 4),
               'alpha': round(float(rng.uniform(-0.012, 0)), 6),
               'captions': captions, 'action_labels': [motion]}
        frames, box = _scene(rng, shape, colour, bg, motion)
        _write_mp4(os.path.join(root, 'videos', rec['filename']), frames)
        boxes[rec['filename']] = box.tolist()
        if split_of[i] == 'test':
            del rec['mem_score']
        records[str(split_of[i])].append(rec)
        corpus += captions
    for s in SPLITS:
        runs.write_json(os.path.join(root, OFFICIAL_FILES[s]), records[s])
    runs.write_bytes(os.path.join(root, 'captions.txt'), ('\n'.join(corpus) + '\n').encode())
    runs.write_json(os.path.join(root, DEMO_BOXES), boxes)  # last: the dataset is whole

# -----------------------------------------------------------------------------
# tiny random models for demos and tests
SPECIAL_TOKENS = {'clip': ['<|startoftext|>', '<|endoftext|>'],
                  'bert': ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']}
TYPES = ['clip', 'vit', 'distilbert', 'bert']  # model_type of the tiny models
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

def train_tokenizer(corpus, family, vocab_size=1000):
    """a small lowercase byte-level BPE with the family's special tokens and template"""
    specials = SPECIAL_TOKENS[family]
    tk = Tokenizer(BPE(unk_token=None if family == 'clip' else '[UNK]'))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    start, end = specials[:2] if family == 'clip' else ('[CLS]', '[SEP]')
    ends = [(t, tk.token_to_id(t)) for t in (start, end)]
    tk.post_processor = processors.TemplateProcessing(single=f'{start} $A {end}', special_tokens=ends)
    return tk

def _merge(d, overrides):
    return {k: _merge(d[k], v) if isinstance(v, dict) and isinstance(d.get(k), dict) else v
            for k, v in {**d, **overrides}.items()}

def make_tiny(model_type, out_dir, corpus, seed=0, **overrides):
    """random-init tiny model + a BPE tokenizer trained on `corpus`, saved in HF layout;
    overrides merge into config.json"""
    image = dict(TINY, image_size=32, patch_size=8)
    if model_type == 'clip':
        tk = train_tokenizer(corpus, 'clip')
        eot, bos = tk.token_to_id('<|endoftext|>'), tk.token_to_id('<|startoftext|>')
        text = dict(TINY, vocab_size=tk.get_vocab_size(), max_position_embeddings=32,
                    pad_token_id=eot, bos_token_id=bos, eos_token_id=eot)
        d = dict(model_type='clip', projection_dim=16, vision_config=image, text_config=text)
    elif model_type == 'vit':
        tk, d = None, dict(model_type='vit', **image)
    else:
        tk = train_tokenizer(corpus, 'bert')
        d = dict(TINY, model_type=model_type, vocab_size=tk.get_vocab_size(),
                 max_position_embeddings=64, pad_token_id=tk.token_to_id('[PAD]'))
    torch.manual_seed(seed)
    model = models.build(_merge(d, overrides))
    # zero biases, unit layernorms, N(0, 0.02) embeddings, weight matrices of std 1/sqrt(fan_in):
    # HF's 0.02 everywhere would leave a 32-wide random model's outputs nearly constant
    for name, p in model.named_parameters():
        if p.dim() > 1 and not re.search(r'(^|\.)(tok|pos|seg|cls)(\.|$)', name):
            nn.init.normal_(p, std=p[0].numel() ** -0.5)
        elif p.dim() > 1 or name.endswith('cls'):
            nn.init.normal_(p, std=0.02)
        elif name != 'logit_scale':  # 1 for a layernorm's weight, 0 for a bias
            nn.init.constant_(p, float('.ln' in f'.{name}' and name.endswith('weight')))
    tokenizer = {} if tk is None else {'tokenizer.json': tk.to_str(pretty=True).encode()}
    runs.write_folder(out_dir, {**checkpoints.hf_files(model), **tokenizer})
    return model.eval()  # as data.load_encoder returns it

# -----------------------------------------------------------------------------
def parse_args(argv=None):
    fmt = runs.HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    commands = parser.add_subparsers(dest='command', metavar='{dataset,models}', required=True)
    dataset = commands.add_parser('dataset', formatter_class=fmt, help="write a demo dataset",
                                  description="write a demo dataset (official layout, mp4s) to DIR")
    dataset.add_argument('root', metavar='DIR', help="output folder")
    dataset.add_argument('--videos', type=runs.count(1), default=200, help="number of demo videos")
    dataset.add_argument('--seed', type=int, default=0, help="dataset seed")
    dataset.add_argument('--shape-only', action='store_true', help="the score depends on the shape "
                         "and its colour only, not on the background and motion")
    tiny = commands.add_parser('models', formatter_class=fmt, help="write tiny random encoders",
                               description="write tiny random encoders in the HF layout to OUT")
    tiny.add_argument('types', nargs='+', choices=TYPES, metavar='TYPE',
                      help="model_type(s) of the tiny random encoders to write: %(choices)s")
    tiny.add_argument('--out', required=True, help="output folder (HF layout: config.json, "
                      "model.safetensors, tokenizer.json); with several types, OUT/<type> for each")
    tiny.add_argument('--corpus', help="text file, one caption a line, to train the BPE tokenizer "
                                       "on (not needed for vit)")
    tiny.add_argument('--seed', type=int, default=0, help="weights' seed")
    args = parser.parse_args(argv)
    if args.command == 'models' and args.corpus is None and args.types != ['vit']:
        tiny.error(f"--corpus is required for models {' '.join(args.types)}")
    return args

def main(argv=None):
    args, t0 = parse_args(argv), time.time()
    if args.command == 'dataset':  # reused when made by this code with these flags
        runs.claim(args.root, {'script': 'tools/demo.py dataset', 'code': runs.code(make_demo),
                               **runs.flags(args, ('command', 'root'))})
        if not os.path.exists(os.path.join(args.root, DEMO_BOXES)):
            make_demo(args.root, args.videos, args.seed, args.shape_only)
        print(f"{args.videos} demo videos in {args.root} ({time.time() - t0:.1f} s)")
        return
    corpus = runs.read_text(args.corpus, 'corpus').splitlines() if args.corpus else []
    key = {'script': 'tools/demo.py models', 'code': runs.code(make_tiny),
           **runs.flags(args, ('command', 'out', 'corpus')), 'corpus': runs.fingerprint(corpus)}
    if len(args.types) > 1:  # OUT/<type> each, reused when made by this code with these flags
        runs.claim(args.out, key)
    for kind in args.types:
        out = os.path.join(args.out, kind) if len(args.types) > 1 else args.out
        if len(args.types) == 1 or not os.path.exists(os.path.join(out, 'config.json')):
            make_tiny(kind, out, [line.strip() for line in corpus if line.strip()], seed=args.seed)
        print(f"a tiny {kind} model in {out}")

if __name__ == '__main__':
    runs.script(main, 'tools/demo.py', "the same command goes on")
