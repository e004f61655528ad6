"""
A Memento-shaped demo dataset and tiny random-weight checkpoints, for run_all.sh and the tests.

    python demo.py dataset data/demo --videos 500 --seed 0     # official layout, mp4s, captions.txt
    python demo.py models clip vit distilbert --out data/demo-models --corpus data/demo/captions.txt

dataset: 3 s clips of a coloured shape that stands, slides or bounces on a background, in the
official layout, split 70/15/15 with the test scores left out; the score depends on the shape,
colour, background and motion, which the 5 captions of each clip name. demo_boxes.json records where
the shape is in every frame, to check memorability maps (explain.py) against. With
--shape-only the score depends on the shape and its colour alone, all inside that box: the same
clips and captions, other scores.
models: random-init encoders 32 wide and 2 deep, a BPE tokenizer trained on the captions, saved in
the Hugging Face layout so that the code that loads the published weights loads them.
"""
import argparse
import os
import re
import time

import av
import numpy as np
import torch
import torch.nn as nn
from tokenizers import (Tokenizer as HFTokenizer, decoders, normalizers, pre_tokenizers, processors,
                        trainers)
from tokenizers.models import BPE

import runs
from checkpoints import DISTILBERT_NAMES, config_from_dict, save_pretrained
from data import DEMO_BOXES, OFFICIAL_FILES, SPLITS
from models import build

# -----------------------------------------------------------------------------
# demo dataset: simple scenes whose memorability depends on what they show

SHAPES = {'circle': ('circle', 'disc', 'round shape', 'ball'),
          'square': ('square', 'box', 'block', 'square tile'),
          'triangle': ('triangle', 'three-sided shape', 'wedge', 'triangular shape')}
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (50, 80, 220),
           'yellow': (235, 210, 40)}
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
    yy, xx = np.mgrid[:h, :w]
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]  # (T, H, W)
    inside = {'circle': dx ** 2 + dy ** 2 <= r ** 2,
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
    n_val = n_test = round(0.15 * n_videos)
    split_of = ['train'] * (n_videos - n_val - n_test) + ['val'] * n_val + ['test'] * n_test
    split_of = np.array(split_of)[rng.permutation(n_videos)]
    records, corpus, boxes = {s: [] for s in SPLITS}, [], {}
    for i in range(n_videos):
        # the draws in this order, one after the other: the same seed gives the same dataset
        shape = str(rng.choice(list(SHAPES)))
        colour = str(rng.choice(list(COLOURS)))
        bg = str(rng.choice(list(BACKGROUNDS)))
        motion = str(rng.choice(list(MOTIONS)))
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
    runs.write_json(os.path.join(root, DEMO_BOXES), boxes)
    text = '\n'.join(corpus) + '\n'
    runs.write_text(os.path.join(root, 'captions.txt'), text)

# -----------------------------------------------------------------------------
# tiny random models for demos and tests

SPECIAL_TOKENS = {'clip': ['<|startoftext|>', '<|endoftext|>'],
                  'bert': ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']}
TYPES = ['clip', 'vit', 'distilbert', 'bert']  # model_type of the tiny models
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)

def train_tokenizer(corpus, family, vocab_size=1000):
    """a small lowercase byte-level BPE with the family's special tokens and template"""
    specials = SPECIAL_TOKENS[family]
    tk = HFTokenizer(BPE(unk_token=None if family == 'clip' else '[UNK]'))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False, initial_alphabet=alphabet)
    tk.train_from_iterator(corpus, trainer)
    start, end = specials[:2] if family == 'clip' else ('[CLS]', '[SEP]')
    ends = [(t, tk.token_to_id(t)) for t in (start, end)]
    tk.post_processor = processors.TemplateProcessing(single=f'{start} $A {end}',
                                                      special_tokens=ends)
    return tk

def _merge(d, overrides):
    return {k: _merge(d[k], v) if isinstance(v, dict) and isinstance(d.get(k), dict) else v
            for k, v in {**d, **overrides}.items()}

