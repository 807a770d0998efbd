"""manifest.json: one typed definition (`rewrite.formats.manifest`) written by the exporter, read by the runtime.

1. Round trip on real exports (`rewrite apply` of factories:mlp4, ort-adapters and bank): the file on disk is
   exactly the typed manifest's JSON, written again and read back it is equal, its entries are typed by `mode`.
2. Broken deployment directories: each problem (manifest missing, not JSON, NaN, not an object, unknown version,
   a missing, unknown or mistyped field, an inconsistent bank, a file name escaping the directory, a missing or
   corrupt model or adapter file, a model that does not fit its manifest) is a `DeploymentError` naming the file
   and the field, never a raw KeyError / JSONDecodeError / ONNX Runtime exception (a corrupt adapter file is the
   adapter reader's `AdapterFileError`, naming that file).
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from rewrite.errors import AdapterFileError, DeploymentError, RewriteError
from rewrite.formats.manifest import MANIFEST, MergedExport, UnmergedExport, read_manifest, write_manifest
from rewrite.runtime import AdapterSession


def test_round_trip_of_a_real_export(deployment, tmp_path):
    out = deployment("ort-adapters")
    manifest = read_manifest(out)
    assert json.loads((out / MANIFEST).read_text()) == manifest.model_dump(mode="json")
    (entry,) = manifest.exports
    assert isinstance(entry, UnmergedExport) and entry.switching == "ort-adapters" and entry.routed is False
    assert [(s.site, s.d_in, s.d_out, s.rank) for s in entry.sites] == [
        ("layers.0", 64, 64, 4), ("layers.1", 64, 64, 2), ("layers.2", 64, 64, 4), ("layers.3", 64, 64, 2)]
    assert {n: (a.file, a.slot) for n, a in entry.adapters.items()} == {
        "a": ("adapters/a.onnx_adapter", None), "b": ("adapters/b.onnx_adapter", None)}
    assert 0 <= entry.check_max_abs_diff <= 1e-4
    assert [(a.site, a.adapter, a.rank) for a in manifest.adapters] == [
        ("layers.0", "a", 2), ("layers.0", "b", 4), ("layers.1", "a", 2), ("layers.2", "a", 2), ("layers.2", "b", 4),
        ("layers.3", "a", 2)]
    assert [h.name for h in manifest.history] == ["insert", "insert"]
    # written again (with a merged entry beside it) and read back: equal, each entry typed by its mode
    merged = MergedExport(file="merged.onnx", nodes=7, op_types=["Gemm", "Relu"], external_data=False,
                          check_max_abs_diff=1e-7)
    both = manifest.model_copy(update={"exports": [entry, merged]})
    write_manifest(tmp_path / MANIFEST, both)
    again = read_manifest(tmp_path)
    assert again == both and [type(e) for e in again.exports] == [UnmergedExport, MergedExport]


def test_merged_adapters_keep_what_they_were(tmp_path):
    """A merged export still says which adapters went into which weights, with kind, rank and scale."""
    from rewrite.pipeline import apply
    from rewrite.spec import parse_spec

    spec = parse_spec('version = 1\n[capture]\nfrontend = "fx"\n[[capture.inputs]]\nname = "input"\nshape = [2, 16]\n'
                      '[[pass]]\nname = "insert"\ntargets = ["0", "2"]\nrank = 4\nalpha = 8\nrank_pattern = { "2" = 2 }\n'
                      '[[pass]]\nname = "merge"\n[export]\nformat = "none"\n')
    apply(spec, "factories:mlp", tmp_path / "out")
    adapters = json.loads((tmp_path / "out" / MANIFEST).read_text())["adapters"]
    assert adapters == [
        dict(site="0", adapter="default", kind="lora", op="linear", rank=4, alpha=8.0, rslora=False, scaling=2.0,
             state="merged"),
        dict(site="2", adapter="default", kind="lora", op="linear", rank=2, alpha=8.0, rslora=False, scaling=4.0,
             state="merged"),
    ]
    assert read_manifest(tmp_path / "out").adapters[0].rank == 4


def test_bank_entry(deployment):
    (entry,) = read_manifest(deployment("bank")).exports
    assert (entry.switching, entry.capacity, entry.ids_input, entry.bank_dtype) == ("bank", 4, "adapter_ids", "float32")
    assert {n: (a.slot, a.file) for n, a in entry.adapters.items()} == {"a": (0, None), "b": (1, None)}


def test_the_schema_is_strict():
    with pytest.raises(ValueError, match="d_in"):
        UnmergedExport.model_validate(dict(file="m.onnx", switching="ort-adapters", model_version=1, nodes=1,
                                           op_types=[], external_data=False, capacity=None, bank_dtype=None,
                                           ids_input=None, adapters={},
                                           sites=[dict(site="s", op="linear", d_in="64", d_out=64, rank=2, A="a",
                                                       B="b")]))


# ---------------------------------------------------------------------------------- broken directories


def _edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A breakage that edits the parsed manifest (and writes it back as JSON)."""
    def apply(out: Path) -> None:
        data = json.loads((out / MANIFEST).read_text())
        change(data)
        (out / MANIFEST).write_text(json.dumps(data))
    return apply


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda out: (out / name).write_bytes(content)


