"""
The harness: what keeps a run safe and is not the paper. The stage scripts call each piece in one
line, so that they read as the algorithm:
- UserError, the one error type for bad input, and script(), the `__main__` of every script: a
  UserError is printed in one line (exit 2), Ctrl-C says how to continue (exit 130), anything else
  keeps its traceback;
- the command-line value types (count, number, lr_arg) and the --help formatter (HelpFormatter);
- the input checks each stage script makes before any work (check_contrastive, check_regress);
- a run folder held by one run at a time (hold), its state saved and restored in one dict
  (save_state, load_state, restore), and its identity: the flags, the dataset's content, the
  content of every file the loader reads and the code that computes a feature (run_identity,
  check_identity);
- files written whole (atomic_write, write_json, write_csv), readers whose errors name the file, and
  the cache lock (locked, cached).

    python -m pytest tests/test_runs.py -q
"""
import argparse
import ast
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import random
import sys
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from strategies import FCLIP

HERE = os.path.dirname(os.path.abspath(__file__))


class UserError(ValueError):
    """Bad input: a file, a key or a flag the user can put right. Its message names the file, the
    key, the expected and the found value; the scripts print it in one line. A ValueError, so that
    code catching ValueError catches it too; the scripts catch this type only, so a bug keeps its
    traceback."""


def script(main, name, interrupted):
    """the `__main__` of every script: main() with bad input in one line (exit 2) and Ctrl-C
    answered by `interrupted`, a sentence saying how to continue (exit 130). Nothing else is caught.
    """
    try:
        main()
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; {interrupted}", file=sys.stderr)
        raise SystemExit(130)


# -----------------------------------------------------------------------------
# command-line value types: each names what it expected and what it found

def lr_arg(text):
    """a positive learning rate, or 'auto' for the range test"""
    if text == 'auto':
        return text
    try:
        lr = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', found {text!r}") from None
    if not 0 < lr < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive learning rate, found {text}")
    return lr


def count(minimum):
    """a whole number >= minimum"""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}, found {n}")
        return n
    parse.__name__ = f'whole number >= {minimum}'
    return parse


def number(low, high=math.inf):
    """a float in [low, high)"""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
        if not low <= x < high:
            bound = f">= {low}" + (f" and < {high}" if high < math.inf else '')
            raise argparse.ArgumentTypeError(f"expected a number {bound}, found {text}")
        return x
    parse.__name__ = f'number >= {low}'
    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """every script's --help: each default shown, except where it says nothing (a required flag,
    an on/off switch, a None whose meaning the help text gives); the description and epilog keep
    their line breaks"""
    def _get_help_string(self, action):
        switch = action.nargs == 0  # store_true, store_false
        if action.required or switch or action.default is None:
            return action.help
        return super()._get_help_string(action)


def hms(seconds):
    """H:MM:SS, the one format of every ETA the scripts print ('?' when unknown)"""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


# -----------------------------------------------------------------------------
# the input checks of the stage scripts: a clear error now rather than a failure hours later

def check_out(out, kind):
    """--out: a folder holding nothing of another script (a rerun rewrites its results.json)"""
    if os.path.isfile(out):
        raise UserError(f"--out {out} is a file, expected a folder for the run's results")
    found = os.path.join(out, 'results.json')
    other = 'checkpoint.pt' if kind == 'regress' else 'fold0'  # contrastive.py's, regress.py's
    if os.path.exists(os.path.join(out, other)) or (
            os.path.isfile(found) and read_json(found, expect=dict).get('kind') != kind):
        raise UserError(f"--out {out} holds a run of another script; choose another --out")


