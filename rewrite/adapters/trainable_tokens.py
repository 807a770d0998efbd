"""Trainable tokens: train only the rows of chosen token ids of an embedding table, as PEFT's
`TrainableTokensConfig` (peft_type TRAINABLE_TOKENS) does.

    E' = E with row t_i replaced by v_i  (i = 1..n)        y' = E'[ids]

v [n, d] starts as o = E[t] (the rows at insert / load: the identity) and is what trains, as in PEFT. In the graph
it is a delta on the embedding's output ("add" join), gathered by id:

    y' = y + D[slot[ids]]      D = [0; v - o]  [n + 1, d]     slot [V]: slot[t_i] = i, every other id 0

Merge (exact): E[t] <- E[t] + (v - o), written as v itself where E[t] still holds o (the usual case: PEFT's
`index_copy`, bit for bit); unmerge the reverse (o where E[t] holds v). Token ids are checked at insert and load:
non-negative, distinct (PEFT's `index_copy` with a repeated id keeps one of its rows unpredictably) and < V.

PEFT (TRAINABLE_TOKENS): key `base_model.model.<module>.trainable_tokens_delta` [n, d] = v (the new rows themselves,
not a difference, despite the name); beside a LoRA's modules (its `trainable_token_indices`, `rides`), key
`<module>.token_adapter.trainable_tokens_delta`, config {module: ids}; config `token_indices` (one list for every targeted module), `target_modules`
(PEFT saves its default, the input embedding, as a regex string), `init_weights`. A directory applies its rows
whatever the base holds there (o is read from this model's table). A tied embedding (its table also the output
layer's weight: `tie_word_embeddings`, GPT-2) is refused: PEFT then rewrites the same rows of the output layer as
well, and saves that tied copy under the output layer's name. Not low-rank and not elementwise: unmerged (switching)
exports refuse it (as LoRA on an embedding), allocate refuses it (no rank); a merged export folds it in (exported
unmerged by hand, the graph above runs as it is: two gathers).
"""
from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.oft import PEFT_VERSION
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import CONFIG, TOKEN_ROWS, WEIGHTS, PeftAdapter, PeftConfig, PeftFormat
from rewrite.options import Strict
from rewrite.sites import Site
from rewrite.state import AdapterTag, state_of

KEY = "trainable_tokens_delta"


def _token_ids(ids: list[int]) -> list[int]:
    negative = [i for i in ids if i < 0]
    if negative:
        raise ValueError(f"has the negative token ids {negative}; token ids count from 0")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"repeats the token ids {repeated}; each row is trained once (PEFT would keep one of the "
                         "repeated rows unpredictably)")
    return ids


class TrainableTokensOptions(Strict):
    """insert's `options` for kind = "trainable_tokens"."""

    token_indices: list[StrictInt] = Field(min_length=1)  # the token ids whose rows train: distinct, < the vocabulary

    @field_validator("token_indices")
    @classmethod
    def _token_ids(cls, ids: list[int]) -> list[int]:
        return _token_ids(ids)


class TrainableTokensPeftConfig(PeftConfig):
    """`adapter_config.json` of a trainable-tokens adapter. TrainableTokensConfig has no modules_to_save,
    exclude_modules, layers_to_transform or layers_pattern (PEFT drops them when it reads the config), so a config
    that sets one is refused rather than read."""

    expected: ClassVar[dict[str, str]] = {
        **PeftConfig.expected, "token_indices": "a non-empty list of distinct token ids (integers >= 0)"}
    unsupported: ClassVar[dict[str, str]] = {
        **PeftConfig.unsupported, **{key: f"{key} (not a TrainableTokensConfig field: PEFT ignores it)" for key in
                                     ("modules_to_save", "exclude_modules", "layers_to_transform", "layers_pattern")}}

    peft_type: StrictStr = "TRAINABLE_TOKENS"
    token_indices: list[StrictInt] = Field(min_length=1)
    init_weights: StrictBool = True

    @field_validator("token_indices")
    @classmethod
    def _token_ids(cls, ids: list[int]) -> list[int]:
        return _token_ids(ids)

    def targets(self, module: str) -> bool | None:
        # a module outside target_modules may be PEFT's tied copy: `_check_peft_dir` says which it is
        return super().targets(module) or None


def _check_peft_dir(adapter: PeftAdapter) -> None:
    """Each module's rows are [len(token_indices), d]; a module target_modules does not select is refused, as PEFT's
    tied copy of the embedding's rows (same tensor) or as not PEFT's."""
    config, rows = adapter.config, len(adapter.config.token_indices)
    tables = {module: parts[KEY] for module, parts in adapter.modules.items()}
    for module, table in tables.items():
        if table.ndim != 2 or table.shape[0] != rows:
            raise AdapterFileError(f"{adapter.path / WEIGHTS}: {module}.{KEY} has shape {list(table.shape)}; the "
                                   f"config's token_indices give {rows} rows: [{rows}, embedding width]")
    for module, table in tables.items():
        if PeftConfig.targets(config, module) is not False:
            continue
        tied = next((m for m, t in tables.items() if m != module and t.shape == table.shape
                     and np.array_equal(t, table)), None)
        if tied is not None:
            raise AdapterFileError(f"{adapter.path}: {module}.{KEY} is PEFT's tied copy of {tied}'s rows: the model "
                                   "ties its embedding and output layer (tie_word_embeddings), where PEFT rewrites the "
                                   "output layer's rows too; trainable tokens on tied embeddings are not supported: "
                                   "merge in PEFT (merge_and_unload) and export that model, or train on an untied "
                                   "model")
        raise AdapterFileError(f"{adapter.path / CONFIG}: 'target_modules' = {config.target_modules!r} does not "
                               f"select {module!r}, but {WEIGHTS} holds its tensors; PEFT would not load them there")


