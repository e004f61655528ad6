"""
harness/runs.py, what keeps a run safe: files written whole, readers whose errors name the file, the locks, paths
kept inside a folder, the machine's faults in one line, the keys (code, changes, claim, content), the state dict with
its RNG, the cache folder, one run a folder, and one error type for bad input.

    python -m pytest tests/test_runs.py -q
"""
import argparse
import errno
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch

import contrastive
import regress
from conftest import interrupted
from harness import runs
from harness.runs import UserError

NAMES = ('config.json', 'model.safetensors')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# files written whole

def test_write_bytes_keeps_the_old_file_when_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / 'a.json'
    runs.write_json(path, {'x': 1})

    def killed(fd):  # the data is written, not yet on the disk
        raise RuntimeError('killed mid-write')
    monkeypatch.setattr(os, 'fsync', killed)
    with pytest.raises(RuntimeError, match='killed mid-write'):
        runs.write_bytes(path, b'{"half')

    def ctrl_c(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, 'fsync', ctrl_c)  # Ctrl-C at that moment: the same
    with pytest.raises(KeyboardInterrupt):
        runs.write_json(path, {'x': 2})
    assert json.loads(path.read_text()) == {'x': 1}
    assert os.listdir(tmp_path) == ['a.json']  # no temporary file left behind


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        runs.write_json(tmp_path / 'r.json', {'srcc': math.nan})
    assert not (tmp_path / 'r.json').exists()
    with pytest.raises(UserError, match=r'fold 2: srcc_folds.1 is nan: the run diverged'):
        runs.check_finite({'srcc_folds': [0.5, math.nan]}, 'fold 2')
    assert runs.check_finite({'srcc_folds': [0.5, 0.25]}, 'fold 2') == {'srcc_folds': [0.5, 0.25]}


def test_written_files_get_the_usual_permissions(tmp_path):
    runs.write_json(tmp_path / 'a.json', [1])
    assert os.stat(tmp_path / 'a.json').st_mode & 0o777 == 0o666 & ~runs.UMASK  # not mkstemp's 0600


def test_write_folder_swaps_a_whole_folder_in(tmp_path):
    out = tmp_path / 'model'
    runs.write_folder(out, {'config.json': b'{"a": 1}', 'model.safetensors': b'1'})
    runs.write_folder(out, {'config.json': b'{"a": 2}'})  # the old folder goes whole, not file by file
    assert os.listdir(out) == ['config.json'] and (out / 'config.json').read_bytes() == b'{"a": 2}'
    os.rename(out, tmp_path / 'model.old')  # a save killed between its two renames
    runs.write_folder(out, {'config.json': b'{"a": 3}'})
    assert os.listdir(tmp_path) == ['model'] and (out / 'config.json').read_bytes() == b'{"a": 3}'


def _append_locked(path, n):
    for _ in range(n):
        with runs.locked(path):
            value = int(open(path).read()) if os.path.exists(path) else 0
            runs.write_bytes(path, str(value + 1).encode())


