"""Many requests, each with its own adapter, answered by as few model runs as their shapes allow.

    answers = run_mixed(session, [Request(feeds, "support"), Request(feeds, None), ...], output_names)

Rules:
  * Requests whose inputs agree in every axis but the leading (batch) one are concatenated on it and run once, with
    one adapter id per row (bank, custom-op); with ort-adapters, which switch one adapter per run, requests also
    share a run only with requests for the same adapter. The outputs are split back by each request's rows.
  * A request naming an adapter the session does not hold is answered with its own `UnknownAdapter`; the others
    still run. Names are resolved when the run starts (`AdapterSession.run` takes one snapshot of the adapters).
  * If a shared run fails, each of its requests runs alone, so one bad request never fails another.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rewrite.errors import RuntimeUseError
from rewrite.runtime.session import AdapterSession


class UnknownAdapter(RuntimeUseError):
    """The request names an adapter the session does not hold (the HTTP API answers 404)."""


@dataclass(frozen=True)
class Request:
    feeds: dict[str, np.ndarray]
    adapter: str | None

    @property
    def rows(self) -> int:
        return next(iter(self.feeds.values())).shape[0]


@dataclass(frozen=True)
class Answer:
    outputs: dict[str, np.ndarray] | None = None
    error: RuntimeUseError | None = None


def _key(request: Request, per_run: bool) -> tuple:
    shapes = tuple((name, array.shape[1:]) for name, array in sorted(request.feeds.items()))
    return (shapes, request.adapter) if per_run else (shapes,)


def _run(session: AdapterSession, group: list[Request], output_names: list[str]) -> list[Answer]:
    feeds = {name: np.concatenate([r.feeds[name] for r in group]) for name in group[0].feeds}
    if session.switching == "ort-adapters":
        outputs = session.run(feeds, adapter=group[0].adapter, output_names=output_names)
    else:
        ids = [r.adapter for r in group for _ in range(r.rows)]
        outputs = session.run(feeds, adapter_ids=ids, output_names=output_names)
    answers, start = [], 0
    for request in group:
        stop = start + request.rows
        answers.append(Answer({name: out[start:stop] for name, out in zip(output_names, outputs)}))
        start = stop
    return answers


def run_mixed(session: AdapterSession, requests: list[Request], output_names: list[str]) -> list[Answer]:
    """One answer per request, in order."""
    answers: list[Answer | None] = [None] * len(requests)
    loaded = set(session.adapters)
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        if request.adapter is not None and request.adapter not in loaded:
            answers[index] = Answer(error=UnknownAdapter(f"unknown adapter {request.adapter!r}; loaded: "
                                                          f"{sorted(loaded)}"))
        else:
            groups.setdefault(_key(request, session.switching == "ort-adapters"), []).append(index)
    for indices in groups.values():
        try:
            done = _run(session, [requests[i] for i in indices], output_names)
        except RuntimeUseError as err:
            if len(indices) == 1:
                done = [Answer(error=err)]
            else:
                done = [run_mixed(session, [requests[i]], output_names)[0] for i in indices]
        for i, answer in zip(indices, done):
            answers[i] = answer
    return answers
