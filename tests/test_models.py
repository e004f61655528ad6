"""
models.py against the reference (transformers, test-only) on the same weights, plus real checkpoints and bad input.

    python -m pytest tests/test_models.py -x -q
"""
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
import regex
import torch
import torch.nn.functional as F
import transformers as hf
from safetensors.torch import load_file, save_file

import checkpoints
import demo
import models
import runs
from runs import UserError

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32)
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
    model.save_pretrained(path)
    return str(path)

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
# parity with transformers on random weights

@pytest.mark.parametrize('vision,eos', [(dict(TINY, image_size=32, patch_size=8), 99),
                                        (dict(TINY, image_size=32, patch_size=8), 2),  # openai's legacy config
                                        (B32, 99)])
def test_clip_parity(tmp_path, vision, eos):
    torch.manual_seed(0)
    text = dict(TINY, vocab_size=100, max_position_embeddings=16, eos_token_id=eos, bos_token_id=98, pad_token_id=99)
    ref = hf.CLIPModel(hf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)).eval()
    ours = checkpoints.from_pretrained(hf_save(ref, tmp_path))
    assert isinstance(ours, models.CLIP) and ours.image_size == vision['image_size'] and ours.image_family == 'clip'
    n, C = (vision['image_size'] // vision['patch_size']) ** 2, vision['hidden_size']
    assert ours.visual.cls.shape == (C,) and ours.visual.pos.shape == (n + 1, C) and ours.visual.patch.bias is None
    px = torch.randn(3, 3, vision['image_size'], vision['image_size'])
    ids, mask = padded_batch(100, [5, 16, 9], end=99, pad=99, start=98)  # end-of-text is the highest id, as in CLIP
    with torch.no_grad():
        assert maxdiff(ours.encode_image(px), feats(ref.get_image_features(pixel_values=px))) <= 1e-4
        t = ours.encode_text(ids, mask)
        assert maxdiff(t, feats(ref.get_text_features(input_ids=ids, attention_mask=mask))) <= 1e-4
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=px)
        img, txt, logit_scale = ours(px, ids, mask)  # both towers in one call, as contrastive.py trains them
        li = logit_scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()  # (B images, B captions)
        assert maxdiff(li, out.logits_per_image) <= 1e-4 and maxdiff(li.t(), out.logits_per_text) <= 1e-4
        check_rows_alone(ours.encode_text, ids, mask, t)

@pytest.mark.parametrize('cfg', [dict(TINY, image_size=32, patch_size=8), B32])
def test_vit_parity(tmp_path, cfg):
    torch.manual_seed(0)
    ref = hf.ViTModel(hf.ViTConfig(**cfg)).eval()
    ours = checkpoints.from_pretrained(hf_save(ref, tmp_path))
    assert isinstance(ours, models.ViT) and ours.image_family == 'vit' and ours.embed_dim == cfg['hidden_size']
    n, C = (cfg['image_size'] // cfg['patch_size']) ** 2, cfg['hidden_size']  # HF's: (1, 1, C), (1, n+1, C)
    assert ours.cls.shape == (C,) and ours.pos.shape == (n + 1, C) and ours.patch.bias is not None
    px = torch.randn(2, 3, cfg['image_size'], cfg['image_size'])
    with torch.no_grad():
        assert maxdiff(ours(px), ref(pixel_values=px).last_hidden_state[:, 0]) <= 1e-4

@pytest.mark.parametrize('kind', ['distilbert', 'bert'])
def test_text_encoder_parity(tmp_path, kind):
    torch.manual_seed(0)
    if kind == 'distilbert':
        ref = hf.DistilBertModel(hf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4))
    else:
        ref = hf.BertModel(hf.BertConfig(vocab_size=100, **TINY))
    ref.eval()
    ours = checkpoints.from_pretrained(hf_save(ref, tmp_path))
    assert isinstance(ours, models.TextEncoder) and ours.pooling == 'cls'
    ids, mask = padded_batch(100, [4, 11, 7], end=3, pad=0, start=2)
    with torch.no_grad():
        out = ours(ids, mask)
        last = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        assert maxdiff(out, last[:, 0]) <= 1e-4
        check_rows_alone(ours, ids, mask, out)
        ours.pooling = 'mean'
        m = mask.unsqueeze(-1).float()
        assert maxdiff(ours(ids, mask), (last * m).sum(1) / m.sum(1)) <= 1e-4

