"""A `.pt2` archive from an untrusted source must not run code (README safety table).

Each case rewrites one part of a real `torch.export.save` archive so that loading it would write a marker
file: a pickled weight, a pickled constant, an opaque (pickled) constant, pickled sample inputs, a symbolic
size that sympy would `eval`, and a graph node whose target is a Python function that writes a file. The
oracle is plain `torch.export.load`, which does write the marker for the payloads (so the cases are real);
`rewrite` refuses each with a clear error and the marker never appears, until the user trusts the file.
"""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from torch.export.pt2_archive.constants import OPAQUE_OBJ_FILENAME_PREFIX

from rewrite.errors import ModelLoadError
from rewrite.load import load_model

_TORCH_LOAD, _PICKLE_LOADS = torch.load, pickle.loads


class _WritesMarker:
    """Unpickling this calls Path.write_text(marker, 'pwned')."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "pwned")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("shift", torch.ones(3), persistent=False)

    def forward(self, x):
        return self.proj(x) + self.shift


def _archive(tmp_path: Path) -> Path:
    program = torch.export.export(_Tiny(), (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("b")},))
    path = tmp_path / "clean.pt2"
    torch.export.save(program, path)
    return path


def _rewrite_archive(src: Path, dst: Path, edit, extra: dict[str, bytes]) -> Path:
    """Copy the zip archive `src` to `dst`, passing every member through `edit(name, data)`; add `extra`
    members (paths below the archive's root folder)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
        for member, data in extra.items():
            zout.writestr(f"{root}/{member}", data)
    return dst


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _config_entry(data: bytes, key: str, **changes) -> bytes:
    config = json.loads(data)
    config["config"][key].update(changes)
    return json.dumps(config).encode()


def _pickled_weight(name, data, marker):
    if name.endswith("model_weights_config.json"):
        return _config_entry(data, "proj.weight", use_pickle=True)
    return _pickled(_WritesMarker(marker)) if name.endswith("weights/weight_0") else data


def _pickled_constant(name, data, marker):
    if name.endswith("model_constants_config.json"):
        return _config_entry(data, "shift", use_pickle=True)
    return _pickled(_WritesMarker(marker)) if name.endswith("constants/tensor_0") else data


def _opaque_constant(name, data, marker):
    if name.endswith("model_constants_config.json"):
        return _config_entry(data, "shift", path_name=f"{OPAQUE_OBJ_FILENAME_PREFIX}0", use_pickle=True)
    return data


def _pickled_inputs(name, data, marker):
    return _pickled(((_WritesMarker(marker),), {})) if name.endswith("sample_inputs/model.pt") else data


def _eval_in_size(name, data, marker):
    if not name.endswith("models/model.json"):
        return data
    text = data.decode()
    symbol = "Symbol('s77', positive=True, integer=True)"
    assert symbol in text
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned') and {symbol}"
    return text.replace(json.dumps(symbol)[1:-1], json.dumps(payload)[1:-1]).encode()


def _file_writing_target(name, data, marker):
    if not name.endswith("models/model.json"):
        return data
    text = data.decode()
    assert '"torch.ops.aten.linear.default"' in text
    return text.replace('"torch.ops.aten.linear.default"', '"torch.save"').encode()


def _extra_members(attack, marker: Path) -> dict[str, bytes]:
    if attack is _opaque_constant:
        return {f"data/constants/{OPAQUE_OBJ_FILENAME_PREFIX}0": pickle.dumps(_WritesMarker(marker))}
    return {}


ATTACKS = {
    "pickled weight": _pickled_weight,
    "pickled constant": _pickled_constant,
    "opaque pickled constant": _opaque_constant,
    "pickled sample inputs": _pickled_inputs,
    "eval in a symbolic size": _eval_in_size,
}


def _crafted(tmp_path: Path, attack) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    return _rewrite_archive(_archive(tmp_path), tmp_path / "crafted.pt2",
                            lambda name, data: attack(name, data, marker), _extra_members(attack, marker)), marker


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_plain_torch_export_load_runs_the_payload(tmp_path, attack):
    """The oracle: these archives really execute code under torch.export.load."""
    path, marker = _crafted(tmp_path, ATTACKS[attack])
    try:
        torch.export.load(path)
    except Exception:  # noqa: BLE001 - some payloads break loading after they ran
        pass
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_untrusted_archive_is_refused_and_runs_nothing(tmp_path, attack):
    path, marker = _crafted(tmp_path, ATTACKS[attack])
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path))
    assert str(path) in str(err.value) and "--trust-pickle" in str(err.value)
    assert not marker.exists()
    assert torch.load is _TORCH_LOAD and pickle.loads is _PICKLE_LOADS  # the guards are gone afterwards


def test_graph_calling_a_python_function_is_refused(tmp_path):
    """torch's verifier refuses a node whose target is not an operator; it arrives as our error."""
    path, marker = _crafted(tmp_path, _file_writing_target)
    with pytest.raises(ModelLoadError, match="not a readable torch.export archive.*not an allowed operator"):
        load_model(str(path))
    assert not marker.exists()


def test_trusted_archive_loads_as_torch_does(tmp_path):
    path, marker = _crafted(tmp_path, _pickled_constant)
    loaded = load_model(str(path), trust_pickle=True)
    assert loaded.kind == "pt2" and marker.read_text() == "pwned"


def test_clean_archive_loads_and_runs_equal_to_the_module(tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    program = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_model(str(tmp_path / "m.pt2"))
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded.program.module()(x), model(x), rtol=0, atol=0)


def test_corrupt_archive_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt2"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="not a readable torch.export archive"):
        load_model(str(path))


def test_cli_inspect_of_a_crafted_archive_exits_2_without_traceback(tmp_path):
    path, marker = _crafted(tmp_path, _pickled_inputs)
    run = subprocess.run([sys.executable, "-m", "rewrite.cli", "inspect", str(path)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout and "--trust-pickle" in run.stderr
    assert not marker.exists()