def test_lock_serialises_read_modify_write(tmp_path):
    path = str(tmp_path / 'counter')
    procs = [mp.get_context('fork').Process(target=_append_locked, args=(path, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert open(path).read() == '150'  # without the lock, increments are lost


# -----------------------------------------------------------------------------
# readers whose errors name the file

@pytest.mark.parametrize('content, message', [
    (b'\xff\xfe[1, 2]', r'not UTF-8 text \(byte 0xff at offset 0\)'),
    (b'[{"a": 1', r'not valid JSON .*line 1.*truncated'),
    (b'"oops"', r'expected a JSON list at the top level, found str'),
])
def test_read_json_names_the_file(tmp_path, content, message):
    path = tmp_path / 'memento_train_data.json'
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        runs.read_json(path, expect=list)
    assert str(path) in str(e.value)


def test_read_csv_accepts_a_byte_order_mark_and_names_bad_rows(tmp_path):
    path = tmp_path / 's.csv'
    path.write_bytes('\ufeffvideo_id,score\n1,0.5\n'.encode())
    assert runs.read_csv(path, required=['video_id']) == [{'video_id': '1', 'score': '0.5'}]
    path.write_text('video_id,score\n1,0.5\n2\n')
    with pytest.raises(UserError, match=r's.csv, line 3: expected 2 fields'):
        runs.read_csv(path)
    path.write_text('id,score\n1,0.5\n')
    with pytest.raises(UserError, match=r"missing column\(s\) \['video_id'\]"):
        runs.read_csv(path, required=['video_id'])


def test_inside(tmp_path):
    (tmp_path / 'videos').mkdir()
    (tmp_path / 'videos' / 'a.mp4').write_bytes(b'')
    os.symlink('/etc/passwd', tmp_path / 'videos' / 'link.mp4')
    assert runs.inside(tmp_path, 'videos/a.mp4') == os.path.realpath(tmp_path / 'videos' / 'a.mp4')
    for bad in ('../x.mp4', '/etc/passwd', 'videos/../../x.mp4', 'videos/link.mp4', '.', 'videos/a\0.mp4'):
        assert runs.inside(tmp_path, bad) is None, bad


# -----------------------------------------------------------------------------
# the machine's faults (issue 39): one line naming the path, the reason and what to do; nothing partial

FREE = 3 * 2 ** 19  # 1.5 MiB, what the stand-in disk has left


class FullDisk:
    """a file object on a disk that fills up halfway through the write: part of the data lands, then ENOSPC"""
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def little_space(monkeypatch):
    """shutil.disk_usage says FREE bytes are left, whatever the folder"""
    usage = namedtuple('usage', 'total used free')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(10 * FREE, 9 * FREE, FREE))


def full_disk(monkeypatch):
    """every file os.fdopen opens meets a full disk"""
    little_space(monkeypatch)
    fdopen = os.fdopen
    monkeypatch.setattr(os, 'fdopen', lambda fd, *a, **kw: FullDisk(fdopen(fd, *a, **kw)))


def test_write_bytes_on_a_full_disk_names_the_path_and_the_space(tmp_path, monkeypatch):
    path = tmp_path / 'run' / 'results.json'
    runs.write_json(path, {'x': 1})
    full_disk(monkeypatch)
    with pytest.raises(UserError) as e:
        runs.write_bytes(path, bytes(3 * 2 ** 20))
    assert str(e.value).startswith(f"{path}: No space left on device (3.0 MiB needed, 1.5 MiB free); free some "
                                   f"space or use another disk (--out, --cache or FCLIP_CACHE), then run the same "
                                   f"command again"), e.value
    assert '\n' not in str(e.value)
    assert json.loads(path.read_text()) == {'x': 1} and os.listdir(path.parent) == ['results.json']


@pytest.mark.parametrize('code, reason', [(errno.EROFS, 'Read-only file system'), (errno.EACCES, 'Permission denied'),
                                          (errno.EDQUOT, 'Disk quota exceeded')])
def test_write_bytes_in_a_folder_it_cannot_write(tmp_path, monkeypatch, code, reason):
    path = tmp_path / 'key.json'
    runs.write_json(path, {'x': 1})

    def mkstemp(**kw):
        raise OSError(code, os.strerror(code), kw['dir'])
    monkeypatch.setattr(runs.tempfile, 'mkstemp', mkstemp)
    with pytest.raises(UserError) as e:
        runs.write_json(path, {'x': 2})
    assert str(e.value).startswith(f"{path}: {reason}"), e.value
    assert ('choose a folder you can write' in str(e.value)) == (code != errno.EDQUOT), e.value
    assert json.loads(path.read_text()) == {'x': 1} and os.listdir(tmp_path) == ['key.json']


def test_write_bytes_in_a_real_read_only_folder(tmp_path):
    folder = tmp_path / 'results'
    runs.write_json(folder / 'key.json', {'x': 1})
    folder.chmod(0o555)
    try:
        try:  # root (os.geteuid() == 0, with its CAP_DAC_OVERRIDE) writes into a folder whatever its permissions
            (folder / 'probe').touch()
            os.remove(folder / 'probe')
            pytest.skip(f"user {os.geteuid()} writes into a read-only folder")
        except PermissionError:
            pass
        with pytest.raises(UserError, match=rf"^{folder / 'key.json'}: Permission denied; choose a folder you can "
                                            rf"write \(--out, --cache or FCLIP_CACHE\)"):
            runs.write_json(folder / 'key.json', {'x': 2})
        assert os.listdir(folder) == ['key.json'] and json.loads((folder / 'key.json').read_text()) == {'x': 1}
    finally:
        folder.chmod(0o755)


def test_fill_on_a_full_disk_says_the_size_and_leaves_nothing(tmp_path, monkeypatch):
    def fallocate(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'posix_fallocate', fallocate)
    little_space(monkeypatch)
    built = []
    with pytest.raises(UserError) as e:  # 1000 x 1024 float32: 4000 KiB and a 128-byte header
        runs.fill(str(tmp_path / 'features.npy'), (1000, 1024), np.float32, lambda i, j: built.append(i) or (0, {}),
                  print, 'features', block=100)
    assert str(e.value).startswith(str(tmp_path / 'features.')), e.value  # the file it was making, and the size
    assert '.partial.npy: No space left on device (3.9 MiB needed, 1.5 MiB free); free some' in str(e.value), e.value
    assert os.listdir(tmp_path) == [] and built == []  # no partial file, and no row computed for nothing


def test_save_state_on_a_full_disk_is_one_user_error(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pt'
    runs.save_state(path, {'w': torch.ones(3)})
    full_disk(monkeypatch)
    with pytest.raises(UserError, match=rf"^{path}: No space left on device \(\d+\.\d MiB needed, 1\.5 MiB free\)"):
        runs.save_state(path, {'w': torch.zeros(2 ** 20)})  # 4 MiB: torch's own writer would raise RuntimeError
    monkeypatch.undo()
    assert torch.equal(runs.read_state(path)['w'], torch.ones(3)) and os.listdir(tmp_path) == ['checkpoint.pt']


def test_script_turns_a_fault_of_the_machine_into_one_line(tmp_path, monkeypatch, capsys):
    little_space(monkeypatch)

    def raising(e):
        def main():
            raise e
        return main
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / 'frames.npy'))
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / 'out'))
    for e, message in [(full, f"{tmp_path / 'frames.npy'}: No space left on device (1.5 MiB free); free some"),
                       (denied, f"{tmp_path / 'out'}: Permission denied; choose a folder you can write")]:
        with pytest.raises(SystemExit) as stop:
            runs.script(raising(e), 'regress.py', 'the same command continues')
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count('\n') == 1 and err.startswith(f"regress.py: error: {message}"), err
    # any other error keeps its traceback: a missing file the code should have checked, a student's bug
    for e in (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), 'x.npy'), ValueError('shapes (4) (3)')):
        with pytest.raises(type(e)) as raised:
            runs.script(raising(e), 'regress.py', 'the same command continues')
        assert raised.value is e and capsys.readouterr().err == ''


