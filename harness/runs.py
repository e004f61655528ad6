"""
What keeps a run safe and is not the paper, each piece one line in a script; it computes no result,
so code() never follows a name here. UserError and script() for every __main__; keys (code:
docs/one-rule.md), caches (cached, fill), run folders (claim); files written whole, read with errors
naming them; the state dict with its RNG; the device and DDP; the checks made before any work.

    python -m pytest tests/test_runs.py -q
"""
import argparse
import ast
import csv
import errno
import fcntl
import functools
import glob
import hashlib
import inspect
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import timeit
from contextlib import contextmanager, suppress

import numpy as np
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# the machine's faults: a full disk or quota, a read-only mount, a missing permission
FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

class UserError(ValueError):
    """bad input or a fault of the machine: what the user can put right, printed in one line"""

def fault(e, needed=None):
    """an OSError of FAULTS -> a UserError naming the path, the reason, the space and what to do"""
    path, folder = e.filename or '?', os.path.dirname(os.path.abspath(e.filename or '.'))
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"{path}: {e.strerror}; choose a folder you can write (--out, --cache or "
                         f"FCLIP_CACHE), or ask for access there, then run the same command again")
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    space = f"{needed / 2 ** 20:.1f} MiB needed, " if needed else ''
    return UserError(f"{path}: {e.strerror} ({space}{shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB "
                     f"free); free some space or use another disk (--out, --cache or FCLIP_CACHE), then "
                     f"run the same command again: it goes on from where it stopped")

def script(main, name, interrupted):
    """main(); only bad input, faults (one line, exit 2) and Ctrl-C (exit 130) caught"""
    try:
        main()
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in FAULTS:
            raise
        print(f"{name}: error: {e if isinstance(e, UserError) else fault(e)}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; {interrupted}", file=sys.stderr)
        raise SystemExit(130)

# -----------------------------------------------------------------------------
# command-line values, each naming what it expected and what it found; --help
def number(low, high=math.inf, kind=float):
    """a kind (float or int) in [low, high)"""
    whole = 'whole ' if kind is int else ''
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {whole}number, found {text!r}") from None
        if not low <= x < high:
            bound = f">= {low}" + (f" and < {high}" if high < math.inf else '')
            raise argparse.ArgumentTypeError(f"expected a number {bound}, found {text}")
        return x
    parse.__name__ = f"{whole}number >= {low}"
    return parse

def count(minimum):
    return number(minimum, kind=int)

def lr_arg(text):  # a positive learning rate, or 'auto' for the range test
    with suppress(argparse.ArgumentTypeError):
        return text if text == 'auto' else number(1e-300)(text)
    raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', found {text!r}")

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """each default shown but where it says nothing (a required flag, a switch, None)"""
    def _get_help_string(self, action):
        silent = action.required or action.nargs == 0 or action.default is None
        return action.help if silent else super()._get_help_string(action)

def cache_dir(given=None):
    """the caches of every script, a key naming each file: --cache, else FCLIP_CACHE, else the
    user's cache folder (~/.cache/fclip-memorability); never the dataset's folder"""
    home = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return given or os.environ.get('FCLIP_CACHE') or os.path.join(home, 'fclip-memorability')

