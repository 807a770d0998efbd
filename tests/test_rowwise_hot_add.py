"""Adding an elementwise adapter ((IA)^3, RoAd, BEFT) from a PEFT directory while serving, numpy only.

1. The runtime's reading of PEFT tensors as row vectors (`rewrite.formats.peft_rows.row_vectors`) equals our compiler
   kind's `row_params()` / `row_layout()` on the same directory (loaded by the `load` pass), for every IA3 placement
   (outputs, feed-forward inputs), every RoAd variant and BEFT.
2. `AdapterSession.add_adapter` of PEFT-made adapters into a bank / custom-op export (free slots and a replaced one)
   and an ort-adapters export: each row / run equals `PeftModel` with that adapter (<= 1e-5); a replaced adapter's
   slot no longer answers with it.
3. A Triton repository version adding (IA)^3 and RoAd adapters (`add_version`) answers each request as PEFT.
4. An .onnx_adapter vector of the wrong width is an `AdapterFileError` naming the site and what the export takes.
5. An adapter the export has no row site for (another kind at the site, another RoAd group size, (IA)^3 on the input
   where the export scales the output, a site with no elementwise kind) is an `AdapterSlotError` naming the site, the
   kind and what the export holds there.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rewrite.errors import AdapterFileError, AdapterSlotError
from rewrite.formats.manifest import read_manifest
from rewrite.formats.onnx_adapter import write_onnx_adapter
from rewrite.formats.peft_dir import read_peft_dir
from rewrite.formats.peft_rows import ROW_FORMATS, row_vectors
from rewrite.graph_edit import adapters_at
from rewrite.runtime.session import AdapterSession

from helpers import fill_adapter, fresh_capture
from helpers import run_pass as run
from models import build
from test_rowwise_ort_adapters import NAMES, Tiny
from test_unmerged import need

peft = pytest.importorskip("peft")

VECTOR_FILL = {"ia3_l": (1.0, 0.3), "road_theta": (0.0, 0.5), "road_alpha": (1.0, 0.3), "beft_bias": (0.0, 0.3)}
PEFT_ADAPTERS = {  # name -> PEFT config; each fits the row sites of test_rowwise_ort_adapters.INSERTS
    "ia3_new": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
    "road_new": lambda: peft.RoadConfig(target_modules=["q_proj"], variant="road_4", group_size=8),
    "beft_new": lambda: peft.BeftConfig(target_modules=["up_proj"]),
}
READERS = {  # name -> PEFT config, for the reader-vs-kind comparison
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    **{variant: (lambda v=variant: peft.RoadConfig(target_modules=["q_proj", "o_proj"], variant=v, group_size=8))
       for variant in ("road_1", "road_2", "road_4")},
    "beft": lambda: peft.BeftConfig(target_modules=["up_proj", "v_proj"]),
}


def _peft(work, name: str, config, seed: int):
    model = fill_adapter(peft.get_peft_model(build("llama"), config()), VECTOR_FILL, seed=seed)
    model.save_pretrained(work / name)
    return model, work / name


@pytest.mark.parametrize("name", list(READERS))
def test_reader_equals_the_kinds_row_params(name, tmp_path):
    _, path = _peft(tmp_path, name, READERS[name], seed=1)
    found = row_vectors(read_peft_dir(path, ROW_FORMATS))
    gm, _ = fresh_capture("llama")
    run(gm, "load", path=str(path), adapter="x")
    assert len(found) == 4  # two modules in each of two layers
    for module, vectors in found.items():
        kind = adapters_at(gm, module)["x"]
        assert (vectors.kind, vectors.layout) == (kind.kind, kind.row_layout())
        params = kind.row_params()
        assert set(vectors.vectors) == set(params)
        for p, (want, _) in params.items():
            np.testing.assert_allclose(vectors.vectors[p], want.numpy(), rtol=0, atol=1e-6)
        assert any(not np.allclose(v, params[p][1]) for p, v in vectors.vectors.items())  # not the identity


class Served:
    """PEFT-made adapters fitting Tiny's row sites, their PeftModels (the oracle) and feeds with five rows."""

    def __init__(self, work):
        self.tiny = Tiny(work)
        self.dirs, self.oracles = {}, {}
        for seed, (name, config) in enumerate(PEFT_ADAPTERS.items()):
            self.oracles[name], self.dirs[name] = _peft(work / "peft", name, config, seed=seed + 10)
        g = torch.Generator().manual_seed(5)
        self.feeds = {"input_ids": torch.randint(0, 128, (5, 7), generator=g).numpy(),
                      "attention_mask": np.ones((5, 7), np.int64)}

    def oracle(self, name: str, row: int) -> np.ndarray:
        feeds = {k: torch.from_numpy(v[row:row + 1]) for k, v in self.feeds.items()}
        with torch.no_grad():
            return self.oracles[name](**feeds).logits.numpy()[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    return Served(tmp_path_factory.mktemp("hot_add"))


@pytest.mark.parametrize("switching", ["bank", "custom-op"])
def test_added_rows_equal_peft(served, switching):
    out = served.tiny.export(need(switching), capacity=len(NAMES) + 2)
    with AdapterSession(out) as session:
        session.add_adapter("ia3_new", served.dirs["ia3_new"])  # the two free slots
        session.add_adapter("road_new", served.dirs["road_new"])
        bitfit_slot = session._snapshot.slots["bitfit"]
        session.remove_adapter("bitfit")
        session.add_adapter("beft_new", served.dirs["beft_new"])  # the slot bitfit held, its vectors replaced
        assert session._snapshot.slots["beft_new"] == bitfit_slot
        rows = ["road_new", "ia3_new", "beft_new", "road_new", "ia3_new"]
        got = session.run(served.feeds, adapter_ids=rows)[0]
        for i, name in enumerate(rows):
            assert np.abs(got[i] - served.oracle(name, i)).max() <= 1e-5, name
        session.remove_adapter("ia3_new")  # its slot is the identity everywhere: a LoRA adapter there is alone
        session.add_adapter("lora_2", served.tiny.export("ort-adapters") / "adapters" / "lora.onnx_adapter")
        added, exported, base = (session.run(served.feeds, adapter_ids=[name] * 5)[0]
                                 for name in ("lora_2", "lora", None))
        assert np.abs(added - exported).max() <= 1e-5 and np.abs(added - base).max() > 1e-3


def test_added_runs_equal_peft_in_ort_adapters(served):
    with AdapterSession(served.tiny.export("ort-adapters")) as session:
        for name, path in served.dirs.items():
            session.add_adapter(name, path)
            got = session.run(served.feeds, adapter=name)[0]
            for i in range(len(got)):
                assert np.abs(got[i] - served.oracle(name, i)).max() <= 1e-5, name


@pytest.mark.parametrize("switching", ["bank", "ort-adapters"])
def test_a_row_site_the_export_does_not_hold_is_named(served, tmp_path, switching):
    capacity = {"capacity": len(NAMES) + 2} if switching == "bank" else {}  # the export the other tests use
    cases = {
        "road_16": (lambda: peft.RoadConfig(target_modules=["q_proj"], group_size=16),
                    r"site 'model.layers.0.self_attn.q_proj': this road adapter \(group_size 16\) has no slot in this "
                    r"export, which holds road on the output \(group_size 8\) there"),
        "ia3_input": (lambda: peft.IA3Config(target_modules=["v_proj"], feedforward_modules=["v_proj"]),
                      r"site 'model.layers.0.self_attn.v_proj': this ia3_ff adapter has no slot in this export, which "
                      r"holds ia3 on the output \(widths l 32\) there"),
        "beft_k": (lambda: peft.BeftConfig(target_modules=["k_proj"]),
                   r"site 'model.layers.0.self_attn.k_proj': this bitfit adapter has no slot in this export, which holds "
                   r"ia3 on the output \(widths l 32\) there"),
        "beft_o": (lambda: peft.BeftConfig(target_modules=["o_proj"]),
                   r"site 'model.layers.0.self_attn.o_proj': this bitfit adapter has no slot in this export, which holds "
                   r"no elementwise adapter there \(sites with row vectors: "),
    }
    with AdapterSession(served.tiny.export(switching, **capacity)) as session:
        for name, (config, message) in cases.items():
            _, path = _peft(tmp_path, name, config, seed=2)
            with pytest.raises(AdapterSlotError, match=message):
                session.add_adapter(name, path)
        assert sorted(session.adapters) == sorted(NAMES)  # nothing half-added


def test_a_vector_of_the_wrong_width_is_named(served, tmp_path):
    out = served.tiny.export("ort-adapters")
    entry = read_manifest(out).exports[0]
    row_site = next(r for r in entry.row_sites if r.kind == "ia3")
    path = tmp_path / "wide.onnx_adapter"
    write_onnx_adapter(path, {row_site.banks["l"]: np.ones(row_site.widths["l"] + 1, np.float32)}, entry.model_version)
    width = row_site.widths["l"]
    message = (rf"site '{row_site.site}': ia3 vector l has shape \({width + 1},\); the export's ia3 on the output "
               rf"\(widths l {width}\) takes \[{width}\]")
    with AdapterSession(out) as session, pytest.raises(AdapterFileError, match=message):
        session.add_adapter("wide", path)


def test_a_triton_version_adds_elementwise_adapters(served, tmp_path):
    """`add_version` fills the row banks of a Triton repository's new version (as `add_adapter` does in a session):
    each request, batched as Triton's batcher would, equals PeftModel with its adapter."""
    pytest.importorskip("tritonclient.grpc")
    from rewrite.options import TritonOptions
    from rewrite.triton_repo import add_version, write_repository
    from test_triton import table_of
    from triton_batcher import TritonLike

    out = served.tiny.export("bank", capacity=len(NAMES) + 2)
    model_dir = write_repository(out, tmp_path / "repo", TritonOptions(name="tiny")).model_dir
    add_version(model_dir, add={"ia3_new": served.dirs["ia3_new"], "road_new": served.dirs["road_new"]})
    triton = TritonLike(model_dir)
    table = table_of(triton.config)
    rows = ["road_new", "ia3_new", "road_new", "ia3_new", "ia3_new"]
    requests = [{**{k: v[i:i + 1] for k, v in served.feeds.items()},
                 "adapter_ids": np.array([[table[name]]], np.int64)} for i, name in enumerate(rows)]
    for i, (name, answer) in enumerate(zip(rows, triton.run(requests))):
        (y,) = answer.values()
        assert np.abs(y[0] - served.oracle(name, i)).max() <= 1e-5, name
