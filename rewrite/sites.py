"""Weight call sites and the selectors that pick them.

A site is one call of a weight-carrying base op, named by the module path of the weight's owner
(PEFT's `target_modules` vocabulary) plus `@k` for the k-th further call of the same weight:

    op          graph node (export front-end)            weight layout      d_in, d_out
    linear      aten.linear(x, W, b)                     W [d_out, d_in]    W.shape[1], W.shape[0]
                (x @ W.T + b written out: `canonical_linears` makes it aten.linear at capture)
    conv1d      aten.addmm(b, x2d, W)   (HF GPT-2 Conv1D) W [d_in, d_out]    W.shape[0], W.shape[1]
    conv2d      aten.conv2d(x, W, b, ...)                W [c_out, c_in/g, kh, kw]
    embedding   aten.embedding(W, ids)                   W [V, d]           V, d
    layernorm   aten.layer_norm(x, [d], W, b, eps)       W [d]              d, d
    rmsnorm     aten.mul(W, n) in an RMSNorm module      W [d]              d, d

Norm sites carry a 1-D weight. `layernorm` is every affine nn.LayerNorm / F.layer_norm over one dim. `rmsnorm` is
the product of an RMS norm's weight and its normalised input, n = x * rsqrt(mean(x^2) + eps) (LlamaRMSNorm and
its kin are plain Python, so no single op carries them): a `mul` with a direct `get_attr` operand that is the
1-D parameter `weight` of the calling module, a module whose class is named `*RMSNorm` or `T5LayerNorm`
(nn_module_stack). Norms that scale by (1 + weight) (Gemma) multiply by an `add`, not the weight: not sites.

Selectors (strings in a spec), with a fixed precedence when several give a site a value:
global default < `class:Name` < glob / `re:` regex (first listed wins) < exact name. An exact name
also matches as a dotted suffix (`q_proj` matches `model.layers.0.self_attn.q_proj`), like PEFT.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from rewrite.errors import SpecError, nearest

aten = torch.ops.aten
V = TypeVar("V")

# op -> (index of x, index of the weight, index of the bias or None)
_ATEN_SITES = {
    aten.linear.default: ("linear", 0, 1, 2),
    aten.addmm.default: ("conv1d", 1, 2, 0),
    aten.conv2d.default: ("conv2d", 0, 1, 2),
    aten.embedding.default: ("embedding", 1, 0, None),
    aten.layer_norm.default: ("layernorm", 0, 2, 3),
}
_MODULE_SITES = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding", nn.LayerNorm: "layernorm"}
NORM_OPS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class Site:
    name: str
    owner: str
    call_index: int
    op: str
    weight: str
    bias: str | None
    module_class: str
    d_in: int
    d_out: int
    node: str


class SiteTable(Mapping[str, Site]):
    """Sites in graph order, addressable by name."""

    def __init__(self, sites: Iterable[Site]):
        self._sites = {s.name: s for s in sites}

    def __getitem__(self, name: str) -> Site:
        return self._sites[name]

    def __iter__(self):
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    def node_of(self, gm: fx.GraphModule, name: str) -> fx.Node:
        target = self._sites[name].node
        for node in gm.graph.nodes:
            if node.name == target:
                return node
        raise KeyError(f"site {name}: node {target} is no longer in the graph")


def _get_attr_source(node: Any) -> str | None:
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if node.op == "get_attr":
            return node.target
        if node.op == "call_function" and node.target in (aten.t.default, aten.permute.default,
                                                           aten.transpose.int, aten._to_copy.default,
                                                           aten.alias.default):
            node, seen = node.args[0], seen + 1
            continue
        return None
    return None


def _lookup(root: nn.Module, fqn: str) -> Any:
    try:
        return root.get_submodule(fqn) if fqn else root
    except AttributeError:
        return None


def _owner_path(gm: fx.GraphModule, node: fx.Node, weight: str) -> str:
    """The calling module if it owns this weight (keeps PEFT names for tied weights), else the weight's owner."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        module = _lookup(gm, path)
        param = gm.get_parameter(weight) if weight else None
        if module is not None and any(p is param for p in module.parameters(recurse=False)):
            return path
    return weight.rpartition(".")[0]