# -----------------------------------------------------------------------------
# keys: code() on a small repository of its own

STAGE = '''"""the stage"""
import torch
import helper
from losses import mse
from pkg import mod
from harness import runs

SCALE = 2.0
torch.manual_seed(0)


def train(x):
    runs.log('training')
    return mse(helper.g(x) * SCALE, mod.TARGET)


def figure(x):
    return helper.plot(x)


if __name__ == '__main__':
    train(1)
'''
# the same code, documented, commented and reflowed
STAGE_DOCUMENTED = '''"""the stage, documented at length"""
import torch
import helper
from losses import mse
from pkg import mod
from harness import runs

SCALE = 2.0  # the paper's
torch.manual_seed(0)


def train(x):
    """the loss of x"""
    runs.log('training')
    # why: the target is the module's
    return mse(helper.g(x)
               * SCALE,
               mod.TARGET)


def figure(x):
    return helper.plot(x)


if __name__ == '__main__':
    train(1)
'''
FILES = {
    'stage.py': STAGE,
    'helper.py': 'import deep\n\n\ndef g(x):\n    return deep.h(x) + 1\n\n\ndef plot(x):\n    return x\n',
    'deep.py': 'def h(x):\n    return 2 * x\n\n\ndef unused():\n    return 0\n',
    'losses.py': 'def mse(a, b):\n    return (a - b) ** 2\n',
    'pkg/__init__.py': '',
    'pkg/mod.py': 'TARGET = 3.0\n',
    'harness/__init__.py': '',
    'harness/runs.py': 'import deep\n\n\ndef log(*args):\n    return deep.unused()\n',
}
REACHED = ['deep.py:h', 'helper.py:g', 'losses.py:mse', 'pkg/mod.py:TARGET', 'stage.py:<module>', 'stage.py:SCALE',
           'stage.py:train']


@pytest.fixture
def repository(tmp_path, monkeypatch):
    """FILES in tmp_path, the repository code() reads; its harness/runs.py stands for this one"""
    for name, text in FILES.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(runs, 'ROOT', str(tmp_path))
    runs.definitions.cache_clear()
    yield tmp_path
    runs.definitions.cache_clear()  # (the real repository's modules, read afresh)


