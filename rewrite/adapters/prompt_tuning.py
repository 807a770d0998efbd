"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"), as PEFT's
`PromptTuningConfig` runs it: p trained virtual token embeddings P [p, d] in front of the input embeddings.

    H0' = [P; E(ids)]           on the sequence axis: the model sees p + S positions

The site is the model's input embedding: the embedding op that reads the graph input `input_ids` (`embed_tokens`,
`word_embeddings`, `wte`). Wired there, the adapter rewrites the graph's per-token inputs first (`graph_edits`), so
every shape the graph takes from them grows by p, then the embedding's output ("output" join):

    input_ids       [0^p, ids]              p filler ids, whose embeddings the join replaces
    embedding out   y' = [P; y[:, p:]]      what follows (position / token-type embeddings, a scale) applies to P too
    attention_mask  [1^p, mask]             the virtual tokens are attended to, as PEFT prepends ones
    position_ids    arange(p + S)           PEFT drops given position ids (with a warning): the default positions,
                                            virtual tokens at 0..p-1, real tokens shifted by p
    token_type_ids  0 over p + S            CAUSAL_LM, FEATURE_EXTRACTION: PEFT drops given token types (warning)
                    [0^p, types]            SEQ_CLS, TOKEN_CLS, QUESTION_ANS: PEFT keeps them, zeros in front

