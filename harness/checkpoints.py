"""
Hugging Face checkpoints in and out for models.py: hub snapshots (cache first), config.json checked,
the published names and shapes, a strict loader naming every bad tensor, exports, the tokenizer.

    python -m pytest tests/test_models.py -q
"""
import json
import os
import re
from dataclasses import asdict

import huggingface_hub as hub
import torch
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tokenizers import Tokenizer as HFTokenizer

from harness import runs
from harness.runs import UserError

# every file the loaders read: required, then optional
FILES = ('config.json', 'model.safetensors', 'tokenizer.json', '1_Pooling/config.json')
DISTILBERT_NAMES = dict(dim='hidden_size', hidden_dim='intermediate_size',
                        n_layers='num_hidden_layers', n_heads='num_attention_heads',
                        activation='hidden_act', dropout='hidden_dropout_prob',
                        attention_dropout='attention_probs_dropout_prob')
# config.json values that models.py implements; any other is refused, naming the key
SUPPORTED = dict(model_type=('clip', 'vit', 'distilbert', 'bert'), qkv_bias=(True,),
                 sinusoidal_pos_embds=(False,), position_embedding_type=('absolute',),
                 hidden_act=('gelu', 'quick_gelu'))

def snapshot(name):
    """a folder, or a hub repo id -> its snapshot's folder: from the hub cache (no network) when it
    holds FILES[:2], else downloaded; a missing repo, no network or HF_HUB_OFFLINE=1: a UserError"""
    folder = name
    local = os.path.isdir(name) or name.startswith(('.', '/', '~')) or name.count('/') > 1
    for cache_only in ([] if local else [True, False]):  # a model downloaded once needs no network
        try:
            folder = hub.snapshot_download(name, allow_patterns=list(FILES), local_files_only=cache_only,
                                           etag_timeout=float(os.environ.get('HF_HUB_ETAG_TIMEOUT', 5)))
        except LocalEntryNotFoundError:  # not in the cache, and offline or the hub unreachable
            if cache_only:
                continue
            why = ("HF_HUB_OFFLINE=1 forbids downloading; unset it or" if constants.HF_HUB_OFFLINE
                   else f"the hub at {constants.ENDPOINT} is unreachable; set HF_HUB_OFFLINE=1 to "
                        f"use the cache only, or")
            raise UserError(f"hub repo {name!r}: not in the hub cache {constants.HF_HUB_CACHE}, "
                            f"and {why} pass --checkpoint FOLDER (a local copy)") from None
        except HfHubHTTPError as e:  # no such repo, gated, private
            raise UserError(f"hub repo {name!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        if all(os.path.isfile(os.path.join(folder, f)) for f in FILES[:2]):
            break
    runs.require(os.path.isdir(folder), f"{name}: no such folder")
    for f in FILES[:2]:
        old = f == 'model.safetensors' and os.path.isfile(f'{folder}/pytorch_model.bin')
        runs.require(os.path.isfile(os.path.join(folder, f)), f"{os.path.join(folder, f)} not found"
                     + " (found pytorch_model.bin: convert it to safetensors)" * old)
    return folder

def read_config(folder, pooling=None):
    """folder/config.json -> (its dict: DistilBERT's names as BERT's, a CLIP's towers in *_config,
    values checked; a text encoder's pooling: `pooling`, 1_Pooling/config.json's or 'cls')"""
    path = os.path.join(folder, 'config.json')
    d = runs.read_json(path, expect=dict, what='config.json')
    for sub in ('text_config', 'vision_config'):  # old CLIP files say text_config_dict
        d[sub] = {**(d.get(sub) or {}), **(d.pop(sub + '_dict', None) or {})}
    if d.get('model_type') == 'distilbert':
        d = {'num_hidden_layers': 6, **{DISTILBERT_NAMES.get(k, k): v for k, v in d.items()}}
    for c in (d, d['text_config'], d['vision_config']):  # (a tower's model_type names the tower)
        for key in SUPPORTED.keys() & c.keys() - ({'model_type'} if c is not d else set()):
            runs.require(c[key] in SUPPORTED[key], f"{path}: {key}={c[key]!r} is not supported "
                         f"(expected one of {SUPPORTED[key]})")
    if d.get('model_type') not in SUPPORTED['model_type']:
        raise UserError(f"{path}: model_type missing (expected one of {SUPPORTED['model_type']})")
    pool_file = os.path.join(folder, '1_Pooling', 'config.json')
    if pooling is None and os.path.isfile(pool_file):
        modes = [k for k, v in runs.read_json(pool_file, expect=dict).items()
                 if k.startswith('pooling_mode_') and v is True]
        pooling = {'pooling_mode_cls_token': 'cls', 'pooling_mode_mean_tokens': 'mean'}.get(
            modes[0] if len(modes) == 1 else None)
        runs.require(pooling is not None, f"{pool_file}: pooling {modes} is not supported "
                     f"(expected pooling_mode_cls_token or pooling_mode_mean_tokens alone)")
    return d, pooling or 'cls'

def config_dict(config):
    """our config dataclass -> Hugging Face's config.json dict"""
    kind, d = config.model_type, {'model_type': config.model_type, **asdict(config)}
    if kind == 'distilbert':
        names = {v: k for k, v in DISTILBERT_NAMES.items()}
        d = {names.get(k, k): v for k, v in d.items() if k not in ('type_vocab_size', 'layer_norm_eps')}
    arch = dict(clip='CLIPModel', vit='ViTModel', bert='BertModel', distilbert='DistilBertModel')
    d = dict(d, architectures=[arch[kind]])
    return dict(d, qkv_bias=True) if kind == 'vit' else d

# -----------------------------------------------------------------------------
# the published key names and shapes: our module -> HF module, per model_type ('#': a block index)
HF_NAMES = {
    'clip': {'visual.patch': 'vision_model.embeddings.patch_embedding',
             'visual.cls': 'vision_model.embeddings.class_embedding',
             'visual.pos': 'vision_model.embeddings.position_embedding.weight',
             'visual.ln_pre': 'vision_model.pre_layrnorm',  # sic
             'visual.blocks.#': 'vision_model.encoder.layers.#',
             'visual.ln_post': 'vision_model.post_layernorm', 'visual.proj': 'visual_projection',
             'text.tok': 'text_model.embeddings.token_embedding',
             'text.pos': 'text_model.embeddings.position_embedding.weight',
             'text.blocks.#': 'text_model.encoder.layers.#',
             'text.ln_final': 'text_model.final_layer_norm',
             'text.proj': 'text_projection', 'logit_scale': 'logit_scale'},
    'vit': {'patch': 'embeddings.patch_embeddings.projection', 'cls': 'embeddings.cls_token',
            'pos': 'embeddings.position_embeddings', 'blocks.#': 'encoder.layer.#',
            'ln_post': 'layernorm'},
    'distilbert': {'tok': 'embeddings.word_embeddings', 'pos': 'embeddings.position_embeddings',
                   'ln_emb': 'embeddings.LayerNorm', 'blocks.#': 'transformer.layer.#'},
    'bert': {'tok': 'embeddings.word_embeddings', 'pos': 'embeddings.position_embeddings',
             'seg': 'embeddings.token_type_embeddings', 'ln_emb': 'embeddings.LayerNorm',
             'blocks.#': 'encoder.layer.#'},
}
# our Block module -> HF module(s); qkv is stored as three tensors (q, k, v)
BLOCK_NAMES = {
    'clip': dict(qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'),
                 proj='self_attn.out_proj', ln1='layer_norm1', ln2='layer_norm2',
                 fc1='mlp.fc1', fc2='mlp.fc2'),
    'vit': dict(qkv=('attention.attention.query', 'attention.attention.key',
                     'attention.attention.value'),
                proj='attention.output.dense', ln1='layernorm_before', ln2='layernorm_after',
                fc1='intermediate.dense', fc2='output.dense'),
    'distilbert': dict(qkv=('attention.q_lin', 'attention.k_lin', 'attention.v_lin'),
                       proj='attention.out_lin', ln1='sa_layer_norm', ln2='output_layer_norm',
                       fc1='ffn.lin1', fc2='ffn.lin2'),
    'bert': dict(qkv=('attention.self.query', 'attention.self.key', 'attention.self.value'),
                 proj='attention.output.dense', ln1='attention.output.LayerNorm',
                 ln2='output.LayerNorm', fc1='intermediate.dense', fc2='output.dense'),
}
# HF's ViT: [CLS] (1, 1, C), positions (1, N+1, C); ours: CLIP's (C,) and (N+1, C), the loader and
# saver reshape (as nanoGPT's from_pretrained transposes GPT-2's Conv1D rather than bend its Linear)
HF_SHAPES = {'vit': {'cls': lambda s: (1, 1, *s), 'pos': lambda s: (1, *s)}}
# tensors of published checkpoints skipped on purpose: buffers, pooler, masked-LM and NSP heads
SKIPPED = re.compile(r'(^|\.)(position_ids|token_type_ids)$|^pooler\.|^cls\.'
                     r'|^vocab_(transform|layer_norm|projector)\.')
TASK_PREFIXES = ('vit.', 'bert.', 'distilbert.')  # a base model in a task model (BertForMaskedLM)

def layout(model):
    """our key -> [(HF key, shape on disk)], 3 for a fused qkv; a tensor new to HF keeps our key"""
    kind, out = model.config.model_type, {}
    for key, t in model.state_dict().items():
        m = re.search(r'\.(\d+)\.', key)  # block index, e.g. 'visual.blocks.3.qkv.weight'
        generic = key.replace(m.group(0), '.#.', 1) if m else key
        mod = max([n for n in HF_NAMES[kind] if generic == n or generic.startswith(n + '.')],
                  key=len, default=None)
        names = [key]
        if mod:
            hf_mod = HF_NAMES[kind][mod].replace('#', m.group(1) if m else '')
            rest = generic[len(mod):]
            sub, _, leaf = rest[1:].partition('.')  # in a block: '.qkv.weight' -> 'qkv', 'weight'
            if not m:
                names = [hf_mod + rest]
            elif sub in BLOCK_NAMES[kind] and '.' not in leaf:
                parts = BLOCK_NAMES[kind][sub]
                parts = parts if isinstance(parts, tuple) else (parts,)
                names = [f'{hf_mod}.{n}.{leaf}' for n in parts]
        shape = tuple(t.shape) if len(names) == 1 else (t.shape[0] // len(names), *t.shape[1:])
        shape = HF_SHAPES.get(kind, {}).get(key, lambda s: s)(shape)
        out[key] = [(n, shape) for n in names]
    return out

def load_weights(model, folder):
    """strict load of folder/model.safetensors into `model`, in eval mode: every key and shape must
    match, but a parameter in model.new_parameters (LAB.md) keeps its initial value if absent"""
    path = os.path.join(folder, 'model.safetensors')
    try:
        raw = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: truncated or corrupt ({e}); download or export it again") from None
    sd = {}
    for k, v in raw.items():
        for p in TASK_PREFIXES:
            k = k.removeprefix(p)
        if 'LayerNorm.' in k:  # pre-2019 BERT checkpoints: gamma and beta
            k = re.sub(r'\.gamma$', '.weight', re.sub(r'\.beta$', '.bias', k))
        if not SKIPPED.search(k):
            sd[k] = v
    hf, ours = layout(model), model.state_dict()
    new = {h for key in getattr(model, 'new_parameters', ()) for h, _ in hf[key]}
    expected = {h for parts in hf.values() for h, _ in parts}
    missing, unexpected = sorted(expected - sd.keys() - new), sorted(sd.keys() - expected)
    wrong = [f"{h}: expected {shape}, found {tuple(sd[h].shape)}" for parts in hf.values()
             for h, shape in parts if h in sd and tuple(sd[h].shape) != shape]
    if missing or unexpected or wrong:
        raise UserError(
            f"{path} does not match a {model.config.model_type} model with this config.json:"
            + (f"\n  {len(missing)} missing keys: {missing[:20]}" if missing else '')
            + (f"\n  {len(unexpected)} unexpected keys: {unexpected[:20]}" if unexpected else '')
            + (f"\n  {len(wrong)} shape mismatches: {wrong[:20]}" if wrong else ''))
    with torch.no_grad():
        for key, parts in hf.items():
            if parts[0][0] in sd:  # cat: HF's q, k, v into our qkv; view: ViT's (1, 1, C) into (C,)
                ours[key].copy_(torch.cat([sd[h].flatten() for h, _ in parts]).view_as(ours[key]))
    return model.eval()

def hf_files(model, tokenizer_from=None):
    """-> {name: bytes} of `model` in the HF layout, for runs.write_folder: config.json,
    model.safetensors, a mean-pooling encoder's 1_Pooling/config.json, tokenizer_from's tokenizer"""
    if model.config.model_type == 'clip' and not hasattr(model.config, 'vision_config'):
        raise UserError("one tower of a CLIP is saved with its CLIP model: pass the CLIP model")
    sd, tensors = model.state_dict(), {}
    for key, parts in layout(model).items():
        rows = sd[key].detach().float().cpu().reshape(len(parts), -1)  # (1, n) or (3, n/3): q, k, v
        for row, (h, shape) in zip(rows, parts):  # cloned: safetensors refuses shared storage
            tensors[h] = row.reshape(shape).clone()
    files = {'config.json': json.dumps(config_dict(model.config), indent=1).encode(),
             'model.safetensors': save(tensors, metadata={'format': 'pt'})}
    if getattr(model, 'pooling', 'cls') == 'mean':
        files['1_Pooling/config.json'] = json.dumps(dict(
            word_embedding_dimension=model.embed_dim, pooling_mode_cls_token=False,
            pooling_mode_mean_tokens=True)).encode()
    if tokenizer_from:
        with open(os.path.join(tokenizer_from, 'tokenizer.json'), 'rb') as f:
            files['tokenizer.json'] = f.read()
    return files

class Tokenizer:
    """folder/tokenizer.json: texts -> (ids, attention mask) (B, T), padded, cut to max_length"""
    def __init__(self, folder, max_length):
        path = os.path.join(folder, 'tokenizer.json')
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: a text encoder's folder needs its tokenizer")
        try:
            self.tk = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust library raises a bare Exception
            raise UserError(f"{path}: truncated or corrupt ({e}); download or export it again") from None
        self.key = [runs.file_hash(path), max_length]  # what the tokens depend on
        pads = ('[PAD]', '<pad>', '<|endoftext|>')
        pad = (self.tk.padding or {}).get('pad_token') or next(
            (t for t in pads if self.tk.token_to_id(t) is not None), None)
        runs.require(pad is not None, f"{path}: no padding token (looked for padding.pad_token, "
                     f"{', '.join(pads)})")
        self.tk.enable_padding(pad_id=self.tk.token_to_id(pad), pad_token=pad)
        self.tk.enable_truncation(max_length)  # special tokens (the end token) are kept

    def __call__(self, texts):
        enc = self.tk.encode_batch(list(texts))
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])