def _site(index: int, **values) -> Callable[[Path], None]:
    return _edit(lambda m: m["exports"][0]["sites"][index].update(values))


def _entry(**values) -> Callable[[Path], None]:
    return _edit(lambda m: m["exports"][0].update(values))


# (id, switching, breakage, the file the message names, the rest of the message)
CASES = [
    ("no manifest", "bank", lambda out: (out / MANIFEST).unlink(), None, r"no manifest\.json"),
    ("not JSON", "bank", _write(MANIFEST, b'{"format": "rewrite-manifest",'), MANIFEST,
     r"not JSON \(line 1, column \d+"),
    ("not UTF-8", "bank", _write(MANIFEST, b"\xff\xfe{}"), MANIFEST, "not a UTF-8 text file"),
    ("NaN", "bank", _write(MANIFEST, b'{"format": "rewrite-manifest", "version": 1, "x": NaN}'), MANIFEST,
     "NaN is not a number"),
    ("1e999", "bank", _write(MANIFEST, b'{"format": "rewrite-manifest", "version": 1, "x": 1e999}'), MANIFEST,
     "1e999 is not a finite number"),
    ("a list", "bank", _write(MANIFEST, b"[]"), MANIFEST, "expected a JSON object, got a list"),
    ("nested deep", "bank", _write(MANIFEST, b"[" * 100_000), MANIFEST, "nested too deeply"),
    ("other format", "bank", _edit(lambda m: m.update(format="onnx")), MANIFEST, "'format': expected"),
    ("unknown version", "bank", _edit(lambda m: m.update(version=2)), MANIFEST,
     "'version': unknown manifest version 2; this rewrite reads version 1"),
    ("no version", "bank", _edit(lambda m: m.pop("version")), MANIFEST, "'version': missing"),
    ("missing key", "bank", _edit(lambda m: m["exports"][0]["sites"][1].pop("d_out")), MANIFEST,
     r"'exports\[0\]\.sites\[1\]\.d_out': missing"),
    ("missing section", "bank", _edit(lambda m: m.pop("source")), MANIFEST, "'source': missing"),
    ("d_in a string", "bank", _site(3, d_in="64"), MANIFEST,
     r"'exports\[0\]\.sites\[3\]\.d_in': expected an integer, got \"64\""),
    ("d_in a float", "bank", _site(3, d_in=64.0), MANIFEST, r"'exports\[0\]\.sites\[3\]\.d_in': expected an integer"),
    ("d_in a bool", "bank", _site(3, d_in=True), MANIFEST, r"'exports\[0\]\.sites\[3\]\.d_in': expected an integer"),
    ("d_in zero", "bank", _site(0, d_in=0), MANIFEST, r"'exports\[0\]\.sites\[0\]\.d_in': expected greater"),
    ("sites an object", "bank", _entry(sites={}), MANIFEST, r"'exports\[0\]\.sites': expected a list"),
    ("unknown field", "bank", _entry(rank=3), MANIFEST, r"'exports\[0\]\.rank': unknown field"),
    ("unknown mode", "bank", _entry(mode="half"), MANIFEST, r"'exports\[0\]\.mode': expected one of"),
    ("unknown switching", "bank", _entry(switching="lazy"), MANIFEST, r"'exports\[0\]\.switching': expected"),
    ("history seconds a string", "bank", _edit(lambda m: m["history"][0].update(seconds="1")), MANIFEST,
     r"'history\[0\]\.seconds': expected a number"),
    ("slot outside the bank", "bank", _edit(lambda m: m["exports"][0]["adapters"]["b"].update(slot=4)), MANIFEST,
     r"'exports\[0\]': adapters\.b\.slot: 4 is not a bank slot 0\.\.3"),
    ("shared slot", "bank", _edit(lambda m: m["exports"][0]["adapters"]["b"].update(slot=0)), MANIFEST,
     "two adapters share a bank slot"),
    ("bank without capacity", "bank", _entry(capacity=None), MANIFEST, "switching 'bank' needs 'capacity'"),
    ("empty adapter name", "bank", _edit(lambda m: m["exports"][0]["adapters"].update({"": {"slot": 2}})), MANIFEST,
     r"'exports\[0\]\.adapters': adapter name \"\": adapter names are identifiers"),
    ("model ../", "bank", _entry(file="../model.onnx"), MANIFEST,
     r"'exports\[0\]\.file': file '\.\./model\.onnx' must be a relative path inside"),
    ("model absolute", "bank", _entry(file="/tmp/model.onnx"), MANIFEST, r"'exports\[0\]\.file': .*relative path"),
    ("adapter file ../", "ort-adapters",
     _edit(lambda m: m["exports"][0]["adapters"]["a"].update(file="../out/adapters/a.onnx_adapter")), MANIFEST,
     r"'exports\[0\]\.adapters\.a\.file': file '\.\./out/.*relative path inside"),
    ("only merged", "bank", _edit(lambda m: m.update(exports=[dict(mode="merged", file="model.onnx", nodes=1,
                                                                   op_types=[], external_data=False)])),
     MANIFEST, "no unmerged export"),
    ("model missing", "bank", lambda out: (out / "model.onnx").unlink(), MANIFEST,
     r"'exports\[0\]\.file': .*model\.onnx does not exist"),
    ("model corrupt", "bank", _write("model.onnx", b"not a protobuf at all"), "model.onnx",
     "ONNX Runtime cannot load this model"),
    ("model empty", "ort-adapters", _write("model.onnx", b""), "model.onnx", "ONNX Runtime cannot load this model"),
    ("adapter file missing", "ort-adapters", lambda out: (out / "adapters" / "b.onnx_adapter").unlink(), MANIFEST,
     r"'exports\[0\]\.adapters\.b\.file': .*b\.onnx_adapter does not exist"),
    ("adapter file corrupt", "ort-adapters", _write("adapters/b.onnx_adapter", b"junk"), "adapters/b.onnx_adapter",
     "not a readable .onnx_adapter file"),
    ("d_in of another model", "bank", _site(1, d_in=32), MANIFEST,
     r"'exports\[0\]\.sites\[1\]': input 'lora\.layers\.1\.A' of .*model\.onnx has shape \[64, 8\], the "
     r"manifest's sizes give \[32, 8\]"),
    ("rank of another model", "ort-adapters", _site(2, d_out=16), MANIFEST, r"'exports\[0\]\.sites\[2\]': input"),
    ("input name of another model", "bank", _site(0, A="lora.decoder.A"), MANIFEST,
     r"'exports\[0\]\.sites\[0\]\.A': 'lora\.decoder\.A' is not an input of"),
    ("ids input of another model", "bank", _entry(ids_input="ids"), MANIFEST,
     r"'exports\[0\]\.ids_input': 'ids' is not an input of"),
]


@pytest.mark.parametrize("switching, breakage, named, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_deployment_directory(deployment, tmp_path, switching, breakage, named, message):
    out = tmp_path / "out"
    shutil.copytree(deployment(switching), out)
    (tmp_path / "model.onnx").write_bytes((out / "model.onnx").read_bytes())  # what '../model.onnx' would load
    breakage(out)
    with pytest.raises(RewriteError) as caught:
        AdapterSession(out)
    text = str(caught.value)
    assert type(caught.value) in (DeploymentError, AdapterFileError) and caught.value.__cause__ is None
    assert text.startswith(str(out / named) if named else str(out)), text
    assert re.search(message, text), text