def find_sites(gm: fx.GraphModule) -> SiteTable:
    """Every call of a weight-carrying op whose weight is a parameter, in graph order."""
    found: list[Site] = []
    calls: dict[str, int] = {}

    def add(node: fx.Node, op: str, owner: str, weight: str, bias: str | None, shape: tuple[int, ...]):
        if op == "conv1d":
            d_in, d_out = shape[0], shape[1]
        elif op == "embedding":
            d_in, d_out = shape
        elif op == "conv2d":
            d_in, d_out = shape[1], shape[0]
        elif op in NORM_OPS:
            d_in = d_out = shape[0]
        else:
            d_in, d_out = shape[1], shape[0]
        k = calls.get(owner, 0)
        calls[owner] = k + 1
        found.append(Site(name=owner if k == 0 else f"{owner}@{k}", owner=owner, call_index=k, op=op,
                          weight=weight, bias=bias, module_class=_module_class(gm, node, owner), d_in=d_in,
                          d_out=d_out, node=node.name))

    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ATEN_SITES:
            op, _, w_idx, b_idx = _ATEN_SITES[node.target]
            weight = _get_attr_source(node.args[w_idx]) if len(node.args) > w_idx else None
            if weight is None or not isinstance(_param(gm, weight), nn.Parameter):
                continue
            if op == "conv1d" and node.args[w_idx].op != "get_attr":
                continue  # addmm over a transposed Linear weight is a decomposed linear, not Conv1D
            if op in NORM_OPS and _param(gm, weight).dim() != 1:
                continue  # a norm over several trailing dims
            bias = _get_attr_source(node.args[b_idx]) if b_idx is not None and len(node.args) > b_idx else None
            add(node, op, _owner_path(gm, node, weight), weight, bias, tuple(_param(gm, weight).shape))
        elif node.op == "call_function" and node.target == aten.mul.Tensor and (weight := _rmsnorm_weight(gm, node)):
            add(node, "rmsnorm", _owner_path(gm, node, weight), weight, None, tuple(_param(gm, weight).shape))
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            op = next((v for k, v in _MODULE_SITES.items() if type(module) is k), None)
            if op is None and type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
                op = "conv1d"
            if op == "layernorm" and (module.weight is None or module.weight.dim() != 1):
                continue
            if op is not None:
                bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
                add(node, op, node.target, f"{node.target}.weight", bias, tuple(module.weight.shape))
    return SiteTable(found)


_OTHER_WEIGHT_OPS = {aten.embedding.default}  # weight first
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}  # weight second


