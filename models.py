"""
Hand-written encoders that load Hugging Face checkpoints unchanged (paper 3.3-3.4, Table 3):
CLIP ViT-B/32 (image + text towers), ViT-B/32 in21k, DistilBERT and BERT-family text encoders,
plus the regression head of paper eq. 11. One transformer Block serves all of them.
The scripts import it; it has no command line (demo.py writes tiny random-weight checkpoints). Parity with
transformers on the same weights:

    python -m pytest tests/test_models.py -q
"""
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import huggingface_hub as hub
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tokenizers import Tokenizer as HFTokenizer

import runs
from runs import UserError

# -----------------------------------------------------------------------------
# configs, filled from config.json; missing keys take Hugging Face's defaults

@dataclass
class CLIPVisionConfig:
    hidden_size: int = 768           # width of every token
    intermediate_size: int = 3072    # mlp width
    num_hidden_layers: int = 12      # number of blocks
    num_attention_heads: int = 12    # heads per block
    image_size: int = 224            # input resolution in pixels
    patch_size: int = 32             # ViT-B/32: 7 x 7 patches of 32 x 32 pixels
    num_channels: int = 3            # rgb
    layer_norm_eps: float = 1e-5     # every layernorm of the tower
    hidden_act: str = 'quick_gelu'   # mlp activation
    attention_dropout: float = 0.0   # on the attention weights in training: CLIP's only dropout
    # where the two image towers differ, fixed by the architecture rather than read from config.json:
    # class attributes, so asdict (the saved config.json) leaves them out
    image_family = 'clip'            # pixel normalisation: CLIP's mean and std (data.py)
    patch_bias = False               # openai's patch conv has no bias
    ln_pre = True                    # a layernorm on the embeddings before the first block

@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408          # BPE tokens, start/end-of-text last
    hidden_size: int = 512           # width of every token
    intermediate_size: int = 2048    # mlp width
    num_hidden_layers: int = 12      # number of blocks
    num_attention_heads: int = 8     # heads per block
    max_position_embeddings: int = 77  # longest caption in tokens, start and end included
    layer_norm_eps: float = 1e-5     # every layernorm of the tower
    hidden_act: str = 'quick_gelu'   # mlp activation
    attention_dropout: float = 0.0   # on the attention weights in training: CLIP's only dropout
    pad_token_id: int = 1            # the three ids are kept only for the saved config.json:
    bos_token_id: int = 49406        # we pool at the last attended token, whatever its id
    eos_token_id: int = 49407

@dataclass
class CLIPConfig:
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)  # image tower
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)        # text tower
    projection_dim: int = 512               # size of the shared image-text embedding
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature

@dataclass
class ViTConfig:
    hidden_size: int = 768           # width of every token
    intermediate_size: int = 3072    # mlp width
    num_hidden_layers: int = 12      # number of blocks
    num_attention_heads: int = 12    # heads per block
    image_size: int = 224            # input resolution in pixels
    patch_size: int = 16             # HF's default; the in21k B/32 checkpoint says 32
    num_channels: int = 3            # rgb
    layer_norm_eps: float = 1e-12    # every layernorm of the model
    hidden_act: str = 'gelu'         # mlp activation (exact gelu)
    hidden_dropout_prob: float = 0.0           # on the embeddings and residual branches (training)
    attention_probs_dropout_prob: float = 0.0  # dropout on the attention weights (training only)
    # class attributes, fixed by the architecture (see CLIPVisionConfig)
    image_family = 'vit'             # pixel normalisation: mean and std 0.5
    patch_bias = True                # the patch conv has a bias
    ln_pre = False                   # the embeddings enter the first block as they are