def make_tiny(model_type, out_dir, corpus, seed=0, **overrides):
    """random-init tiny model + a BPE tokenizer trained on `corpus`, saved in HF layout;
    overrides merge into config.json"""
    tk = None
    if model_type != 'vit':
        tk = train_tokenizer(corpus, 'clip' if model_type == 'clip' else 'bert')
    image = dict(TINY, image_size=32, patch_size=8)
    if model_type == 'clip':
        eot = tk.token_to_id('<|endoftext|>')
        bos = tk.token_to_id('<|startoftext|>')
        text = dict(TINY, vocab_size=tk.get_vocab_size(), max_position_embeddings=32,
                    pad_token_id=eot, bos_token_id=bos, eos_token_id=eot)
        d = dict(model_type='clip', projection_dim=16, vision_config=image, text_config=text)
    elif model_type == 'vit':
        d = dict(model_type='vit', **image)
    else:
        d = dict(TINY, model_type=model_type, vocab_size=tk.get_vocab_size(),
                 max_position_embeddings=64, pad_token_id=tk.token_to_id('[PAD]'))
        if model_type == 'distilbert':
            d = {({v: k for k, v in DISTILBERT_NAMES.items()}).get(k, k): v for k, v in d.items()}
    config = config_from_dict(_merge(d, overrides), f'make_tiny({model_type!r})')
    torch.manual_seed(seed)
    model = build(config)
    # zero biases, unit layernorms, N(0, 0.02) embeddings, weight matrices of std 1/sqrt(fan_in):
    # HF's 0.02 everywhere would leave a 32-wide random model's outputs nearly constant
    for name, p in model.named_parameters():
        if p.dim() > 1 and not re.search(r'(^|\.)(tok|pos|seg|cls)(\.|$)', name):
            nn.init.normal_(p, std=p[0].numel() ** -0.5)
        elif p.dim() > 1 or name.endswith('cls'):
            nn.init.normal_(p, std=0.02)
        elif name != 'logit_scale':  # 1 for a layernorm's weight, 0 for a bias
            nn.init.constant_(p, float('.ln' in f'.{name}' and name.endswith('weight')))
    save_pretrained(model, out_dir)
    if tk is not None:
        text = tk.to_str(pretty=True)
        runs.write_text(os.path.join(out_dir, 'tokenizer.json'), text)
    return model.eval()  # as from_pretrained returns it

# -----------------------------------------------------------------------------

def parse_args(argv=None):
    """the command line of `python demo.py dataset ...` and `python demo.py models ...`"""
    fmt = runs.HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    commands = parser.add_subparsers(dest='command', metavar='{dataset,models}', required=True)
    dataset = commands.add_parser('dataset', formatter_class=fmt, help="write a demo dataset",
                                  description="write a demo dataset (official layout, mp4s) to DIR")
    dataset.add_argument('root', metavar='DIR', help="output folder")
    dataset.add_argument('--videos', type=runs.count(1), default=200,
                         help="number of demo videos")
    dataset.add_argument('--seed', type=int, default=0, help="dataset seed")
    dataset.add_argument('--shape-only', action='store_true',
                         help="the score depends on the shape and its colour only, not on the "
                              "background and motion")
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
    args = parse_args(argv)
    if args.command == 'dataset':
        t0 = time.time()
        make_demo(args.root, args.videos, args.seed, args.shape_only)
        print(f"wrote {args.videos} demo videos to {args.root} in {time.time() - t0:.1f}s")
    else:
        lines = runs.read_text(args.corpus, 'corpus').splitlines() if args.corpus else []
        for kind in args.types:
            out = args.out if len(args.types) == 1 else os.path.join(args.out, kind)
            make_tiny(kind, out, [line.strip() for line in lines if line.strip()], seed=args.seed)
            print(f"wrote a tiny {kind} model to {out}")

if __name__ == '__main__':
    runs.script(main, 'demo.py', "the same command writes the demo again")