def root(path, name):
    """a stand-in for the function `name` of the file at path: code() reads only its file and its name"""
    scope = {}
    exec(compile(f"def {name}():\n    pass\n", str(path), 'exec'), scope)
    return scope[name]


def code_of(repository, name='train'):
    runs.definitions.cache_clear()  # (read once a process: the scripts never edit their code while they run)
    return runs.code(root(repository / 'stage.py', name))


def test_code_holds_what_the_function_names_at_any_depth(repository):
    key = code_of(repository)
    assert sorted(key) == REACHED  # through `import mod`, `from mod import f`, `from pkg import mod`, mod.attr
    assert all(len(h) == 12 for h in key.values())
    assert sorted(code_of(repository, 'figure')) == ['helper.py:plot', 'stage.py:<module>', 'stage.py:figure']


@pytest.mark.parametrize('file, old, new, changed', [
    ('deep.py', '2 * x', '3 * x', ['deep.py:h']),  # two imports away
    ('losses.py', '** 2', '** 3', ['losses.py:mse']),
    ('pkg/mod.py', '3.0', '4.0', ['pkg/mod.py:TARGET']),
    ('stage.py', 'SCALE = 2.0', 'SCALE = 2.5', ['stage.py:SCALE']),
    ('stage.py', 'manual_seed(0)', 'manual_seed(1)', ['stage.py:<module>']),  # a top-level statement
    ('stage.py', "runs.log('training')", "runs.log('fitting')", ['stage.py:train']),
    ('stage.py', 'return helper.plot(x)', 'return helper.plot(-x)', []),  # a figure: not what train computes
    ('helper.py', 'return x', 'return -x', []),
    ('deep.py', 'return 0', 'return 1', []),
    ('harness/runs.py', 'return deep.unused()', 'return print(*args)', []),  # never followed
    ('stage.py', 'train(1)', 'train(2)', []),  # the __main__ block
])
def test_an_edit_changes_exactly_its_entry(repository, file, old, new, changed):
    before = code_of(repository)
    path = repository / file
    path.write_text(path.read_text().replace(old, new))
    after = code_of(repository)
    assert sorted(after) == sorted(before)
    assert [k for k in before if before[k] != after[k]] == changed


def test_docstrings_comments_and_layout_keep_the_code(repository):
    before = code_of(repository)
    (repository / 'stage.py').write_text(STAGE_DOCUMENTED)
    assert code_of(repository) == before
    # what the code does: another key, named by changes() in the words claim() uses
    (repository / 'deep.py').write_text(FILES['deep.py'].replace('2 * x', '2 * x + 0'))
    assert runs.changes({'code': before}, {'code': code_of(repository)}) == ['deep.py:h edited']


@pytest.mark.parametrize('stage, file, old, new', [
    ('import pkg.mod\n\n\ndef train():\n    return pkg.mod.TARGET\n', 'pkg/mod.py', '3.0', '4.0'),
    ("LAYERS = {'a': 1}\nLAYERS['b'] = 2\n\n\ndef train():\n    return LAYERS\n", 'stage.py', "{'a': 1}", "{'a': 2}"),
], ids=['import a.b', 'a name assigned twice'])
def test_an_edit_other_forms_reach_changes_the_key(repository, stage, file, old, new):
    (repository / 'stage.py').write_text(stage)
    before = code_of(repository)
    path = repository / file
    path.write_text(path.read_text().replace(old, new))
    assert code_of(repository) != before


def test_code_of_the_real_scripts_holds_what_they_compute_and_no_more():
    runs.definitions.cache_clear()
    key = runs.code(regress.run)
    for label in ('regress.py:run', 'regress.py:train_fold', 'regress.py:STRATEGIES', 'models.py:Block',
                  'data.py:Items', 'data.py:resize_crop',  # (run decodes frames: frame_cache -> read_frames)
                  'harness/train.py:infer', 'harness/train.py:lr_range_test', 'harness/checkpoints.py:load_weights'):
        assert label in key, label
    assert not [k for k in key if k.startswith(('evaluate.py', 'tools/', 'harness/runs.py', 'contrastive.py'))
                or k in ('regress.py:main', 'data.py:main')], key
    stage1 = runs.code(contrastive.train)
    assert 'contrastive.py:clip_loss' in stage1 and 'contrastive.py:gather' in stage1
    assert not [k for k in stage1 if k.startswith(('regress.py', 'harness/runs.py', 'evaluate.py', 'tools/'))]
    runs.definitions.cache_clear()
    assert runs.code(regress.run) == key  # read again: the same