@dataclass
class BertConfig:                    # BERT and DistilBERT (whose config.json names are mapped below)
    model_type: str = 'bert'         # 'bert' | 'distilbert': picks the key names on disk
    vocab_size: int = 30522          # WordPiece/BPE tokens
    hidden_size: int = 768           # width of every token (DistilBERT: dim)
    intermediate_size: int = 3072    # mlp width (DistilBERT: hidden_dim)
    num_hidden_layers: int = 12      # number of blocks (DistilBERT: n_layers, default 6)
    num_attention_heads: int = 12    # heads per block (DistilBERT: n_heads)
    max_position_embeddings: int = 512  # longest input in tokens, [CLS] and [SEP] included
    type_vocab_size: int = 2         # segment embeddings; 0 for DistilBERT, which has none
    layer_norm_eps: float = 1e-12    # DistilBERT hard-codes 1e-12
    hidden_act: str = 'gelu'         # mlp activation (DistilBERT: activation)
    hidden_dropout_prob: float = 0.1           # dropout on embeddings and residual branches (DistilBERT: dropout)
    attention_probs_dropout_prob: float = 0.1  # dropout on the attention weights (DistilBERT: attention_dropout)
    pad_token_id: int = 0            # kept for the saved config.json

DISTILBERT_NAMES = dict(dim='hidden_size', hidden_dim='intermediate_size', n_layers='num_hidden_layers',
                        n_heads='num_attention_heads', activation='hidden_act', dropout='hidden_dropout_prob',
                        attention_dropout='attention_probs_dropout_prob')
DISTILBERT_DEFAULTS = dict(num_hidden_layers=6, type_vocab_size=0)

def _fill(cls, d, **fixed):
    known = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in d.items() if k in known}, **fixed})

# config.json values implemented here
SUPPORTED = dict(qkv_bias=(True,), sinusoidal_pos_embds=(False,), position_embedding_type=('absolute',),
                 hidden_act=('gelu', 'quick_gelu'), activation=('gelu',))

def config_from_dict(d, path='config.json'):
    """config.json dict -> our dataclass, by model_type"""
    kind = d.get('model_type')
    sub = lambda k: {**(d.get(k) or {}), **(d.get(k + '_dict') or {})}  # old CLIP files say text_config_dict
    for c in (d, sub('text_config'), sub('vision_config')):
        for key in SUPPORTED.keys() & c.keys():
            if c[key] not in SUPPORTED[key]:
                raise UserError(f"{path}: {key}={c[key]!r} is not supported (expected one of {SUPPORTED[key]})")
    if kind == 'clip':
        top = {k: d[k] for k in ('projection_dim', 'logit_scale_init_value') if k in d}
        vision, text = _fill(CLIPVisionConfig, sub('vision_config')), _fill(CLIPTextConfig, sub('text_config'))
        return CLIPConfig(vision, text, **top)
    if kind == 'vit':
        return _fill(ViTConfig, d)
    if kind == 'bert':
        return _fill(BertConfig, d, model_type='bert')
    if kind == 'distilbert':
        d = {**DISTILBERT_DEFAULTS, **{DISTILBERT_NAMES.get(k, k): v for k, v in d.items()}}
        return _fill(BertConfig, d, model_type='distilbert', type_vocab_size=0)
    raise UserError(f"{path}: unknown model_type {kind!r} (expected one of clip, vit, distilbert, bert)")

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
# the one transformer block

def quick_gelu(x):  # CLIP's sigmoid approximation of gelu
    return x * torch.sigmoid(1.702 * x)

ACTIVATIONS = {'gelu': F.gelu, 'quick_gelu': quick_gelu}  # exact gelu: ViT, BERT; quick_gelu: CLIP

class Block(nn.Module):
    def __init__(self, dim, n_heads, mlp_dim, eps, pre_norm, act, dropout=(0.0, 0.0, 0.0)):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not supported (expected one of {list(ACTIVATIONS)})")
        self.n_heads, self.pre_norm, self.act = n_heads, pre_norm, ACTIVATIONS[act]
        # dropout in training: attention weights, attention output, mlp output (DROPOUT below)
        self.p_attn, self.p_proj, self.p_mlp = dropout
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k, v in one matmul; split into three tensors on disk
        self.proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def attn(self, x, mask, causal):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        p = self.p_attn if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)), self.p_proj, self.training)

    def mlp(self, x):  # (B, T, C)
        return F.dropout(self.fc2(self.act(self.fc1(x))), self.p_mlp, self.training)

    def forward(self, x, key_padding_mask=None, causal=False):  # x (B, T, C), key_padding_mask (B, T) True = attend
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B, 1, 1, T)
        if self.pre_norm:  # CLIP, ViT
            x = x + self.attn(self.ln1(x), mask, causal)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, mask, causal))  # BERT, DistilBERT
        return self.ln2(x + self.mlp(x))

