"""The paper's networks (3.3-3.4, Table 3) by hand: CLIP ViT-B/32 (image and text towers), ViT-B/32
in21k, DistilBERT and BERT-family text encoders, one transformer Block for all, the regression head
of eq. 11 on an encoder (eq. 1). harness/checkpoints.py loads Hugging Face's weights unchanged
(data.load_encoder); nothing of ours is imported here. Parity with transformers in eval and train:

    python -m pytest tests/test_models.py tests/test_train_parity.py -q
"""
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    # fixed by the architecture, not read from config.json (class attributes: not saved either)
    model_type = 'clip'              # the family: dropout sites, labels, key names on disk
    image_family = 'clip'            # pixel normalisation: CLIP's mean and std (data.FAMILIES)
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
    pad_token_id: int = 1            # the three ids are kept for the saved config.json only:
    bos_token_id: int = 49406        # we pool at the last attended token, whatever its id
    eos_token_id: int = 49407
    model_type = 'clip'              # class attribute (see CLIPVisionConfig)

@dataclass
class CLIPConfig:
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)  # image tower
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)        # text tower
    projection_dim: int = 512               # size of the shared image-text embedding
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature
    model_type = 'clip'                     # class attribute (see CLIPVisionConfig)

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
    attention_probs_dropout_prob: float = 0.0  # on the attention weights (training)
    model_type = 'vit'               # class attributes (see CLIPVisionConfig)
    image_family = 'vit'             # pixel normalisation: mean and std 0.5
    patch_bias = True                # the patch conv has a bias
    ln_pre = False                   # the embeddings enter the first block as they are

@dataclass
class BertConfig:  # BERT and DistilBERT (whose config.json names are mapped below)
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
    hidden_dropout_prob: float = 0.1           # embeddings, residual branches (DistilBERT: dropout)
    attention_probs_dropout_prob: float = 0.1  # attention weights (DistilBERT: attention_dropout)
    pad_token_id: int = 0            # kept for the saved config.json

# -----------------------------------------------------------------------------
# the one transformer block
def quick_gelu(x):  # CLIP's sigmoid approximation of gelu
    return x * torch.sigmoid(1.702 * x)

ACTIVATIONS = {'gelu': F.gelu, 'quick_gelu': quick_gelu}  # exact gelu: ViT, BERT; quick_gelu: CLIP

class Block(nn.Module):
    def __init__(self, dim, n_heads, mlp_dim, eps, pre_norm, act, dropout=(0.0, 0.0, 0.0)):
        super().__init__()
        self.n_heads, self.pre_norm, self.act = n_heads, pre_norm, ACTIVATIONS[act]
        # dropout in training: attention weights, attention output, mlp output (DROPOUT below)
        self.p_attn, self.p_proj, self.p_mlp = dropout
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k, v in one matmul; three tensors on disk
        self.proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def attn(self, x, mask, causal):  # (B, T, C)
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        p = self.p_attn if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return F.dropout(y, self.p_proj, self.training)

    def mlp(self, x):  # (B, T, C)
        return F.dropout(self.fc2(self.act(self.fc1(x))), self.p_mlp, self.training)

    def forward(self, x, key_padding_mask=None, causal=False):  # (B, T, C); mask (B, T), True: in
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B,1,1,T)
        if self.pre_norm:  # CLIP, ViT
            x = x + self.attn(self.ln1(x), mask, causal)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, mask, causal))  # BERT, DistilBERT
        return self.ln2(x + self.mlp(x))

# the config field of p where transformers drops out in training, in dropouts()' order (None: none)
HIDDEN, ATTENTION = 'hidden_dropout_prob', 'attention_probs_dropout_prob'
DROPOUT = {'clip': (None, 'attention_dropout', None, None),  # the attention weights only
           'distilbert': (HIDDEN, ATTENTION, None, HIDDEN),  # its attention's out_lin: none
           'vit': (HIDDEN, ATTENTION, HIDDEN, HIDDEN), 'bert': (HIDDEN, ATTENTION, HIDDEN, HIDDEN)}