# -----------------------------------------------------------------------------
# keys: what differs, and a run folder given to one key

def test_changes_names_each_difference():
    then = {'--lr': 1e-3, 'data': 'ab', 'checkpoint': {'config.json': '12', 'model.safetensors': 'ab'},
            'code': {'regress.py:train_fold': 'a1', 'data.py:fuse': 'b2'}}
    assert runs.changes(then, json.loads(json.dumps(then))) == []
    now = {'--lr': 2e-3, 'data': 'cd', 'checkpoint': {'config.json': '12', 'model.safetensors': 'cd'},
           'code': {'regress.py:train_fold': 'a2', 'models.py:Block': 'c3'}}
    assert runs.changes(then, now) == [
        '--lr: 0.001 then, 0.002 now',
        "checkpoint model.safetensors: 'ab' then, 'cd' now",  # within the checkpoint, only the file that changed
        'data.py:fuse gone', 'models.py:Block added', 'regress.py:train_fold edited',
        "data: 'ab' then, 'cd' now"]
    assert runs.changes({'rows': 'a' * 64}, {'rows': 'b' * 64}) == \
        [f"rows: '{'a' * 17}...{'a' * 17}' then, '{'b' * 17}...{'b' * 17}' now"]  # a long value, shortened
    assert runs.changes({'--frames': 3}, {}) == ['--frames: 3 then, None now']


def test_flags_hold_every_flag_but_the_ignored():
    args = argparse.Namespace(lr=1e-3, new_flag=0.1, verbose=True, batch_size=[64])
    key = runs.flags(args, ('verbose',))
    assert key == {'--batch-size': [64], '--lr': 1e-3, '--new-flag': 0.1}  # a flag added later is in the key
    later = runs.flags(argparse.Namespace(**dict(vars(args), new_flag=0.2)), ('verbose',))
    assert runs.changes(key, later) == ['--new-flag: 0.1 then, 0.2 now']
    assert runs.flags(argparse.Namespace(**dict(vars(args), verbose=False)), ('verbose',)) == key


def test_claim_gives_a_folder_to_one_key(tmp_path):
    out = tmp_path / 'run'
    key = {'script': 'regress.py', '--lr': 0.001, '--batch-size': (64,),
           'code': {'regress.py:train_fold': 'a1b2c3d4e5f6', 'models.py:Block': '0123456789ab'}}
    assert runs.claim(str(out), key) is None
    assert json.loads((out / 'key.json').read_text()) == json.loads(json.dumps(key))
    assert runs.claim(str(out), key) is None  # the same inputs: continue (a tuple saved as a list is the same)
    runs.write_json(out / 'results.json', {'srcc': 0.5})
    assert runs.claim(str(out), key) == {'srcc': 0.5}  # finished: its results
    other = dict(key, **{'--lr': 0.002, 'code': dict(key['code'], **{'regress.py:train_fold': 'ffffffffffff'})})
    with pytest.raises(UserError) as e:
        runs.claim(str(out), other)
    assert str(e.value) == (f"{out} holds a run of other inputs (--lr: 0.001 then, 0.002 now; regress.py:train_fold "
                            f"edited); give another --out, or delete {out} to start over")
    assert json.loads((out / 'key.json').read_text())['--lr'] == 0.001  # refused: untouched
    many = {f'--flag-{i}': i for i in range(6)}
    with pytest.raises(UserError, match=r"\(--flag-0: None then, 0 now; [^;]*; [^;]*; --flag-3: None then, 3 now\);"):
        runs.claim(str(out), dict(key, **many))  # the first four differences: one line, whatever the number


