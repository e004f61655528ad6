"""
Train-mode parity with the reference (transformers, test-only) on the same weights, as minGPT's
import test does in eval mode: every encoder's output and the gradient of every parameter in
train() mode, dropout made deterministic in both; one FCLIP step (contrastive.batch_loss, the
script's own step lines, Adam, the clamp of the temperature) against CLIPModel(return_loss=True);
one stage-2 fine-tuning step (regress.batch_loss, eq. 9 and 11 on DistilBERT, regress.py's step
lines) against DistilBertModel and a head built from torch.nn parts.

    python -m pytest tests/test_train_parity.py -q
"""
import argparse
import copy
import inspect
import math
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as hf
from torch.overrides import TorchFunctionMode

import contrastive
import models
import regress
from test_models import TINY, feats, hf_save, load, maxdiff, padded_batch

# float32 on the CPU: the two implementations group the same sums differently (one qkv matmul
# against three, fused attention against eager matmuls), so they agree to rounding, far below what
# one dropout site too many or too few changes (a factor 1 + p of 1.1 to 1.3 on a branch). Measured
# on transformers 5.25: outputs 5e-7, losses 1e-6, gradients 4e-7 of the largest, steps 1e-6.
OUT_TOL = 1e-5   # outputs and losses, of order 1
GRAD_TOL = 1e-5  # gradients, relative to the largest gradient entry of the model
# a weight after one Adam step of lr 1e-3: Adam's first step is lr * g / (|g| + 1e-8), so an entry
# whose gradient is near 1e-8 turns the rounding above into a step that differs by up to ~1e-6
STEP_TOL = 1e-5


class FixedDropout(TorchFunctionMode):
    """every dropout made deterministic, and recorded: F.dropout(x, p, training=True) -> x * (1 + p)
    and scaled_dot_product_attention's dropout_p -> its output times (1 + p), which is what the same
    scaling of the attention weights gives (eager attention's F.dropout). The scaling depends on p,
    so a site missing, added or with another p changes the output. sites: the p of every site run
    with p > 0, in order"""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:  # torch hands it over as (input,) and the rest by name
            assert len(args) == 1 and not kwargs.get('inplace'), (args, kwargs)
            x, p, training = args[0], kwargs.get('p', 0.5), kwargs.get('training', True)
            if training and p > 0:
                self.sites.append(p)
                return x * (1 + p)
            return x
        if func is F.scaled_dot_product_attention:
            assert len(args) == 3, "both implementations pass dropout_p by name"
            p = kwargs.get('dropout_p', 0.0)
            if p > 0:
                self.sites.append(p)
                return func(*args, **{**kwargs, 'dropout_p': 0.0}) * (1 + p)
        assert 'dropout' not in getattr(func, '__name__', ''), f"{func} is not made deterministic"
        return func(*args, **kwargs)


def hf_as_ours(ref, tensors, folder):
    """ref's `tensors` ({ref's parameter name: tensor}: its weights, or its gradients) under our
    names: put into a copy of ref, written by its own save_pretrained (transformers 5 names some
    modules in memory otherwise than on disk, ViT's among them) and read by our strict loader,
    which refuses any key it misses"""
    clone = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(tensors[name])
    return load(hf_save(clone, folder)).state_dict()


def script_step(function, **names):
    """runs the optimizer step of a script's loop, its own lines from the backward to zero_grad
    (autocast's scaler, unscale, the clip of the gradient norm, step, update), on `names`: this
    test steps as the script does, and an edit of the script's step is tested as it is"""
    lines = inspect.getsource(function).splitlines()
    start = next(i for i, line in enumerate(lines) if 'scaler.scale(loss).backward()' in line)
    end = next(i for i, line in enumerate(lines) if 'optimizer.zero_grad(' in line)
    step = textwrap.dedent('\n'.join(lines[start:end + 1]))
    assert 'scaler.unscale_(optimizer)' in step and 'clip_grad_norm_(' in step, step
    exec(step, {'torch': torch, 'math': math, **names})


def record_grads(optimizer, model):
    """{parameter name: its gradient} as the optimizer steps on it (after the clip), kept past
    zero_grad"""
    names, seen = {id(p): n for n, p in model.named_parameters()}, {}

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            seen.update({names[id(p)]: p.grad.clone() for p in group['params']
                         if p.grad is not None})
    optimizer.register_step_pre_hook(record)
    return seen