# where transformers drops out in training, per encoder: the config field that gives p on the
# embeddings, the attention weights, the attention's output and the mlp's output (None: no dropout
# there; H and A: the hidden and attention fields). CLIP drops the attention weights only;
# DistilBERT's attention ends in out_lin with no dropout, where BERT's and ViT's have one
H, A = 'hidden_dropout_prob', 'attention_probs_dropout_prob'
DROPOUT = {'clip': (None, 'attention_dropout', None, None), 'distilbert': (H, A, None, H),
           'vit': (H, A, H, H), 'bert': (H, A, H, H)}

def dropouts(c):
    """config -> p of the dropouts (embeddings, attention weights, attention output, mlp output)"""
    if isinstance(c, (CLIPVisionConfig, CLIPTextConfig)):
        kind = 'clip'
    else:
        kind = 'vit' if isinstance(c, ViTConfig) else c.model_type
    return tuple(getattr(c, name) if name else 0.0 for name in DROPOUT[kind])

def _blocks(c, pre_norm):
    return nn.ModuleList(Block(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.layer_norm_eps,
                               pre_norm, c.hidden_act, dropouts(c)[1:])
                         for _ in range(c.num_hidden_layers))

# -----------------------------------------------------------------------------
# encoders

class ViT(nn.Module):
    """ViT-in21k (ViTConfig) and CLIP's image tower (CLIPVisionConfig, projected): embedding = [CLS] after the
    final layernorm. The two differ only in the config's patch_bias and ln_pre (and pixel normalisation)."""
    modality = 'vision'

    def __init__(self, config, projection_dim=None):
        super().__init__()
        C, p, n = config.hidden_size, config.patch_size, (config.image_size // config.patch_size) ** 2
        self.config, self.image_size, self.image_family = config, config.image_size, config.image_family
        self.patch = nn.Conv2d(config.num_channels, C, p, stride=p, bias=config.patch_bias)
        self.cls = nn.Parameter(torch.zeros(C))  # (C,)
        self.pos = nn.Parameter(torch.zeros(n + 1, C))  # (N+1, C)
        self.p_emb = dropouts(config)[0]  # ViT-in21k drops out its embeddings; CLIP does not
        self.ln_pre = nn.LayerNorm(C, eps=config.layer_norm_eps) if config.ln_pre else nn.Identity()
        self.blocks = _blocks(config, pre_norm=True)
        self.ln_post = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.proj = nn.Linear(C, projection_dim, bias=False) if projection_dim else nn.Identity()
        self.embed_dim = projection_dim or C

    def forward(self, pixel_values):  # (B, 3, H, W) normalised
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.pos  # (B, N+1, C)
        x = self.ln_pre(F.dropout(x, self.p_emb, self.training))
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))  # layernorm is per token, so only [CLS] needs it

class CLIPText(nn.Module):
    """CLIP's text tower: causal blocks, pooled at the end-of-text token, projected"""
    modality = 'text'

    def __init__(self, config, projection_dim):
        super().__init__()
        C = config.hidden_size
        self.config, self.embed_dim = config, projection_dim
        self.tok = nn.Embedding(config.vocab_size, C)
        self.pos = nn.Parameter(torch.zeros(config.max_position_embeddings, C))
        self.blocks = _blocks(config, pre_norm=True)
        self.ln_final = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.proj = nn.Linear(C, projection_dim, bias=False)

    def forward(self, input_ids, attention_mask):  # (B, T), (B, T) right-padded
        x = self.tok(input_ids) + self.pos[:input_ids.shape[1]]  # (B, T, C)
        for block in self.blocks:  # with right padding the causal mask alone keeps real tokens off the padding
            x = block(x, causal=True)
        x = x[torch.arange(x.shape[0], device=x.device), attention_mask.sum(1) - 1]  # end-of-text token (B, C)
        return self.proj(self.ln_final(x))