def test_save_pretrained_swaps_the_folder_in_whole(tmp_path):
    ours = demo.make_tiny('vit', tmp_path / 'a', None)
    (tmp_path / 'b').mkdir()
    (tmp_path / 'b' / 'stale.bin').write_bytes(b'from an older model')
    for leftover in ('b.old', 'b.tmp'):  # half-removed folders of a process killed while it saved
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / 'model.safetensors').write_bytes(b'half')
    checkpoints.save_pretrained(ours, tmp_path / 'b')
    assert sorted(os.listdir(tmp_path)) == ['a', 'b']  # no b.tmp or b.old left behind
    assert sorted(os.listdir(tmp_path / 'b')) == ['config.json', 'model.safetensors']  # the older model is gone
    again = checkpoints.from_pretrained(str(tmp_path / 'b'))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())

def test_save_pretrained_after_a_save_killed_between_its_renames(tmp_path):
    ours = demo.make_tiny('vit', tmp_path / 'a', None)
    os.replace(tmp_path / 'a', tmp_path / 'b.old')  # the model moved aside, the new one not yet in place
    (tmp_path / 'b.tmp').write_bytes(b'a file, not a folder')
    with pytest.raises(UserError):  # a save that fails before its swap leaves the model it found
        checkpoints.save_pretrained(ours, tmp_path / 'b', tokenizer_from=str(tmp_path / 'no-such-folder'))
    assert os.path.isfile(tmp_path / 'b' / 'model.safetensors') and not os.path.exists(tmp_path / 'b.old')
    checkpoints.save_pretrained(ours, tmp_path / 'b')
    assert sorted(os.listdir(tmp_path)) == ['b']
    again = checkpoints.from_pretrained(str(tmp_path / 'b'))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())

def test_round_trip_into_transformers(tmp_path):
    ours = demo.make_tiny('clip', tmp_path / 'a', CAPTIONS * 4)
    checkpoints.save_pretrained(ours, tmp_path / 'b', tokenizer_from=str(tmp_path / 'a'))
    ref, info = hf.CLIPModel.from_pretrained(tmp_path / 'b', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
    tok = checkpoints.load_tokenizer(str(tmp_path / 'b'))
    ids, mask = tok(CAPTIONS)
    px = torch.randn(2, 3, ours.image_size, ours.image_size)
    with torch.no_grad():
        assert maxdiff(ours.encode_text(ids, mask), feats(ref.get_text_features(input_ids=ids, attention_mask=mask))) <= 1e-4
        assert maxdiff(ours.encode_image(px), feats(ref.get_image_features(pixel_values=px))) <= 1e-4
        again = checkpoints.from_pretrained(str(tmp_path / 'b'))
        assert maxdiff(again.encode_image(px), ours.encode_image(px)) == 0
    # same tokenizer.json in transformers' fast tokenizer gives the same ids
    fast = hf.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / 'b' / 'tokenizer.json'), pad_token='<|endoftext|>')
    ref_ids = fast(CAPTIONS, padding=True, return_tensors='pt')
    assert torch.equal(ref_ids['input_ids'], ids) and torch.equal(ref_ids['attention_mask'], mask)