Task types: CAUSAL_LM, FEATURE_EXTRACTION, and the head tasks SEQ_CLS, TOKEN_CLS and QUESTION_ANS, whose head PEFT
trains too (`modules_to_save`: loaded as `full` copies beside the prompt, rewrite/adapters/full.py); SEQ_2_SEQ_LM
prompts both stacks: not supported. Outputs are what the model computes on the p + S positions, as PEFT's are
(CAUSAL_LM logits [B, p + S, V], FEATURE_EXTRACTION last_hidden_state [B, p + S, d], TOKEN_CLS logits [B, p + S, C]:
PEFT strips nothing; labels, not a graph input, would get -100 in front; SEQ_CLS pools what the model pools, e.g.
BERT's first position, a virtual token). Hazard: a decoder's SEQ_CLS head picks the last non-pad token of input_ids;
PEFT runs the model on embeddings (no ids), where transformers takes the last position instead: the two agree on
left-padded or unpadded batches only. A graph with any other
input (a with-past capture's cache: the prompt belongs to the prefill, not to each decode step; an encoder-decoder's
decoder inputs) is refused, and so is a second prompt or prefix adapter in one graph. Inits (PEFT's
`prompt_tuning_init`): "random" P ~ N(0, 1) (nn.Embedding's, PEFT's RANDOM), "sample_vocab" rows of the embedding
table at uniformly drawn ids (SAMPLE_VOCAB; TEXT needs a tokenizer: not offered). Neither is the identity
(`starts_as_identity = False`).

Not a weight delta: `merge` refuses it, unmerged (switching) exports refuse it, allocate refuses it (no rank); a
merged export keeps it inline, P an initializer. PEFT (`PROMPT_TUNING`): one tensor for the whole model under the bare
key `prompt_embeddings` [p, d]; config `num_virtual_tokens`, `token_dim`, `task_type`, `num_transformer_submodules`
(1 only).
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, StrictInt, StrictStr, field_validator
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.oft import PEFT_VERSION
from rewrite.errors import AdapterFileError
from rewrite.formats.peft_dir import PeftAdapter, PeftConfig, PeftFormat
from rewrite.options import Strict
from rewrite.sites import Site, SiteTable
from rewrite.state import AdapterTag, state_of

KEY = "prompt_embeddings"
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")  # PEFT keeps their token types (zeros for the prompt)
TASK_TYPES = ("CAUSAL_LM", "FEATURE_EXTRACTION", *HEAD_TASKS)
EDITS = {"input_ids": "ids", "attention_mask": "mask", "position_ids": "positions", "token_type_ids": "types"}
INLINE_ONLY = ("{kind} adapters add virtual tokens to the sequence, not a delta to a weight: they cannot be folded "
               "into the weights, nor switched in an unmerged export; export them inline with [export] mode = "
               "\"merged\", which keeps them as they are")


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _symbolic_view_source(node: fx.Node) -> fx.Node:
    """What a view of the ids with symbolic sizes only (GPT-2's `input_ids.view(-1, S)`, S read from the ids) reads;
    such a view follows the ids when virtual tokens grow them. Any other node is returned as it is: a constant size
    would not grow with them."""
    if node.op == "call_function" and node.target in _VIEWS and all(
            isinstance(size, fx.Node) or size == -1 for size in node.args[1]):
        return node.args[0]
    return node


def token_embedding(gm: fx.GraphModule, table: SiteTable) -> Site:
    """The model's input embedding: the embedding site whose ids are the graph input `input_ids` (read directly, or
    through a view of symbolic sizes, or through an adapter's edit of that input). ValueError when the graph has
    none."""
    for site in table.values():
        if site.op != "embedding":
            continue
        ids = _symbolic_view_source(table.node_of(gm, site.name).args[1])
        tag = ids.meta.get("rewrite")
        if isinstance(tag, AdapterTag) and tag.role == "graph":
            ids = ids.args[0]
        if ids.op == "placeholder" and ids.name == "input_ids":
            return site
    raise ValueError("the graph has no embedding op reading the input `input_ids`; virtual tokens go in front of "
                     "the token embeddings")


def check_entry(gm: fx.GraphModule, site: Site, module: AdapterKind) -> None:
    """A ValueError unless `site` is the model's input embedding and no other adapter already changes the sequence
    (two would each place their virtual tokens first)."""
    entry = token_embedding(gm, state_of(gm).sites)
    if entry.name != site.name:
        raise ValueError(f"{module.kind} adapters attach to the model's input embedding (the embedding reading "
                         f"`input_ids`), {entry.owner!r} here; {site.name} is another embedding")
    other = next((n for n in gm.graph.nodes if isinstance(tag := n.meta.get("rewrite"), AdapterTag)
                  and tag.role == "graph" and gm.get_submodule(n.target) is not module), None)
    if other is not None:
        tag = other.meta["rewrite"]
        raise ValueError(f"{tag.kind} adapter {tag.adapter!r} already adds virtual tokens to this graph; one "
                         "sequence-changing adapter (prompt or prefix tuning) per graph")


def inline_only(kind: str) -> NotSupported:
    return NotSupported(INLINE_ONLY.format(kind=kind))


class PromptTuningOptions(Strict):
    """insert's `options` for kind = "prompt_tuning"."""

    num_virtual_tokens: Annotated[StrictInt, Field(ge=1)]
    task_type: Literal[TASK_TYPES] = "CAUSAL_LM"  # type: ignore[valid-type]  # what PEFT runs it as (saved config)


class PromptTuningPeftConfig(PeftConfig):
    expected: ClassVar[dict[str, str]] = {
        **PeftConfig.expected, "num_virtual_tokens": "a positive integer", "token_dim": "a positive integer",
        "task_type": f"one of {', '.join(TASK_TYPES)} (SEQ_2_SEQ_LM prompts the encoder and the decoder: not "
                     "supported)",
        "num_transformer_submodules": "1 (one prompt for one stack; encoder-decoder prompts are not supported)"}

    peft_type: StrictStr = "PROMPT_TUNING"
    task_type: Literal[TASK_TYPES] | None = Field(default=None, validate_default=True)  # type: ignore[valid-type]
    num_virtual_tokens: Annotated[StrictInt, Field(ge=1)]
    token_dim: Annotated[StrictInt, Field(ge=1)] | None = None
    num_transformer_submodules: Literal[1] | None = None

    @field_validator("task_type")
    @classmethod
    def _task(cls, value: str | None) -> str:
        if value is None:
            raise ValueError("is null; PEFT applies no prompt without a task type (it runs the bare model)")
        return value


def check_table(adapter: PeftAdapter, columns: int | None, what: str) -> None:
    """The saved table `prompt_embeddings` is the model's (a bare key) and [num_virtual_tokens, columns] (columns
    unchecked when None)."""
    if set(adapter.modules) != {""}:
        raise AdapterFileError(f"{adapter.path}: {KEY} is kept once for the whole model under its bare key; this "
                               f"directory has it for the modules {sorted(m for m in adapter.modules if m)}")
    table, rows = adapter.modules[""][KEY], adapter.config.num_virtual_tokens
    if table.ndim != 2 or table.shape[0] != rows or columns not in (None, table.shape[1]):
        raise AdapterFileError(f"{adapter.path}: {KEY} has shape {list(table.shape)}; the config says "
                               f"[num_virtual_tokens, {what}] = [{rows}, {columns if columns else '...'}]")


PROMPT_TUNING_FORMAT = PeftFormat("PROMPT_TUNING", PromptTuningPeftConfig, ((KEY,),), bare=(KEY,),
                                  check=lambda adapter: check_table(adapter, adapter.config.token_dim, "token_dim"))


class PromptTuning(AdapterKind):
    kind = "prompt_tuning"
    ops = ("embedding",)
    join = "output"
    settings = ("init",)
    Options = PromptTuningOptions
    inits = ("random", "sample_vocab")
    built_with_base = True  # sample_vocab draws rows of the table
    starts_as_identity = False
    peft_format = PROMPT_TUNING_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "random", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 base_weight: torch.Tensor, base_bias: torch.Tensor | None, num_virtual_tokens: int,
                 task_type: str = "CAUSAL_LM"):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.num_virtual_tokens, self.task_type = num_virtual_tokens, task_type
        if init == "sample_vocab":
            ids = torch.randint(0, d_in, (num_virtual_tokens,))
            start = base_weight.detach()[ids.to(base_weight.device)].to(dtype=dtype, device=device)
        else:
            start = torch.randn(num_virtual_tokens, d_out).to(dtype=dtype, device=device)
        self.prompt = nn.Parameter(start)

    def graph_edits(self, gm: fx.GraphModule, site: Site) -> tuple[dict[str, str], dict[str, str]]:
        check_entry(gm, site, self)
        inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        other = [name for name in inputs if name not in EDITS]
        if other:
            why = ""
            if any(name.startswith("past_key_values") for name in other):
                why = (" (a with-past capture: the prompt belongs to the prefill, not to every decode step; capture "
                       "without use_cache, or use prefix_tuning, which is the initial cache)")
            raise ValueError(f"{self.kind} grows the inputs {', '.join(EDITS)} by its virtual tokens; this graph "
                             f"also takes {', '.join(other)}{why}")
        return {name: EDITS[name] for name in inputs}, {}

    def forward(self, x: torch.Tensor, edit: str | None = None) -> torch.Tensor:
        p, batch = self.num_virtual_tokens, x.shape[0]
        if edit is None:  # the embedding output of the grown ids: its first p rows become P
            return torch.cat((self.prompt.to(x.dtype).expand(batch, p, self.d_out), x[:, p:]), dim=1)
        if edit == "mask":
            return torch.cat((x.new_ones((batch, p)), x), dim=1)
        if edit == "ids":
            return torch.cat((x.new_zeros((batch, p)), x), dim=1)
        if edit == "types" and self.task_type in HEAD_TASKS:
            return torch.cat((x.new_zeros((batch, p)), x), dim=1)
        # positions (and the other tasks' token types): PEFT drops the given ones; the model's defaults over p + S
        positions = torch.arange(p + x.shape[1], dtype=x.dtype, device=x.device).expand(batch, -1)
        return positions if edit == "positions" else torch.zeros_like(positions)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        raise inline_only(self.kind)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise inline_only(self.kind)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {KEY: self.prompt}

    @classmethod
    def peft_owner(cls, gm: fx.GraphModule, table: SiteTable) -> str:
        return token_embedding(gm, table).owner

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[PromptTuning], dict]:
        config = adapter.config
        return cls, dict(num_virtual_tokens=config.num_virtual_tokens, task_type=config.task_type)

    @classmethod
    def peft_config(cls, modules) -> dict:
        (module,) = modules.values()
        return {"peft_type": "PROMPT_TUNING", "task_type": module.task_type, "peft_version": PEFT_VERSION,
                "num_virtual_tokens": module.num_virtual_tokens, "token_dim": module.d_out,
                "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None,
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None, "inference_mode": True, "base_model_name_or_path": None,
                "modules_to_save": None, "revision": None, "auto_mapping": None}

    def extra_repr(self) -> str:
        return f"virtual_tokens={self.num_virtual_tokens}, d={self.d_out}, task_type={self.task_type}"