def grads(model, recorded=None):
    """{parameter name: its gradient} (those recorded as the optimizer stepped, if given), zeros
    where the loss did not reach it"""
    found = {n: p.grad for n, p in model.named_parameters()} if recorded is None else recorded
    return {n: torch.zeros_like(p) if found.get(n) is None else found[n]
            for n, p in model.named_parameters()}


def check_grads(ours, ref, folder, reached='', recorded=None):
    """the gradient of every parameter of ours (or those `recorded` by the step) against the
    reference's; those whose name starts with `reached` have a non-zero one, the others none"""
    mine, theirs = grads(ours, recorded), hf_as_ours(ref, grads(ref), folder)
    assert mine.keys() == ours.state_dict().keys() == theirs.keys()
    scale = max(g.abs().max().item() for g in mine.values())
    for k, g in mine.items():
        assert maxdiff(g, theirs[k]) <= GRAD_TOL * scale, (k, maxdiff(g, theirs[k]) / scale)
        assert (g.abs().max() > 0) == k.startswith(reached), k


def check_step(ours, after):
    """every weight of ours after one Adam step against the reference's (same names), but the key
    third of a fused qkv bias: its gradient is exactly zero in exact arithmetic (softmax ignores a
    shift of a whole row of logits), so each implementation's rounding is all it has (check_grads
    compares it), and Adam, which divides by |g| + eps, turns that into a step of up to lr"""
    for k, v in ours.state_dict().items():
        a, b = v.clone(), after[k].clone()
        if k.endswith('qkv.bias'):
            a[len(a) // 3:2 * len(a) // 3] = b[len(b) // 3:2 * len(b) // 3]
        assert maxdiff(a, b) <= STEP_TOL, (k, maxdiff(a, b))


# -----------------------------------------------------------------------------
# every encoder, in train mode

IMAGE = dict(TINY, image_size=32, patch_size=8)
CLIP_TEXT = dict(TINY, vocab_size=100, max_position_embeddings=16, eos_token_id=99,
                 bos_token_id=98, pad_token_id=99)
# dropout probabilities that differ by site (0.1 on residual branches and embeddings, 0.2 and 0.3
# on attention weights), so that a site with another p shows; CLIP's `dropout` field is one that
# transformers never reads
DISTILBERT = dict(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4, dropout=0.1,
                  attention_dropout=0.2)
VIT = dict(IMAGE, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)
BERT = dict(TINY, vocab_size=100, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)


def clip(**kw):
    vision = dict(IMAGE, attention_dropout=0.2, dropout=0.1)
    text = dict(CLIP_TEXT, attention_dropout=0.3, dropout=0.1)
    config = hf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24, **kw)
    return hf.CLIPModel(config)


ENCODERS = {  # we keep no pooler
    'clip-vision': clip, 'clip-text': clip,  # one CLIP model, each tower on its own
    'vit': lambda: hf.ViTModel(hf.ViTConfig(**VIT), add_pooling_layer=False),
    'distilbert': lambda: hf.DistilBertModel(hf.DistilBertConfig(**DISTILBERT)),
    'bert': lambda: hf.BertModel(hf.BertConfig(**BERT), add_pooling_layer=False),
}
# the dropout sites of one forward in transformers 5.25 (2 blocks): CLIP drops the attention
# weights only; ViT and BERT the embeddings, the attention weights and both residual branches;
# DistilBERT has no dropout after its attention's output projection
SITES = {'clip-vision': [0.2] * 2, 'clip-text': [0.3] * 2, 'vit': [0.1] + [0.2, 0.1, 0.1] * 2,
         'distilbert': [0.1] + [0.2, 0.1] * 2, 'bert': [0.1] + [0.2, 0.1, 0.1] * 2}

PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, 3, H, W)
CAPTIONS = padded_batch(100, [5, 16, 9], end=99, pad=99, start=98)  # CLIP's: end-of-text is last
TOKENS = padded_batch(100, [4, 11, 7], end=3, pad=0, start=2)  # [CLS] ... [SEP] [PAD]