def test_claim_refuses_what_is_no_run_folder(tmp_path):
    (tmp_path / 'thesis').mkdir()
    (tmp_path / 'thesis' / 'chapter1.tex').write_text('...')
    with pytest.raises(UserError, match=r"thesis holds files of no run of this repository; choose another --out"):
        runs.claim(str(tmp_path / 'thesis'), {'--lr': 0.001})
    assert os.listdir(tmp_path / 'thesis') == ['chapter1.tex']
    (tmp_path / 'results.csv').write_text('a,b\n')
    with pytest.raises(UserError, match=r"--out .*results.csv is a file, expected a folder"):
        runs.claim(str(tmp_path / 'results.csv'), {'--lr': 0.001})
    (tmp_path / 'held').mkdir()
    (tmp_path / 'held' / '.lock').write_text('123')  # hold() made it: a new run
    assert runs.claim(str(tmp_path / 'held'), {'--lr': 0.001}) is None
    (tmp_path / 'held' / 'key.json').write_text('{"--lr": 0.0')  # truncated
    with pytest.raises(UserError, match=r"key.json: not valid JSON"):
        runs.claim(str(tmp_path / 'held'), {'--lr': 0.001})


def test_content_is_the_checkpoints_content_not_its_path_or_mtime(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.mkdir()
    (a / 'config.json').write_text('{"model_type": "clip"}')
    (a / 'model.safetensors').write_bytes(bytes(range(256)) * 3)
    shutil.copytree(a, b)
    os.utime(b / 'model.safetensors', (1, 1))
    assert runs.content(str(a), NAMES) == runs.content(str(b), NAMES)  # copied and touched
    (b / 'model.safetensors').write_bytes(bytes(range(256)) * 2 + bytes(reversed(range(256))))  # same size
    before, after = runs.content(str(a), NAMES), runs.content(str(b), NAMES)
    assert before['model.safetensors'] != after['model.safetensors'] and before['config.json'] == after['config.json']
    assert runs.content(str(a), ('tokenizer.json',)) == {'tokenizer.json': None}  # absent: named, None


def test_stamp_is_a_files_size_and_mtime(tmp_path):
    path = tmp_path / 'v.mp4'
    path.write_bytes(b'1234')
    os.utime(path, ns=(5, 7))
    assert runs.stamp(str(path)) == [4, 7] and runs.stamp(str(tmp_path / 'gone.mp4')) is None
    assert runs.stamp(None) is None  # a video without a file


# -----------------------------------------------------------------------------
# the state dict, saved with the RNG

def draws():
    return torch.rand(3), random.random(), np.random.rand(2)


def test_save_and_read_state_with_rng(tmp_path):
    path = str(tmp_path / 'sub' / 'checkpoint.pt')
    state = {'w': torch.arange(5.0), 'epoch': 3, 'sampler': {'epoch': 3, 'step': 0}}
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    runs.save_state(path, state)
    expected = draws()
    loaded = runs.read_state(path)
    assert loaded['epoch'] == 3 and loaded['sampler'] == state['sampler'] and torch.equal(loaded['w'], state['w'])
    draws()
    runs.restore(loaded, path)
    got = draws()  # the resumed process draws the same numbers, from each generator
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])
    # a failing write leaves the previous checkpoint intact and no temporary file behind
    with pytest.raises(Exception):
        runs.save_state(path, {'w': torch.zeros(5), 'bad': lambda: 0})
    assert torch.equal(runs.read_state(path)['w'], state['w'])
    assert os.listdir(os.path.dirname(path)) == ['checkpoint.pt']


def test_read_state_errors(tmp_path):
    assert runs.read_state(tmp_path / 'missing.pt') is None  # nothing saved yet: start afresh
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match="bad.pt is unreadable .*; delete it to start that part afresh"):
        runs.read_state(bad)