def dropouts(c):
    """config -> p of the dropouts (embeddings, attention weights, attention output, mlp output)"""
    return tuple(getattr(c, name) if name else 0.0 for name in DROPOUT[c.model_type])

def blocks(c, pre_norm):
    args = (c.hidden_size, c.num_attention_heads, c.intermediate_size, c.layer_norm_eps, pre_norm,
            c.hidden_act)
    return nn.ModuleList(Block(*args, dropouts(c)[1:]) for _ in range(c.num_hidden_layers))

# -----------------------------------------------------------------------------
# encoders
class ViT(nn.Module):
    """ViT-in21k (ViTConfig) and CLIP's image tower (CLIPVisionConfig, projected): the embedding is
    [CLS] after the final layernorm. They differ in patch_bias, ln_pre and pixel normalisation."""
    modality = 'vision'

    def __init__(self, config, projection_dim=None):
        super().__init__()
        C, p = config.hidden_size, config.patch_size
        self.config, self.image_size = config, config.image_size
        self.image_family = config.image_family
        self.patch = nn.Conv2d(config.num_channels, C, p, stride=p, bias=config.patch_bias)
        self.cls = nn.Parameter(torch.zeros(C))  # (C,)
        self.pos = nn.Parameter(torch.zeros((config.image_size // p) ** 2 + 1, C))  # (N+1, C)
        self.p_emb = dropouts(config)[0]  # ViT-in21k drops out its embeddings; CLIP does not
        self.ln_pre = nn.LayerNorm(C, eps=config.layer_norm_eps) if config.ln_pre else nn.Identity()
        self.blocks = blocks(config, pre_norm=True)
        self.ln_post = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.proj = nn.Linear(C, projection_dim, bias=False) if projection_dim else nn.Identity()
        self.embed_dim = projection_dim or C

    def forward(self, pixel_values):  # (B, 3, H, W) normalised
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls.expand(len(x), 1, -1), x], dim=1) + self.pos  # (B, N+1, C)
        x = self.ln_pre(F.dropout(x, self.p_emb, self.training))
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))  # layernorm is per token: only [CLS] needs it

class CLIPText(nn.Module):
    """CLIP's text tower: causal blocks, pooled at the end-of-text token, projected"""
    modality = 'text'

    def __init__(self, config, projection_dim):
        super().__init__()
        C = config.hidden_size
        self.config, self.embed_dim = config, projection_dim
        self.tok = nn.Embedding(config.vocab_size, C)
        self.pos = nn.Parameter(torch.zeros(config.max_position_embeddings, C))
        self.blocks = blocks(config, pre_norm=True)
        self.ln_final = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.proj = nn.Linear(C, projection_dim, bias=False)

    def forward(self, input_ids, attention_mask):  # (B, T), (B, T) right-padded
        x = self.tok(input_ids) + self.pos[:input_ids.shape[1]]  # (B, T, C)
        for block in self.blocks:  # right padding: the causal mask alone keeps real tokens off it
            x = block(x, causal=True)
        x = x[torch.arange(len(x), device=x.device), attention_mask.sum(1) - 1]  # (B, C) end token
        return self.proj(self.ln_final(x))