def ours_forward(kind, model):  # -> (B, D) embeddings
    if kind == 'clip-vision':
        return model.visual(PIXELS)
    if kind == 'clip-text':
        return model.text(*CAPTIONS)
    return model(PIXELS) if kind == 'vit' else model(*TOKENS)


def ref_forward(kind, ref):  # -> (B, D) the same embeddings from transformers
    if kind == 'clip-vision':
        return feats(ref.get_image_features(pixel_values=PIXELS))
    if kind == 'clip-text':
        return feats(ref.get_text_features(input_ids=CAPTIONS[0], attention_mask=CAPTIONS[1]))
    if kind == 'vit':
        return ref(pixel_values=PIXELS).last_hidden_state[:, 0]
    return ref(input_ids=TOKENS[0], attention_mask=TOKENS[1]).last_hidden_state[:, 0]


@pytest.mark.parametrize('kind', list(ENCODERS))
def test_train_mode_parity(tmp_path, kind):
    torch.manual_seed(0)
    ref = ENCODERS[kind]().train()
    ours = load(hf_save(ref, tmp_path / 'weights')).train()
    with FixedDropout() as ours_sites:
        out = ours_forward(kind, ours)
    with FixedDropout() as ref_sites:
        ref_out = ref_forward(kind, ref)
    assert ours_sites.sites == ref_sites.sites == SITES[kind]
    assert maxdiff(out, ref_out) <= OUT_TOL
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))  # weighs every output
    (out * r).sum().backward()
    (ref_out * r).sum().backward()
    tower = {'clip-vision': 'visual.', 'clip-text': 'text.'}.get(kind, '')
    check_grads(ours, ref, tmp_path / 'grads', reached=tower)


# -----------------------------------------------------------------------------
# one FCLIP step: contrastive.batch_loss (clip_loss), the script's step, the temperature's clamp


class Pairs:
    """contrastive.Pairs' one method the loss reads, on given tensors"""
    def __init__(self, *tensors):
        self.tensors = tensors

    def batch(self, triples, device):  # -> pixel_values, input_ids, attention_mask
        return self.tensors


@pytest.mark.parametrize('logit_scale,grad_clip', [(math.log(1 / 0.07), 0.0),  # CLIP's initial
                                                   (4.6052, 0.0),  # the published one, > ln 100
                                                   (math.log(1 / 0.07), 0.5)])  # --grad-clip 0.5
def test_one_fclip_step(tmp_path, logit_scale, grad_clip):
    torch.manual_seed(0)
    ref = clip(logit_scale_init_value=logit_scale).train()
    ours = load(hf_save(ref, tmp_path / 'start')).train()
    start = ours.logit_scale.item()
    assert start == pytest.approx(logit_scale)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = padded_batch(100, [5, 16, 9, 12], end=99, pad=99, start=98)
    args = argparse.Namespace(dtype='float32', loss='ce', grad_clip=grad_clip)
    lr = 1e-3
    # as contrastive.train sets them up; float32: the scaler is off and unscale_ a no-op
    optimizer = torch.optim.Adam(ours.parameters(), lr=lr, fused=True)
    contrastive.clamp_temperature(optimizer, ours)
    scaler = torch.amp.GradScaler('cpu', enabled=args.dtype == 'float16')
    stepped = record_grads(optimizer, ours)
    ref_optimizer = torch.optim.Adam(ref.parameters(), lr=lr)

    with FixedDropout():
        loss = contrastive.batch_loss(ours, Pairs(pixels, ids, mask), range(4), args,
                                      torch.device('cpu'))
    script_step(contrastive.train, loss=loss, optimizer=optimizer, scaler=scaler, clip=ours,
                args=args)
    with FixedDropout():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
    ref_loss = out.loss
    ref_loss.backward()
    if grad_clip:
        norm = nn.utils.clip_grad_norm_(ref.parameters(), grad_clip)
        assert norm > 2 * grad_clip  # clipped indeed
    ref_optimizer.step()
    with torch.no_grad():  # CLIP's paper and open_clip: the parameter clamped after each step
        ref.logit_scale.clamp_(0, math.log(100))

    assert abs(loss.item() - ref_loss.item()) <= OUT_TOL
    assert all(p.grad is None for p in ours.parameters())  # the step ends with zero_grad
    check_grads(ours, ref, tmp_path / 'grads', recorded=stepped)  # logit_scale's among them
    check_step(ours, hf_as_ours(ref, dict(ref.named_parameters()), tmp_path / 'after'))
    assert stepped['logit_scale'].item() != 0  # the temperature learns, at ln 100 as below it
    assert ours.logit_scale.item() != start and ours.logit_scale.item() <= math.log(100)