def check_contrastive(args, memento, clip, world):
    """contrastive.py's flags against the data, the checkpoint and the output folder"""
    check_out(args.out, 'contrastive')
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the "
                        f"{world} processes")
    if type(clip).__name__ != 'CLIP':  # by name: models.py imports this module
        raise UserError(f"{args.checkpoint}: expected a CLIP checkpoint "
                        f"(config.json model_type 'clip'), found {type(clip).__name__}")
    if not memento.split('test'):
        raise UserError(f"{args.data}: no test videos; contrastive.py monitors the loss on the "
                        f"test split (paper 4.1.1)")
    done = any(os.path.exists(os.path.join(args.out, f)) for f in ('checkpoint.pt', 'results.json'))
    if done and not args.resume:
        raise UserError(f"{args.out} holds a run already; --resume continues it, and to start over "
                        f"delete {args.out} or choose another --out")


def check_pairs(args, sets):
    """sets: name -> the Pairs of a split; a batch holds one pair per video (paper 3.2)"""
    for name, pairs in sets.items():
        if args.batch_size > len(pairs):
            raise UserError(f"--batch-size {args.batch_size} is larger than the {len(pairs)} "
                            f"{name} videos of {args.data} ({pairs.failed} more failed to "
                            f"decode): a batch holds one pair per video (paper 3.2)")


def check_regress(args, row, labelled, world):
    """regress.py's flags against the strategy's row, the data, the FCLIP folder and the output
    folder"""
    if row.encoder(args.modality) is None:
        raise UserError(f"strategy {args.strategy} ({row.name}) has no {args.modality} run: "
                        f"its {args.modality} encoder in strategies.STRATEGIES is None")
    if 'table4' in map(str, args.batch_size or []) and args.batch_size != ['table4']:
        raise UserError(f"--batch-size takes whole numbers or 'table4' alone, "
                        f"found {args.batch_size}")
    sizes = row.batch_sizes(args.modality, args.batch_size)
    # (embed_once's gather would also wait on a lock that another rank holds)
    if row.frozen and world > 1:
        raise UserError(f"strategy {args.strategy} is frozen: its head trains on embeddings "
                        f"computed once, in seconds; run it without torchrun (DDP serves the "
                        f"fine-tuned strategies)")
    if len(labelled) < 2 * args.folds:
        raise UserError(f"{args.data}: {len(labelled)} labelled videos (train + val with a "
                        f"score), need at least {2 * args.folds} for {args.folds} folds: a "
                        f"fold's SRCC ranks two videos or more")
    check_out(args.out, 'regress')
    # captions per video (data.N_CAPTIONS)
    per_video = args.frames if args.modality == 'vision' else 5
    n_train = len(labelled) * (args.folds - 1) // args.folds * per_video  # about, per fold
    if max(sizes) > n_train:
        given = {None: "paper Table 6's, the default", 'table4': "the largest of Table 4's"}.get(
            (args.batch_size or [None])[0], 'given')
        raise UserError(f"--batch-size {max(sizes)} ({given}) is larger than the about {n_train} "
                        f"training {args.modality} items of a fold ({len(labelled)} labelled "
                        f"videos of {args.data}); give a smaller --batch-size")
    if row.encoder(args.modality) == FCLIP and not args.checkpoint:
        if not os.path.isdir(args.fclip):
            raise UserError(f"FCLIP folder {args.fclip} not found: strategy {args.strategy} "
                            f"starts from the encoders that contrastive.py writes; run "
                            f"`python contrastive.py --data {args.data}` first or pass --fclip DIR")
        # contrastive.py's --out: results.json once finished
        run = os.path.dirname(os.path.normpath(args.fclip))
        if os.path.exists(os.path.join(run, 'checkpoint.pt')) \
                and not os.path.exists(os.path.join(run, 'results.json')):
            raise UserError(f"{args.fclip} is the best epoch so far of an unfinished "
                            f"contrastive.py run ({run} holds a checkpoint but no results.json): "
                            f"continue it with `python contrastive.py --out {run} --resume` and "
                            f"its other flags, or pass --checkpoint {args.fclip} "
                            f"to use it as it is")