class CLIP(nn.Module):
    image_family = 'clip'

    def __init__(self, config):
        super().__init__()
        self.config, self.image_size = config, config.vision_config.image_size
        self.visual = ViT(config.vision_config, projection_dim=config.projection_dim)
        self.text = CLIPText(config.text_config, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))  # log of the inverse temperature

    def encode_image(self, pixel_values):  # -> (B, projection_dim)
        return self.visual(pixel_values)

    def encode_text(self, input_ids, attention_mask):  # -> (B, projection_dim)
        return self.text(input_ids, attention_mask)

    def forward(self, pixel_values, input_ids, attention_mask):
        # both towers in one call, so that DDP and torch.compile see the whole step; the log scale is returned
        # so that DDP averages its gradient. The contrastive loss (contrastive.clip_loss) normalises and scales.
        img, txt = self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)  # (B, P), (B, P)
        return img, txt, self.logit_scale

class TextEncoder(nn.Module):
    """DistilBERT / BERT (post-norm blocks); embedding = [CLS] state or masked mean of the states"""
    modality = 'text'

    def __init__(self, config, pooling='cls'):
        super().__init__()
        if pooling not in ('cls', 'mean'):
            raise ValueError(f"pooling {pooling!r} is not supported (expected 'cls' or 'mean')")
        C = config.hidden_size
        self.config, self.pooling, self.embed_dim = config, pooling, C
        self.tok = nn.Embedding(config.vocab_size, C)
        self.pos = nn.Embedding(config.max_position_embeddings, C)
        self.seg = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None
        self.ln_emb = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.p_emb = dropouts(config)[0]
        self.blocks = _blocks(config, pre_norm=False)

    def forward(self, input_ids, attention_mask):  # (B, T), (B, T)
        x = self.tok(input_ids) + self.pos.weight[:input_ids.shape[1]]  # (B, T, C)
        if self.seg is not None:
            x = x + self.seg.weight[0]  # single-segment input: token type 0 everywhere
        x = F.dropout(self.ln_emb(x), self.p_emb, self.training)
        keep = attention_mask.bool()
        for block in self.blocks:
            x = block(x, key_padding_mask=keep)
        if self.pooling == 'cls':
            return x[:, 0]
        m = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling

class Normalized(nn.Module):
    """an encoder whose embeddings come out layer-normalised without affine: zhat = (z - mean) / std, the part
    of eq. 11's LN that has no parameters. A frozen encoder's zhat is computed once; the head takes zhat."""
    def __init__(self, encoder, eps=1e-5):  # nn.LayerNorm's eps
        super().__init__()
        self.encoder, self.eps = encoder, eps

    def forward(self, *inputs):  # -> (B, D)
        z = self.encoder(*inputs)
        return F.layer_norm(z, z.shape[-1:], eps=self.eps)

class RegressionHead(nn.Module):
    """paper eq. 11: y = sigmoid(w^T LN(z) + b), with LN(z) = gamma * zhat + beta. Takes zhat (Normalized) and
    computes eq. 11 regrouped: sigmoid((w * gamma)^T zhat + (w^T beta + b)). A training step then reads the batch
    twice, where gamma * zhat + beta and its gradient read and write it six times: head training steps run
    1.3-1.8x faster at batch 512 and 2.2-3.8x at 4096 (tests/bench.py regress)."""
    def __init__(self, dim):
        super().__init__()
        self.ln = nn.LayerNorm(dim)  # holds gamma and beta; the normalisation itself is Normalized's
        self.fc = nn.Linear(dim, 1)  # w, b

    def forward(self, zhat):  # (B, dim) -> (B,)
        w = self.fc.weight[0]  # (dim,)
        return torch.sigmoid(zhat @ (w * self.ln.weight) + (w @ self.ln.bias + self.fc.bias[0]))

class Regressor(nn.Module):
    """paper eq. 1: y = g_RH(f_enc(x)). The encoder gives zhat (Normalized), or is a lookup of zhat computed once.
    A frozen encoder (eq. 10) stays in eval mode and out of autograd; a trainable one (eq. 8) learns with the head."""
    def __init__(self, encoder, dim, trainable):
        super().__init__()
        self.encoder, self.head, self.trainable = encoder, RegressionHead(dim), trainable
        encoder.requires_grad_(trainable)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.train(mode and self.trainable)
        return self

    def reset_head(self):
        """the head drawn anew, in the order its constructor draws it: each fold's head comes from its own seed"""
        for module in self.head.modules():
            if hasattr(module, 'reset_parameters'):
                module.reset_parameters()

    def forward(self, *inputs):  # -> (B,)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            zhat = self.encoder(*inputs)  # (B, D)
        with torch.autocast(zhat.device.type, enabled=False):  # a bfloat16 head would round scores to ~0.004: ties
            return self.head(zhat.float())

