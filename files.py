"""
Files written whole and read with errors that name them: the one atomic writer, the cache lock and
the cache built once under it, JSON/CSV readers, and the check that keeps dataset paths inside the
dataset folder. Every script writes through atomic_write, so a kill mid-write leaves the old file or
the new one, never half.

    python -m pytest tests/test_files.py -q
"""
import csv
import fcntl
import io
import json
import math
import os
import tempfile
from contextlib import contextmanager


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
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600; a written file gets the usual permissions
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    """strict JSON (a NaN or inf is an error, not a token other parsers reject)"""
    text = json.dumps(obj, indent=1, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))


def write_csv(path, header, rows):
    buf = io.StringIO()
    csv.writer(buf).writerows([header] + [list(r) for r in rows])
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def read_text(path, what='file'):
    """the text of a UTF-8 file (a byte-order mark is dropped); errors name the file"""
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: expected a {what}, found a folder") from None
    try:
        return raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def read_json(path, expect=None, what='JSON file'):
    """parsed JSON; expect=list or dict checks the top level. Errors name the file and the line."""
    try:
        obj = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         f"is it truncated?") from None
    if expect is not None and not isinstance(obj, expect):
        raise ValueError(f"{path}: expected a JSON {'list' if expect is list else 'object'} at the top level, "
                         f"found {type(obj).__name__}")
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
        raise ValueError(f"{path}: not a readable CSV ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the header has {header}")
    for i, row in enumerate(rows, 2):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}, line {i}: expected {len(header)} fields {header}, found a row of another length")
    return rows


def finite(obj, where):
    """obj unchanged; raises ValueError naming `where` and the key when a float in it is NaN or inf"""
    def walk(x, key):
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"{where}: {key or 'value'} is {x}; the run diverged (try a lower --lr)")
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()
        for k, v in items:
            walk(v, f"{key}.{k}" if key else str(k))
    walk(obj, '')
    return obj


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
    """read(path), after build(path) when the file is missing or read() rejects it (ValueError:
    truncated, wrong shape), which warns: a cache is a pure function of its inputs. build runs under
    the file's lock: a process asking meanwhile waits, then reads the file the first one built."""
    if os.path.exists(path):
        try:
            return read(path)
        except ValueError:
            pass  # looked at again under the lock: another process may be rebuilding it
    with locked(path):
        if os.path.exists(path):
            try:
                return read(path)
            except ValueError as e:
                log(f"warning: rebuilding an unreadable cache file: {e}")
        build(path)
        return read(path)


def inside(root, relative):
    """root/relative resolved, or None when it lands outside root (an absolute path, '..', a link
    leading out) or holds a NUL byte, which no file name has: a path read from a dataset file must
    never open anything outside the dataset"""
    if '\0' in str(relative):
        return None
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, relative))
    return path if os.path.commonpath([base, path]) == base and path != base else None
