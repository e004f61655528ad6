"""
models.py against the reference (transformers, test-only) on the same weights, the checkpoint files
of harness/checkpoints.py (snapshot, read_config, load_weights, hf_files, Tokenizer) on real
checkpoints and bad input, and what models.py promises a student (no import of this repository, a
frozen part stays frozen, one seed one head).

    python -m pytest tests/test_models.py -x -q
"""
import ast
import gzip
import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import regex
import torch
import torch.nn.functional as F
import transformers as hf
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import models as tm, processors

import data
import models
import regress
from harness import checkpoints, runs
from harness.runs import UserError
from tools import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# ViT-B/32's geometry (width, heads, 7 x 7 patches of 32 pixels) with 2 of its 12 blocks: depth
# repeats the same Block, and 12 cost a minute on two cores
B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
           image_size=224, patch_size=32)
CAPTIONS = ["a man rides a bicycle down a busy street at night",
            "Two dogs play with a red ball on the beach.",
            "close-up of hands kneading dough, flour everywhere!",
            "the crowd cheers as fireworks explode over the river's bank in 2019",
            "a woman isn't smiling; she's talking on the phone (outside)"]


def feats(out):  # transformers 5 returns an output object from get_*_features
    return out.pooler_output if hasattr(out, 'pooler_output') else out


def maxdiff(a, b):
    return (a - b).abs().max().item()


def hf_save(model, path):
    """the reference's own export: the checkpoint our loader reads is one transformers wrote"""
    model.save_pretrained(path)
    return str(path)


def tower_types(path):
    """the model_type of a CLIP config.json's towers ('clip_text_model', 'clip_vision_model', as
    transformers and the published openai/clip-vit-base-patch32 write them)"""
    config = json.loads((path / 'config.json').read_text())
    return [c.get('model_type') for c in (config.get('text_config') or {}, config.get('vision_config') or {})]


def load(folder, pooling=None):
    """our network with the weights of `folder`, as every script loads it"""
    return data.load_encoder(str(folder), pooling)[0]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def padded_batch(vocab, lengths, end, pad, start=None, seed=0):
    """random ids, each row [start] ... end then padding; returns (ids, mask)"""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids, mask = torch.full((len(lengths), T), pad), torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab - 3, (n,), generator=g)
        if start is not None:
            ids[i, 0] = start
        ids[i, n - 1] = end
        mask[i, :n] = 1
    return ids, mask


def check_rows_alone(fn, ids, mask, batch_out):
    """padding must not change any row: each row alone, unpadded, gives the same output"""
    for i in range(len(ids)):
        n = int(mask[i].sum())
        alone = fn(ids[i:i + 1, :n], mask[i:i + 1, :n])
        assert maxdiff(alone[0], batch_out[i]) <= 1e-5, f"row {i} changes with padding"

# -----------------------------------------------------------------------------
# what models.py promises a student


def test_models_imports_nothing_of_this_repository():
    # nanoGPT's model.py: the lesson's networks stand alone; the loader stands on them, not under
    tree = ast.parse(open(os.path.join(ROOT, 'models.py')).read())
    ours = {n[:-3] if n.endswith('.py') else n for n in os.listdir(ROOT)
            if n.endswith('.py') or os.path.isdir(os.path.join(ROOT, n, ''))}
    assert {'data', 'harness', 'tools', 'contrastive', 'regress', 'evaluate'} <= ours
    imported = []
    for node in ast.walk(tree):  # anywhere in the file, a function-local import too
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"models.py: a relative import (line {node.lineno})"
            imported.append(node.module)
    assert imported and not {m.split('.')[0] for m in imported} & ours, imported


def tiny_distilbert():
    torch.manual_seed(0)
    d = dict(TINY, model_type='distilbert', vocab_size=100, max_position_embeddings=16)
    return models.build(d)


def test_a_part_frozen_before_the_regressor_stays_frozen():
    # issue 35: building the Regressor once unfroze what a student had frozen before it
    encoder = tiny_distilbert()
    encoder.blocks[0].requires_grad_(False)  # where regress.py says to freeze a part
    frozen = {id(p) for p in encoder.blocks[0].parameters()}
    model = models.Regressor(encoder, encoder.embed_dim, trainable=True).train()
    assert encoder.training  # a trainable encoder trains (dropout) with the head
    for n, p in model.named_parameters():
        trainable = id(p) not in frozen
        assert p.requires_grad == trainable, f"{n}: requires_grad {p.requires_grad}"
    ids, mask = padded_batch(100, [4, 9, 6], end=3, pad=0, start=2)
    params = [p for p in model.parameters() if p.requires_grad]  # regress.train_fold's optimizer's
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(params, lr=1e-3)
    model(ids, mask).sum().backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if id(p) in frozen:
            assert p.grad is None and torch.equal(p, before[n]), n
        else:  # the rest learns: every parameter has a gradient and moved
            assert p.grad is not None and p.grad.abs().max() > 0, n
            assert not torch.equal(p, before[n]), n


def test_a_frozen_regressor_freezes_its_whole_encoder():
    encoder = tiny_distilbert()
    model = models.Regressor(encoder, encoder.embed_dim, trainable=False).train()
    assert not encoder.training and model.head.training  # eq. 10: the encoder as it was published
    assert not any(p.requires_grad for p in encoder.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    ids, mask = padded_batch(100, [4, 9], end=3, pad=0, start=2)
    model(ids, mask).sum().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad.abs().max() > 0 for p in model.head.parameters())


