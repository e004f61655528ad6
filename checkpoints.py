"""
Hugging Face checkpoints in and out, for the networks of models.py: a local folder or a hub repo
(through huggingface_hub's snapshot, the cache first), config.json to our configs and back, the
published key names and shapes, a strict loader that names every missing, unexpected or mismatched
tensor, an atomic saver, and the tokenizer of a checkpoint. A checkpoint's identity is the content
of every file read here (FILES).

    python -m pytest tests/test_models.py -q
"""
import os
import re
import shutil
from dataclasses import asdict, fields

import huggingface_hub as hub
import torch
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tokenizers import Tokenizer as HFTokenizer

import runs
from models import (ACTIVATIONS, BertConfig, CLIPConfig, CLIPTextConfig, CLIPVisionConfig,
                    TextEncoder, ViT, ViTConfig, build)
from runs import UserError

# -----------------------------------------------------------------------------
# config.json, to our configs and back

DISTILBERT_NAMES = dict(dim='hidden_size', hidden_dim='intermediate_size',
                        n_layers='num_hidden_layers', n_heads='num_attention_heads',
                        activation='hidden_act', dropout='hidden_dropout_prob',
                        attention_dropout='attention_probs_dropout_prob')
DISTILBERT_DEFAULTS = dict(num_hidden_layers=6, type_vocab_size=0)
# config.json values implemented here; any other value is refused, naming the key
SUPPORTED = dict(qkv_bias=(True,), sinusoidal_pos_embds=(False,),
                 position_embedding_type=('absolute',), hidden_act=tuple(ACTIVATIONS),
                 activation=tuple(ACTIVATIONS))

def _fill(cls, d, **fixed):
    known = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in d.items() if k in known}, **fixed})

def config_from_dict(d, path='config.json'):
    """config.json dict -> our dataclass, by model_type"""
    kind = d.get('model_type')
    def sub(k):  # old CLIP files say text_config_dict
        return {**(d.get(k) or {}), **(d.get(k + '_dict') or {})}
    for c in (d, sub('text_config'), sub('vision_config')):
        for key in SUPPORTED.keys() & c.keys():
            if c[key] not in SUPPORTED[key]:
                raise UserError(f"{path}: {key}={c[key]!r} is not supported "
                                f"(expected one of {SUPPORTED[key]})")
    if kind == 'clip':
        top = {k: d[k] for k in ('projection_dim', 'logit_scale_init_value') if k in d}
        vision = _fill(CLIPVisionConfig, sub('vision_config'))
        return CLIPConfig(vision, _fill(CLIPTextConfig, sub('text_config')), **top)
    if kind == 'vit':
        return _fill(ViTConfig, d)
    if kind == 'bert':
        return _fill(BertConfig, d, model_type='bert')
    if kind == 'distilbert':
        d = {**DISTILBERT_DEFAULTS, **{DISTILBERT_NAMES.get(k, k): v for k, v in d.items()}}
        return _fill(BertConfig, d, model_type='distilbert', type_vocab_size=0)
    raise UserError(f"{path}: unknown model_type {kind!r} "
                    f"(expected one of clip, vit, distilbert, bert)")

def config_to_dict(config):
    """our dataclass -> Hugging Face config.json dict"""
    if isinstance(config, CLIPConfig):
        return dict(model_type='clip', architectures=['CLIPModel'], **asdict(config))
    if isinstance(config, ViTConfig):
        return dict(model_type='vit', architectures=['ViTModel'], qkv_bias=True, **asdict(config))
    d = asdict(config)
    if config.model_type == 'bert':
        return dict(architectures=['BertModel'], **d)
    names = {v: k for k, v in DISTILBERT_NAMES.items()}
    d = {names.get(k, k): v for k, v in d.items() if k not in ('type_vocab_size', 'layer_norm_eps')}
    return dict(architectures=['DistilBertModel'], **d)

# -----------------------------------------------------------------------------
# Hugging Face key names and shapes

