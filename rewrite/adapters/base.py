"""`AdapterKind`: the one interface every adapter kind implements. Passes, export and the manifest ask the kind;
none of them switch on kind names.

What a kind declares (class attributes):

    kind        its name in the spec (`insert kind = ...`), the graph tags and the manifest
    ops         the site ops it can adapt ("linear", "conv1d", "conv2d", "embedding"; norms: "layernorm", "rmsnorm")
    join        how its module joins the base op y = base(x) (a module may set its own: bottleneck by placement):
                  "add"    y' = y + m(x)          the module returns a delta (LoRA family, BitFit, parallel adapters)
                  "output" y' = m(y)              the module rewrites the output ((IA)^3 on k / v, series adapters)
                  "input"  y' = base(m(x))        the module rewrites the input ((IA)^3 on feed-forward layers)
                  "graph"  y' = y                 the module joins no op: it only rewrites graph inputs and outputs
                                                  (`graph_edits`: prefix tuning's initial KV cache)
    reads_weight whether the module needs the site's base weight W: it is built with it (constructor keyword
                `weight`, what its init reads) and, joined by "add", called as m(x, W) with W read from the graph
                (DoRA normalises W + s B A)
    reads_output whether an "add"-joined module that `reads_weight` also takes the base op's own output y0 = base(x)
                (bias included) and the site's bias b (None without one): called as m(x, W, y0, b), so it can reuse
                y0 - b = op(x, W) instead of running the base op a second time (DoRA)
    needs_bias  whether `merge_into` writes the site's bias (BitFit): `merge` gives a site without one a zero bias
                parameter first
    built_with_base whether the module is built with the site's base weight and bias (constructor keywords
                `base_weight`, `base_bias`; None where the site has no bias), which it never reads at run time: a kind
                whose saved form holds the adapted weights themselves, not deltas, converts with them (LN tuning); one
                may draw its init from them (prompt tuning's sample_vocab: rows of the embedding table)
    settings    the insert keys it reads (rank, alpha, rslora, dropout, init); an insert that sets another key
                for this kind is refused
    Options     its own typed options (a strict pydantic model; insert's `options = { ... }` table), passed to
                the constructor as keyword arguments and kept as attributes of the same names
    inits       the `init` values it accepts, default first (each must start as the identity)
    weight_inits the inits among `inits` that read the site's base weight W and rewrite it in place at insert
                (PiSSA, OLoRA: W <- W - delta0, so the outputs stay unchanged): `adapter_for_site` calls
                `init_from_weight(W)` once the module is built; its forward never reads W. `save` writes such an
                adapter as PEFT does (it fits the residual base), or, with `convert_to_lora`, its `converted_form`
    starts_as_identity whether its inits leave the model's outputs unchanged (what `insert --verify` checks);
                prompt and prefix tuning add virtual tokens, which change them from the start
    mergeable   whether `merge_into` folds it into the base weights exactly
    resizable   whether `resize(rank, keep)` grows and shrinks it freely (what `allocate` needs; the SVD form only
                shrinks, under its training allocators)
    low_rank    whether `factors()` gives (A [d_in, r], B [r, d_out]) with delta(x) = x A B: what the unmerged
                lowerings (ort-adapters, bank, custom-op) switch per run or per batch row
    factored    whether `factors()` gives that view of an update that is not low-rank by construction (LoKr,
                FourierFT: exact factors at the update's numerical rank, rewrite/adapters/dense_factors.py); such a
                kind is switched like a low-rank one, but `allocate`, `fuse` and `combine` do not treat it as LoRA
    rowwise     whether `row_params()` gives the adapter as vectors over the last axis of the tensor its join
                rewrites (x for "input", y otherwise), each with the value that is the identity, and the class-level
                `apply_rows(t, params, **row_layout())` applies them: elementwise kinds ((IA)^3 t (.) l, RoAd
                c1 (.) t + c2 (.) rot(t), BitFit t + b), which the per-row lowerings (bank, custom-op) switch by
                gathering each row's vectors from a bank (no matmul); rotations of the input are row vectors too
                when flattened (OFT's blocks R - I, HRA's unit vectors: a per-row batched matmul, identity 0)
    parted      whether the adapter, neither `low_rank` nor `rowwise` as a whole, is exactly a low-rank delta and/or
                `rowwise` modules at its site: `unmerged_parts(W, b)` (the site's base weight and bias, as the
                export holds them) gives (factors or None, row modules), composed as
                    y' = rows_out(base(rows_in(x)) + x A B)        x A B reading the site's own x
                (DoRA: LoRA factors and an output scale; BOFT: an input rotation and an output scale), each part
                switched by the unmerged lowerings as a low-rank or `rowwise` adapter is
    copies_layer whether a module is a trained copy of its site's own tensors (PEFT's `modules_to_save`, which every
                tuner's directory may carry beside its adapter tensors): `copy_state()` gives them ({"weight", "bias"}:
                the site's parameters as the copy holds them, in the base op's own layout) and `load_copy(tensors)`
                sets the module from them; `load` places a directory's copies on such modules (`full`, `ln_tuning` on
                norms) and `save` writes them as modules_to_save beside the adapter's other modules
    rides       the key of another tuner's adapter_config.json under which that tuner's directory also holds modules of
                this kind ("modules_to_save" for copies; "trainable_token_indices"): `save` writes such modules
                there when the adapter has others, the key's value from class-level `rider_config(modules)` and
                each module's tensors from `rider_state()` ({key suffix: tensor}, stored as `<path>.<suffix>`)
    peft_format the PEFT directory format it reads and writes (rewrite.formats.peft_dir.PeftFormat: peft_type,
                config model, key suffixes), or None when PEFT has no such tuner; kinds sharing a format share
                `peft_config` and `peft_module` and may be saved as one PEFT adapter; the first kind registered
                with a format reads its directories

What a kind instance provides: `forward`, `merge_into(weight, bias)` / `unmerge_from(weight, bias)` (in place,
in the base op's own layout), `resize(rank, keep)` where a rank exists, `factors()` for low-rank kinds, `row_params()`
and `row_layout()` for elementwise (`rowwise`) ones, `unmerged_parts(weight, bias)` for `parted` ones, its PEFT
tensors (`peft_state`, `peft_shapes`, `load_peft_state`), class-level `peft_config(modules)` (writing) and
`peft_module(adapter, module)` (reading: which kind and settings a module of a PEFT directory gets), what `save`
writes (`saved_form`, `adapter_file_entry`) and `load` reads back (`load_adapter_file_entry`), and
`manifest_entry()`. A kind that changes the sequence the whole model sees (batching class B-seq: prompt and prefix
tuning) names the graph inputs and outputs it rewrites (`graph_edits`: `wire` routes each through a call of the module
with `edit=<key>`), and places the whole-model tensors of a PEFT directory (bare keys, module "") on its site
(`peft_owner`). A kind whose modules share state across the sites of one adapter (VeRA's frozen projections)
ties it in class-level `share(modules, tensors)`, which `insert` and `load` call once the adapter's modules are
built, and gives `save` the tensors it keeps once (`peft_shared_state(modules)`). What a kind cannot do raises
`NotSupported`
with a message that says what it can. A new kind is one file under rewrite/adapters/, its test, and one line in `KINDS`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from rewrite.formats.peft_dir import PeftAdapter, PeftFormat
from rewrite.options import Strict
from rewrite.sites import Site, SiteTable

SETTINGS = ("rank", "alpha", "rslora", "dropout", "init")


class NotSupported(ValueError):
    """The kind cannot do what was asked (merge, resize, lower, save as PEFT); the message says what can."""


class NoOptions(Strict):
    """A kind without options of its own."""


class AdapterKind(nn.Module):
    kind: ClassVar[str]
    ops: ClassVar[tuple[str, ...]]
    join: ClassVar[str] = "add"  # "add" | "output" | "input" | "graph"
    reads_weight: ClassVar[bool] = False
    reads_output: ClassVar[bool] = False
    needs_bias: ClassVar[bool] = False
    built_with_base: ClassVar[bool] = False
    settings: ClassVar[tuple[str, ...]] = SETTINGS
    Options: ClassVar[type[Strict]] = NoOptions
    inits: ClassVar[tuple[str, ...]] = ("zeros",)
    weight_inits: ClassVar[tuple[str, ...]] = ()
    starts_as_identity: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False  # a kind that implements merge_into exactly says so
    resizable: ClassVar[bool] = False
    low_rank: ClassVar[bool] = False
    factored: ClassVar[bool] = False
    rowwise: ClassVar[bool] = False
    parted: ClassVar[bool] = False
    copies_layer: ClassVar[bool] = False
    rides: ClassVar[str | None] = None
    peft_format: ClassVar[PeftFormat | None] = None

    op: str
    d_in: int
    d_out: int

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        raise NotSupported(f"{self.kind} adapters cannot be folded into the weights exactly; export them unmerged")

    def unmerge_from(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.merge_into(weight, bias, sign=-1.0)

    def resize(self, rank: int, keep: Sequence[int] | torch.Tensor | None = None) -> None:
        raise NotSupported(f"{self.kind} adapters have no rank to allocate")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [d_in, r], B [r, d_out]) with the scale folded into B: delta(x) = x A B (linear-layout sites)."""
        raise NotSupported(f"{self.kind} adapters are not low-rank; they cannot be switched in an unmerged export "
                           "(merge them, or use a low-rank kind such as lora)")

    def row_params(self) -> dict[str, tuple[torch.Tensor, float]]:
        """{name: (vector [width], identity value)} of a `rowwise` kind: `apply_rows` with every vector at its
        identity returns t unchanged."""
        raise NotSupported(f"{self.kind} adapters are not elementwise; they cannot be switched per row by a gather")

    def row_layout(self) -> dict[str, Any]:
        """The settings `apply_rows` needs besides the vectors; adapters of one kind share a bank where equal."""
        return {}

    @classmethod
    def apply_rows(cls, t: torch.Tensor, params: Mapping[str, torch.Tensor], **layout: Any) -> torch.Tensor:
        """t [..., width] rewritten by `row_params`-shaped vectors that broadcast against it (one per batch row)."""
        raise NotSupported(f"{cls.kind} adapters are not elementwise; they cannot be switched per row by a gather")

    def unmerged_parts(self, weight: torch.Tensor, bias: torch.Tensor | None
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, list["AdapterKind"]]:
        """(A [d_in, r], B [r, d_out] with the scale folded in, or None; the `rowwise` modules, at most one per join)
        of a `parted` kind at a site with base weight `weight` and bias `bias` (None without one)."""
        raise NotSupported(f"{self.kind} adapters cannot be switched in an unmerged export (merge them)")

    def graph_edits(self, gm: fx.GraphModule, site: Site) -> tuple[dict[str, str], dict[str, str]]:
        """The graph inputs (placeholder names) and outputs (output keys: `logits`, `present.0.key`) this module
        rewrites once it is wired at `site`, each {name: the `edit` key its call gets}: `wire` routes every user of
        such an input, and each such output, through `module(value, edit=key)`. Raises ValueError (naming what does
        not fit) for a graph it cannot serve, before anything is changed. Most kinds rewrite none."""
        return {}, {}

    @classmethod
    def peft_owner(cls, gm: fx.GraphModule, table: SiteTable) -> str:
        """The site owner that a PEFT directory's whole-model tensors (bare keys, read as module "": prompt
        learning's `prompt_embeddings`) belong to in this graph."""
        raise NotSupported(f"{cls.kind} adapters keep their PEFT tensors per module")

    def copy_state(self) -> dict[str, torch.Tensor]:
        """The site's tensors as this trained copy holds them ({"weight", "bias"}, the base op's layout)."""
        raise NotSupported(f"{self.kind} adapters are not a trained copy of a module (PEFT's modules_to_save)")

    def copy_shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(t.shape) for key, t in self.copy_state().items()}

    def load_copy(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set this module from a trained copy's tensors (`copy_shapes`, checked by the caller)."""
        raise NotSupported(f"{self.kind} adapters are not a trained copy of a module (PEFT's modules_to_save)")

    def rider_state(self) -> dict[str, torch.Tensor]:
        """This module's tensors in another tuner's directory ({key suffix: tensor}); copies: `copy_state`."""
        return self.copy_state()

    @classmethod
    def rider_config(cls, modules: Mapping[str, "AdapterKind"]) -> Any:
        """The value of `rides` in another tuner's config for these modules; copies: their paths."""
        return sorted(modules)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This module's tensors under PEFT's key suffixes, as views in PEFT's layout that write through; the
        default `peft_state`, `peft_shapes` and `load_peft_state` read and fill them."""
        raise NotSupported(f"{self.kind} adapters have no PEFT form")

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {key: t.detach().clone(memory_format=torch.contiguous_format) for key, t in self.peft_tensors().items()}

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(t.shape) for key, t in self.peft_tensors().items()}

    @torch.no_grad()
    def load_peft_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy PEFT-layout tensors in; callers have checked names and shapes with `peft_shapes`."""
        for key, target in self.peft_tensors().items():
            target.copy_(tensors[key].to(target.dtype))

    @classmethod
    def peft_config(cls, modules: Mapping[str, "AdapterKind"]) -> dict[str, Any]:
        """PEFT's adapter_config.json for these modules (module path -> module) of one adapter."""
        raise NotSupported(f"{cls.kind} adapters have no PEFT form")

    @classmethod
    def peft_module(cls, adapter: PeftAdapter, module: str) -> tuple[type["AdapterKind"], dict[str, Any]]:
        """The kind (this one or a sibling of its format) and the constructor settings (rank, alpha, rslora and
        the kind's Options fields) that `module` of this PEFT directory gets; its tensors then go in with
        `load_peft_state`. Each setting is also an attribute of the module (rule 7 of `load` compares them)."""
        raise NotSupported(f"{cls.kind} adapters have no PEFT form")

    @classmethod
    def share(cls, modules: Mapping[str, "AdapterKind"], tensors: Mapping[str, torch.Tensor]) -> bool:
        """Tie what the modules (module path -> module) of one adapter share, once they are all built: `insert` and
        `load` call it with every module of the adapter of this kind; `tensors` are the adapter's tensors kept once
        in its PEFT directory (`peft_format.shared`; empty at insert). Checks everything before it changes anything
        (NotSupported says what does not fit); returns whether anything changed. Most kinds share nothing."""
        return False

    @classmethod
    def peft_shared_state(cls, modules: Mapping[str, "AdapterKind"]) -> dict[str, torch.Tensor]:
        """The tensors `save` writes once for these modules of one adapter (`peft_format.shared`, PEFT layout)."""
        return {}

    def init_from_weight(self, weight: torch.Tensor) -> None:
        """Initialise from the site's base weight (an init of `weight_inits`) and rewrite that weight in place to
        the residual W - delta0, delta0 this init's delta: the outputs are unchanged. Refuses (ValueError) a site it
        cannot take before it changes anything."""
        raise NotSupported(f"{self.kind} adapters have no init that reads the base weight")

    def saved_form(self) -> "AdapterKind":
        """The module `save` writes: itself, or an equivalent of another kind (SVD-form LoRA saves as LoRA)."""
        return self

    def converted_form(self) -> "AdapterKind":
        """The module `save convert_to_lora = true` writes: the same delta relative to the base weight as it was
        before this adapter's insert (an adapter of `weight_inits`: the plain LoRA s (B A - B0 A0)); adapters that
        left the base weight alone are their `saved_form`."""
        return self.saved_form()

    def adapter_file_entry(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """(site metadata, tensors) for our own adapter file (rewrite.formats.adapter_file)."""
        raise NotSupported(f"our adapter file holds LoRA adapters; save {self.kind} as PEFT")

    def load_adapter_file_entry(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy in the tensors of `adapter_file_entry` (names and shapes checked against `adapter_file_shapes`)."""
        raise NotSupported(f"our adapter file holds LoRA adapters; load {self.kind} from PEFT")

    def adapter_file_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotSupported(f"our adapter file holds LoRA adapters; load {self.kind} from PEFT")

    def manifest_entry(self) -> dict[str, Any]:
        """What the manifest records of this adapter at its site besides site, name and kind (`LiveAdapter`)."""
        return dict(op=self.op)


class LowRank(AdapterKind):
    """A kind with a LoRA view: `lora_A` [d_in, r], `lora_B` [r, d_out] and `scaling`, delta(x) = scaling x A B."""

    low_rank = True
    mergeable = True
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    @torch.no_grad()
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.op not in ("linear", "conv1d"):
            raise NotSupported(f"unmerged export supports {self.kind} on linear and Conv1D sites; {self.op} sites "
                               "must be merged")
        return self.lora_A.detach().clone(), (self.lora_B.detach() * self.scaling).clone()
