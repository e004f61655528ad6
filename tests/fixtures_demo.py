"""
Session-wide fixtures shared by the training-script tests: a small Memento-shaped demo dataset
and tiny random-initialised encoders. Test modules import them by name:

    from fixtures_demo import demo_root, tiny_models
"""
import os

import pytest

from tools import demo


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory):
    """folder with a 40-video demo Memento (official layout, real mp4s, captions.txt)."""
    root = str(tmp_path_factory.mktemp('demo'))
    demo.make_demo(root, n_videos=40, seed=0)
    return root


@pytest.fixture(scope='session')
def tiny_models(demo_root, tmp_path_factory):
    """model_type -> folder of a tiny random model whose tokenizer is trained on the demo captions."""
    with open(os.path.join(demo_root, 'captions.txt')) as f:
        corpus = [line.strip() for line in f if line.strip()]
    out = tmp_path_factory.mktemp('tiny')
    folders = {}
    for model_type in ('clip', 'vit', 'distilbert'):
        folders[model_type] = str(out / model_type)
        demo.make_tiny(model_type, folders[model_type], corpus)
    return folders