@pytest.mark.parametrize('kind,cls', [('vit', 'ViTModel'), ('distilbert', 'DistilBertModel'), ('bert', 'BertModel')])
def test_make_tiny_loads_in_transformers(tmp_path, kind, cls):
    ours = demo.make_tiny(kind, tmp_path, CAPTIONS * 4)
    kw = {} if kind == 'distilbert' else dict(add_pooling_layer=False)  # we keep no pooler
    ref, info = getattr(hf, cls).from_pretrained(tmp_path, output_loading_info=True, **kw)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
    with torch.no_grad():
        if kind == 'vit':
            px = torch.randn(2, 3, ours.image_size, ours.image_size)
            assert maxdiff(ours(px), ref(pixel_values=px).last_hidden_state[:, 0]) <= 1e-4
        else:
            ids, mask = checkpoints.load_tokenizer(str(tmp_path))(CAPTIONS + [' '.join(CAPTIONS * 9)])
            assert ids[0, 0] == 2 and ids[0, int(mask[0].sum()) - 1] == 3  # [CLS] ... [SEP]
            assert ids.shape[1] == 64 and ids[-1, -1] == 3  # truncated to max_position_embeddings, [SEP] kept
            assert maxdiff(ours(ids, mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]) <= 1e-4

def test_dropout_in_training_only(tmp_path):
    # BERT-family checkpoints fine-tune with dropout 0.1 (config.json); eval mode is deterministic
    ref = hf.DistilBertModel(hf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                                 dropout=0.2, attention_dropout=0.3))
    ours = checkpoints.from_pretrained(hf_save(ref, tmp_path / 'a'))
    assert (ours.config.hidden_dropout_prob, ours.config.attention_probs_dropout_prob) == (0.2, 0.3)
    ids, mask = padded_batch(100, [5, 9], end=3, pad=0, start=2)
    with torch.no_grad():
        assert torch.equal(ours(ids, mask), ours(ids, mask))
        ours.train()
        assert maxdiff(ours(ids, mask), ours(ids, mask)) > 1e-3
    checkpoints.save_pretrained(ours, tmp_path / 'b')
    saved = hf.DistilBertConfig.from_pretrained(tmp_path / 'b')
    assert (saved.dropout, saved.attention_dropout) == (0.2, 0.3)

def test_make_tiny_cli(tmp_path, capsys):
    corpus = tmp_path / 'captions.txt'
    corpus.write_text('\n'.join(CAPTIONS * 4))
    r = subprocess.run([sys.executable, demo.__file__, 'models', 'distilbert', '--out', str(tmp_path / 'm'),
                        '--corpus', str(corpus)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'm')) == ['config.json', 'model.safetensors', 'tokenizer.json']
    assert json.loads((tmp_path / 'm' / 'config.json').read_text())['model_type'] == 'distilbert'
    demo.main(['models', 'vit', 'bert', '--out', str(tmp_path / 'two'), '--corpus', str(corpus)])
    assert sorted(os.listdir(tmp_path / 'two')) == ['bert', 'vit']  # OUT/<type> for several types
    assert 'wrote a tiny bert model' in capsys.readouterr().out
    assert demo.parse_args(['models', 'vit', '--out', str(tmp_path / 'v')]).corpus is None  # vit needs no tokenizer
    with pytest.raises(SystemExit):
        demo.parse_args(['models', 'vit', 'clip', '--out', str(tmp_path / 'x')])
    assert '--corpus is required for models vit clip' in capsys.readouterr().err

# -----------------------------------------------------------------------------
# real weights and vocabularies

SENTENCES = ["A man is eating food.", "A man is riding a white horse on an enclosed ground.",
             "Memorable videos often show people, faces and unusual actions.", "ok"]

def test_minilm_real_weights(minilm_dir):
    ours = checkpoints.from_pretrained(minilm_dir)
    assert ours.pooling == 'mean' and ours.embed_dim == 384  # from 1_Pooling/config.json
    ids, mask = checkpoints.load_tokenizer(minilm_dir)(SENTENCES)
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
    keep = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(c) for b, c in zip(keep + extra, keep + [256 + i for i in range(len(extra))])}

def clip_vocab(bpe_path):
    merges = gzip.open(bpe_path).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges] + ['<|startoftext|>', '<|endoftext|>']
    return {t: i for i, t in enumerate(vocab)}, merges

CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