def check_pooling(args, encoder):
    """--pooling chooses a BERT-family encoder's embedding; CLIP's text tower pools at its
    end-of-text token and an image tower at [CLS], as their architectures say"""
    if args.pooling and not hasattr(encoder, 'pooling'):
        raise UserError(f"--pooling {args.pooling}: {type(encoder).__name__} has one pooling, "
                        f"its own; --pooling is for BERT-family text encoders (DistilBERT, BERT)")


def check_learned(fold, best, n_videos):
    """a fold whose validation SRCC never was a number (EarlyStopping's best is None) has no model
    to keep"""
    if best is None:
        why = (f"its validation set holds {n_videos} video(s), which have no rank correlation"
               if n_videos < 2 else "the run diverged or predicts one constant (try a lower --lr)")
        raise UserError(f"fold {fold}: the validation SRCC was nan at every epoch: {why}")


# -----------------------------------------------------------------------------
# a run folder: one run at a time, one state dict, saved atomically with the RNG

@contextmanager
def hold(out):
    """holds the run folder `out` for this run: a second run on it is refused naming the process
    that holds it. The ranks of one torchrun job are one run: rank 0 holds the folder. A folder made
    here and left empty (a run refused before any work) is removed."""
    if os.environ.get('RANK', '0') != '0' or os.path.isfile(out):
        yield  # (a file as --out is refused by the input checks, naming the flag)
        return
    made = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, '.lock')
    with open(path, 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{out} is in use by another run (process {f.read().strip() or '?'}); "
                            f"wait for it to end or choose another --out") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            os.remove(path)
            fcntl.flock(f, fcntl.LOCK_UN)
            if made and not os.listdir(out):
                os.rmdir(out)


def rng_state():
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'python': random.getstate(),
            'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(rng):
    torch.set_rng_state(rng['torch'])
    if rng['cuda']:
        torch.cuda.set_rng_state_all(rng['cuda'])
    random.setstate(rng['python'])
    np.random.set_state((rng['numpy'][0], np.array(rng['numpy'][1], dtype=np.uint32),
                         *rng['numpy'][2:]))


def save_state(path, state):
    """state: a dict of state_dicts and plain values; the process's RNG state is added as 'rng'.
    Rank 0 writes."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = dict(state, rng=rng_state())
        atomic_write(path, lambda f: torch.save(state, f))


def read_state(path, hint="; delete it to start that part afresh"):
    """the dict save_state wrote; an unreadable file is a UserError naming it"""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of other types: torch raises many kinds
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}){hint}") from None


def load_state(path, identity, out):
    """the state saved at path, or None when there is none; refused, naming what changed, when it
    was saved from other inputs than this run's (out: the run's folder, which must never mix the
    results of two identities)"""
    if not os.path.exists(path):
        return None
    state = read_state(path)
    check_identity(state['identity'], identity, path,
                   f"give another --out, or delete {out} to start over")
    return state


# an optimizer's own hyper-parameters, compared before its state is loaded: load_state_dict would
# silently keep the saved ones (Adam's weight_decay=0 in an AdamW). lr is the schedule's; the others
# choose kernels only
NOT_SETTINGS = ('params', 'lr', 'initial_lr', 'fused', 'foreach', 'capturable', 'differentiable')


def state_mismatches(then, now):
    """what keeps a saved state_dict from loading into an object whose state_dict is now: other
    keys, a tensor of another shape, an optimizer's group of another size or other settings"""
    if then.keys() != now.keys():
        return [f"keys {sorted(then)} then, {sorted(now)} now"]
    wrong = [f"{k}: shape {tuple(then[k].shape)} then, {tuple(now[k].shape)} now" for k in now
             if torch.is_tensor(now[k]) and torch.is_tensor(then[k])
             and then[k].shape != now[k].shape]
    groups = (then.get('param_groups', []), now.get('param_groups', []))
    if len(groups[0]) != len(groups[1]):
        return wrong + [f"{len(groups[0])} parameter groups then, {len(groups[1])} now"]
    for a, b in zip(*groups):
        wrong += [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(a.keys() | b.keys())
                  if k not in NOT_SETTINGS and a.get(k) != b.get(k)]
        if len(a['params']) != len(b['params']):
            wrong.append(f"{len(a['params'])} parameters then, {len(b['params'])} now")
    return wrong