def drawn_head(model, seed):
    """regress.new_head(model, seed) -> the head's state it loads, read as the model receives it:
    a model on the meta device holds no values, so they are caught on their way in"""
    got = {}

    def catch(module, state_dict, prefix, *rest):
        got.update({k[len(prefix):]: v.detach().clone() for k, v in state_dict.items()})
    hook = model.head.register_load_state_dict_pre_hook(catch)
    regress.new_head(model, seed)
    hook.remove()
    # (a head that is a new module, not loaded: read as it is)
    return got or {k: v.detach().clone() for k, v in model.head.state_dict().items()}


@pytest.mark.filterwarnings('ignore:for .* copying from a non-meta parameter')  # what meta is for
def test_the_head_is_drawn_on_the_cpu_whatever_the_device():
    # issue 41: a head drawn on the model's device came from that device's generator, so one seed
    # gave another head on a GPU. The meta device stands in for any device but the CPU
    seed = 1003
    torch.manual_seed(seed)
    expected = models.RegressionHead(16).state_dict()  # on the CPU
    cpu = models.Regressor(torch.nn.Identity(), 16, trainable=False)
    with torch.device('meta'):
        meta = models.Regressor(torch.nn.Identity(), 16, trainable=False)
    assert meta.head.fc.weight.is_meta
    heads = [drawn_head(cpu, seed), drawn_head(meta, seed), drawn_head(meta, seed)]
    for head in heads:
        assert head.keys() == expected.keys()
        for k, v in head.items():
            assert v.device.type == 'cpu' and torch.equal(v, expected[k]), (k, v.device)
    assert same_weights(cpu.head.state_dict(), expected)  # and it is the head the model has
    other = drawn_head(cpu, seed + 1)  # another fold's seed, another head
    assert not torch.equal(other['fc.weight'], expected['fc.weight'])

# -----------------------------------------------------------------------------
# parity with transformers on random weights


IMAGE = dict(TINY, image_size=32, patch_size=8)


@pytest.mark.parametrize('vision,eos', [(IMAGE, 99), (IMAGE, 2),  # 2: openai's legacy config
                                        (B32, 99)])
def test_clip_parity(tmp_path, vision, eos):
    torch.manual_seed(0)
    text = dict(TINY, vocab_size=100, max_position_embeddings=16, eos_token_id=eos, bos_token_id=98,
                pad_token_id=99)
    config = hf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)
    ref = hf.CLIPModel(config).eval()
    ours = load(hf_save(ref, tmp_path))
    assert isinstance(ours, models.CLIP) and not ours.training
    assert ours.image_size == vision['image_size'] and ours.image_family == 'clip'
    n, C = (vision['image_size'] // vision['patch_size']) ** 2, vision['hidden_size']
    assert ours.visual.cls.shape == (C,) and ours.visual.pos.shape == (n + 1, C)
    assert ours.visual.patch.bias is None
    px = torch.randn(3, 3, vision['image_size'], vision['image_size'])
    ids, mask = padded_batch(100, [5, 16, 9], end=99, pad=99, start=98)  # end-of-text: highest id
    with torch.no_grad():
        assert maxdiff(ours.visual(px), feats(ref.get_image_features(pixel_values=px))) <= 1e-4
        t = ours.text(ids, mask)
        assert maxdiff(t, feats(ref.get_text_features(input_ids=ids, attention_mask=mask))) <= 1e-4
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=px)
        img, txt, logit_scale = ours(px, ids, mask)  # both towers in one call, as contrastive.py
        li = logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()  # (B, B)
        assert maxdiff(li, out.logits_per_image) <= 1e-4
        assert maxdiff(li.t(), out.logits_per_text) <= 1e-4
        check_rows_alone(ours.text, ids, mask, t)


def test_a_clip_config_with_tower_types_loads(tmp_path):
    torch.manual_seed(0)
    text = dict(TINY, vocab_size=100, max_position_embeddings=16, eos_token_id=99, bos_token_id=98,
                pad_token_id=99)
    ref = hf.CLIPModel(hf.CLIPConfig(vision_config=dict(TINY, image_size=32, patch_size=8),
                                     text_config=text, projection_dim=24))
    ref.save_pretrained(tmp_path)
    assert tower_types(tmp_path) == ['clip_text_model', 'clip_vision_model']
    assert same_weights(load(tmp_path).state_dict(), load(hf_save(ref, tmp_path)).state_dict())


@pytest.mark.parametrize('cfg', [dict(TINY, image_size=32, patch_size=8), B32])
def test_vit_parity(tmp_path, cfg):
    torch.manual_seed(0)
    ref = hf.ViTModel(hf.ViTConfig(**cfg)).eval()
    ours = load(hf_save(ref, tmp_path))
    assert isinstance(ours, models.ViT) and ours.image_family == 'vit'
    assert ours.embed_dim == cfg['hidden_size']
    n, C = (cfg['image_size'] // cfg['patch_size']) ** 2, cfg['hidden_size']
    # HF's: (1, 1, C) and (1, n+1, C)
    assert ours.cls.shape == (C,) and ours.pos.shape == (n + 1, C) and ours.patch.bias is not None
    px = torch.randn(2, 3, cfg['image_size'], cfg['image_size'])
    with torch.no_grad():
        assert maxdiff(ours(px), ref(pixel_values=px).last_hidden_state[:, 0]) <= 1e-4


@pytest.mark.parametrize('kind', ['distilbert', 'bert'])
def test_text_encoder_parity(tmp_path, kind):
    torch.manual_seed(0)
    if kind == 'distilbert':
        config = hf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4)
        ref = hf.DistilBertModel(config)
    else:
        ref = hf.BertModel(hf.BertConfig(vocab_size=100, **TINY))
    ref.eval()
    folder = hf_save(ref, tmp_path)
    ours = load(folder)
    assert isinstance(ours, models.TextEncoder) and ours.pooling == 'cls'
    ids, mask = padded_batch(100, [4, 11, 7], end=3, pad=0, start=2)
    with torch.no_grad():
        out = ours(ids, mask)
        last = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert maxdiff(out, last[:, 0]) <= 1e-4
        check_rows_alone(ours, ids, mask, out)
        mean = load(folder, 'mean')  # --pooling mean
        assert mean.pooling == 'mean'
        m = mask.unsqueeze(-1).float()
        assert maxdiff(mean(ids, mask), (last * m).sum(1) / m.sum(1)) <= 1e-4
        check_rows_alone(mean, ids, mask, mean(ids, mask))