def clip_tokenizer_json(bpe_path, out_path):
    """build a CLIP tokenizer.json with the tokenizers library from the merges file"""
    from tokenizers import Regex, Tokenizer, decoders, models as tm, normalizers, pre_tokenizers, processors
    vocab, merges = clip_vocab(bpe_path)
    tk = Tokenizer(tm.BPE(vocab=vocab, merges=merges, end_of_word_suffix='</w>', continuing_subword_prefix='',
                          unk_token='<|endoftext|>'))
    tk.add_special_tokens(['<|startoftext|>', '<|endoftext|>'])
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior='removed', invert=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single='<|startoftext|> $A <|endoftext|>', special_tokens=[
        ('<|startoftext|>', vocab['<|startoftext|>']), ('<|endoftext|>', vocab['<|endoftext|>'])])
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
    json.dump({'model_type': 'clip', 'text_config': {}}, open(tmp_path / 'config.json', 'w'))
    long = ' '.join(CAPTIONS * 3)  # > 77 tokens: truncated, end token kept
    texts = CAPTIONS + [long, "Ünïcödé café, naïve—résumé  with   spaces"]
    ids, mask = checkpoints.load_tokenizer(str(tmp_path))(texts)
    ref = reference_clip_encode(clip_bpe_path, texts)
    assert ids.shape == (len(texts), 77) and mask[-2].sum() == 77 and ids[-2, -1] == 49407
    for i, r in enumerate(ref):
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == r, f"caption {i}: {texts[i]!r}"
        assert (ids[i, n:] == 49407).all()  # padded with <|endoftext|>, like openai's HF tokenizer
    # transformers' CLIPTokenizer from vocab.json + merges.txt of the same file
    vocab, merges = clip_vocab(clip_bpe_path)
    json.dump(vocab, open(tmp_path / 'vocab.json', 'w'))
    (tmp_path / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(' '.join(m) for m in merges) + '\n')
    tok = hf.CLIPTokenizer(vocab=str(tmp_path / 'vocab.json'), merges=str(tmp_path / 'merges.txt'))
    ref = tok(texts[:-2], padding=True, return_tensors='pt')
    ours_short, mask_short = checkpoints.load_tokenizer(str(tmp_path))(texts[:-2])
    assert torch.equal(ours_short, ref['input_ids']) and torch.equal(mask_short, ref['attention_mask'])

# -----------------------------------------------------------------------------
# loading paths and bad input

def fake_hub_cache(cache, repo_id, folder, absent=()):
    """huggingface_hub's cache layout: refs/main -> snapshots/<commit>/<files>, .no_exist/<commit>/<absent files>"""
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
    import huggingface_hub
    demo.make_tiny('bert', tmp_path / 'repo', CAPTIONS * 4)
    snapshot = fake_hub_cache(tmp_path / 'cache', 'someone/tiny-bert', tmp_path / 'repo',
                              absent=['1_Pooling/config.json'])  # sentence-transformers' file, known missing
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    def no_network(*a, **kw):
        raise AssertionError('a cached model must load without the network')
    monkeypatch.setattr(huggingface_hub.HfApi, 'repo_info', no_network)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    assert checkpoints.resolve('someone/tiny-bert') == snapshot
    assert isinstance(checkpoints.from_pretrained('someone/tiny-bert'), models.TextEncoder)
    assert checkpoints.load_tokenizer('someone/tiny-bert')(['a man'])[0].shape[0] == 1

