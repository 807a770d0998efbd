"""Token generation with a with-past ONNX decoder (`[capture] use_cache = true`), numpy + onnxruntime only.

    tokens = generate(onnxruntime.InferenceSession("out/model.onnx"), [[1, 5, 9], [7, 3]], max_new_tokens=32)

Rules:
- Prompts of different lengths are left-padded; padded positions have attention_mask 0 and, as transformers'
  `generate` does, position_ids = cumsum(mask) - 1 (1 where masked). So every row runs with its own past length
  inside one batch, which is what continuous batching needs.
- The first call feeds the whole prompts with an empty cache (past length 0); each later call feeds one token per row
  with the `present.<i>.*` outputs as `past_key_values.<i>.*`.
- Greedy (argmax) by default; `do_sample=True` draws from softmax(logits / temperature), optionally limited to the
  `top_k` most likely tokens, with `numpy.random.default_rng(seed)`: the same seed gives the same tokens.
- A row stops after emitting one of `stop_tokens` (kept in its output) or after `max_new_tokens`; finished rows are fed
  `pad_token_id` until every row has stopped. The result holds each row's new tokens only.
- `adapter_ids` (bank / custom-op exports): one bank slot per row, -1 = base, fixed for the row's whole generation.
  `AdapterSession.generate` takes adapter names instead.
- `decode_steps` yields every step (the tokens and the logits they were picked from); `generate` collects the tokens.
- The cache's dtype is the model's (`tensor(float16)` past inputs get a float16 cache).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewrite.errors import RuntimeUseError

PAST, PRESENT = "past_key_values.", "present."


def _empty_cache(session: Any, batch: int) -> dict[str, np.ndarray]:
    cache = {}
    for info in session.get_inputs():
        if info.name.startswith(PAST):
            _, heads, _, head_dim = info.shape
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise RuntimeUseError(f"{info.name}: expected fixed KV-head and head-dim axes, got {info.shape}")
            dtype = np.float16 if info.type == "tensor(float16)" else np.float32
            cache[info.name] = np.zeros((batch, heads, 0, head_dim), dtype)
    if not cache:
        raise RuntimeUseError("this model has no past_key_values inputs: export it with [capture] use_cache = true")
    return cache


def _left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RuntimeUseError("generate needs at least one prompt, and every prompt at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    return positions[:, -new:]


def _pick(logits: np.ndarray, rng: np.random.Generator | None, temperature: float, top_k: int | None) -> np.ndarray:
    if rng is None:
        return logits.argmax(-1)
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None:
        kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


@dataclass(frozen=True)
class Step:
    """One decoding step: `tokens` [batch] (pad_token_id for rows already stopped), picked from `logits`
    [batch, vocab] (the model's last-position logits), and `done` [batch], the rows stopped after this step."""
    tokens: np.ndarray
    logits: np.ndarray
    done: np.ndarray


def decode_steps(session: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_tokens: Iterable[int] = (), pad_token_id: int = 0, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                 adapter_ids: Sequence[int] | None = None) -> Iterator[Step]:
    """Every step of the generation (see the module docstring for the rules), until every row has stopped."""
    if max_new_tokens < 1 or temperature <= 0 or (top_k is not None and top_k < 1):
        raise RuntimeUseError("max_new_tokens and top_k must be >= 1 and temperature > 0")
    names = {info.name for info in session.get_inputs()}
    outputs = [info.name for info in session.get_outputs()]
    ids, mask = _left_pad(prompts, pad_token_id)
    batch = len(prompts)
    feeds = {"input_ids": ids, "attention_mask": mask, **_empty_cache(session, batch)}
    if adapter_ids is not None:
        if "adapter_ids" not in names or len(adapter_ids) != batch:
            raise RuntimeUseError("adapter_ids needs a bank / custom-op export and one id per prompt")
        feeds["adapter_ids"] = np.asarray(adapter_ids, np.int64)
    stops, rng = list(stop_tokens), np.random.default_rng(seed) if do_sample else None
    done = np.zeros(batch, bool)
    for _ in range(max_new_tokens):
        if "position_ids" in names:
            feeds["position_ids"] = _positions(feeds["attention_mask"], feeds["input_ids"].shape[1])
        result = dict(zip(outputs, session.run(outputs, feeds)))
        logits = result["logits"][:, -1]
        tokens = np.where(done, pad_token_id, _pick(logits, rng, temperature, top_k))
        done = done | np.isin(tokens, stops)
        yield Step(tokens, logits, done)
        if done.all():
            return
        feeds.update({PAST + name.removeprefix(PRESENT): value for name, value in result.items()
                      if name.startswith(PRESENT)})
        feeds["input_ids"] = tokens[:, None].astype(np.int64)
        feeds["attention_mask"] = np.concatenate([feeds["attention_mask"], np.ones((batch, 1), np.int64)], axis=1)


def generate(session: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             stop_tokens: Iterable[int] = (), pad_token_id: int = 0, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
             adapter_ids: Sequence[int] | None = None) -> list[list[int]]:
    """The new tokens of every prompt, each row up to and including its stop token (module docstring)."""
    out: list[list[int]] = [[] for _ in prompts]
    was_done = np.zeros(len(prompts), bool)
    for step in decode_steps(session, prompts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                             pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature, top_k=top_k,
                             seed=seed, adapter_ids=adapter_ids):
        for row in np.flatnonzero(~was_done):
            out[row].append(int(step.tokens[row]))
        was_done = step.done
    return out