def test_write_folder_swaps_the_folder_in_whole(tmp_path):
    ours = demo.make_tiny('vit', tmp_path / 'a', None)
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'stale.bin').write_bytes(b'from an older model')
    for leftover in ('b.old', 'b.tmp'):  # half-removed folders of a process killed while it saved
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / 'model.safetensors').write_bytes(b'half')
    runs.write_folder(tmp_path / 'b', checkpoints.hf_files(ours))
    assert sorted(os.listdir(tmp_path)) == ['a', 'b']  # no b.tmp or b.old left behind
    # the older model is gone
    assert sorted(os.listdir(tmp_path / 'b')) == ['config.json', 'model.safetensors']
    assert same_weights(load(tmp_path / 'b').state_dict(), ours.state_dict())


def test_write_folder_after_a_save_killed_between_its_renames(tmp_path, monkeypatch):
    ours = demo.make_tiny('vit', tmp_path / 'a', None)
    os.replace(tmp_path / 'a', tmp_path / 'b.old')  # moved aside, the new one not yet in place
    (tmp_path / 'b.tmp').mkdir()
    (tmp_path / 'b.tmp' / 'config.json').write_bytes(b'{"half": ')
    real = runs.write_bytes

    def disk_full(path, data):  # the second file of the save fails, before its swap
        if str(path).endswith('model.safetensors'):
            raise UserError(f"{path}: No space left on device")
        real(path, data)
    monkeypatch.setattr(runs, 'write_bytes', disk_full)
    with pytest.raises(UserError, match='No space left'):
        runs.write_folder(tmp_path / 'b', checkpoints.hf_files(ours))
    # a save that fails before its swap leaves the model it found, where it was
    assert os.path.isfile(tmp_path / 'b' / 'model.safetensors')
    assert not os.path.exists(tmp_path / 'b.old')
    assert same_weights(load(tmp_path / 'b').state_dict(), ours.state_dict())
    monkeypatch.setattr(runs, 'write_bytes', real)
    with torch.no_grad():
        ours.pos.add_(1.0)  # another model, saved in its place
    runs.write_folder(tmp_path / 'b', checkpoints.hf_files(ours))
    assert sorted(os.listdir(tmp_path)) == ['b']
    assert same_weights(load(tmp_path / 'b').state_dict(), ours.state_dict())


def test_write_folder_removes_a_leftover_file(tmp_path):
    ours = demo.make_tiny('vit', tmp_path / 'a', None)
    (tmp_path / 'b.tmp').write_bytes(b'a file, not a folder')  # the old test's leftover
    runs.write_folder(tmp_path / 'b', checkpoints.hf_files(ours))
    assert sorted(os.listdir(tmp_path)) == ['a', 'b']