def test_a_checkpoint_of_another_optimizer_is_refused_not_loaded(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([w], lr=1e-3)
    w.sum().backward()
    adam.step()
    runs.save_state(tmp_path / 'ckpt.pt', {'optimizer': adam.state_dict()})
    state = runs.read_state(tmp_path / 'ckpt.pt')
    # AdamW would load Adam's state and silently keep weight_decay=0
    adamw = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.1)
    with pytest.raises(UserError, match=r"ckpt\.pt: its optimizer state does not fit the optimizer the code builds "
                                        r"now \(.*weight_decay: 0 then, 0\.1 now"):
        runs.restore(state, 'ckpt.pt', optimizer=adamw)
    assert adamw.param_groups[0]['weight_decay'] == 0.1 and not adamw.state  # nothing loaded
    with pytest.raises(UserError, match=r"its optimizer state does not fit"):  # another kind: SGD's momentum
        runs.restore(state, 'ckpt.pt', optimizer=torch.optim.SGD([w], lr=1e-3, momentum=0.9))
    two = torch.optim.Adam([w, torch.nn.Parameter(torch.ones(2))], lr=1e-3)  # another set of parameters
    with pytest.raises(UserError, match=r"its optimizer state does not fit .*1 parameters then, 2 now"):
        runs.restore(state, 'ckpt.pt', optimizer=two)
    with pytest.raises(UserError, match=r"its scaler state does not fit"):  # a float16 scaler from a float32 run's
        runs.restore({'scaler': {}, 'rng': state['rng']}, 'ckpt.pt',
                     scaler=torch.amp.GradScaler('cpu', enabled=True))
    wide = {'model': torch.nn.Linear(4, 2).state_dict(), 'rng': state['rng']}  # a model of another size
    optimizer = torch.optim.Adam([w], lr=1e-3)
    with pytest.raises(UserError, match=r"its model state does not fit .*weight: shape \(2, 4\) then, "
                                        r"\(2, 3\) now"):
        runs.restore(dict(wide, optimizer=adam.state_dict()), 'ckpt.pt', optimizer=optimizer,
                     model=torch.nn.Linear(3, 2))
    assert not optimizer.state  # the optimizer, whose state fits, was not loaded either: never in part
    fits = torch.optim.Adam([w], lr=5e-4)  # the lr is the schedule's, saved with the state: it fits
    runs.restore(state, 'ckpt.pt', optimizer=fits)
    assert fits.state_dict()['state'][0]['step'] == 1 and fits.param_groups[0]['lr'] == 1e-3


@pytest.fixture
def cuda_rng(monkeypatch):
    """torch.cuda stood in on any machine: CUDA is there, and the RNG states set are recorded, not set. Like
    torch's, the stand-in's set_rng_state takes a tensor (torch's clones it first)"""
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': torch.arange(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, 'set_rng_state',
                        lambda new_state, device='cuda': calls.append((new_state.clone(), device)))
    return calls


def test_restore_sets_the_cuda_rng_of_this_processs_device(tmp_path, cuda_rng):
    runs.save_state(tmp_path / 'gpu.pt', {})  # saved on a machine with CUDA: this device's one state
    state = runs.read_state(tmp_path / 'gpu.pt')
    runs.restore(state, 'gpu.pt')
    assert len(cuda_rng) == 1 and cuda_rng[0][1] == 'cuda'  # 'cuda': the current device, the one start() set
    assert torch.equal(cuda_rng[0][0], torch.arange(16, dtype=torch.uint8))


def test_a_state_saved_with_8_gpus_resumes_on_1(tmp_path, monkeypatch, cuda_rng):
    with monkeypatch.context() as m:  # rank 0 of a job on 8 GPUs saves; get_rng_state_all would keep 8 states
        m.setattr(torch.cuda, 'device_count', lambda: 8)
        m.setattr(torch.cuda, 'get_rng_state_all', lambda: [torch.arange(16, dtype=torch.uint8)] * 8)
        runs.save_state(tmp_path / 'eight.pt', {})
    state = runs.read_state(tmp_path / 'eight.pt')
    assert torch.is_tensor(state['rng']['cuda'])  # one state, its own device's: never one per device
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    runs.restore(state, 'eight.pt')  # resumed on 1 GPU: no IndexError, the one state on the current device
    assert len(cuda_rng) == 1 and cuda_rng[0][1] == 'cuda'


def test_restore_of_a_state_saved_without_cuda_leaves_the_gpu_alone(tmp_path, monkeypatch, cuda_rng):
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, 'is_available', lambda: False)
        runs.save_state(tmp_path / 'cpu.pt', {})
    state = runs.read_state(tmp_path / 'cpu.pt')
    assert state['rng']['cuda'] is None
    runs.restore(state, 'cpu.pt')
    assert cuda_rng == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restore_puts_back_a_real_gpus_rng(tmp_path):
    torch.cuda.manual_seed(7)
    runs.save_state(tmp_path / 'gpu.pt', {})
    expected = torch.rand(3, device='cuda')
    torch.rand(10, device='cuda')
    runs.restore(runs.read_state(tmp_path / 'gpu.pt'), 'gpu.pt')
    assert torch.equal(torch.rand(3, device='cuda'), expected)  # dropout masks on the GPU resume the same


# -----------------------------------------------------------------------------
# the caches' folder