# -----------------------------------------------------------------------------
# one stage-2 fine-tuning step: strategy 2's Regressor on DistilBERT, as regress.train_fold steps


class Items:
    """data.Items' three members regress.batch_loss reads, on given tensors"""
    device = torch.device('cpu')

    def __init__(self, ids, mask, target):
        self.ids, self.mask, self.target = ids, mask, target

    def inputs(self, rows):
        return self.ids[rows], self.mask[rows]

    def targets(self, rows):
        return self.target[rows]


def test_one_fine_tuning_step(tmp_path):
    torch.manual_seed(0)
    ref = hf.DistilBertModel(hf.DistilBertConfig(**DISTILBERT)).train()
    # ours as regress.run builds a fine-tuned row: Regressor(encoder_for(...), ...), a new head
    encoder = models.encoder_for(load(hf_save(ref, tmp_path / 'start')), 'text')
    raw_model = models.Regressor(encoder, encoder.embed_dim, trainable=True)
    regress.new_head(raw_model, 0)
    raw_model.train()  # as train_fold puts it
    with torch.no_grad():  # a head away from its initial ones and zeros, so gamma and beta matter
        for p in raw_model.head.parameters():
            p.normal_(0, 0.5)
    # the reference: eq. 11 as the paper writes it, sigmoid(w^T LN(z) + b), from torch.nn parts
    ln, fc = nn.LayerNorm(32), nn.Linear(32, 1)
    ln.load_state_dict(raw_model.head.ln.state_dict())
    fc.load_state_dict(raw_model.head.fc.state_dict())
    ids, mask = padded_batch(100, [4, 11, 7, 9], end=3, pad=0, start=2)
    target = torch.tensor([0.9, 0.7, 0.8, 0.85])  # memorability scores
    args = argparse.Namespace(dtype='float32', grad_clip=0.0)  # the paper: no clipping
    lr = 1e-3
    # as train_fold sets them up
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)
    scaler = torch.amp.GradScaler('cpu', enabled=args.dtype == 'float16')
    stepped = record_grads(optimizer, raw_model)
    ref_optimizer = torch.optim.Adam([*ref.parameters(), *ln.parameters(), *fc.parameters()], lr)

    with FixedDropout() as sites:
        loss = regress.batch_loss(raw_model, Items(ids, mask, target), torch.arange(4), args)
    script_step(regress.train_fold, loss=loss, optimizer=optimizer, scaler=scaler, params=params,
                args=args)
    with FixedDropout() as ref_sites:
        z = ref(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]  # (B, D) [CLS]
        ref_loss = F.mse_loss(torch.sigmoid(fc(ln(z)))[:, 0], target)
    ref_loss.backward()
    ref_optimizer.step()

    assert sites.sites == ref_sites.sites == SITES['distilbert']
    assert abs(loss.item() - ref_loss.item()) <= OUT_TOL
    encoder_grads = {k[len('encoder.'):]: g for k, g in stepped.items() if k.startswith('encoder.')}
    check_grads(encoder, ref, tmp_path / 'grads', recorded=encoder_grads)
    check_step(encoder, hf_as_ours(ref, dict(ref.named_parameters()), tmp_path / 'after'))
    heads = (('ln', raw_model.head.ln, ln), ('fc', raw_model.head.fc, fc))  # gamma, beta; w, b
    for name, ours, theirs in heads:
        for leaf in ('weight', 'bias'):
            g, q = stepped[f'head.{name}.{leaf}'], getattr(theirs, leaf)
            assert maxdiff(g, q.grad) <= GRAD_TOL * g.abs().max(), (name, leaf)
            assert maxdiff(getattr(ours, leaf), q) <= STEP_TOL, (name, leaf)