def test_round_trip_into_transformers(tmp_path):
    ours = demo.make_tiny('clip', tmp_path / 'a', CAPTIONS * 4)
    b = tmp_path / 'b'
    runs.write_folder(b, checkpoints.hf_files(ours, tokenizer_from=str(tmp_path / 'a')))
    assert sorted(os.listdir(b)) == ['config.json', 'model.safetensors', 'tokenizer.json']
    ref, info = hf.CLIPModel.from_pretrained(b, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    assert not info['mismatched_keys'], info
    tok = checkpoints.Tokenizer(str(b), ours.config.text_config.max_position_embeddings)
    ids, mask = tok(CAPTIONS)
    px = torch.randn(2, 3, ours.image_size, ours.image_size)
    with torch.no_grad():
        ref_text = feats(ref.get_text_features(input_ids=ids, attention_mask=mask))
        assert maxdiff(ours.text(ids, mask), ref_text) <= 1e-4
        assert maxdiff(ours.visual(px), feats(ref.get_image_features(pixel_values=px))) <= 1e-4
        assert maxdiff(ours.logit_scale, ref.logit_scale) == 0
        again = load(b)
        assert same_weights(again.state_dict(), ours.state_dict())
    # the same tokenizer.json in transformers' fast tokenizer gives the same ids
    fast = hf.PreTrainedTokenizerFast(tokenizer_file=str(b / 'tokenizer.json'),
                                      pad_token='<|endoftext|>')
    ref_ids = fast(CAPTIONS, padding=True, return_tensors='pt')
    assert torch.equal(ref_ids['input_ids'], ids) and torch.equal(ref_ids['attention_mask'], mask)


@pytest.mark.parametrize('kind,cls', [('vit', 'ViTModel'), ('distilbert', 'DistilBertModel'),
                                      ('bert', 'BertModel')])
def test_make_tiny_loads_in_transformers(tmp_path, kind, cls):
    ours = demo.make_tiny(kind, tmp_path, CAPTIONS * 4)
    assert not ours.training  # as data.load_encoder returns it
    kw = {} if kind == 'distilbert' else dict(add_pooling_layer=False)  # we keep no pooler
    ref, info = getattr(hf, cls).from_pretrained(tmp_path, output_loading_info=True, **kw)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    assert not info['mismatched_keys'], info
    assert same_weights(load(tmp_path).state_dict(), ours.state_dict())
    with torch.no_grad():
        if kind == 'vit':
            px = torch.randn(2, 3, ours.image_size, ours.image_size)
            assert maxdiff(ours(px), ref(pixel_values=px).last_hidden_state[:, 0]) <= 1e-4
        else:
            tok = checkpoints.Tokenizer(str(tmp_path), ours.config.max_position_embeddings)
            ids, mask = tok(CAPTIONS + [' '.join(CAPTIONS * 9)])
            assert ids[0, 0] == 2 and ids[0, int(mask[0].sum()) - 1] == 3  # [CLS] ... [SEP]
            # cut to max_position_embeddings, [SEP] kept
            assert ids.shape[1] == 64 and ids[-1, -1] == 3
            out = ref(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            assert maxdiff(ours(ids, mask), out) <= 1e-4


def test_dropout_in_training_only(tmp_path):
    # BERT-family checkpoints fine-tune with dropout 0.1 (config.json); eval mode is deterministic
    ref = hf.DistilBertModel(hf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2,
                                                 n_heads=4, dropout=0.2, attention_dropout=0.3))
    ours = load(hf_save(ref, tmp_path / 'a'))
    assert (ours.config.hidden_dropout_prob, ours.config.attention_probs_dropout_prob) == (0.2, 0.3)
    ids, mask = padded_batch(100, [5, 9], end=3, pad=0, start=2)
    with torch.no_grad():
        assert torch.equal(ours(ids, mask), ours(ids, mask))
        ours.train()
        assert maxdiff(ours(ids, mask), ours(ids, mask)) > 1e-3
    runs.write_folder(tmp_path / 'b', checkpoints.hf_files(ours))
    saved = hf.DistilBertConfig.from_pretrained(tmp_path / 'b')
    assert (saved.dropout, saved.attention_dropout) == (0.2, 0.3)


def test_make_tiny_cli(tmp_path, capsys):
    corpus = tmp_path / 'captions.txt'
    corpus.write_text('\n'.join(CAPTIONS * 4))
    r = subprocess.run([sys.executable, '-m', 'tools.demo', 'models', 'distilbert',
                        '--out', str(tmp_path / 'm'), '--corpus', str(corpus)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'm')) == ['config.json', 'model.safetensors',
                                                  'tokenizer.json']
    assert json.loads((tmp_path / 'm' / 'config.json').read_text())['model_type'] == 'distilbert'
    two = ['models', 'vit', 'bert', '--out', str(tmp_path / 'two'), '--corpus', str(corpus)]
    demo.main(two)
    assert sorted(os.listdir(tmp_path / 'two')) == ['bert', 'key.json', 'vit']  # OUT/<type> each
    assert 'a tiny bert model in' in capsys.readouterr().out
    assert isinstance(load(tmp_path / 'two' / 'bert'), models.TextEncoder)
    # another key: refused, naming what changed
    with pytest.raises(UserError, match=r"two holds a run of other inputs \(--seed: 0 then, 1 now\)"):
        demo.main(two + ['--seed', '1'])
    vit = demo.parse_args(['models', 'vit', '--out', str(tmp_path / 'v')])
    assert vit.corpus is None  # vit needs no tokenizer
    with pytest.raises(SystemExit):
        demo.parse_args(['models', 'vit', 'clip', '--out', str(tmp_path / 'x')])
    assert '--corpus is required for models vit clip' in capsys.readouterr().err

# -----------------------------------------------------------------------------
# real weights and vocabularies

SENTENCES = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
             "Memorable videos often show people, faces and unusual actions.", "ok"]


def test_minilm_real_weights(minilm_dir):
    ours, folder = data.load_encoder(minilm_dir)
    assert folder == minilm_dir and not ours.training
    assert ours.pooling == 'mean' and ours.embed_dim == 384  # from 1_Pooling/config.json
    ids, mask = checkpoints.Tokenizer(minilm_dir, ours.config.max_position_embeddings)(SENTENCES)
    fast = hf.AutoTokenizer.from_pretrained(minilm_dir)
    ref_tok = fast(SENTENCES, padding=True, return_tensors='pt')
    assert torch.equal(ids, ref_tok['input_ids']) and torch.equal(mask, ref_tok['attention_mask'])
    ref = hf.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        last = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        out = ours(ids, mask)
        assert maxdiff(out, (last * m).sum(1) / m.sum(1)) <= 1e-4
    sim = torch.nn.functional.cosine_similarity(out[0], out[1], dim=0)
    assert 0 < sim < 0.9  # real, different sentences: neither identical nor orthogonal


def bytes_to_unicode():
    """CLIP/GPT-2 byte -> printable unicode character table"""
    keep = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) \
        + list(range(ord('®'), ord('ÿ') + 1))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(c) for b, c in zip(keep + extra, keep + [256 + i for i in range(len(extra))])}


def clip_vocab(bpe_path):
    merges = gzip.open(bpe_path).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges] \
        + ['<|startoftext|>', '<|endoftext|>']
    return {t: i for i, t in enumerate(vocab)}, merges


CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_tokenizer_json(bpe_path, out_path):
    """build a CLIP tokenizer.json with the tokenizers library from the merges file"""
    vocab, merges = clip_vocab(bpe_path)
    tk = HFTokenizer(tm.BPE(vocab=vocab, merges=merges, end_of_word_suffix='</w>',
                            continuing_subword_prefix='', unk_token='<|endoftext|>'))
    tk.add_special_tokens(['<|startoftext|>', '<|endoftext|>'])
    tk.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    ends = [(t, vocab[t]) for t in ('<|startoftext|>', '<|endoftext|>')]
    tk.post_processor = processors.TemplateProcessing(single='<|startoftext|> $A <|endoftext|>',
                                                      special_tokens=ends)
    tk.save(str(out_path))


def reference_clip_encode(bpe_path, texts, max_length=77):
    """an independent pure-Python CLIP BPE (openai/CLIP's algorithm) on the same merges"""
    vocab, merges = clip_vocab(bpe_path)
    ranks, b2u = {m: i for i, m in enumerate(merges)}, bytes_to_unicode()
    pat = regex.compile(CLIP_PATTERN, regex.IGNORECASE)

    def bpe(word):
        parts = list(word[:-1]) + [word[-1] + '</w>']
        while len(parts) > 1:
            pairs = [(ranks.get(p, 1e9), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == 1e9:
                break
            a, b = merges[rank]
            out, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        return parts

    rows = []
    for text in texts:
        ids = [vocab[t] for w in pat.findall(' '.join(text.split()).lower())
               for t in bpe(''.join(b2u[b] for b in w.encode('utf-8')))]
        rows.append([vocab['<|startoftext|>']] + ids[:max_length - 2] + [vocab['<|endoftext|>']])
    return rows


def test_clip_tokenizer_real_vocab(tmp_path, clip_bpe_path):
    clip_tokenizer_json(clip_bpe_path, tmp_path / 'tokenizer.json')
    long = ' '.join(CAPTIONS * 3)  # > 77 tokens: truncated, end token kept
    texts = CAPTIONS + [long, "Ünïcödé café, naïve—résumé  with   spaces"]
    tokenizer = checkpoints.Tokenizer(str(tmp_path), 77)  # CLIP's max_position_embeddings
    ids, mask = tokenizer(texts)
    ref = reference_clip_encode(clip_bpe_path, texts)
    assert ids.shape == (len(texts), 77) and mask[-2].sum() == 77 and ids[-2, -1] == 49407
    for i, r in enumerate(ref):
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == r, f"caption {i}: {texts[i]!r}"
        assert (ids[i, n:] == 49407).all()  # padded with <|endoftext|>, like openai's HF tokenizer
    # transformers' CLIPTokenizer from vocab.json + merges.txt of the same file
    vocab, merges = clip_vocab(clip_bpe_path)
    (tmp_path / 'vocab.json').write_text(json.dumps(vocab))
    lines = ['#version: 0.2'] + [' '.join(m) for m in merges]
    (tmp_path / 'merges.txt').write_text('\n'.join(lines) + '\n')
    tok = hf.CLIPTokenizer(vocab=str(tmp_path / 'vocab.json'), merges=str(tmp_path / 'merges.txt'))
    ref = tok(texts[:-2], padding=True, return_tensors='pt')
    ids, mask = tokenizer(texts[:-2])
    assert torch.equal(ids, ref['input_ids']) and torch.equal(mask, ref['attention_mask'])

# -----------------------------------------------------------------------------
# loading paths and bad input


def fake_hub_cache(cache, repo_id, folder, absent=()):
    """huggingface_hub's cache layout: refs/main -> snapshots/<commit>/<files>,
    .no_exist/<commit>/<absent files>"""
    commit = '0' * 40
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    shutil.copytree(folder, repo / 'snapshots' / commit)
    for f in absent:
        (repo / '.no_exist' / commit / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / '.no_exist' / commit / f).touch()
    return str(repo / 'snapshots' / commit)


def test_hub_cache_first(tmp_path, monkeypatch):
    demo.make_tiny('bert', tmp_path / 'repo', CAPTIONS * 4)
    # the hub cache knows sentence-transformers' file to be missing
    snapshot = fake_hub_cache(tmp_path / 'cache', 'someone/tiny-bert', tmp_path / 'repo',
                              absent=['1_Pooling/config.json'])
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))

    def no_network(*a, **kw):
        raise AssertionError('a cached model must load without the network')
    monkeypatch.setattr(huggingface_hub.HfApi, 'repo_info', no_network)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    monkeypatch.setattr('socket.socket.connect', no_network)
    assert checkpoints.snapshot('someone/tiny-bert') == snapshot
    model, folder = data.load_encoder('someone/tiny-bert')
    assert isinstance(model, models.TextEncoder) and folder == snapshot
    assert checkpoints.Tokenizer(folder, 64)(['a man'])[0].shape[0] == 1