def canonical_linears(gm: fx.GraphModule) -> int:
    """Rewrite each linear written out by hand as the one op that makes it a site, in place; returns how many.

        matmul(x, T(W))            -> aten.linear(x, W)       T: W.T, W.t(), W.transpose(0, 1), W.permute(1, 0)
        add(matmul(x, T(W)), b)    -> aten.linear(x, W, b)    b the parameter `bias` of W's module, [d_out]
        (mm in place of matmul)

    W is a 2-D parameter (Falcon's `FalconLinear.forward` is `x @ self.weight.T + self.bias`). Both sides compute
    x Wᵀ + b; without this the weight is no site and a selector naming the module matches nothing. A W that another
    kind of op also reads (an embedding table used as the output projection, `h @ wte.weight.T`) is left alone: its
    module would own sites of two ops, and one adapter module per owner cannot adapt both."""
    graph, count = gm.graph, 0
    other_ops = {n.args[0].target for n in graph.nodes if n.op == "call_function" and n.target in _OTHER_WEIGHT_OPS
                 and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"}
    other_ops |= {n.args[1].target for n in graph.nodes if n.op == "call_function" and n.target in _CONVS
                  and len(n.args) > 1 and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"}
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target in (aten.matmul.default, aten.mm.default)
                and len(node.args) == 2 and not node.kwargs):
            continue
        transposed = node.args[1]
        weight = _transposed_param(gm, transposed)
        if weight is None or weight.target in other_ops:
            continue
        end, bias = node, None
        user = next(iter(node.users)) if len(node.users) == 1 else None
        if user is not None and user.target == aten.add.Tensor and not user.kwargs and len(user.args) == 2:
            other = user.args[1] if user.args[0] is node else user.args[0]
            param = _param(gm, other.target) if isinstance(other, fx.Node) and other.op == "get_attr" else None
            w = _param(gm, weight.target)
            if (other.target == f"{weight.target.rpartition('.')[0]}.bias".lstrip(".")
                    and isinstance(param, nn.Parameter) and param.shape == w.shape[:1] and param.dtype == w.dtype):
                end, bias = user, other
        with graph.inserting_before(end):
            linear = graph.call_function(aten.linear.default, (node.args[0], weight) + ((bias,) if bias else ()))
        linear.meta = dict(end.meta)
        end.replace_all_uses_with(linear)
        for dead in dict.fromkeys((end, node, transposed)):
            if not dead.users:
                graph.erase_node(dead)
        count += 1
    if count:
        gm.recompile()
    return count


def _transposed_param(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The get_attr node of a 2-D parameter W when `node` is W with its two dims swapped, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    source = node.args[0] if node.args else None
    if not (isinstance(source, fx.Node) and source.op == "get_attr"):
        return None
    param = _param(gm, source.target)
    if not isinstance(param, nn.Parameter) or param.dim() != 2:
        return None
    if node.target in (aten.t.default, aten.numpy_T.default):
        return source
    if node.target == aten.transpose.int and {node.args[1] % 2, node.args[2] % 2} == {0, 1}:
        return source
    if node.target == aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return source
    return None


def _rmsnorm_weight(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The weight of an RMSNorm-style `weight * n` (either order; the rule in the module docstring), else None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    name = (cls if isinstance(cls, str) else cls.__qualname__).rpartition(".")[2]
    if not (name.endswith("RMSNorm") or name == "T5LayerNorm"):
        return None
    weight = f"{path}.weight" if path else "weight"
    for arg in node.args[:2]:
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target == weight:
            param = _param(gm, weight)
            return weight if isinstance(param, nn.Parameter) and param.dim() == 1 else None
    return None


def _module_class(gm: fx.GraphModule, node: fx.Node, owner: str) -> str:
    """The original class name: `ep.module()` keeps only plain Modules, so read it from nn_module_stack."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if path == owner:
            name = cls if isinstance(cls, str) else cls.__qualname__
            return name.rpartition(".")[2]
    module = _lookup(gm, owner)
    if module is None or type(module) is nn.Module:
        return "Parameter"
    return type(module).__name__


def _param(gm: fx.GraphModule, fqn: str) -> Any:
    module_path, _, attr = fqn.rpartition(".")
    module = _lookup(gm, module_path)
    return getattr(module, attr, None) if module is not None else None


@dataclass(frozen=True)
class Selector:
    text: str
    kind: str  # "exact" | "glob" | "regex" | "class"
    rank: int  # precedence: higher wins

    def matches(self, site: Site) -> bool:
        if self.kind == "class":
            return site.module_class == self.text[len("class:"):]
        if self.kind == "regex":
            return re.fullmatch(self.text[len("re:"):], site.owner) is not None
        if self.kind == "glob":
            return fnmatch.fnmatchcase(site.owner, self.text) or fnmatch.fnmatchcase(site.name, self.text)
        return self.text in (site.owner, site.name) or site.owner.endswith("." + self.text)


def parse_selector(text: str, where: str = "<spec>") -> Selector:
    if not isinstance(text, str) or not text:
        raise SpecError(f"{where}: a selector must be a non-empty string, got {text!r}")
    if text.startswith("class:"):
        return Selector(text, "class", 1)
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as err:
            raise SpecError(f"{where}: selector {text!r} is not a valid regular expression: {err}") from None
        return Selector(text, "regex", 2)
    if any(ch in text for ch in "*?["):
        return Selector(text, "glob", 2)
    return Selector(text, "exact", 3)


def check_selector_syntax(text: str) -> str:
    """For spec validation: a ValueError (reported with its TOML location) for a malformed selector."""
    try:
        parse_selector(text)
    except SpecError as err:
        raise ValueError(str(err).removeprefix("<spec>: ")) from None
    return text


def select(table: SiteTable, patterns: Iterable[str], where: str = "<spec>",
           ops: Iterable[str] | None = None) -> list[Site]:
    """Sites matched by any pattern, in graph order; a pattern that matches nothing is an error."""
    allowed = set(ops) if ops else None
    picked: dict[str, Site] = {}
    for text in patterns:
        selector = parse_selector(text, where)
        hits = [s for s in table.values() if selector.matches(s) and (allowed is None or s.op in allowed)]
        if not hits:
            raise SpecError(_nothing_matched(table, selector, where, allowed))
        picked.update((s.name, s) for s in hits)
    return [s for s in table.values() if s.name in picked]


def _nothing_matched(table: SiteTable, selector: Selector, where: str, allowed: set[str] | None) -> str:
    candidates = [s.name for s in table.values() if allowed is None or s.op in allowed]
    if selector.kind == "class":
        classes = sorted({s.module_class for s in table.values()})
        near = f" Module classes with sites: {', '.join(classes)}."
    else:
        hits = nearest(selector.text, candidates)
        near = f" Nearest site names: {', '.join(hits)}." if hits else ""
    kinds = f" (only {', '.join(sorted(allowed))} sites are eligible)" if allowed else ""
    return (f"{where}: selector {selector.text!r} matches no site{kinds}.{near} "
            f"Run `rewrite inspect MODEL` to list all {len(candidates)} sites.")


def resolve(site: Site, default: V, mapping: Mapping[str, V], where: str = "<spec>") -> V:
    """The value for one site: exact name > first matching glob/regex > class > `default`."""
    best: tuple[int, int, V] | None = None
    for order, (text, value) in enumerate(mapping.items()):
        selector = parse_selector(text, where)
        if selector.matches(site):
            key = (selector.rank, -order)
            if best is None or key > best[:2]:
                best = (*key, value)
    return default if best is None else best[2]


def check_mapping(table: SiteTable, mapping: Mapping[str, Any], where: str) -> None:
    """Every key of a per-site mapping (rank_pattern, ...) must match at least one site."""
    select(table, list(mapping), where)