class CLIP(nn.Module):
    image_family = 'clip'

    def __init__(self, config):
        super().__init__()
        self.config, self.image_size = config, config.vision_config.image_size
        self.visual = ViT(config.vision_config, projection_dim=config.projection_dim)
        self.text = CLIPText(config.text_config, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def forward(self, pixel_values, input_ids, attention_mask):
        # both towers in one call, so that DDP and torch.compile see the whole step; the log scale
        # is returned so that DDP averages its gradient. contrastive.clip_loss normalises, scales
        img = self.visual(pixel_values)  # (B, P)
        txt = self.text(input_ids, attention_mask)  # (B, P)
        return img, txt, self.logit_scale

class TextEncoder(nn.Module):
    """DistilBERT / BERT (post-norm blocks); embedding = [CLS] state or masked mean of the states"""
    modality = 'text'

    def __init__(self, config, pooling='cls'):
        super().__init__()
        C = config.hidden_size
        self.config, self.pooling, self.embed_dim = config, pooling, C
        self.tok = nn.Embedding(config.vocab_size, C)
        self.pos = nn.Embedding(config.max_position_embeddings, C)
        self.seg = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None
        self.ln_emb = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.p_emb = dropouts(config)[0]
        self.blocks = blocks(config, pre_norm=False)

    def forward(self, input_ids, attention_mask):  # (B, T), (B, T)
        x = self.tok(input_ids) + self.pos.weight[:input_ids.shape[1]]  # (B, T, C)
        if self.seg is not None:
            x = x + self.seg.weight[0]  # single-segment input: token type 0 everywhere
        x = F.dropout(self.ln_emb(x), self.p_emb, self.training)
        for block in self.blocks:
            x = block(x, key_padding_mask=attention_mask.bool())
        if self.pooling == 'cls':
            return x[:, 0]
        m = attention_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling

# -----------------------------------------------------------------------------
# the regression head (eq. 11) and the model of stage 2 (eq. 1)
class RegressionHead(nn.Module):
    """paper eq. 11: y = sigmoid(w^T LN(z) + b)"""
    def __init__(self, dim):
        super().__init__()
        self.ln = nn.LayerNorm(dim)  # LN, with its gamma and beta
        self.fc = nn.Linear(dim, 1)  # w, b

    def forward(self, z):  # (B, dim) -> (B,)
        return torch.sigmoid(self.fc(self.ln(z))).squeeze(-1)

class Regressor(nn.Module):
    """paper eq. 1: y = g_RH(f_enc(x)); f_enc maps inputs to z or looks up z computed once. A frozen
    encoder (eq. 10) stays in eval mode, out of autograd; a trainable one (eq. 8) learns with the
    head, each parameter as its requires_grad says (to freeze a part: regress.py says where)"""
    def __init__(self, encoder, dim, trainable):
        super().__init__()
        self.encoder, self.head, self.trainable, self.dim = encoder, RegressionHead(dim), trainable, dim
        if not trainable:
            encoder.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.train(mode and self.trainable)
        return self

    def forward(self, *inputs):  # -> (B,)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            z = self.encoder(*inputs)  # (B, D)
        with torch.autocast(z.device.type, enabled=False):  # bfloat16 would round scores to ~0.004
            return self.head(z.float())

def encoder_for(model, modality):
    """the part of `model` that maps one modality's inputs to embeddings; None if it has none"""
    if isinstance(model, CLIP):
        return model.visual if modality == 'vision' else model.text
    return model if model.modality == modality else None

LABELS = {'clip': 'CLIP', 'vit': 'ViT', 'distilbert': 'DistilBERT', 'bert': 'BERT'}  # Table 6's

def fill(cls, d, **fixed):
    return cls(**{**{f.name: d[f.name] for f in fields(cls) if f.name in d}, **fixed})

def build(d, pooling='cls'):
    """config.json as a dict (checked by checkpoints.read_config) -> our network by model_type"""
    if d['model_type'] == 'clip':
        return CLIP(fill(CLIPConfig, d, vision_config=fill(CLIPVisionConfig, d['vision_config']),
                         text_config=fill(CLIPTextConfig, d['text_config'])))
    if d['model_type'] == 'vit':
        return ViT(fill(ViTConfig, d))
    segments = {'type_vocab_size': 0} if d['model_type'] == 'distilbert' else {}  # it has none
    return TextEncoder(fill(BertConfig, d, **segments), pooling)