def encoder_for(model, modality):
    """the part of `model` that maps one modality's inputs to embeddings"""
    towers = {(CLIP, 'vision'): lambda m: m.visual, (CLIP, 'text'): lambda m: m.text,
              (ViT, 'vision'): lambda m: m, (TextEncoder, 'text'): lambda m: m}
    if (type(model), modality) not in towers:
        have = [m for (cls, m) in towers if cls is type(model)]
        raise UserError(f"{type(model).__name__} has no {modality!r} encoder (it has: {have})")
    return towers[type(model), modality](model)

LABELS = {'clip': 'CLIP', 'vit': 'ViT', 'distilbert': 'DistilBERT', 'bert': 'BERT'}

def describe(model):
    """what was loaded, for labels such as "BERT (all-MiniLM-L6-v2)": 'CLIP' | 'ViT' | 'DistilBERT' | 'BERT';
    a tower of a CLIP model is 'CLIP'"""
    config = model.config
    if isinstance(config, (CLIPConfig, CLIPVisionConfig, CLIPTextConfig)):
        return LABELS['clip']
    return LABELS['vit'] if isinstance(config, ViTConfig) else LABELS[config.model_type]

# -----------------------------------------------------------------------------
# Hugging Face key names and shapes

# our module -> HF module, per model_type; '#' is a block index
HF_NAMES = {
    'clip': {'visual.patch': 'vision_model.embeddings.patch_embedding',
             'visual.cls': 'vision_model.embeddings.class_embedding',
             'visual.pos': 'vision_model.embeddings.position_embedding.weight',
             'visual.ln_pre': 'vision_model.pre_layrnorm',  # sic
             'visual.blocks.#': 'vision_model.encoder.layers.#', 'visual.ln_post': 'vision_model.post_layernorm',
             'visual.proj': 'visual_projection', 'text.tok': 'text_model.embeddings.token_embedding',
             'text.pos': 'text_model.embeddings.position_embedding.weight',
             'text.blocks.#': 'text_model.encoder.layers.#', 'text.ln_final': 'text_model.final_layer_norm',
             'text.proj': 'text_projection', 'logit_scale': 'logit_scale'},
    'vit': {'patch': 'embeddings.patch_embeddings.projection', 'cls': 'embeddings.cls_token',
            'pos': 'embeddings.position_embeddings', 'blocks.#': 'encoder.layer.#', 'ln_post': 'layernorm'},
    'distilbert': {'tok': 'embeddings.word_embeddings', 'pos': 'embeddings.position_embeddings',
                   'ln_emb': 'embeddings.LayerNorm', 'blocks.#': 'transformer.layer.#'},
    'bert': {'tok': 'embeddings.word_embeddings', 'pos': 'embeddings.position_embeddings',
             'seg': 'embeddings.token_type_embeddings', 'ln_emb': 'embeddings.LayerNorm',
             'blocks.#': 'encoder.layer.#'},
}
# our Block module -> HF module(s); qkv is stored as three tensors (q, k, v)
BLOCK_NAMES = {
    'clip': dict(qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'), proj='self_attn.out_proj',
                 ln1='layer_norm1', ln2='layer_norm2', fc1='mlp.fc1', fc2='mlp.fc2'),
    'vit': dict(qkv=('attention.attention.query', 'attention.attention.key', 'attention.attention.value'),
                proj='attention.output.dense', ln1='layernorm_before', ln2='layernorm_after',
                fc1='intermediate.dense', fc2='output.dense'),
    'distilbert': dict(qkv=('attention.q_lin', 'attention.k_lin', 'attention.v_lin'), proj='attention.out_lin',
                       ln1='sa_layer_norm', ln2='output_layer_norm', fc1='ffn.lin1', fc2='ffn.lin2'),
    'bert': dict(qkv=('attention.self.query', 'attention.self.key', 'attention.self.value'),
                 proj='attention.output.dense', ln1='attention.output.LayerNorm', ln2='output.LayerNorm',
                 fc1='intermediate.dense', fc2='output.dense'),
}
# HF's ViT keeps batch dims of 1 on [CLS] (1, 1, C) and the position table (1, N+1, C); our network has CLIP's
# (C,) and (N+1, C) for both, and the loader and saver reshape, as nanoGPT's from_pretrained transposes GPT-2's
# Conv1D weights rather than bending its Linear
HF_SHAPES = {'vit': {'cls': lambda s: (1, 1, *s), 'pos': lambda s: (1, *s)}}
# tensors in published checkpoints that we skip on purpose: buffers, pooler and masked-LM / NSP heads
SKIPPED = re.compile(r'(^|\.)(position_ids|token_type_ids)$|^pooler\.|^cls\.|^vocab_(transform|layer_norm|projector)\.')
TASK_PREFIXES = ('vit.', 'bert.', 'distilbert.')  # base model inside a task model (e.g. BertForMaskedLM)
OLD_LAYERNORM = {'.gamma': '.weight', '.beta': '.bias'}  # pre-2019 BERT checkpoints

