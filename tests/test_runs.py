"""
runs.py, the harness: the atomic writer, strict JSON, readers whose errors name the file, the locks, paths kept
inside a folder, the state dict with its RNG, a run's identity, and one error type for bad input.

    python -m pytest tests/test_runs.py -q
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import runs
from conftest import interrupted
from runs import UserError

NAMES = ('config.json', 'model.safetensors')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / 'a.json'
    runs.write_json(path, {'x': 1})

    def broken(f):
        f.write(b'{"half')
        raise RuntimeError('killed mid-write')
    with pytest.raises(RuntimeError):
        runs.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {'x': 1}
    assert os.listdir(tmp_path) == ['a.json']  # no temporary file left behind


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        runs.write_json(tmp_path / 'r.json', {'srcc': math.nan})
    assert not (tmp_path / 'r.json').exists()
    with pytest.raises(ValueError, match=r'fold 2: srcc_folds.1 is nan'):
        runs.check_finite({'srcc_folds': [0.5, math.nan]}, 'fold 2')


@pytest.mark.parametrize('content, message', [
    (b'\xff\xfe[1, 2]', r'not UTF-8 text \(byte 0xff at offset 0\)'),
    (b'[{"a": 1', r'not valid JSON .*line 1.*truncated'),
    (b'"oops"', r'expected a JSON list at the top level, found str'),
])
def test_read_json_names_the_file(tmp_path, content, message):
    path = tmp_path / 'memento_train_data.json'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        runs.read_json(path, expect=list)
    assert str(path) in str(e.value)


def test_read_csv_accepts_a_byte_order_mark_and_names_bad_rows(tmp_path):
    path = tmp_path / 's.csv'
    path.write_bytes('\ufeffvideo_id,score\n1,0.5\n'.encode())
    assert runs.read_csv(path, required=['video_id']) == [{'video_id': '1', 'score': '0.5'}]
    path.write_text('video_id,score\n1,0.5\n2\n')
    with pytest.raises(ValueError, match=r's.csv, line 3: expected 2 fields'):
        runs.read_csv(path)
    path.write_text('id,score\n1,0.5\n')
    with pytest.raises(ValueError, match=r"missing column\(s\) \['video_id'\]"):
        runs.read_csv(path, required=['video_id'])


def test_inside(tmp_path):
    (tmp_path / 'videos').mkdir()
    (tmp_path / 'videos' / 'a.mp4').write_bytes(b'')
    os.symlink('/etc/passwd', tmp_path / 'videos' / 'link.mp4')
    assert runs.inside(tmp_path, 'videos/a.mp4') == os.path.realpath(tmp_path / 'videos' / 'a.mp4')
    for bad in ('../x.mp4', '/etc/passwd', 'videos/../../x.mp4', 'videos/link.mp4', '.', 'videos/a\0.mp4'):
        assert runs.inside(tmp_path, bad) is None, bad


def _append_locked(path, n):
    for _ in range(n):
        with runs.locked(path):
            value = int(open(path).read()) if os.path.exists(path) else 0
            runs.atomic_write(path, lambda f: f.write(str(value + 1).encode()))


def test_lock_serialises_read_modify_write(tmp_path):
    path = str(tmp_path / 'counter')
    procs = [mp.get_context('fork').Process(target=_append_locked, args=(path, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert open(path).read() == '150'  # without the lock, increments are lost


def test_written_files_get_the_usual_permissions(tmp_path):
    runs.write_json(tmp_path / 'a.json', [1])
    assert os.stat(tmp_path / 'a.json').st_mode & 0o777 == 0o666 & ~runs.UMASK  # not mkstemp's 0600


def test_save_and_load_checkpoint_with_rng(tmp_path):
    path = str(tmp_path / 'sub' / 'checkpoint.pt')
    state = {'w': torch.arange(5.0), 'epoch': 3, 'sampler': {'epoch': 3, 'step': 0}}
    torch.manual_seed(7)
    runs.save_state(path, state)
    expected = torch.rand(3)
    loaded = runs.read_state(path)
    assert loaded['epoch'] == 3 and torch.equal(loaded['w'], state['w'])
    torch.rand(10)
    runs.set_rng_state(loaded['rng'])
    assert torch.equal(torch.rand(3), expected)  # the resumed process draws the same numbers
    # a failing write leaves the previous checkpoint intact and no temporary file behind
    with pytest.raises(Exception):
        runs.save_state(path, {'w': torch.zeros(5), 'bad': lambda: 0})
    assert torch.equal(runs.read_state(path)['w'], state['w'])
    assert os.listdir(os.path.dirname(path)) == ['checkpoint.pt']


def test_identity_names_what_changed():
    runs.check_identity({'--lr': 1e-3, 'dataset content': 'ab'}, {'--lr': 1e-3, 'dataset content': 'ab'}, 'p', '')
    with pytest.raises(UserError, match=r"p was written from other inputs \(dataset content: 'ab' then, 'cd' now\); "
                                        r"start over"):
        runs.check_identity({'--lr': 1e-3, 'dataset content': 'ab'}, {'--lr': 1e-3, 'dataset content': 'cd'}, 'p',
                            'start over')
    # within the checkpoint's content, only the part that changed is named
    with pytest.raises(ValueError, match=r"\(checkpoint content model.safetensors: 'ab' then, 'cd' now\); x$"):
        runs.check_identity({'checkpoint content': {'config.json': '12', 'model.safetensors': 'ab'}},
                            {'checkpoint content': {'config.json': '12', 'model.safetensors': 'cd'}}, 'p', 'x')


def test_a_code_identity_is_what_the_code_does_not_its_layout(tmp_path, monkeypatch):
    (tmp_path / 'stage.py').write_text('"""a stage"""\nimport helper\nimport numpy\n\n\ndef f(a, b):\n'
                                       '    return helper.g(a, b)  # the loss\n')
    (tmp_path / 'helper.py').write_text('from deep import h\n\n\ndef g(a, b):\n    return h(a) + b\n')
    (tmp_path / 'deep.py').write_text('def h(a):\n    return 2 * a\n')
    (tmp_path / 'unused.py').write_text('x = 1\n')
    monkeypatch.setattr(runs, 'HERE', str(tmp_path))
    first = runs.code_identity('stage')
    assert sorted(first) == ['deep.py', 'helper.py', 'stage.py']  # what it imports at any depth, nothing else
    # a comment, a docstring, a reflowed line: the same code
    (tmp_path / 'stage.py').write_text('"""the stage, documented"""\nimport helper\nimport numpy\n\n\n'
                                       'def f(a,\n      b):\n    """f"""\n    # why\n    return helper.g(a, b)\n')
    assert runs.code_identity('stage') == first
    (tmp_path / 'deep.py').write_text('def h(a):\n    return 3 * a\n')  # two imports away
    changed = runs.code_identity('stage')
    assert [k for k in first if first[k] != changed[k]] == ['deep.py']
    with pytest.raises(UserError, match=r"p was written from other inputs \(deep\.py edited\); x"):
        runs.check_identity({'code': first}, {'code': changed}, 'p', 'x')


def test_run_identity_holds_every_flag_but_the_ignored(tmp_path):
    args = argparse.Namespace(lr=1e-3, new_flag=0.1, verbose=True, batch_size=[64])
    identity = runs.run_identity(args, ('verbose',), [], {'config.json': 'ab'}, 'runs')
    assert {'--lr', '--new-flag', '--batch-size'} <= set(identity) and '--verbose' not in identity
    assert identity['code'] == runs.code_identity('runs') and 'strategies.py' in identity['code']
    later = runs.run_identity(argparse.Namespace(**dict(vars(args), new_flag=0.2)), ('verbose',), [],
                              {'config.json': 'ab'}, 'runs')
    with pytest.raises(UserError, match=r"\(--new-flag: 0\.1 then, 0\.2 now\)"):
        runs.check_identity(identity, later, 'p', 'x')


def test_a_checkpoint_of_another_optimizer_is_refused_not_loaded(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([w], lr=1e-3)
    w.sum().backward()
    adam.step()
    state = {'optimizer': adam.state_dict(), 'rng': runs.rng_state()}
    # AdamW would load Adam's state and silently keep weight_decay=0
    adamw = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.1)
    with pytest.raises(UserError, match=r"ckpt\.pt: its optimizer state does not fit the optimizer the code builds "
                                        r"now \(.*weight_decay: 0 then, 0\.1 now"):
        runs.restore(state, 'ckpt.pt', optimizer=adamw)
    assert adamw.param_groups[0]['weight_decay'] == 0.1 and not adamw.state  # nothing loaded
    with pytest.raises(UserError, match=r"its optimizer state does not fit"):  # another kind: SGD's momentum
        runs.restore(state, 'ckpt.pt', optimizer=torch.optim.SGD([w], lr=1e-3, momentum=0.9))
    two = torch.optim.Adam([w, torch.nn.Parameter(torch.ones(2))], lr=1e-3)  # another set of parameters
    with pytest.raises(UserError, match=r"its optimizer state does not fit"):
        runs.restore(state, 'ckpt.pt', optimizer=two)
    with pytest.raises(UserError, match=r"its scaler state does not fit"):  # a float16 scaler from a float32 run's
        runs.restore({'scaler': {}, 'rng': state['rng']}, 'ckpt.pt',
                     scaler=torch.amp.GradScaler('cpu', enabled=True))
    wide = {'model': torch.nn.Linear(4, 2).state_dict(), 'rng': state['rng']}  # a model of another size
    with pytest.raises(UserError, match=r"its model state does not fit .*weight: shape \(2, 4\) then, "
                                        r"\(2, 3\) now"):
        runs.restore(wide, 'ckpt.pt', model=torch.nn.Linear(3, 2))
    fits = torch.optim.Adam([w], lr=5e-4)  # the lr is the schedule's, saved with the state: it fits
    runs.restore(state, 'ckpt.pt', optimizer=fits)
    assert fits.state_dict()['state'][0]['step'] == 1 and fits.param_groups[0]['lr'] == 1e-3


def test_checkpoint_identity_is_the_content_not_the_path_or_mtime(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.mkdir()
    (a / 'config.json').write_text('{"model_type": "clip"}')
    (a / 'model.safetensors').write_bytes(bytes(range(256)) * 3)
    shutil.copytree(a, b)
    os.utime(b / 'model.safetensors', (1, 1))
    assert runs.content_identity(str(a), NAMES) == runs.content_identity(str(b), NAMES)  # copied and touched
    (b / 'model.safetensors').write_bytes(bytes(range(256)) * 2 + bytes(reversed(range(256))))  # same size
    before, after = runs.content_identity(str(a), NAMES), runs.content_identity(str(b), NAMES)
    assert before['model.safetensors'] != after['model.safetensors'] and before['config.json'] == after['config.json']
    assert runs.content_identity(str(a), ('tokenizer.json',)) == {'tokenizer.json': None}  # absent: named, None


def test_read_state_errors(tmp_path):
    with pytest.raises(UserError, match="missing.pt"):
        runs.read_state(tmp_path / 'missing.pt')
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match="bad.pt is unreadable .*; delete it to start that part afresh"):
        runs.read_state(bad)


# -----------------------------------------------------------------------------
# one run at a time in a run folder; bad input in one line, a bug with its traceback

HOLD = """if True:
    import sys, time, runs
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
    import sys, runs
    def main():
        if sys.argv[1] == 'bad input':
            raise runs.UserError('data/x.json: key "score" expected a number, found "high"')
        if sys.argv[1] == 'bug':
            raise ValueError('Expected input batch_size (4) to match target batch_size (3).')
        raise KeyboardInterrupt
    runs.script(main, 'stage.py', 'the same command continues')"""


def test_script_prints_bad_input_in_one_line_and_keeps_a_bugs_traceback():
    def run(case):
        return subprocess.run([sys.executable, '-c', SCRIPT, case], cwd=ROOT, capture_output=True, text=True)
    bad, bug, stop = run('bad input'), run('bug'), run('ctrl-c')
    assert bad.returncode == 2 and bad.stderr == 'stage.py: error: data/x.json: key "score" expected a number, ' \
                                                 'found "high"\n'
    assert bug.returncode == 1 and bug.stderr.startswith('Traceback') and 'line 7, in main' in bug.stderr
    assert bug.stderr.rstrip().endswith('ValueError: Expected input batch_size (4) to match target batch_size (3).')
    assert stop.returncode == 130 and stop.stderr.strip() == 'stage.py: interrupted; the same command continues'


def test_ctrl_c_reaches_the_child_in_a_background_job():
    # a background job inherits SIGINT ignored; the suite's helper must still interrupt the scripts it runs
    stage = ("import runs, time\n"
             "runs.script(lambda: (print('working', flush=True), time.sleep(60)), 'stage.py', 'the same command "
             "continues')\n")
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `nohup python -m pytest &` starts the suite
    try:
        code, out = interrupted(['-c', stage], after='working', timeout=30)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert code == 130 and out.strip().endswith('stage.py: interrupted; the same command continues'), out
