"""Property: `parse_spec` on any TOML text returns a Spec or raises SpecError, never another exception.

Documents are built from the spec's own vocabulary (section names, every registered pass and its option keys,
valid values such as selectors and ranks) mixed with random keys, values of every TOML type (NaN, inf, huge
integers, dates, nested arrays and tables) and raw text fragments, so most cases get past TOML and reach
pydantic, the pass registry and the option validators. Derandomized: CI sees the same cases every run.
"""
from __future__ import annotations

import datetime as dt
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewrite.errors import SpecError
from rewrite.options import CaptureOptions, DataOptions, ExportOptions, InputSpec, ModelOptions
from rewrite.passes import REGISTRY
from rewrite.spec import Spec, parse_spec

PROFILE = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SECTIONS = {"model": ModelOptions, "capture": CaptureOptions, "export": ExportOptions, "data": DataOptions}
PASS_KEYS = sorted({key for cls in REGISTRY.values() for key in cls.Options.model_fields})
SECTION_KEYS = sorted({key for cls in (*SECTIONS.values(), InputSpec) for key in cls.model_fields})
VALID_STRINGS = ["*", "layers.*", "re:layers\\.[0-9]", "re:(", "class:Linear", "q_proj", "", "a", "float16",
                 "unmerged", "bank", "custom-op", "gaussian", "zeros", "svd_lora", "fisher", "spectrum",
                 "model.onnx", "../x", "/abs", "pkg.mod:fn", "mse", "params", "1", "8", "true", "nan", "é\u0000"]

FRAGMENTS = ["[[pass]]", "[pass]", "version = 1", "= 3", "[capture", "rank = ", "x.y = 1", "[export]\nmode = 1",
             '"""', "a = [1, 'b'", "[[capture.inputs]]\nname = \"x\"\nshape = [2, 0]"]
keys = st.one_of(st.sampled_from(PASS_KEYS + SECTION_KEYS + ["name", "version", "pass", "inputs"]),
                 st.text(max_size=8))
scalars = st.one_of(
    st.integers(min_value=-3, max_value=40), st.integers(), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 8.0, 1e300]),
    st.sampled_from(VALID_STRINGS), st.text(max_size=12),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)), st.dates(), st.times())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=8)
# values a field of the spec plausibly takes, so that many documents pass pydantic and reach the validators
plausible = st.one_of(st.sampled_from([1, 2, 4, 8, 0.5, 8.0, True, False]), st.sampled_from(VALID_STRINGS),
                      st.lists(st.sampled_from(VALID_STRINGS), min_size=1, max_size=2),
                      st.dictionaries(st.sampled_from(["layers.0", "*", "re:(", "nope"]),
                                      st.sampled_from([0, 1, 2, 4.0, math.inf]), max_size=2),
                      st.fixed_dictionaries({"params": st.sampled_from([0, 100, -1, 1e9])}))


@st.composite
def tables_of(draw, fields: list[str]) -> dict:
    """A table of the given keys with plausible or arbitrary values, sometimes with one stray key."""
    table = draw(st.dictionaries(st.sampled_from(fields), st.one_of(plausible, plausible, values), max_size=5))
    if draw(st.integers(0, 3)) == 3:
        table[draw(keys)] = draw(values)
    return table


@st.composite
def pass_entries(draw) -> dict:
    name = draw(st.one_of(st.sampled_from(sorted(REGISTRY)), st.sampled_from(sorted(REGISTRY)), st.none(), values))
    fields = sorted(REGISTRY[name].Options.model_fields) if isinstance(name, str) and name in REGISTRY else PASS_KEYS
    rest = draw(tables_of(fields))
    return rest if name is None else {**rest, "name": name}


def toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")) if not math.isfinite(value) \
            else repr(value)
    if isinstance(value, (int, dt.date, dt.time)):
        return value.isoformat() if not isinstance(value, int) else str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_table(header: str, table: dict) -> str:
    lines = [header] if header else []
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@st.composite
def documents(draw) -> str:
    parts = []
    version = {8: None, 9: draw(values)}.get(draw(st.integers(0, 9)), 1)  # hypothesis favours 0: the valid one
    top = draw(st.dictionaries(keys, values, max_size=1)) if draw(st.integers(0, 3)) == 3 else {}
    if version is not None:
        top = {"version": version, **top}
    parts.append(toml_table("", top))
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "capture.inputs", "bogus"]), max_size=3, unique=True)):
        header = f"[[{section}]]" if section == "capture.inputs" else f"[{section}]"
        cls = SECTIONS.get(section, InputSpec)
        parts.append(toml_table(header, draw(tables_of(sorted(cls.model_fields)))))
    parts += [toml_table("[[pass]]", entry) for entry in draw(st.lists(pass_entries(), max_size=3))]
    if draw(st.integers(0, 3)) == 3:  # raw text: broken TOML, or valid fragments in odd places
        fragment = draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=20)))
        parts.insert(draw(st.integers(1, len(parts))), fragment + "\n")
    return "".join(parts)


@PROFILE
@given(documents())
def test_parse_spec_returns_a_spec_or_raises_spec_error(text):
    try:
        spec = parse_spec(text)
    except SpecError as err:
        assert str(err).strip()
    else:
        assert isinstance(spec, Spec)