def model_type(model):
    if isinstance(model, ViT) and model.image_family == 'clip':
        raise ValueError("a CLIP image tower is loaded and saved with its CLIP model: pass the CLIP model")
    return 'clip' if isinstance(model, CLIP) else 'vit' if isinstance(model, ViT) else model.config.model_type

def hf_layout(model):
    """our state_dict key -> [(HF key, shape on disk)]; three for a fused qkv, a third of its rows each. A tensor
    the Hugging Face layout has no name for (one a student added) is stored under our own key"""
    kind, out = model_type(model), {}
    for key, t in model.state_dict().items():
        m = re.search(r'\.(\d+)\.', key)  # block index, e.g. 'visual.blocks.3.qkv.weight'
        generic = key.replace(m.group(0), '.#.', 1) if m else key
        mods = [n for n in HF_NAMES[kind] if generic == n or generic.startswith(n + '.')]
        mod = max(mods, key=len, default=None)
        names = [key]
        if mod:
            hf_mod, rest = HF_NAMES[kind][mod].replace('#', m.group(1) if m else ''), generic[len(mod):]
            sub, _, leaf = rest[1:].partition('.')  # in a block: '.qkv.weight' -> 'qkv', 'weight'
            if not m:
                names = [hf_mod + rest]
            elif sub in BLOCK_NAMES[kind] and '.' not in leaf:
                names = BLOCK_NAMES[kind][sub]
                names = [f'{hf_mod}.{n}.{leaf}' for n in (names if isinstance(names, tuple) else (names,))]
        shape = tuple(t.shape) if len(names) == 1 else (t.shape[0] // len(names), *t.shape[1:])
        if key in HF_SHAPES.get(kind, {}):
            shape = HF_SHAPES[kind][key](shape)
        out[key] = [(n, shape) for n in names]
    return out

def load_weights(model, path):
    """strict load of a HF model.safetensors into `model`: every key and shape must match. The one exception is a
    parameter a student adds to a published architecture (SigLIP's logit bias, say): its name in the model's
    `new_parameters` (e.g. `self.new_parameters = ('logit_bias',)` in __init__) lets a checkpoint without it load,
    the parameter keeping its initial value; save_pretrained stores it under its own name, so it loads back"""
    try:
        raw = load_file(path)
    except SafetensorError as e:
        raise UserError(f"{path}: truncated or corrupt ({e}); download or export it again") from None
    sd = {}
    for k, v in raw.items():
        for p in TASK_PREFIXES:
            k = k[len(p):] if k.startswith(p) else k
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
                        + (f"\n  {len(unexpected)} unexpected keys: {unexpected[:20]}" if unexpected else '')
                        + (f"\n  {len(wrong)} shape mismatches: {wrong[:20]}" if wrong else ''))
    with torch.no_grad():
        for key, parts in layout.items():
            if parts[0][0] not in sd:  # a new parameter the checkpoint lacks: its initial value
                continue
            # cat: HF's q, k, v into our qkv; view: HF ViT's (1, 1, C) into our (C,)
            ours[key].copy_(torch.cat([sd[h].flatten() for h, _ in parts]).view_as(ours[key]))
    return model

# -----------------------------------------------------------------------------
# folders: local, or from the Hugging Face hub