def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv('FCLIP_CACHE', str(tmp_path / 'env'))
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert runs.cache_dir(str(tmp_path / 'flag')) == str(tmp_path / 'flag')  # --cache wins
    assert runs.cache_dir() == str(tmp_path / 'env')
    monkeypatch.delenv('FCLIP_CACHE')
    assert runs.cache_dir() == str(tmp_path / 'xdg' / 'fclip-memorability')
    monkeypatch.setenv('XDG_CACHE_HOME', '')  # set but empty: as unset (the XDG specification)
    assert runs.cache_dir() == str(tmp_path / 'home' / '.cache' / 'fclip-memorability')
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert runs.cache_dir() == str(tmp_path / 'home' / '.cache' / 'fclip-memorability')


def test_cached_builds_once_and_rebuilds_what_it_cannot_read(tmp_path):
    path = str(tmp_path / 'rows-abc.json')
    built, warnings = [], []

    def build(p):
        built.append(p)
        runs.write_json(p, [1, 2])
    assert runs.cached(path, lambda p: runs.read_json(p, expect=list), build, warnings.append) == [1, 2]
    assert runs.cached(path, lambda p: runs.read_json(p, expect=list), build, warnings.append) == [1, 2]
    assert built == [path] and warnings == []
    (tmp_path / 'rows-abc.json').write_text('[1, ')  # truncated
    assert runs.cached(path, lambda p: runs.read_json(p, expect=list), build, warnings.append) == [1, 2]
    assert len(built) == 2 and len(warnings) == 1 and 'rebuilding an unreadable cache file' in warnings[0]


# -----------------------------------------------------------------------------
# one run at a time in a run folder; bad input in one line, a bug with its traceback

HOLD = """if True:
    import sys, time, harness.runs as runs
    with runs.hold(sys.argv[1]):
        print('held', flush=True)
        time.sleep(60)"""


def test_a_second_run_on_one_folder_is_refused_naming_the_process(tmp_path):
    out = tmp_path / 'run'
    first = subprocess.Popen([sys.executable, '-c', HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == 'held'
        with pytest.raises(UserError, match=rf"{out} is in use by another run \(process {first.pid}\); wait for it"):
            with runs.hold(str(out)):
                pass
    finally:
        first.kill()
        first.wait()
    with runs.hold(str(out)):  # the holder is gone: its lock went with it
        (out / 'results.json').write_text('{}')
    assert os.listdir(out) == ['results.json']  # the lock file is removed when the run ends
    with runs.hold(str(tmp_path / 'refused')):  # a folder made for a run that wrote nothing is removed
        pass
    assert not (tmp_path / 'refused').exists()


SCRIPT = """if True:
    import sys, harness.runs as runs
    def main():
        if sys.argv[1] == 'bad input':
            raise runs.UserError('data/x.json: key "score" expected a number, found "high"')
        if sys.argv[1] == 'bug':
            raise ValueError('Expected input batch_size (4) to match target batch_size (3).')
        raise KeyboardInterrupt
    runs.script(main, 'stage.py', 'the same command continues')"""


def test_script_prints_bad_input_in_one_line_and_keeps_a_bugs_traceback():
    procs = [subprocess.Popen([sys.executable, '-c', SCRIPT, case], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for case in ('bad input', 'bug', 'ctrl-c')]  # (the three at once: each spends its time importing torch)
    (bad, bad_code), (bug, bug_code), (stop, stop_code) = [(p.communicate()[1], p.returncode) for p in procs]
    assert bad_code == 2 and bad == 'stage.py: error: data/x.json: key "score" expected a number, found "high"\n'
    assert bug_code == 1 and bug.startswith('Traceback') and 'line 7, in main' in bug
    assert bug.rstrip().endswith('ValueError: Expected input batch_size (4) to match target batch_size (3).')
    assert stop_code == 130 and stop.strip() == 'stage.py: interrupted; the same command continues'


def test_ctrl_c_reaches_the_child_in_a_background_job():
    # a background job inherits SIGINT ignored; the suite's helper must still interrupt the scripts it runs
    stage = ("import harness.runs as runs, time\n"
             "runs.script(lambda: (print('working', flush=True), time.sleep(60)), 'stage.py', 'the same command "
             "continues')\n")
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `nohup python -m pytest &` starts the suite
    try:
        code, out = interrupted(['-c', stage], after='working', timeout=30)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert code == 130 and out.strip().endswith('stage.py: interrupted; the same command continues'), out