def test_hub_download_path(tmp_path, monkeypatch):
    demo.make_tiny('bert', tmp_path / 'repo', CAPTIONS * 4)
    asked, real = [], huggingface_hub.snapshot_download

    def fake_snapshot(repo_id, allow_patterns, local_files_only, **kw):  # the hub: a folder
        asked.append((repo_id, tuple(allow_patterns), local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo_id} is not in the cache")
        return str(tmp_path / 'repo')

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_snapshot)
    model, folder = data.load_encoder('someone/tiny-bert')
    assert isinstance(model, models.TextEncoder) and folder == str(tmp_path / 'repo')
    assert asked == [('someone/tiny-bert', checkpoints.FILES, True),  # the cache, then the hub
                     ('someone/tiny-bert', checkpoints.FILES, False)]
    assert checkpoints.Tokenizer(folder, 64)(['a man'])[0].shape[0] == 1
    os.remove(tmp_path / 'repo' / 'model.safetensors')
    with pytest.raises(UserError, match=r"repo/model.safetensors not found$"):
        data.load_encoder('someone/tiny-bert')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', real)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # not cached, offline
    with pytest.raises(UserError) as e:
        data.load_encoder('someone/other-bert')
    message = str(e.value)
    assert "hub repo 'someone/other-bert': not in the hub cache" in message
    assert 'empty-cache' in message
    assert 'HF_HUB_OFFLINE=1 forbids downloading' in message and '--checkpoint FOLDER' in message
    assert len(message.splitlines()) == 1


def test_hub_unreachable_fails_fast(tmp_path):
    # port 9 refuses connections at once; huggingface_hub's retries would take ~25 s
    code = """if True:
        import time, data
        from harness.runs import UserError
        t = time.perf_counter()
        try:
            data.load_encoder('someone/tiny-bert')
        except UserError as e:
            print(f'{time.perf_counter() - t:.1f}', e)"""
    env = dict(os.environ, HF_ENDPOINT='http://127.0.0.1:9', HF_HOME=str(tmp_path / 'hf'))
    for name in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_HUB_CACHE'):
        env.pop(name, None)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout, r.stderr
    seconds, message = r.stdout.split(' ', 1)
    assert float(seconds) < 10, r.stdout
    assert 'unreachable' in message and '--checkpoint FOLDER' in message, message
    assert 'HF_HUB_OFFLINE=1' in message, message
    assert str(tmp_path / 'hf') in message, message  # names the cache
    assert len(message.strip().splitlines()) == 1, message


def test_bad_input(tmp_path):
    d = tmp_path / 'm'
    demo.make_tiny('vit', d, [])
    assert isinstance(load(d), models.ViT)
    sd = load_file(d / 'model.safetensors')

    key = 'encoder.layer.0.attention.attention.query.weight'
    renamed = 'encoder.layer.0.attention.attention.qry.weight'
    save_file({(renamed if k == key else k): v for k, v in sd.items()}, d / 'model.safetensors')
    with pytest.raises(UserError) as e:
        load(d)
    message = str(e.value)
    assert str(d / 'model.safetensors') in message and f"1 missing keys: ['{key}']" in message
    assert f"1 unexpected keys: ['{renamed}']" in message

    save_file({k: (v[:, :16].contiguous() if k == key else v) for k, v in sd.items()},
              d / 'model.safetensors')
    with pytest.raises(UserError) as e:
        load(d)
    assert f"1 shape mismatches: ['{key}: expected (32, 32), found (32, 16)']" in str(e.value)
    save_file(sd, d / 'model.safetensors')

    os.remove(d / 'model.safetensors')
    with pytest.raises(UserError, match=r"m/model.safetensors not found$"):
        load(d)
    torch.save(sd, d / 'pytorch_model.bin')  # an older checkpoint: said what to do
    with pytest.raises(UserError, match=r"m/model.safetensors not found \(found pytorch_model.bin"):
        load(d)
    os.remove(d / 'config.json')
    with pytest.raises(UserError, match=r"m/config.json not found"):
        load(d)
    with pytest.raises(UserError, match='nowhere/x: no such folder'):
        load(tmp_path / 'nowhere' / 'x')


CLIP_CONFIG = dict(model_type='clip', vision_config={}, text_config={})
# config.json values models.py does not implement: each refused by read_config, naming the key
UNSUPPORTED = [
    (dict(model_type='gpt2'), "model_type='gpt2' is not supported"),
    (dict(hidden_size=32), "model_type missing"),
    (dict(model_type='vit', hidden_act='relu'), "hidden_act='relu' is not supported"),
    (dict(model_type='vit', qkv_bias=False), "qkv_bias=False is not supported"),
    (dict(model_type='bert', position_embedding_type='relative_key'),
     "position_embedding_type='relative_key' is not supported"),
    (dict(model_type='distilbert', sinusoidal_pos_embds=True),
     "sinusoidal_pos_embds=True is not supported"),
    (dict(model_type='distilbert', activation='relu'),
     "hidden_act='relu' is not supported"),  # named as BERT's key
    (dict(CLIP_CONFIG, vision_config=dict(hidden_act='relu')),
     "hidden_act='relu' is not supported"),
    (dict(CLIP_CONFIG, text_config_dict=dict(hidden_act='gelu_new')),  # old CLIP files' name
     "hidden_act='gelu_new' is not supported"),
]