# our module -> HF module, per model_type; '#' is a block index
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
# HF's ViT keeps batch dims of 1 on [CLS] (1, 1, C) and the positions (1, N+1, C); our network has
# CLIP's (C,) and (N+1, C) for both, and the loader and saver reshape, as nanoGPT's from_pretrained
# transposes GPT-2's Conv1D weights rather than bending its Linear
HF_SHAPES = {'vit': {'cls': lambda s: (1, 1, *s), 'pos': lambda s: (1, *s)}}
# tensors of published checkpoints skipped on purpose: buffers, pooler, masked-LM and NSP heads
SKIPPED = re.compile(r'(^|\.)(position_ids|token_type_ids)$|^pooler\.|^cls\.'
                     r'|^vocab_(transform|layer_norm|projector)\.')
TASK_PREFIXES = ('vit.', 'bert.', 'distilbert.')  # base model inside a task model (BertForMaskedLM)
OLD_LAYERNORM = {'.gamma': '.weight', '.beta': '.bias'}  # pre-2019 BERT checkpoints

def model_type(model):
    if isinstance(model, ViT) and model.image_family == 'clip':
        raise ValueError("a CLIP image tower is loaded and saved with its CLIP model: "
                         "pass the CLIP model")
    return model.config.model_type

def hf_layout(model):
    """our state_dict key -> [(HF key, shape on disk)]: three for a fused qkv, a third of its rows
    each. A tensor the Hugging Face layout has no name for (one a student added) keeps our own key
    """
    kind, out = model_type(model), {}
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
                names = BLOCK_NAMES[kind][sub]
                names = [f'{hf_mod}.{n}.{leaf}'
                         for n in (names if isinstance(names, tuple) else (names,))]
        shape = tuple(t.shape) if len(names) == 1 else (t.shape[0] // len(names), *t.shape[1:])
        if key in HF_SHAPES.get(kind, {}):
            shape = HF_SHAPES[kind][key](shape)
        out[key] = [(n, shape) for n in names]
    return out

def load_weights(model, path):
    """strict load of a HF model.safetensors into `model`: every key and shape must match. The
    exception is a parameter a student adds to a published architecture (SigLIP's logit bias, say):
    named in the model's `new_parameters` (`self.new_parameters = ('logit_bias',)` in __init__), it
    keeps its initial value when the checkpoint lacks it; save_pretrained stores it under its own
    name, so it loads back"""
    try:
        raw = load_file(path)
    except SafetensorError as e:
        raise UserError(f"{path}: truncated or corrupt ({e}); "
                        f"download or export it again") from None
    sd = {}
    for k, v in raw.items():
        for p in TASK_PREFIXES:
            k = k.removeprefix(p)
        for old, new in OLD_LAYERNORM.items():
            k = k[:-len(old)] + new if k.endswith(old) and 'LayerNorm' in k else k
        if not SKIPPED.search(k):
            sd[k] = v
    layout, ours = hf_layout(model), model.state_dict()
    new = {h for key in getattr(model, 'new_parameters', ()) for h, _ in layout[key]}
    expected = {h for parts in layout.values() for h, _ in parts}
    missing, unexpected = sorted(expected - sd.keys() - new), sorted(sd.keys() - expected)
    wrong = [f"{h}: expected {shape}, found {tuple(sd[h].shape)}" for parts in layout.values()
             for h, shape in parts if h in sd and tuple(sd[h].shape) != shape]
    if missing or unexpected or wrong:
        raise UserError(f"{path} does not match a {model_type(model)} model with this config.json:"
                        + (f"\n  {len(missing)} missing keys: {missing[:20]}" if missing else '')
                        + (f"\n  {len(unexpected)} unexpected keys: {unexpected[:20]}"
                           if unexpected else '')
                        + (f"\n  {len(wrong)} shape mismatches: {wrong[:20]}" if wrong else ''))
    with torch.no_grad():
        for key, parts in layout.items():
            if parts[0][0] not in sd:  # a new parameter the checkpoint lacks: its initial value
                continue
            # cat: HF's q, k, v into our qkv; view: HF ViT's (1, 1, C) into our (C,)
            ours[key].copy_(torch.cat([sd[h].flatten() for h, _ in parts]).view_as(ours[key]))
    return model

# -----------------------------------------------------------------------------
# folders: local, or a snapshot of the Hugging Face hub

# every file the loader reads (from_pretrained, load_tokenizer): required, then optional
FILES = ('config.json', 'model.safetensors', 'tokenizer.json', '1_Pooling/config.json')
# seconds for a request to the hub: a dead network fails in seconds, not after minutes of retries
HUB_TIMEOUT = float(os.environ.get('HF_HUB_ETAG_TIMEOUT', 5))

def checkpoint_identity(name_or_dir):
    """the content of every file the loader reads from the checkpoint (a run's identity, a cache's
    key)"""
    return runs.content_identity(resolve(name_or_dir), FILES)

def resolve(name_or_dir, required=FILES[:2]):
    """a local folder, or a hub repo id -> the folder of its snapshot: from the hub cache when it
    holds `required` (no network at all), else downloaded by huggingface_hub (the files of FILES
    only)"""
    if os.path.isdir(name_or_dir):
        for f in required:
            path = os.path.join(name_or_dir, f)
            if not os.path.isfile(path):
                bin_ = (f == 'model.safetensors'
                        and os.path.isfile(os.path.join(name_or_dir, 'pytorch_model.bin')))
                hint = ' (found pytorch_model.bin: convert it to safetensors)' if bin_ else ''
                raise UserError(f"{path} not found{hint}")
        return name_or_dir
    if name_or_dir.startswith(('.', '/', '~')) or name_or_dir.count('/') > 1:
        raise UserError(f"{name_or_dir}: no such folder")
    # the cache first: a model downloaded once needs no network
    folder = snapshot(name_or_dir, local=True)
    if folder is None or not all(os.path.isfile(os.path.join(folder, f)) for f in required):
        folder = snapshot(name_or_dir, local=False)
    missing = [f for f in required if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        hint = ' (this loader reads safetensors only)' if missing[0] == 'model.safetensors' else ''
        raise UserError(f"hub repo {name_or_dir!r} has no {missing[0]}{hint}")
    return folder

def snapshot(repo_id, local):
    """huggingface_hub's snapshot of repo_id (the files of FILES it has): from the cache only (None
    when not there), or fetched; a missing repo, a dead network or HF_HUB_OFFLINE=1 is a UserError
    """
    cache = constants.HF_HUB_CACHE
    try:
        return hub.snapshot_download(repo_id, allow_patterns=list(FILES), local_files_only=local,
                                     etag_timeout=HUB_TIMEOUT)
    except LocalEntryNotFoundError:  # not cached, and offline or the hub unreachable
        if local:
            return None
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"hub repo {repo_id!r}: config.json, model.safetensors not found in "
                            f"the hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading; pass "
                            f"--checkpoint FOLDER (a local copy) or unset HF_HUB_OFFLINE") from None
        raise UserError(f"hub repo {repo_id!r}: the hub at {constants.ENDPOINT} is unreachable "
                        f"and the model is not in the hub cache {cache}; pass --checkpoint FOLDER "
                        f"(a local copy), or HF_HUB_OFFLINE=1 to use the cache only") from None
    except HfHubHTTPError as e:  # no such repo, gated, private
        raise UserError(f"hub repo {repo_id!r}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0]}") from None

def read_config(folder):
    path = os.path.join(folder, 'config.json')
    return config_from_dict(runs.read_json(path, expect=dict, what='config.json'), path)

def from_pretrained(name_or_dir, pooling=None):
    """config.json + model.safetensors -> CLIP | ViT | TextEncoder, by config.json's model_type. A
    text encoder pools as `pooling` says ('cls' | 'mean'), else as its sentence-transformers
    1_Pooling/config.json says, else at [CLS]"""
    folder = resolve(name_or_dir)
    config = read_config(folder)
    pool_path = os.path.join(folder, '1_Pooling', 'config.json')
    if pooling is None and os.path.isfile(pool_path):
        pooling = ('mean' if runs.read_json(pool_path, expect=dict).get('pooling_mode_mean_tokens')
                   else 'cls')
    model = build(config, pooling or 'cls')
    return load_weights(model, os.path.join(folder, 'model.safetensors')).eval()

def save_pretrained(model, out_dir, tokenizer_from=None):
    """config.json + model.safetensors in HF layout (+ tokenizer.json copied from `tokenizer_from`),
    written into OUT_DIR.tmp, then swapped in whole: a reader never finds half a model, an older one
    is replaced"""
    tmp, old = str(out_dir).rstrip('/') + '.tmp', str(out_dir).rstrip('/') + '.old'
    if os.path.isdir(old) and not os.path.exists(out_dir):  # a save killed between its two renames
        os.replace(old, out_dir)
    for leftover in (tmp, old):  # of a process killed while it saved
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            shutil.rmtree(leftover)
        elif os.path.lexists(leftover):
            os.remove(leftover)
    sd, tensors = model.state_dict(), {}
    for key, parts in hf_layout(model).items():
        # (1, numel) or (3, numel / 3): q, k, v
        rows = sd[key].detach().float().reshape(len(parts), -1)
        # q, k and v would share one storage, which safetensors refuses: clone them
        for row, (h, shape) in zip(rows, parts):
            tensors[h] = row.reshape(shape).clone() if len(parts) > 1 else row.reshape(shape)
    runs.atomic_write(os.path.join(tmp, 'model.safetensors'),
                      lambda f: f.write(save(tensors, metadata={'format': 'pt'})))
    runs.write_json(os.path.join(tmp, 'config.json'), config_to_dict(model.config))
    if isinstance(model, TextEncoder) and model.pooling == 'mean':  # sentence-transformers' marker
        runs.write_json(os.path.join(tmp, '1_Pooling', 'config.json'),
                        dict(word_embedding_dimension=model.embed_dim, pooling_mode_cls_token=False,
                             pooling_mode_mean_tokens=True))
    if tokenizer_from is not None:
        src = os.path.join(resolve(tokenizer_from, required=('tokenizer.json',)), 'tokenizer.json')
        with open(src, 'rb') as f:
            text = f.read()
        runs.atomic_write(os.path.join(tmp, 'tokenizer.json'), lambda f: f.write(text))
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)

