"""Map a key path of a parsed TOML document back to a line of its source.

`tomllib` keeps no positions, so this scans the text once: it tracks table headers (`[t]`, `[[t]]` with
their occurrence index) and `key =` lines inside them. A path like ("pass", 2, "rank") finds the line of
`rank = ...` inside the third `[[pass]]`; when the key is not written on its own line (inline tables),
the table header's line is returned instead.
"""
from __future__ import annotations

import re

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def _clean(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


class TomlLocator:
    def __init__(self, text: str):
        self._lines: dict[tuple, int] = {}
        counts: dict[str, int] = {}
        table: tuple = ()
        for lineno, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                name = _clean(header.group(2))
                if header.group(1) == "[[":
                    index = counts.get(name, 0)
                    counts[name] = index + 1
                    table = (*name.split("."), index)
                    self._lines.setdefault(table[:-1], lineno)  # the array as a whole: its first element
                else:
                    table = tuple(self._index_parents(name.split("."), counts))
                self._lines.setdefault(table, lineno)
                continue
            key = _KEY.match(line)
            if key:
                self._lines.setdefault((*table, *_clean(key.group(1)).split(".")), lineno)

    @staticmethod
    def _index_parents(parts: list[str], counts: dict[str, int]) -> list:
        """`[capture.inputs]` inside an array of tables refers to its latest element."""
        out: list = []
        for i, part in enumerate(parts):
            out.append(part)
            prefix = ".".join(parts[: i + 1])
            if prefix in counts and i < len(parts) - 1:
                out.append(counts[prefix] - 1)
        return out

    def line(self, path: tuple) -> int | None:
        path = tuple(path)
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None