@pytest.mark.parametrize('config,message', UNSUPPORTED)
def test_read_config_refuses_what_models_do_not_implement(tmp_path, config, message):
    # models.py trusts its config (Block looks an activation up); read_config is where a value it
    # does not implement is refused, in one line naming the file and the key
    (tmp_path / 'config.json').write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        checkpoints.read_config(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: {message}"), str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_read_config_refuses_an_unsupported_pooling_file(tmp_path):
    (tmp_path / '1_Pooling').mkdir()
    (tmp_path / 'config.json').write_text(json.dumps(dict(model_type='bert')))
    modes = dict(pooling_mode_cls_token=False, pooling_mode_mean_tokens=False,
                 pooling_mode_max_tokens=True)
    (tmp_path / '1_Pooling' / 'config.json').write_text(json.dumps(modes))
    with pytest.raises(UserError, match=r"1_Pooling/config.json: pooling \['pooling_mode_max_tokens'\] is not supported"):
        checkpoints.read_config(str(tmp_path))


def test_corrupt_files_are_named(tmp_path):
    d = tmp_path / 'm'
    demo.make_tiny('bert', d, CAPTIONS * 4)
    weights, config, tokenizer = (d / 'model.safetensors', d / 'config.json', d / 'tokenizer.json')
    pooling = d / '1_Pooling' / 'config.json'
    good = {p: p.read_bytes() for p in (weights, config, tokenizer)}
    lfs = b'version https://git-lfs.github.com/spec/v1\n'
    for broken in (good[weights][:len(good[weights]) // 2], b'', lfs):
        weights.write_bytes(broken)  # truncated download, empty file, a Git LFS pointer
        with pytest.raises(UserError, match=r'm/model.safetensors: truncated or corrupt .*export'):
            load(d)
    weights.write_bytes(good[weights])
    config.write_bytes(good[config][:20])
    with pytest.raises(UserError, match=r'm/config.json: not valid JSON'):
        load(d)
    config.write_bytes(b'[]')
    with pytest.raises(UserError, match=r'm/config.json: expected a JSON object'):
        load(d)
    config.write_bytes(good[config])
    pooling.parent.mkdir()
    pooling.write_bytes(b'{"pooling_mode_mean_tokens": tr')
    with pytest.raises(UserError, match=r'm/1_Pooling/config.json: not valid JSON'):
        load(d)
    pooling.write_bytes(b'{"pooling_mode_mean_tokens": true}')
    assert load(d).pooling == 'mean'
    tokenizer.write_bytes(good[tokenizer][:100])
    with pytest.raises(UserError, match=r'm/tokenizer.json: truncated or corrupt'):
        checkpoints.Tokenizer(str(d), 64)
    os.remove(tokenizer)
    with pytest.raises(UserError, match=r'm/tokenizer.json not found'):
        checkpoints.Tokenizer(str(d), 64)
    tokenizer.write_bytes(good[tokenizer])
    assert checkpoints.Tokenizer(str(d), 64)(['a man'])[0].shape[0] == 1


@pytest.mark.parametrize('kind', ['bert', 'distilbert'])
def test_task_model_prefix_and_skipped_heads(tmp_path, kind):
    # keys start with 'bert.' / 'distilbert.', plus masked-LM heads cls.* / vocab_*
    torch.manual_seed(0)
    if kind == 'bert':
        ref = hf.BertForMaskedLM(hf.BertConfig(vocab_size=100, **TINY)).eval()
    else:
        ref = hf.DistilBertForMaskedLM(hf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64,
                                                           n_layers=2, n_heads=4)).eval()
    folder = hf_save(ref, tmp_path)
    saved = load_file(os.path.join(folder, 'model.safetensors'))
    assert any(k.startswith(f'{kind}.') for k in saved)  # what this test is about: both are there
    assert any(k.startswith(('cls.', 'vocab_')) for k in saved)
    ours = load(folder)
    ids, mask = padded_batch(100, [6, 3], end=3, pad=0, start=2)
    with torch.no_grad():
        base = getattr(ref, kind)(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        assert maxdiff(ours(ids, mask), base) <= 1e-4


def test_encoder_for_and_head(tmp_path):
    clip = demo.make_tiny('clip', tmp_path, CAPTIONS * 4)
    vis, txt = models.encoder_for(clip, 'vision'), models.encoder_for(clip, 'text')
    assert (vis.modality, vis.image_family, vis.image_size) == ('vision', 'clip', 32)
    assert vis.embed_dim == 16
    assert (txt.modality, txt.embed_dim) == ('text', 16)
    # fine-tuning one leaves the other alone
    assert not set(map(id, vis.parameters())) & set(map(id, txt.parameters()))
    vit = demo.make_tiny('vit', tmp_path / 'v', [])
    assert models.encoder_for(vit, 'vision') is vit
    assert models.encoder_for(vit, 'text') is None  # runs.check_encoder refuses it, naming the flag
    assert [models.LABELS[m.config.model_type] for m in (clip, vis, txt)] == ['CLIP'] * 3
    # eq. 11 as the paper writes it: LN, then w, b
    head, ln = models.RegressionHead(16), torch.nn.LayerNorm(16)
    with torch.no_grad():
        for p in (head.fc.weight, head.fc.bias, head.ln.weight, head.ln.bias):
            p.normal_()
        ln.load_state_dict(head.ln.state_dict())
        z = 3 + 2 * torch.randn(5, 16)
        y = head(z)
        expected = torch.sigmoid(ln(z) @ head.fc.weight.t() + head.fc.bias).squeeze(-1)
    assert y.shape == (5,) and ((y > 0) & (y < 1)).all() and maxdiff(y, expected) <= 1e-6


def test_a_tower_is_not_exported_alone(tmp_path):
    clip = demo.make_tiny('clip', tmp_path, CAPTIONS * 4)
    with pytest.raises(UserError, match='pass the CLIP model'):
        checkpoints.hf_files(models.encoder_for(clip, 'vision'))


def test_labels(tmp_path, minilm_dir):
    kinds = ('vit', 'distilbert', 'bert')
    assert [models.LABELS[demo.make_tiny(k, tmp_path / k, CAPTIONS * 4).config.model_type]
            for k in kinds] == ['ViT', 'DistilBERT', 'BERT']
    minilm = load(minilm_dir)  # all-MiniLM-L6-v2 is a BertModel
    assert models.LABELS[minilm.config.model_type] == 'BERT'


def test_quick_gelu(tmp_path):
    # CLIP's activation: x * sigmoid(1.702 x), within 0.02 of exact gelu
    x = torch.linspace(-6, 6, 121)
    assert torch.equal(models.quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert maxdiff(models.quick_gelu(x), torch.nn.functional.gelu(x)) < 0.021
    assert models.Block(16, 2, 32, 1e-5, pre_norm=True, act='quick_gelu').act is models.quick_gelu
    assert models.Block(16, 2, 32, 1e-5, pre_norm=True, act='gelu').act is F.gelu
    clip = demo.make_tiny('clip', tmp_path / 'clip', CAPTIONS * 4)  # CLIP's default, both towers
    assert all(b.act is models.quick_gelu for b in [*clip.visual.blocks, *clip.text.blocks])
    config = json.loads((tmp_path / 'clip' / 'config.json').read_text())
    (tmp_path / 'clip' / 'config.json').write_text(json.dumps(dict(config, text_config=dict(
        config['text_config'], hidden_act='relu'))))
    with pytest.raises(UserError, match=r"clip/config.json: hidden_act='relu' is not supported"):
        load(tmp_path / 'clip')


def test_the_checkpoint_key_holds_every_file_the_loader_reads(tmp_path, minilm_dir, monkeypatch):
    # the principle, not a list of cases: each file load_encoder and Tokenizer open (through
    # Python's open, safetensors and tokenizers) is one of checkpoints.FILES, which runs.content
    # hashes; its content changes the key, a copy or a touch does not
    clip = str(tmp_path / 'clip')
    demo.make_tiny('clip', clip, CAPTIONS * 4)
    opened = []
    def recorded(real):
        return lambda path, *a, **k: opened.append(str(path)) or real(path, *a, **k)
    monkeypatch.setattr('builtins.open', recorded(open))
    monkeypatch.setattr(checkpoints, 'load_file', recorded(checkpoints.load_file))
    monkeypatch.setattr(checkpoints.HFTokenizer, 'from_file',
                        recorded(checkpoints.HFTokenizer.from_file))
    reads = {}
    for folder in (minilm_dir, clip):
        opened.clear()
        model, _ = data.load_encoder(folder)
        text = models.encoder_for(model, 'text')
        checkpoints.Tokenizer(folder, text.config.max_position_embeddings)
        reads[folder] = {os.path.relpath(p, folder) for p in opened}
        assert set(checkpoints.FILES[:3]) <= reads[folder] <= set(checkpoints.FILES), reads[folder]
    assert '1_Pooling/config.json' in reads[minilm_dir]  # MiniLM's mean pooling: read, so hashed
    monkeypatch.undo()

    folder = tmp_path / 'mini'
    shutil.copytree(minilm_dir, folder)
    key = runs.content(folder, checkpoints.FILES)
    assert set(key) == set(checkpoints.FILES) and None not in key.values()
    shutil.copytree(folder, tmp_path / 'copy')  # elsewhere: the same checkpoint
    os.utime(folder / 'config.json', ns=(10 ** 9, 10 ** 9))  # touched: the same checkpoint
    assert runs.content(tmp_path / 'copy', checkpoints.FILES) == key
    assert runs.content(folder, checkpoints.FILES) == key
    for name in checkpoints.FILES:
        path, good = folder / name, (folder / name).read_bytes()
        path.write_bytes(good + b' ')  # a byte more
        changed = runs.content(folder, checkpoints.FILES)
        assert changed[name] != key[name] and {k: v for k, v in changed.items() if k != name} == \
            {k: v for k, v in key.items() if k != name}, name
        path.write_bytes(good)
    os.remove(folder / '1_Pooling' / 'config.json')  # an optional file gone: another checkpoint
    assert runs.content(folder, checkpoints.FILES)['1_Pooling/config.json'] is None


def test_a_new_parameter_loads_from_a_checkpoint_without_it(tmp_path, monkeypatch):
    # SigLIP's learnable bias added to CLIP: refused by name, unless listed in new_parameters
    clip = str(tmp_path / 'clip')
    demo.make_tiny('clip', clip, CAPTIONS * 4)
    real_init = models.CLIP.__init__

    def with_bias(self, config, new=True):
        real_init(self, config)
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
        if new:
            self.new_parameters = ('logit_bias',)
    monkeypatch.setattr(models.CLIP, '__init__',
                        lambda self, config: with_bias(self, config, new=False))
    with pytest.raises(UserError, match=r"1 missing keys: \['logit_bias'\]$"):
        load(clip)
    monkeypatch.setattr(models.CLIP, '__init__', with_bias)
    model = load(clip)
    assert model.logit_bias.item() == -10.0  # its initial value
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)
        model.visual.pos.zero_()
    runs.write_folder(tmp_path / 'fclip', checkpoints.hf_files(model))  # saved under its own name
    again = load(tmp_path / 'fclip')
    assert again.logit_bias.item() == -3.0 and torch.equal(again.visual.pos, model.visual.pos)
    (tmp_path / 'fclip' / 'extra').mkdir()
    shutil.copy(tmp_path / 'fclip' / 'config.json', tmp_path / 'fclip' / 'extra')
    tensors = load_file(str(tmp_path / 'fclip' / 'model.safetensors'))
    save_file({k: v for k, v in tensors.items() if k != 'text_projection.weight'},
              str(tmp_path / 'fclip' / 'extra' / 'model.safetensors'))
    # any other key missing: named
    with pytest.raises(UserError, match=r"missing keys: \['text_projection.weight'\]$"):
        load(tmp_path / 'fclip' / 'extra')