# -----------------------------------------------------------------------------
# keys: all an artifact comes from
def fingerprint(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

def file_hash(path):  # (hashlib.file_digest would need Python 3.11)
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            h.update(block)
    return h.hexdigest()[:16]

def content(folder, names):
    """name -> the hash of folder/name's content (None: absent), not its path or mtime"""
    paths = {n: os.path.join(folder, n) for n in names}
    return {n: file_hash(p) if os.path.isfile(p) else None for n, p in paths.items()}

def stamp(path):
    """a video in a key: its size and mtime in ns (None: missing), not its content: hashing 10,000
    clips reads gigabytes, while a file repaired or replaced gets a new mtime (as make relies on)"""
    s = os.stat(path) if path is not None and os.path.exists(path) else None
    return [s.st_size, s.st_mtime_ns] if s else None

def ours(module):
    """a module of this repository whose code can compute a result: not this file, not a library"""
    path = os.path.join(ROOT, *module.split('.')) + '.py'
    return os.path.isfile(path) and path != os.path.join(ROOT, 'harness', 'runs.py')

@functools.cache
def definitions(module):
    """a module of ours ('data', 'harness.train') -> its top-level names {name: [the statements that
    bind it]}, its imports {alias: (module, name; None for a module)} and its other statements"""
    tree = ast.parse(read_text(os.path.join(ROOT, *module.split('.')) + '.py'))
    defs, imports, effects = {}, {}, []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs.setdefault(node.name, []).append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for name in {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}:
                defs.setdefault(name, []).append(node)  # X = {...}; X['k'] = v: both
        elif isinstance(node, ast.Import):
            imports.update({a.asname or a.name: (a.name, None) for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:  # `from harness import runs` imports a module
                whole = f"{node.module}.{a.name}"
                imports[a.asname or a.name] = (whole, None) if ours(whole) else (node.module, a.name)
        elif node is not tree.body[0] and not (  # (the docstring, the __main__ block)
                isinstance(node, ast.If) and '__main__' in ast.dump(node.test)):
            effects.append(node)  # a global setting: torch.set_float32_matmul_precision('high')
    return defs, imports, effects

def code(*roots):
    """the code an artifact comes from: {'file.py:name': hash} of each root (a function or class
    of ours) and of every function, class or constant of ours it names, at any depth, with the
    other top-level statements of their files; docstrings, comments and layout left out"""
    def path(obj):  # also for a file run as __main__
        return os.path.relpath(os.path.abspath(inspect.getsourcefile(obj)), ROOT)[:-3]
    found, todo = {}, [(path(r).replace(os.sep, '.'), r.__qualname__.split('.')[0]) for r in roots]
    while todo:
        module, name = todo.pop()
        label = f"{module.replace('.', '/')}.py:{name}"
        if label in found or not ours(module):
            continue
        defs, imports, effects = definitions(module)
        if name not in defs and name in imports:  # imported from another module of ours
            todo.append(imports[name])
            continue
        nodes = effects if name == '<module>' else defs.get(name, [])
        dump = ''.join(ast.dump(strip_docstrings(n)) for n in nodes)
        found[label] = hashlib.sha256(dump.encode()).hexdigest()[:12]
        todo.append((module, '<module>'))
        for n in (x for node in nodes for x in ast.walk(node)):
            if isinstance(n, ast.Name) and n.id in defs:
                todo.append((module, n.id))
            elif isinstance(n, ast.Name) and n.id in imports:
                todo.append(imports[n.id])
            elif isinstance(n, ast.Attribute) and imports.get(ast.unparse(n.value), (0, 0))[1] is None:
                todo.append((imports[ast.unparse(n.value)][0], n.attr))  # data.resize_crop
    empty = hashlib.sha256(b'').hexdigest()[:12]
    return {k: v for k, v in sorted(found.items()) if v != empty}

def strip_docstrings(node):
    node = ast.parse(ast.unparse(node))  # a copy
    for n in ast.walk(node):
        body = getattr(n, 'body', None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            n.body = body[1:] or [ast.Pass()]
    return node

def changes(then, now, key=''):
    """what differs between two keys: a flag with its values then and now, an edited function..."""
    if isinstance(then, dict) and isinstance(now, dict):
        return [c for k in sorted(then.keys() | now.keys())
                for c in changes(then.get(k), now.get(k), f"{key} {k}".strip())]
    if then == now:
        return []
    if key.startswith('code '):
        return [f"{key[5:]} {'added' if then is None else 'gone' if now is None else 'edited'}"]
    short = [r if len(r) <= 40 else f"{r[:18]}...{r[-18:]}" for r in map(repr, (then, now))]
    return [f"{key}: {short[0]} then, {short[1]} now"]

def claim(out, key):
    """the run folder `out` for the inputs `key`: given to them when new, refused naming what
    changed when it holds a run of other inputs -> a finished run's results.json, or None"""
    path = os.path.join(out, 'key.json')
    require(not os.path.isfile(out), f"--out {out} is a file, expected a folder for the run's results")
    if not os.path.exists(path):
        if is_main():  # (the other ranks of a torchrun job may find rank 0 writing it)
            require(not set(os.listdir(out)) - {'.lock'} if os.path.isdir(out) else True,
                    f"{out} holds files of no run of this repository; choose another --out")
            write_json(path, key)
        return None
    then = read_json(path, expect=dict)
    require(then.get('script') == key['script'], f"{out} holds a run of {then.get('script')}, not "
            f"of {key['script']}; give another --out")
    diff = changes(then, json.loads(json.dumps(key)))
    require(not diff, f"{out} holds a run of other inputs ({'; '.join(diff[:4])}); give another "
            f"--out, or delete {out} to start over")
    done = os.path.join(out, 'results.json')
    return read_json(done, expect=dict) if os.path.exists(done) else None

@contextmanager
def hold(out):
    """the run folder `out`, held by this run (a torchrun job's rank 0): a second run is refused,
    naming the process; a folder made here and left empty (a run refused) is removed"""
    if os.environ.get('RANK', '0') != '0' or os.path.isfile(out):
        yield  # (a file as --out is refused by claim, naming the flag)
        return
    made = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, '.lock'), 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{out} is in use by another run (process {f.read().strip() or '?'}); "
                            f"wait for it to end or choose another --out") from None
        f.truncate(0)
        print(os.getpid(), end='', file=f, flush=True)
        try:
            yield
        finally:  # (the lock is released as the file closes: after its removal)
            os.remove(f.name)
            if made and not os.listdir(out):
                os.rmdir(out)

@contextmanager
def locked(path):
    """an exclusive lock on path + '.lock': one process fills a cache, the others wait, then read"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.lock', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released as the file closes
        yield

def cached(path, read, build, log=print):
    """read(path), after build(path) under the file's lock when the file is missing or read()
    rejects it (UserError: truncated, another shape). `path` names the key of all it comes from."""
    if os.path.exists(path):
        with suppress(UserError):  # looked at again under the lock: another process may rebuild it
            return read(path)
    with locked(path):
        if os.path.exists(path):
            try:
                return read(path)
            except UserError as e:
                log(f"warning: rebuilding an unreadable cache file: {e}")
        build(path)
        return read(path)

FILL_EVERY = 5.0  # seconds between fill()'s progress lines, each a point it resumes from

def fill(path, shape, dtype, rows, log, what, block=1):
    """builds the .npy `path` of `shape` and `dtype` block by block (of `what`): rows(i, j)
    -> (rows i..j, {name: note}), into a partial file a progress file names with the rows done, so
    a killed build resumes; `path` appears whole when complete, its notes in path.notes.json"""
    base = path.removesuffix('.npy')
    progress, array = base + '.progress.json', None
    if os.path.exists(progress):
        try:
            p = read_json(progress, expect=dict)
            partial = os.path.join(os.path.dirname(path), os.path.basename(p['partial']))
            array = np.lib.format.open_memmap(partial, mode='r+')
            done, notes = int(p['done']), dict(p['notes'])
            assert array.shape == tuple(shape) and array.dtype == dtype and done <= shape[0]
            log(f"resuming {partial}: {done}/{shape[0]} {what} done")
        except (UserError, OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            log(f"warning: cannot resume from {progress} ({type(e).__name__}); starting afresh")
            array = None
    if array is None:
        partial, done, notes = f"{base}.{os.urandom(4).hex()}.partial.npy", 0, {}
        array = np.lib.format.open_memmap(partial, mode='w+', dtype=dtype, shape=tuple(shape))
        reserve(partial)
    for stale in glob.glob(glob.escape(base) + '*.partial.npy'):  # killed with no progress file
        if os.path.basename(stale) != os.path.basename(partial):
            os.remove(stale)
    t0 = last = time.time()
    try:
        for i in range(done, shape[0], block):
            j = min(i + block, shape[0])
            array[i:j], new = rows(i, j)
            notes.update(new)
            if time.time() - last > FILL_EVERY or j == shape[0]:
                array.flush()  # the rows reach the disk before the progress file says they're done
                write_json(progress, dict(partial=os.path.basename(partial), done=j, notes=notes))
                rate = (j - done) / max(time.time() - t0, 1e-6)
                log(f"{what} {j}/{shape[0]} | {rate:.1f} {what}/s | eta {hms((shape[0] - j) / rate)}")
                last = time.time()
    except BaseException:
        if not os.path.exists(progress):  # nothing to resume from: no GBs of partial file left
            os.remove(partial)
        raise
    del array
    write_json(path + '.notes.json', notes)
    os.replace(partial, path)
    os.remove(progress)

def reserve(path):
    """the disk space of a memory-mapped file, taken now: a full disk met later kills (SIGBUS)"""
    with open(path, 'r+b') as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size := os.path.getsize(path))
        except (OSError, AttributeError) as e:  # (a filesystem or system without it: as it comes)
            if getattr(e, 'errno', None) in FAULTS:
                os.remove(path)
                raise fault(OSError(e.errno, os.strerror(e.errno), path), size) from None

def read_array(path):
    """a .npy that fill() wrote, memory-mapped, and its notes"""
    try:
        notes = read_json(path + '.notes.json', expect=dict)
        return np.lib.format.open_memmap(path, mode='r'), notes
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable cache file ({e})") from None

# -----------------------------------------------------------------------------
# files written whole, and read with errors that name them
os.umask(UMASK := os.umask(0o022))  # read once: os.umask can only be read by setting it

def write_bytes(path, data):
    """data appears at `path` in one rename once written whole; a fault of the machine is a
    UserError naming the path and the space needed, nothing partial left, nothing earlier touched"""
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; a written file gets the usual mode
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in FAULTS:
            raise fault(OSError(e.errno, e.strerror, str(path)), len(data)) from None
        raise

def write_json(path, obj):
    """strict JSON: a NaN or inf is an error, not a token other parsers reject"""
    write_bytes(path, json.dumps(obj, indent=1, allow_nan=False).encode())

def write_csv(path, header, rows):
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + [list(r) for r in rows])
    write_bytes(path, buf.getvalue().encode())

def write_folder(out, files):
    """files {name: bytes} written into OUT.tmp, then swapped in whole for `out` (a model)"""
    tmp, old = str(out).rstrip('/') + '.tmp', str(out).rstrip('/') + '.old'
    if os.path.isdir(old) and not os.path.exists(out):
        os.replace(old, out)
    for leftover in (tmp, old):  # of a save killed before its end
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            shutil.rmtree(leftover)
        elif os.path.lexists(leftover):
            os.remove(leftover)
    for name, data in files.items():
        write_bytes(os.path.join(tmp, name), data)
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)

def read_text(path, what='file'):
    """the text of a UTF-8 file (a byte-order mark is dropped); errors name the file"""
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except (FileNotFoundError, IsADirectoryError) as e:
        raise UserError(f"{path}: {what} not found" if isinstance(e, FileNotFoundError) else
                        f"{path}: expected a {what}, found a folder") from None
    try:
        return raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start})") from None

def read_json(path, expect=None, what='JSON file'):
    """parsed JSON; expect=list or dict checks the top level. Errors name the file and the line."""
    try:
        obj = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        f"is it truncated?") from None
    if expect is not None and not isinstance(obj, expect):
        raise UserError(f"{path}: expected a JSON {'list' if expect is list else 'object'} at the "
                        f"top level, found {type(obj).__name__}")
    return obj

def read_csv(path, required=()):
    """-> a dict per row; the header must hold `required`. Errors name the file and the row."""
    try:
        reader = csv.DictReader(io.StringIO(read_text(path, 'CSV file')))
        header = reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in required if c not in header]
    require(not missing, f"{path}: missing column(s) {missing}; the header has {header}")
    bad = next((i for i, row in enumerate(rows, 2) if None in row or None in row.values()), None)
    require(bad is None, f"{path}, line {bad}: expected {len(header)} fields {header}, found a row of "
            f"another length")
    return rows

def inside(root, relative):
    """root/relative resolved, or None when it leads outside root ('..', a link) or holds a NUL"""
    base = os.path.realpath(root)
    path = base if '\0' in str(relative) else os.path.realpath(os.path.join(base, relative))
    return path if os.path.commonpath([base, path]) == base and path != base else None

# -----------------------------------------------------------------------------
# one state dict, saved with the RNG
def save_state(path, state):
    """state (state_dicts, values) and the RNG, written whole by rank 0 (a full disk: one error)"""
    if is_main():
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None  # this device's
        np_state = np.random.get_state()
        rng = {'torch': torch.get_rng_state(), 'cuda': cuda, 'python': random.getstate(),
               'numpy': [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        buf = io.BytesIO()
        torch.save(dict(state, rng=rng), buf)
        write_bytes(path, buf.getvalue())

def read_state(path):
    """the dict save_state wrote, or None where there is none; an unreadable file is a UserError"""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated zip, a pickle of other types: torch raises many kinds
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to start "
                        f"that part afresh") from None

# an optimizer's own settings, compared before its state is loaded: load_state_dict would keep the
# saved ones (Adam's weight_decay=0 in an AdamW). lr is the schedule's; the others choose kernels
NOT_SETTINGS = ('params', 'lr', 'initial_lr', 'fused', 'foreach', 'capturable', 'differentiable')

def mismatches(then, now):
    """what keeps a state_dict from loading where the state_dict is now: keys, shapes, settings"""
    if then.keys() != now.keys():
        return [f"keys {sorted(then)} then, {sorted(now)} now"]
    wrong = [f"{k}: shape {tuple(then[k].shape)} then, {tuple(now[k].shape)} now" for k in now
             if torch.is_tensor(now[k]) and torch.is_tensor(then[k]) and then[k].shape != now[k].shape]
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
    """objects[name].load_state_dict(state[name]), then the RNG; a state that does not fit what the
    code builds now (another optimizer, size, scaler) is refused, never loaded in part"""
    for name, obj in objects.items():
        wrong = mismatches(state[name], obj.state_dict())
        require(not wrong, f"{path}: its {name} state does not fit the {name} the code builds now "
                f"({'; '.join(wrong[:3])}); start over in another --out")
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    rng = state['rng']
    torch.set_rng_state(rng['torch'])
    if rng['cuda'] is not None and torch.cuda.is_available():  # this process's device's state
        torch.cuda.set_rng_state(rng['cuda'])
    random.setstate(rng['python'])
    np.random.set_state((rng['numpy'][0], np.array(rng['numpy'][1], dtype=np.uint32), *rng['numpy'][2:]))

# -----------------------------------------------------------------------------
# the machine: device, precision, processes, progress
def start(device, dtype):
    """-> (rank, world size, torch device, dtype), the process group joined under torchrun. dtype
    None: bfloat16 on a GPU that has it, float16 on one without, float32 on a CPU"""
    if device == 'cuda' and not torch.cuda.is_available():
        build = (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else
                 "a CPU-only build: install one built for CUDA")
        raise UserError(f"--device cuda: torch {torch.__version__} ({build}) finds no GPU: "
                        f"torch.cuda.is_available() is False. Check nvidia-smi and that the driver "
                        f"supports the build's CUDA (README: an older driver), or run with --device cpu")
    cuda = device == 'cuda' or device == 'auto' and torch.cuda.is_available()
    if dtype is None:
        dtype = ('float32' if not cuda else 'bfloat16' if torch.cuda.is_bf16_supported(False)
                 else 'float16')
    require(cuda or dtype != 'float16', "--dtype float16 needs a CUDA device (autocast on a CPU "
            "supports bfloat16); use --dtype bfloat16 or float32")
    if not cuda and dtype == 'bfloat16':
        warn_slow_bfloat16()
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    where = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(where)
    if 'RANK' in os.environ:
        dist.init_process_group('nccl' if cuda else 'gloo', rank=rank, world_size=world)
    return rank, world, where, dtype

def session(run, args):
    """run(args) holding its run folder args.out (one run at a time), the process group left after"""
    try:
        with hold(args.out):
            return run(args)
    finally:
        stop()

def stop():
    """leaves the process group, after the others on a normal exit (gloo aborts otherwise)"""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:  # not while an exception unwinds: the others may never come
            dist.barrier()
        dist.destroy_process_group()

@functools.cache
def warn_slow_bfloat16():
    """once per process: where bfloat16 matmuls are much slower than float32 (AVX2 only: ~150x)"""
    x = torch.randn(256, 256)  # (the best of 4: the first call picks the kernel)
    bf16, fp32 = (min(timeit.repeat(lambda: y @ y, number=1, repeat=4)) for y in (x.bfloat16(), x))
    if bf16 / fp32 > 3 and is_main():
        print(f"warning: bfloat16 matmuls run {bf16 / fp32:.0f}x slower than float32 on this CPU "
              f"({torch.backends.cpu.get_cpu_capability()}, no native bfloat16); --dtype float32 is "
              f"faster here", file=sys.stderr)
    return bf16 / fp32

def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0

def log(*args):
    if is_main():
        print(*args, flush=True)

def hms(seconds):
    """H:MM:SS, the one format of every ETA ('?' when unknown)"""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"

class Progress:
    """a progress line every `every` seconds (rank 0): the caller's fields, items/s, the ETA of all
    `total` items; p.update(n, epoch=e, loss=loss) after n more items (a tensor read if printed)"""
    def __init__(self, total, unit='items', every=10.0):
        self.total, self.unit, self.every, self.done = total, unit, every, 0
        self.t0 = self.last = time.time()  # a first line after an interval: one batch's rate is wild

    def update(self, n, **fields):
        self.done += n
        now = time.time()
        if now - self.last < self.every or not is_main():
            return
        self.last, rate = now, self.done / max(now - self.t0, 1e-9)
        fields = {k: float(v) if torch.is_tensor(v) else v for k, v in fields.items()}  # the read
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        eta = (self.total - self.done) / rate if rate > 0 else math.inf
        print(" | ".join(parts + [f"{rate:.1f} {self.unit}/s", f"eta {hms(eta)}"]), flush=True)

# -----------------------------------------------------------------------------
# the checks a stage script makes before any work: a clear error now, not a failure hours later
def require(ok, message):
    if not ok:
        raise UserError(message)

def check_contrastive(args, memento, clip, world):
    require(args.batch_size % world == 0,
            f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    require(type(clip).__name__ == 'CLIP', f"{args.checkpoint}: expected a CLIP checkpoint "
            f"(config.json model_type 'clip'), found {type(clip).__name__}")
    require(memento.split('test'), f"{args.data}: no test videos; contrastive.py monitors the loss "
            f"on the test split (paper 4.1.1)")

def check_pairs(args, sizes):
    """sizes: {split: its videos that decode}; a batch holds one pair a video (paper 3.2)"""
    for name, n in sizes.items():
        require(args.batch_size <= n, f"--batch-size {args.batch_size} is larger than the {n} {name} "
                f"videos of {args.data} that decode: a batch holds one pair a video (paper 3.2)")

def check_regress(args, row, labelled, world, sizes):
    """regress.py's flags against the strategy's row and the data, before any model is loaded"""
    require(row.encoder(args.modality), f"strategy {args.strategy} ({row.name}) has no "
            f"{args.modality} encoder in regress.STRATEGIES")
    require('table4' not in map(str, args.batch_size or []) or args.batch_size == ['table4'],
            f"--batch-size takes whole numbers or 'table4' alone, found {args.batch_size}")
    require(not row.frozen or world == 1, f"strategy {args.strategy} is frozen: its head trains on "
            f"embeddings computed once, in seconds; run it without torchrun")
    require(len(labelled) >= 2 * args.folds, f"{args.data}: {len(labelled)} labelled videos (train + "
            f"val with a score), need at least {2 * args.folds} for {args.folds} folds")
    per_video = args.frames if args.modality == 'vision' else 5  # frames or captions of a video
    n_train = len(labelled) * (args.folds - 1) // args.folds * per_video  # about, a fold
    require(max(sizes) <= n_train, f"--batch-size {max(sizes)} is larger than the about {n_train} "
            f"training {args.modality} items of a fold ({len(labelled)} labelled videos of "
            f"{args.data}); give a smaller --batch-size")
    if row.encoder(args.modality) == 'fclip' and not args.checkpoint:
        run = os.path.dirname(os.path.normpath(args.fclip))  # contrastive.py's --out
        require(os.path.isdir(args.fclip), f"FCLIP folder {args.fclip} not found: strategy "
                f"{args.strategy} starts from what contrastive.py writes; run `python contrastive.py "
                f"--data {args.data}` first, or pass --fclip DIR")
        require(os.path.exists(f'{run}/results.json') or not os.path.exists(f'{run}/key.json'),
                f"{args.fclip} is the best epoch so far of an unfinished contrastive.py run ({run} "
                f"has no results.json): finish it with its command and --resume, or pass "
                f"--checkpoint {args.fclip} to use it as it is")

def check_encoder(args, encoder):
    require(encoder is not None, f"{args.checkpoint or args.fclip}: has no {args.modality} encoder")
    require(not args.pooling or hasattr(encoder, 'pooling'), f"--pooling {args.pooling}: "
            f"{type(encoder).__name__} has one pooling, its own; --pooling is for BERT-family text "
            f"encoders (DistilBERT, BERT)")

def flags(args, ignored):
    """every flag of a run but those `ignored` (each script says why they cannot change a result)"""
    return {'--' + k.replace('_', '-'): v for k, v in sorted(vars(args).items()) if k not in ignored}

def check_learned(fold, best, n_videos):
    """a fold whose validation SRCC never was a number has no model to keep"""
    require(best is not None, f"fold {fold}: the validation SRCC was nan at every epoch: " + (
        f"its validation set holds {n_videos} video(s), which have no rank correlation"
        if n_videos < 2 else "the model predicts one constant (try a lower --lr)"))

def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def check_finite(obj, where, what="try a lower --lr, or --dtype float32"):
    """obj unchanged; a UserError naming `where` and the key when a float in it is NaN or inf"""
    def walk(x, key):
        if isinstance(x, float) and not math.isfinite(x):
            raise UserError(f"{where}: {key or 'value'} is {x}: the run diverged; {what}")
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
        for k, v in items:
            walk(v, f"{key}.{k}" if key else str(k))
    walk(obj, '')
    return obj