# -----------------------------------------------------------------------------
# tokenizer

class Tokenizer:
    """tokenizer.json -> list[str] -> (input_ids, attention_mask) (B, T) padded to the batch's
    longest"""
    def __init__(self, path, max_length):
        try:
            self.tk = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust library raises a bare Exception
            raise UserError(f"{path}: truncated or corrupt ({e}); "
                            f"download or export it again") from None
        # what the tokens depend on: the caption cache's key
        self.key = f"{runs.file_hash(path)}-{max_length}"
        pads = ('[PAD]', '<pad>', '<|endoftext|>')
        pad = (self.tk.padding or {}).get('pad_token')
        pad = pad or next((t for t in pads if self.tk.token_to_id(t) is not None), None)
        if pad is None:
            raise UserError(f"{path}: no padding token "
                            f"(looked for padding.pad_token, {', '.join(pads)})")
        # to the batch's longest
        self.tk.enable_padding(pad_id=self.tk.token_to_id(pad), pad_token=pad)
        # special tokens (the end token) are kept on truncation
        self.tk.enable_truncation(max_length)

    def __call__(self, texts):
        enc = self.tk.encode_batch(list(texts))
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])

def load_tokenizer(name_or_dir):
    folder = resolve(name_or_dir, required=('config.json', 'tokenizer.json'))
    config = read_config(folder)
    text = config.text_config if isinstance(config, CLIPConfig) else config
    if isinstance(text, ViTConfig):
        raise UserError(f"{os.path.join(folder, 'config.json')}: "
                        f"model_type 'vit' has no text tokenizer")
    return Tokenizer(os.path.join(folder, 'tokenizer.json'), text.max_position_embeddings)