def test_hub_download_path(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    demo.make_tiny('bert', tmp_path / 'repo', CAPTIONS * 4)
    asked, real = [], huggingface_hub.snapshot_download

    def fake_snapshot(repo_id, allow_patterns, local_files_only, **kw):  # the hub, served from a folder
        asked.append((repo_id, tuple(allow_patterns), local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo_id} is not in the cache")
        return str(tmp_path / 'repo')

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake_snapshot)
    model = checkpoints.from_pretrained('someone/tiny-bert')
    assert isinstance(model, models.TextEncoder)
    assert asked == [('someone/tiny-bert', checkpoints.FILES, True), ('someone/tiny-bert', checkpoints.FILES, False)]
    assert checkpoints.load_tokenizer('someone/tiny-bert')(['a man'])[0].shape[0] == 1
    os.remove(tmp_path / 'repo' / 'model.safetensors')
    with pytest.raises(UserError, match=r"'someone/tiny-bert' has no model.safetensors \(this loader reads "
                                        r"safetensors only\)"):
        checkpoints.from_pretrained('someone/tiny-bert')
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', real)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # not cached, offline: no download
    with pytest.raises(UserError, match=r"config.json, model.safetensors not found in the hub cache "
                                        r".*empty-cache and HF_HUB_OFFLINE=1 .*--checkpoint FOLDER"):
        checkpoints.from_pretrained('someone/other-bert')

def test_hub_unreachable_fails_fast(tmp_path):
    # port 9 refuses connections at once; without the reachability check huggingface_hub retries for ~25 s
    code = """if True:
        import time, checkpoints
        from runs import UserError
        t = time.perf_counter()
        try:
            checkpoints.from_pretrained('someone/tiny-bert')
        except UserError as e:
            print(f'{time.perf_counter() - t:.1f}', e)"""
    env = dict(os.environ, HF_ENDPOINT='http://127.0.0.1:9', HF_HOME=str(tmp_path / 'hf'))
    env.pop('HF_HUB_OFFLINE', None), env.pop('TRANSFORMERS_OFFLINE', None)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(models.__file__), timeout=120)
    assert r.returncode == 0 and r.stdout, r.stderr
    seconds, message = r.stdout.split(' ', 1)
    assert float(seconds) < 10, r.stdout
    assert 'unreachable' in message and '--checkpoint FOLDER' in message and 'HF_HUB_OFFLINE=1' in message, message
    assert str(tmp_path / 'hf') in message and len(message.strip().splitlines()) == 1, message  # names the cache

def test_bad_input(tmp_path):
    d = tmp_path / 'm'
    demo.make_tiny('vit', d, [])
    assert isinstance(checkpoints.from_pretrained(str(d)), models.ViT)
    sd = load_file(d / 'model.safetensors')

    key = 'encoder.layer.0.attention.attention.query.weight'
    save_file({('encoder.layer.0.attention.attention.qry.weight' if k == key else k): v for k, v in sd.items()}, d / 'model.safetensors')
    with pytest.raises(ValueError) as e:
        checkpoints.from_pretrained(str(d))
    assert str(d / 'model.safetensors') in str(e.value) and key in str(e.value) and 'qry' in str(e.value)

    save_file({k: (v[:, :16].contiguous() if k == key else v) for k, v in sd.items()}, d / 'model.safetensors')
    with pytest.raises(ValueError) as e:
        checkpoints.from_pretrained(str(d))
    assert f"{key}: expected (32, 32), found (32, 16)" in str(e.value)

    cfg = json.loads((d / 'config.json').read_text())
    (d / 'config.json').write_text(json.dumps(dict(cfg, hidden_act='relu')))
    with pytest.raises(ValueError, match=r"config.json: hidden_act='relu' is not supported"):
        checkpoints.from_pretrained(str(d))
    (d / 'config.json').write_text(json.dumps(dict(cfg, model_type='gpt2')))
    with pytest.raises(ValueError, match=r"config.json: unknown model_type 'gpt2'"):
        checkpoints.from_pretrained(str(d))

    os.remove(d / 'model.safetensors')
    with pytest.raises(UserError, match=r"m/model.safetensors not found"):
        checkpoints.from_pretrained(str(d))
    os.remove(d / 'config.json')
    with pytest.raises(UserError, match=r"m/config.json not found"):
        checkpoints.from_pretrained(str(d))
    with pytest.raises(UserError, match='no such folder'):
        checkpoints.from_pretrained(str(tmp_path / 'nowhere' / 'x'))