def snapshot(paths, name):  # every file of one revision sits in one snapshot folder
    return paths[name][:-len(name) - 1]

# seconds for one reachability check (the variable huggingface_hub reads): on a dead network hf_hub_download
# alone retries for ~25 s before failing
HUB_TIMEOUT = float(os.environ.get('HF_HUB_ETAG_TIMEOUT', 5))

# every file the loader reads (from_pretrained, load_tokenizer): required, then optional
FILES = ('config.json', 'model.safetensors', 'tokenizer.json', '1_Pooling/config.json')

def checkpoint_identity(name_or_dir):
    """the content of every file the loader reads from the checkpoint (a run's identity, a feature cache's key)"""
    return runs.content_identity(resolve(name_or_dir), FILES)

def resolve(name_or_dir, required=FILES[:2], optional=FILES[2:]):
    """local folder or hub repo id -> local folder holding `required` (and whichever of `optional` exist)"""
    if os.path.isdir(name_or_dir):
        for f in required:
            if not os.path.isfile(os.path.join(name_or_dir, f)):
                hint = ' (found pytorch_model.bin: convert it to safetensors)' if os.path.isfile(
                    os.path.join(name_or_dir, 'pytorch_model.bin')) and f == 'model.safetensors' else ''
                raise UserError(f"{os.path.join(name_or_dir, f)} not found{hint}")
        return name_or_dir
    if name_or_dir.startswith(('.', '/', '~')) or name_or_dir.count('/') > 1:
        raise UserError(f"{name_or_dir}: no such folder")
    # the cache first: a model downloaded once loads with no network at all
    cached = {f: hub.try_to_load_from_cache(name_or_dir, f) for f in required + optional}
    absent = [f for f in required if not isinstance(cached[f], str)]
    unknown = [f for f in optional if cached[f] is None]  # neither cached nor known to be missing
    offline = hub.constants.HF_HUB_OFFLINE
    if not absent and (offline or not unknown):
        return snapshot(cached, required[0])
    where = f"not found in the hub cache {hub.constants.HF_HUB_CACHE}"
    if offline:
        raise UserError(f"hub repo {name_or_dir!r}: {', '.join(absent)} {where} and HF_HUB_OFFLINE=1 forbids "
                        f"downloading; pass --checkpoint FOLDER (a local copy) or unset HF_HUB_OFFLINE")
    try:  # one request with a short timeout: fails in seconds where hf_hub_download would retry
        hub.get_hf_file_metadata(hub.hf_hub_url(name_or_dir, required[0]), timeout=HUB_TIMEOUT)
    except HfHubHTTPError:
        pass  # the hub answered (no such repo or file, gated, ...): hf_hub_download below says which
    except Exception as e:  # requests, httpx or httpx2 errors by huggingface_hub version: no common base class
        raise UserError(f"hub repo {name_or_dir!r}: the hub at {hub.constants.ENDPOINT} is unreachable "
                        f"({type(e).__name__}: {e}) and {', '.join(absent or unknown)} {where}; "
                        f"pass --checkpoint FOLDER (a local copy), or HF_HUB_OFFLINE=1 to use the cache only"
                                ) from None
    paths = {}
    for f in required + optional:
        try:
            paths[f] = hub.hf_hub_download(name_or_dir, f)
        except EntryNotFoundError:
            if f in optional:
                continue
            hint = ' (this loader reads safetensors only)' if f == 'model.safetensors' else ''
            raise UserError(f"hub repo {name_or_dir!r} has no {f}{hint}") from None
        except HfHubHTTPError as e:  # no such repo, gated, private
            raise UserError(f"hub repo {name_or_dir!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return snapshot(paths, required[0])

def read_config(folder):
    path = os.path.join(folder, 'config.json')
    return config_from_dict(runs.read_json(path, expect=dict, what='config.json'), path)

def build(config, pooling='cls'):
    if isinstance(config, CLIPConfig):
        return CLIP(config)
    return ViT(config) if isinstance(config, ViTConfig) else TextEncoder(config, pooling)

def from_pretrained(name_or_dir):
    """config.json + model.safetensors -> CLIP | ViT | TextEncoder, by config.json's model_type"""
    folder = resolve(name_or_dir)
    config, pooling = read_config(folder), 'cls'
    pool_path = os.path.join(folder, '1_Pooling', 'config.json')
    if isinstance(config, BertConfig) and os.path.isfile(pool_path):  # sentence-transformers' pooling
        pooling = 'mean' if runs.read_json(pool_path, expect=dict).get('pooling_mode_mean_tokens') else 'cls'
    return load_weights(build(config, pooling), os.path.join(folder, 'model.safetensors')).eval()

def save_pretrained(model, out_dir, tokenizer_from=None):
    """config.json + model.safetensors in HF layout (+ tokenizer.json copied from `tokenizer_from`), written into
    OUT_DIR.tmp and then swapped in whole: a reader never finds half a model, and an older model is replaced"""
    tmp, old = str(out_dir).rstrip('/') + '.tmp', str(out_dir).rstrip('/') + '.old'
    if os.path.isdir(old) and not os.path.exists(out_dir):  # a save killed between its two renames: old is the model
        os.replace(old, out_dir)
    for leftover in (tmp, old):  # of a process killed while it saved
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            shutil.rmtree(leftover)
        elif os.path.lexists(leftover):
            os.remove(leftover)
    sd, tensors = model.state_dict(), {}
    for key, parts in hf_layout(model).items():
        rows = sd[key].detach().float().reshape(len(parts), -1)  # (1, numel) or (3, numel / 3) for q, k, v
        # q, k and v would share one storage, which safetensors refuses: clone them
        tensors.update((h, row.reshape(shape).clone() if len(parts) > 1 else row.reshape(shape))
                       for row, (h, shape) in zip(rows, parts))
    runs.atomic_write(os.path.join(tmp, 'model.safetensors'),
                       lambda f: f.write(save(tensors, metadata={'format': 'pt'})))
    runs.write_json(os.path.join(tmp, 'config.json'), config_to_dict(model.config))
    if isinstance(model, TextEncoder) and model.pooling == 'mean':  # sentence-transformers' marker for mean pooling
        runs.write_json(os.path.join(tmp, '1_Pooling', 'config.json'),
                         dict(word_embedding_dimension=model.embed_dim, pooling_mode_cls_token=False,
                              pooling_mode_mean_tokens=True))
    if tokenizer_from is not None:
        src = os.path.join(resolve(tokenizer_from, required=('tokenizer.json',), optional=()), 'tokenizer.json')
        with open(src, 'rb') as f:
            data = f.read()
        runs.atomic_write(os.path.join(tmp, 'tokenizer.json'), lambda f: f.write(data))
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)

