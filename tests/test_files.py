"""
files.py: the atomic writer, strict JSON, readers whose errors name the file, the lock, paths kept inside a folder.

    python -m pytest tests/test_files.py -q
"""
import json
import math
import multiprocessing as mp
import os

import pytest

import files


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / 'a.json'
    files.write_json(path, {'x': 1})

    def broken(f):
        f.write(b'{"half')
        raise RuntimeError('killed mid-write')
    with pytest.raises(RuntimeError):
        files.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {'x': 1}
    assert os.listdir(tmp_path) == ['a.json']  # no temporary file left behind


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        files.write_json(tmp_path / 'r.json', {'srcc': math.nan})
    assert not (tmp_path / 'r.json').exists()
    with pytest.raises(ValueError, match=r'fold 2: srcc_folds.1 is nan'):
        files.finite({'srcc_folds': [0.5, math.nan]}, 'fold 2')


@pytest.mark.parametrize('content, message', [
    (b'\xff\xfe[1, 2]', r'not UTF-8 text \(byte 0xff at offset 0\)'),
    (b'[{"a": 1', r'not valid JSON .*line 1.*truncated'),
    (b'"oops"', r'expected a JSON list at the top level, found str'),
])
def test_read_json_names_the_file(tmp_path, content, message):
    path = tmp_path / 'memento_train_data.json'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        files.read_json(path, expect=list)
    assert str(path) in str(e.value)


def test_read_csv_accepts_a_byte_order_mark_and_names_bad_rows(tmp_path):
    path = tmp_path / 's.csv'
    path.write_bytes('\ufeffvideo_id,score\n1,0.5\n'.encode())
    assert files.read_csv(path, required=['video_id']) == [{'video_id': '1', 'score': '0.5'}]
    path.write_text('video_id,score\n1,0.5\n2\n')
    with pytest.raises(ValueError, match=r's.csv, line 3: expected 2 fields'):
        files.read_csv(path)
    path.write_text('id,score\n1,0.5\n')
    with pytest.raises(ValueError, match=r"missing column\(s\) \['video_id'\]"):
        files.read_csv(path, required=['video_id'])


def test_inside(tmp_path):
    (tmp_path / 'videos').mkdir()
    (tmp_path / 'videos' / 'a.mp4').write_bytes(b'')
    os.symlink('/etc/passwd', tmp_path / 'videos' / 'link.mp4')
    assert files.inside(tmp_path, 'videos/a.mp4') == os.path.realpath(tmp_path / 'videos' / 'a.mp4')
    for bad in ('../x.mp4', '/etc/passwd', 'videos/../../x.mp4', 'videos/link.mp4', '.', 'videos/a\0.mp4'):
        assert files.inside(tmp_path, bad) is None, bad


def _append_locked(path, n):
    for _ in range(n):
        with files.locked(path):
            value = int(open(path).read()) if os.path.exists(path) else 0
            files.atomic_write(path, lambda f: f.write(str(value + 1).encode()))


def test_lock_serialises_read_modify_write(tmp_path):
    path = str(tmp_path / 'counter')
    procs = [mp.get_context('fork').Process(target=_append_locked, args=(path, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert open(path).read() == '150'  # without the lock, increments are lost


def test_written_files_get_the_usual_permissions(tmp_path):
    files.write_json(tmp_path / 'a.json', [1])
    assert os.stat(tmp_path / 'a.json').st_mode & 0o777 == 0o666 & ~files.UMASK  # not mkstemp's 0600
