"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"), as PEFT's
`PrefixTuningConfig` runs it on a decoder: p trained key / value positions in front of every layer's attention.

    K'_l = [Pk_l; K_l],  V'_l = [Pv_l; V_l]      Pk_l, Pv_l [kv_heads, p, head_dim]; queries unchanged

PEFT feeds the prefix in as the initial KV cache, and so does this kind: it serves a with-past capture
(`[capture] use_cache = true`, rewrite/decoder.py), whose cache inputs it extends; the no-cache graph computes its
mask and positions inside, from the sequence it is given, and is refused. Wired at the model's input embedding
(the embedding reading `input_ids`: the model's entry, where prompt tuning also sits) with no join of its own
("graph"), it rewrites the graph's inputs and outputs (`graph_edits`):

    past_key_values.<l>.key / .value   [Pk_l; past]   on the position axis (prefix keys get no rotary embedding)
    attention_mask                     [1^p, mask]    the prefix is attended to
    position_ids                       position_ids + p   real tokens after the prefix, as PEFT offsets them
    present.<l>.key / .value           present[:, :, p:]  the prefix stripped again: the caller's cache stays its
                                                          own, so each step feeds the prefix in once

so outputs keep their shapes (logits [B, S, V]), and a prefill with an empty cache equals PEFT's forward. The table
(PEFT's layout): T [p, 2 L kv_heads head_dim], Pk_l = T[:, 2l], Pv_l = T[:, 2l + 1] (blocks of kv_heads * head_dim,
each viewed [p, kv_heads, head_dim]). `prefix_projection = true` trains T = Linear2(tanh(Linear1(E))), E [p,
kv_heads head_dim], Linear1 to `encoder_hidden_size` (default kv_heads head_dim), as PEFT does; saved, it is T
itself (which PEFT and `load` read without the MLP); a merged export computes it inline. Inits (PEFT's `init_weights`): "random" (E or T ~ N(0, 1), nn.Linear's defaults), "zero"
(T = 0, or Linear2 = 0: zero keys and values, which still take attention weight: not the identity).

Options name the cache layout (PEFT's `num_layers`, `num_attention_heads` = KV heads, `token_dim` = kv_heads *
head_dim under GQA), checked against the graph's cache inputs. Not a weight delta: `merge`, unmerged (switching)
exports and allocate refuse it; a merged export keeps it inline. PEFT (`PREFIX_TUNING`, task_type CAUSAL_LM): the
bare key `prompt_embeddings` = T; `num_transformer_submodules` 1 only.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
import torch.fx as fx
from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationInfo, field_validator
from torch import nn

from rewrite.adapters.base import AdapterKind, NotSupported
from rewrite.adapters.oft import PEFT_VERSION
from rewrite.adapters.prompt_tuning import KEY, check_entry, check_table, inline_only, token_embedding
from rewrite.formats.peft_dir import PeftConfig, PeftFormat
from rewrite.options import Strict
from rewrite.sites import Site, SiteTable

KINDS = ("key", "value")


class PrefixTuningOptions(Strict):
    """insert's `options` for kind = "prefix_tuning"."""

    num_virtual_tokens: Annotated[StrictInt, Field(ge=1)]
    num_layers: Annotated[StrictInt, Field(ge=1)]
    num_key_value_heads: Annotated[StrictInt, Field(ge=1)]
    head_dim: Annotated[StrictInt, Field(ge=1)]
    prefix_projection: StrictBool = False
    encoder_hidden_size: Annotated[StrictInt, Field(ge=1)] | None = None  # default kv_heads * head_dim


class PrefixTuningPeftConfig(PeftConfig):
    expected: ClassVar[dict[str, str]] = {
        **PeftConfig.expected, "num_virtual_tokens": "a positive integer", "token_dim": "a positive integer",
        "num_layers": "a positive integer", "num_attention_heads": "a positive integer",
        "task_type": "CAUSAL_LM (the prefix is a decoder's initial cache; encoders and encoder-decoders are not "
                     "supported)",
        "num_transformer_submodules": "1 (encoder-decoder prefixes are not supported)"}

    peft_type: StrictStr = "PREFIX_TUNING"
    task_type: Literal["CAUSAL_LM"]
    num_virtual_tokens: Annotated[StrictInt, Field(ge=1)]
    token_dim: Annotated[StrictInt, Field(ge=1)]
    num_layers: Annotated[StrictInt, Field(ge=1)]
    num_attention_heads: Annotated[StrictInt, Field(ge=1)]
    num_transformer_submodules: Literal[1] | None = None
    prefix_projection: StrictBool = False
    encoder_hidden_size: Annotated[StrictInt, Field(ge=1)] | None = None

    @field_validator("num_attention_heads")
    @classmethod
    def _heads(cls, heads: int, info: ValidationInfo) -> int:
        token_dim = info.data.get("token_dim")
        if token_dim and token_dim % heads:
            raise ValueError(f"{heads} does not divide token_dim {token_dim} (heads x head_dim)")
        return heads


PREFIX_TUNING_FORMAT = PeftFormat(
    "PREFIX_TUNING", PrefixTuningPeftConfig, ((KEY,),), bare=(KEY,),
    check=lambda adapter: check_table(adapter, 2 * adapter.config.num_layers * adapter.config.token_dim,
                                      "2 * num_layers * token_dim"))


class PrefixTuning(AdapterKind):
    kind = "prefix_tuning"
    ops = ("embedding",)
    join = "graph"
    settings = ("init",)
    Options = PrefixTuningOptions
    inits = ("random", "zero")
    starts_as_identity = False
    peft_format = PREFIX_TUNING_FORMAT

    def __init__(self, op: str, d_in: int, d_out: int, rank: int = 0, alpha: float = 0.0, *, rslora: bool = False,
                 dropout: float = 0.0, init: str = "random", conv: dict | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", num_virtual_tokens: int,
                 num_layers: int, num_key_value_heads: int, head_dim: int, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None):
        super().__init__()
        self.op, self.d_in, self.d_out = op, d_in, d_out
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.num_key_value_heads, self.head_dim = num_key_value_heads, head_dim
        self.prefix_projection = prefix_projection
        token_dim = num_key_value_heads * head_dim
        self.encoder_hidden_size = encoder_hidden_size or token_dim
        width, factory = 2 * num_layers * token_dim, dict(dtype=dtype, device=device)
        if prefix_projection:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, token_dim, **factory))
            self.transform = nn.Sequential(nn.Linear(token_dim, self.encoder_hidden_size, **factory), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, width, **factory))
            if init == "zero":
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)
        else:
            start = torch.zeros if init == "zero" else torch.randn
            self.prefix = nn.Parameter(start(num_virtual_tokens, width, **factory))

    def table(self) -> torch.Tensor:
        """T [p, 2 L kv_heads head_dim] (module docstring)."""
        return self.transform(self.embedding) if self.prefix_projection else self.prefix

    def graph_edits(self, gm: fx.GraphModule, site: Site) -> tuple[dict[str, str], dict[str, str]]:
        check_entry(gm, site, self)
        placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        past = {f"past_key_values_{layer}_{kind}": f"past.{layer}.{kind}"
                for layer in range(self.num_layers) for kind in KINDS}
        cached = sorted(name for name in placeholders if name.startswith("past_key_values_"))
        if not cached:
            raise ValueError(f"{self.kind} feeds its keys and values in as the initial KV cache, and this graph has "
                             "no cache inputs: capture the decoder with [capture] use_cache = true")
        if sorted(past) != cached:
            raise ValueError(f"the adapter has num_layers = {self.num_layers}; the graph caches "
                             f"{len(cached) // 2} layers")
        want = (self.num_key_value_heads, self.head_dim)
        for name in past:
            shape = tuple(placeholders[name].meta["val"].shape)
            if (shape[1], shape[3]) != want:
                raise ValueError(f"the adapter has num_key_value_heads = {want[0]}, head_dim = {want[1]}; the "
                                 f"graph's {name} is [batch, {shape[1]}, past, {shape[3]}]")
        inputs = {**past, **{name: name for name in ("attention_mask", "position_ids") if name in placeholders}}
        return inputs, {f"present.{key.removeprefix('past.')}": f"present.{key.removeprefix('past.')}"
                        for key in past.values()}

    def forward(self, x: torch.Tensor, edit: str) -> torch.Tensor:
        p = self.num_virtual_tokens
        if edit == "attention_mask":
            return torch.cat((x.new_ones((x.shape[0], p)), x), dim=1)
        if edit == "position_ids":
            return x + p
        where, layer, kind = edit.split(".")
        if where == "present":
            return x[:, :, p:]
        index, token_dim = 2 * int(layer) + KINDS.index(kind), self.num_key_value_heads * self.head_dim
        block = self.table()[:, index * token_dim:(index + 1) * token_dim].to(x.dtype)
        prefix = block.view(p, self.num_key_value_heads, self.head_dim).transpose(0, 1)
        return torch.cat((prefix.expand(x.shape[0], -1, -1, -1), x), dim=2)

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None, sign: float = 1.0) -> None:
        raise inline_only(self.kind)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise inline_only(self.kind)

    def peft_state(self) -> dict[str, torch.Tensor]:
        return {KEY: self.table().detach().clone()}

    def peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {KEY: (self.num_virtual_tokens, 2 * self.num_layers * self.num_key_value_heads * self.head_dim)}

    @torch.no_grad()
    def load_peft_state(self, tensors) -> None:
        if self.prefix_projection:
            raise NotSupported("a saved prefix is the projection's output, which cannot be loaded back into the "
                               "projection; load it into an adapter without prefix_projection")
        self.prefix.copy_(tensors[KEY].to(self.prefix.dtype))

    @classmethod
    def peft_owner(cls, gm: fx.GraphModule, table: SiteTable) -> str:
        return token_embedding(gm, table).owner

    @classmethod
    def peft_module(cls, adapter, module: str) -> tuple[type[PrefixTuning], dict]:
        """The saved table is T itself (with prefix_projection, the projection's output, which PEFT also loads
        without its MLP): the module gets no projection."""
        config = adapter.config
        return cls, dict(num_virtual_tokens=config.num_virtual_tokens, num_layers=config.num_layers,
                         num_key_value_heads=config.num_attention_heads,
                         head_dim=config.token_dim // config.num_attention_heads, prefix_projection=False,
                         encoder_hidden_size=config.encoder_hidden_size or config.token_dim)

    @classmethod
    def peft_config(cls, modules) -> dict:
        (module,) = modules.values()
        return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "peft_version": PEFT_VERSION,
                "num_virtual_tokens": module.num_virtual_tokens,
                "token_dim": module.num_key_value_heads * module.head_dim, "num_layers": module.num_layers,
                "num_attention_heads": module.num_key_value_heads, "num_transformer_submodules": 1,
                "prefix_projection": module.prefix_projection, "encoder_hidden_size": module.encoder_hidden_size,
                "init_weights": None, "inference_mode": True, "base_model_name_or_path": None,
                "modules_to_save": None, "revision": None, "auto_mapping": None}

    def extra_repr(self) -> str:
        return (f"virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, "
                f"kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"prefix_projection={self.prefix_projection}")