# -----------------------------------------------------------------------------
# tokenizer

class Tokenizer:
    """tokenizer.json -> list[str] -> (input_ids, attention_mask) (B, T) padded to the batch's longest"""
    def __init__(self, path, max_length):
        try:
            self.tk, self.max_length = HFTokenizer.from_file(path), max_length
            self.key = f"{runs.file_hash(path)}-{max_length}"  # what the tokens depend on: data.caption_cache's key
        except Exception as e:  # the Rust library raises a bare Exception
            raise UserError(f"{path}: truncated or corrupt ({e}); download or export it again") from None
        pad = (self.tk.padding or {}).get('pad_token')
        pad = pad or next((t for t in ('[PAD]', '<pad>', '<|endoftext|>') if self.tk.token_to_id(t) is not None), None)
        if pad is None:
            raise UserError(f"{path}: no padding token (looked for padding.pad_token, [PAD], <pad>, <|endoftext|>)")
        self.tk.enable_padding(pad_id=self.tk.token_to_id(pad), pad_token=pad)  # to the batch's longest
        self.tk.enable_truncation(max_length)  # special tokens (the end token) are kept on truncation

    def __call__(self, texts):
        enc = self.tk.encode_batch(list(texts))
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])

def load_tokenizer(name_or_dir):
    folder = resolve(name_or_dir, required=('config.json', 'tokenizer.json'), optional=())
    config = read_config(folder)
    text = config.text_config if isinstance(config, CLIPConfig) else config
    if isinstance(text, ViTConfig):
        raise UserError(f"{os.path.join(folder, 'config.json')}: model_type 'vit' has no text tokenizer")
    return Tokenizer(os.path.join(folder, 'tokenizer.json'), text.max_position_embeddings)