def restore(state, path, **objects):
    """save_state's counterpart: objects[name].load_state_dict(state[name]) for each, then the RNG
    state. A saved state that does not fit the object the code builds now (another optimizer or its
    settings, another size, a scheduler or scaler of another kind) is refused naming the checkpoint,
    never loaded in part"""
    for name, obj in objects.items():
        wrong = state_mismatches(state[name], obj.state_dict())
        if wrong:
            raise UserError(f"{path}: its {name} state does not fit the {name} the code builds now "
                            f"({'; '.join(wrong[:3])}); start over in another --out")
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    set_rng_state(state['rng'])


# -----------------------------------------------------------------------------
# what a run's results depend on: compared before any finished work is reused

def fingerprint(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def file_hash(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            h.update(block)
    return h.hexdigest()[:16]


def content_identity(folder, names):
    """name -> the hash of folder/name's content, for every file of `names` the loader reads (None:
    absent). Not the path or the mtime: the same files copied, moved or touched are the same
    checkpoint (600 MB hash in ~1 s)"""
    return {n: (file_hash(os.path.join(folder, n)) if os.path.isfile(os.path.join(folder, n))
                else None) for n in names}


def source_hash(path):
    """the code of a Python file, not its layout: the hash of its syntax tree without docstrings, so
    that a comment, a docstring or a reflowed line keeps a run's results and any change to what the
    code does discards them"""
    tree = ast.parse(read_text(path, 'Python file'))
    for node in ast.walk(tree):
        body = getattr(node, 'body', None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def code_identity(script):
    """file -> source_hash of the script (e.g. 'regress') and of every module of this repository it
    imports, at any depth, read from the import statements: whatever a student edits that the script
    runs is part of its identity"""
    found, todo = {}, [script]
    while todo:
        path = os.path.join(HERE, todo.pop() + '.py')
        if os.path.basename(path) in found or not os.path.isfile(path):
            continue  # a module from outside the repository (torch, numpy, ...)
        found[os.path.basename(path)] = source_hash(path)
        for node in ast.walk(ast.parse(read_text(path, 'Python file'))):
            if isinstance(node, ast.Import):
                todo += [alias.name.split('.')[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo.append(node.module.split('.')[0])
    return dict(sorted(found.items()))


def feature_code():
    """the code that turns a frame or a caption into a feature (networks, pooling, preprocessing,
    training.infer's batched pass): a frozen encoder's cached features are reused after an edit of
    anything else, such as regress.py's optimizer"""
    return {name: source_hash(os.path.join(HERE, name))
            for name in ('models.py', 'checkpoints.py', 'data.py', 'frames.py', 'training.py')}


def dataset_identity(videos):
    """the videos a run sees, their scores and captions: any change to these means new results"""
    return fingerprint([[v.video_id, v.split, v.score, v.captions] for v in videos])


def run_identity(args, ignored, videos, checkpoint, script):
    """everything a run's results come from: every flag but those named in `ignored` (each script
    says why they cannot change a result), the dataset's content, the content of the files the
    loader reads (checkpoint: content_identity's dict) and the code of the script and every module
    of this repository it imports"""
    flags = {'--' + k.replace('_', '-'): v for k, v in sorted(vars(args).items())
             if k not in ignored}
    return {'dataset content': dataset_identity(videos), 'checkpoint content': checkpoint,
            'code': code_identity(script), **flags}


def check_identity(found, now, path, hint):
    """raise when a saved run was made from other inputs than this one, naming what changed: a flag
    with its values then and now, a file of code, the part of a checkpoint or the dataset that
    changed"""
    def changes(key, a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return [c for k in sorted(a.keys() | b.keys())
                    for c in changes(f"{key} {k}", a.get(k), b.get(k))]
        if a == b:
            return []
        if key.startswith('code '):
            return [f"{key[5:]} {'added' if a is None else 'gone' if b is None else 'edited'}"]
        return [f"{key}: {a!r} then, {b!r} now"]
    detail = [c for k in sorted(now.keys() | found.keys())
              for c in changes(k, found.get(k), now.get(k))]
    if detail:
        raise UserError(f"{path} was written from other inputs ({'; '.join(detail)}); {hint}")


# -----------------------------------------------------------------------------
# files written whole, and read with errors that name them

UMASK = os.umask(0o022)  # read once: os.umask can only be read by setting it
os.umask(UMASK)


def atomic_write(path, write):
    """write(f) fills a binary file object; it appears at `path` in one rename once complete.
    The temporary file has a unique name beside `path`, so two processes writing the same file
    never share one; the last rename wins and both leave a whole file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
    try:
        # mkstemp makes 0600; a written file gets the usual permissions
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path, obj):
    """strict JSON (a NaN or inf is an error, not a token other parsers reject)"""
    write_text(path, json.dumps(obj, indent=1, allow_nan=False))


def write_csv(path, header, rows):
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + [list(r) for r in rows])
    write_text(path, buf.getvalue())


def read_text(path, what='file'):
    """the text of a UTF-8 file (a byte-order mark is dropped); errors name the file"""
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: expected a {what}, found a folder") from None
    try:
        return raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text "
                        f"(byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_json(path, expect=None, what='JSON file'):
    """parsed JSON; expect=list or dict checks the top level. Errors name the file and the line."""
    try:
        obj = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        f"is it truncated?") from None
    if expect is not None and not isinstance(obj, expect):
        raise UserError(f"{path}: expected a JSON {'list' if expect is list else 'object'} "
                        f"at the top level, found {type(obj).__name__}")
    return obj


def read_csv(path, required=()):
    """-> list of row dicts; the header must hold `required`. Errors name the file and the row."""
    text = read_text(path, 'CSV file')
    try:
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; the header has {header}")
    for i, row in enumerate(rows, 2):
        if None in row or any(v is None for v in row.values()):
            raise UserError(f"{path}, line {i}: expected {len(header)} fields {header}, "
                            f"found a row of another length")
    return rows


def check_finite(obj, where):
    """obj unchanged; raises a UserError naming `where` and the key when a float in it is NaN or inf
    """
    def walk(x, key):
        if isinstance(x, float) and not math.isfinite(x):
            raise UserError(f"{where}: {key or 'value'} is {x}; "
                            f"the run diverged (try a lower --lr)")
        items = (x.items() if isinstance(x, dict)
                 else enumerate(x) if isinstance(x, (list, tuple)) else ())
        for k, v in items:
            walk(v, f"{key}.{k}" if key else str(k))
    walk(obj, '')
    return obj


def inside(root, relative):
    """root/relative resolved, or None when it lands outside root (an absolute path, '..', a link
    leading out) or holds a NUL byte, which no file name has: a path read from a dataset file must
    never open anything outside the dataset"""
    if '\0' in str(relative):
        return None
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, relative))
    return path if os.path.commonpath([base, path]) == base and path != base else None


@contextmanager
def locked(path):
    """an exclusive lock on path + '.lock' (fcntl): one process fills a cache while the others wait,
    then find it complete"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.lock', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(path, read, build, log):
    """read(path), after build(path) when the file is missing or read() rejects it (UserError:
    truncated, wrong shape), which warns: a cache is a pure function of its inputs. build runs under
    the file's lock: a process asking meanwhile waits, then reads the file the first one built."""
    if os.path.exists(path):
        try:
            return read(path)
        except UserError:
            pass  # looked at again under the lock: another process may be rebuilding it
    with locked(path):
        if os.path.exists(path):
            try:
                return read(path)
            except UserError as e:
                log(f"warning: rebuilding an unreadable cache file: {e}")
        build(path)
        return read(path)