def test_corrupt_files_are_named(tmp_path):
    d = tmp_path / 'm'
    demo.make_tiny('bert', d, CAPTIONS * 4)
    weights, config, tokenizer = (d / f for f in ('model.safetensors', 'config.json', 'tokenizer.json'))
    good = {p: p.read_bytes() for p in (weights, config, tokenizer)}
    for broken in (good[weights][:len(good[weights]) // 2], b'', b'version https://git-lfs.github.com/spec/v1\n'):
        weights.write_bytes(broken)  # truncated download, empty file, a Git LFS pointer
        with pytest.raises(ValueError, match=r'm/model.safetensors: truncated or corrupt .*download or export it'):
            checkpoints.from_pretrained(str(d))
    weights.write_bytes(good[weights])
    config.write_bytes(good[config][:20])
    with pytest.raises(ValueError, match=r'm/config.json: not valid JSON'):
        checkpoints.from_pretrained(str(d))
    config.write_bytes(good[config])
    tokenizer.write_bytes(good[tokenizer][:100])
    with pytest.raises(ValueError, match=r'm/tokenizer.json: truncated or corrupt'):
        checkpoints.load_tokenizer(str(d))
    tokenizer.write_bytes(good[tokenizer])
    assert checkpoints.load_tokenizer(str(d))(['a man'])[0].shape[0] == 1

@pytest.mark.parametrize('kind', ['bert', 'distilbert'])
def test_task_model_prefix_and_skipped_heads(tmp_path, kind):
    torch.manual_seed(0)  # keys start with 'bert.' / 'distilbert.', plus masked-LM heads cls.* / vocab_*
    if kind == 'bert':
        ref = hf.BertForMaskedLM(hf.BertConfig(vocab_size=100, **TINY)).eval()
    else:
        ref = hf.DistilBertForMaskedLM(hf.DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=4)).eval()
    ours = checkpoints.from_pretrained(hf_save(ref, tmp_path))
    ids, mask = padded_batch(100, [6, 3], end=3, pad=0, start=2)
    with torch.no_grad():
        base = getattr(ref, kind)(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        assert maxdiff(ours(ids, mask), base) <= 1e-4

def test_encoder_for_and_head(tmp_path):
    clip = demo.make_tiny('clip', tmp_path, CAPTIONS * 4)
    vis, txt = models.encoder_for(clip, 'vision'), models.encoder_for(clip, 'text')
    assert (vis.modality, vis.image_family, vis.image_size, vis.embed_dim) == ('vision', 'clip', 32, 16)
    assert (txt.modality, txt.embed_dim) == ('text', 16)
    assert not set(map(id, vis.parameters())) & set(map(id, txt.parameters()))  # fine-tuning one leaves the other alone
    with pytest.raises(ValueError, match='pass the CLIP model'):
        checkpoints.save_pretrained(vis, tmp_path / 'tower')
    with pytest.raises(ValueError, match="ViT has no 'text' encoder"):
        models.encoder_for(demo.make_tiny('vit', tmp_path / 'v', []), 'text')
    assert [models.describe(m) for m in (clip, vis, txt)] == ['CLIP'] * 3
    head, ln = models.RegressionHead(16), torch.nn.LayerNorm(16)  # eq. 11 as the paper writes it: LN, then w, b
    with torch.no_grad():
        for p in (head.fc.weight, head.fc.bias, head.ln.weight, head.ln.bias):
            p.normal_()
        ln.load_state_dict(head.ln.state_dict())
        z = 3 + 2 * torch.randn(5, 16)
        y = head(z)
        expected = torch.sigmoid(ln(z) @ head.fc.weight.t() + head.fc.bias).squeeze(-1)
    assert y.shape == (5,) and ((y > 0) & (y < 1)).all() and maxdiff(y, expected) <= 1e-6

def test_describe(tmp_path, minilm_dir):
    assert [models.describe(demo.make_tiny(k, tmp_path / k, CAPTIONS * 4)) for k in ('vit', 'distilbert', 'bert')] \
        == ['ViT', 'DistilBERT', 'BERT']
    assert models.describe(checkpoints.from_pretrained(minilm_dir)) == 'BERT'  # all-MiniLM-L6-v2 is a BertModel

def test_quick_gelu():
    # CLIP's activation: x * sigmoid(1.702 x), within 0.02 of exact gelu
    x = torch.linspace(-6, 6, 121)
    assert torch.equal(models.quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert maxdiff(models.quick_gelu(x), torch.nn.functional.gelu(x)) < 0.021
    assert models.Block(16, 2, 32, 1e-5, pre_norm=True, act='quick_gelu').act is models.quick_gelu
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        models.Block(16, 2, 32, 1e-5, pre_norm=True, act='relu')

def test_the_identity_hashes_every_file_the_loader_reads(tmp_path, minilm_dir, monkeypatch):
    # the principle, not a list of cases: record each file from_pretrained and load_tokenizer open, through Python's
    # open, safetensors and tokenizers, and find each one's content hash in checkpoints.checkpoint_identity
    clip = str(tmp_path / 'clip')
    demo.make_tiny('clip', clip, CAPTIONS * 4)
    opened = []
    real_open, real_load, real_tokenizer = open, checkpoints.load_file, checkpoints.HFTokenizer.from_file
    monkeypatch.setattr('builtins.open', lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    monkeypatch.setattr(checkpoints, 'load_file', lambda path, *a: opened.append(str(path)) or real_load(path, *a))
    monkeypatch.setattr(checkpoints.HFTokenizer, 'from_file', lambda path: opened.append(str(path)) or real_tokenizer(path))
    reads = {}
    for folder in (minilm_dir, clip):
        opened.clear()
        checkpoints.from_pretrained(folder)
        checkpoints.load_tokenizer(folder)
        identity = checkpoints.checkpoint_identity(folder)
        reads[folder] = read = {os.path.relpath(p, folder) for p in opened}
        assert read >= {'config.json', 'model.safetensors', 'tokenizer.json'}, read
        assert read <= set(identity) and all(identity[f] == runs.file_hash(os.path.join(folder, f)) for f in read)
    assert '1_Pooling/config.json' in reads[minilm_dir]  # MiniLM's mean pooling: read, so hashed


def test_a_new_parameter_loads_from_a_checkpoint_without_it(tmp_path, monkeypatch):
    # SigLIP's learnable bias added to CLIP: refused by name, unless the model lists it in new_parameters
    clip = str(tmp_path / 'clip')
    demo.make_tiny('clip', clip, CAPTIONS * 4)
    real_init = models.CLIP.__init__

    def with_bias(self, config, new=True):
        real_init(self, config)
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
        if new:
            self.new_parameters = ('logit_bias',)
    monkeypatch.setattr(models.CLIP, '__init__', lambda self, config: with_bias(self, config, new=False))
    with pytest.raises(UserError, match=r"1 missing keys: \['logit_bias'\]$"):
        checkpoints.from_pretrained(clip)
    monkeypatch.setattr(models.CLIP, '__init__', with_bias)
    model = checkpoints.from_pretrained(clip)
    assert model.logit_bias.item() == -10.0  # its initial value
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)
        model.visual.pos.zero_()
    checkpoints.save_pretrained(model, tmp_path / 'fclip')  # saved under its own name, loaded back
    again = checkpoints.from_pretrained(str(tmp_path / 'fclip'))
    assert again.logit_bias.item() == -3.0 and torch.equal(again.visual.pos, model.visual.pos)
    (tmp_path / 'fclip' / 'extra').mkdir()
    shutil.copy(tmp_path / 'fclip' / 'config.json', tmp_path / 'fclip' / 'extra')
    tensors = load_file(str(tmp_path / 'fclip' / 'model.safetensors'))
    save_file({k: v for k, v in tensors.items() if k != 'text_projection.weight'},
              str(tmp_path / 'fclip' / 'extra' / 'model.safetensors'))
    with pytest.raises(UserError, match=r"missing keys: \['text_projection.weight'\]"):  # every other key: named
        checkpoints.from_pretrained(str(tmp_path / 'fclip' / 'extra'))