def _attr(gm: fx.GraphModule, target: str) -> object:
    return functools.reduce(getattr, target.split("."), gm)


TRAINABLE_TOKENS_FORMAT = PeftFormat("TRAINABLE_TOKENS", TrainableTokensPeftConfig, ((KEY,),), check=_check_peft_dir)


class TrainableTokens(AdapterKind):
    kind = "trainable_tokens"
    ops = ("embedding",)
    settings = ()
    Options = TrainableTokensOptions
    inits = ("copy",)  # v = o: PEFT's init_weights = true (its random rows, init_weights = false, are no identity)
    built_with_base = True
    mergeable = True
    rides = "trainable_token_indices"
    peft_format = TRAINABLE_TOKENS_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "copy", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 base_weight: torch.Tensor, base_bias: torch.Tensor | None, token_indices: list[int]):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.token_indices = _token_ids(list(token_indices))
        outside = [t for t in self.token_indices if not 0 <= t < d_in]
        if outside:
            raise ValueError(f"token_indices {outside} are outside the embedding's {d_in} rows (ids 0..{d_in - 1})")
        index = torch.tensor(self.token_indices, dtype=torch.long, device=device)
        slot = torch.zeros(d_in, dtype=torch.long, device=device)
        slot[index] = torch.arange(1, len(index) + 1, device=device)
        originals = base_weight.detach()[index.to(base_weight.device)].to(dtype=dtype, device=device)
        self.values = nn.Parameter(originals.clone())
        # invariant: v - o is the delta; o are the rows this adapter was built on (never trained)
        self.register_buffer("originals", originals.clone(), persistent=False)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("slot", slot, persistent=False)

    def graph_edits(self, gm: fx.GraphModule, site: Site) -> tuple[dict[str, str], dict[str, str]]:
        """No graph edits; refuses a tied table (module docstring) before the adapter is wired: one that any op
        besides this module's embedding calls reads, under any of its names."""
        table, sites = gm.get_parameter(site.weight), state_of(gm).sites
        own = {s.node for s in sites.values() if s.owner == site.owner}
        owners = {s.node: s.owner for s in sites.values()}
        readers = {owners.get(user.name, f"the op {user.name}") for node in gm.graph.nodes
                   if node.op == "get_attr" and _attr(gm, node.target) is table for user in node.users
                   if user.name not in own and not isinstance(user.meta.get("rewrite"), AdapterTag)}
        if readers:
            raise ValueError(f"its table {site.weight} is also read by {', '.join(sorted(readers))} (tied "
                             "embeddings); PEFT's trainable tokens then rewrite the same rows there too, which this "
                             "kind does not do: untie them (tie_word_embeddings = false) or adapt an untied embedding")
        return {}, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = torch.cat((self.values.new_zeros(1, self.d_out), self.values - self.originals))
        return F.embedding(self.slot[x], delta)

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        if weight.is_meta:
            return
        index = self.index.to(weight.device)
        start, end = (self.originals, self.values) if sign > 0 else (self.values, self.originals)
        start, end = start.to(weight), end.to(weight)
        rows = weight[index]
        # rows still at `start` become `end` exactly (PEFT's index_copy); rows another adapter moved get the delta
        weight.index_copy_(0, index, torch.where(rows == start, end, rows + (end - start)))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotSupported(f"{self.kind} adapters replace rows of an embedding table, which the unmerged exports "
                           "(low-rank and elementwise switching) cannot switch; export it with [export] mode = "
                           "\"merged\", which folds it into the table (or run the merge pass first)")

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {KEY: self.values}

    def rider_state(self) -> dict[str, torch.Tensor]:
        return {TOKEN_ROWS: self.values.detach().clone()}

    @classmethod
    def rider_config(cls, modules) -> dict[str, list[int]]:
        return {owner: list(m.token_indices) for owner, m in modules.items()}

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[TrainableTokens], dict]:
        return cls, dict(token_indices=list(adapter.config.token_indices))

    @classmethod
    def peft_config(cls, modules) -> dict:
        indices = {tuple(m.token_indices) for m in modules.values()}
        if len(indices) > 1:
            raise NotSupported(f"PEFT's TrainableTokensConfig has one token_indices list for every module, and this "
                               f"adapter's modules train different ones ({sorted(map(list, indices))}); save each "
                               "embedding's adapter under its own name")
        return {"peft_type": "TRAINABLE_TOKENS", "task_type": None, "base_model_name_or_path": None,
                "inference_mode": True, "peft_version": PEFT_VERSION, "target_modules": sorted(modules),
                "token_indices": list(next(iter(indices))), "init_weights": True, "revision": None}

    def extra_repr(self) -> str:
        return f"rows={self.d_in}, d={self.d_out}, tokens={len(self.token_indices)}"
