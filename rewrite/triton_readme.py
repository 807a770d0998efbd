"""The README.md `rewrite triton` puts beside a Triton model: layout, server command, the tritonclient call, new
adapters while serving. Every name, shape and type in it is the model's own."""
from __future__ import annotations

import re

from rewrite.runtime.model_io import TensorSpec
from rewrite.triton_config import ADAPTER_KEY, client_type


def _var(name: str) -> str:
    """A Python variable for a tensor name ("input_ids", "past_key_values.0.key" -> "past_key_values_0_key")."""
    text = re.sub(r"\W", "_", name)
    return f"t_{text}" if text[0].isdigit() else text


def _example_shape(spec: TensorSpec, examples: dict[str, list[int]]) -> tuple[int, ...]:
    """One request's shape: batch 1, other dynamic axes as in the export's example inputs (else 1)."""
    sizes = examples.get(spec.name, [])
    return (1, *(d if isinstance(d, int) else (sizes[i + 1] if i + 1 < len(sizes) else 1)
                 for i, d in enumerate(spec.dims[1:])))


def readme(name: str, source: str, switching: str, capacity: int, inputs: list[TensorSpec], ids: str,
           outputs: list[TensorSpec], slots: dict[str, int], examples: dict[str, list[int]], library: str | None,
           repo_here: str, repo_in_server: str) -> str:
    first = next(iter(slots), None)
    feeds = "\n".join(f"{_var(s.name)} = np.zeros({_example_shape(s, examples)}, np.{s.dtype.name})" for s in inputs)
    typed = [(s.name, client_type(s.dtype)) for s in inputs] + [(ids, "INT64")]
    infer_inputs = ",\n          ".join(f'httpclient.InferInput("{n}", {_var(n)}.shape, "{t}")' for n, t in typed)
    arrays = ", ".join(_var(n) for n, _ in typed)
    lib = (f"\n`{name}/{library.rsplit('/', 1)[-1]}` is the `rewrite::LoraDelta` custom-op library, named in "
           f"`model_operations` by its path in the server (`{library}`): mount the repository there (or write it again "
           "with `--server-repo`). It was built for this machine's CPU against ONNX Runtime's C API version 21; the "
           "server's ONNX Runtime (the Triton release's) must be 1.21 or newer, and a GPU instance needs the CUDA "
           "build (`runtime/csrc/build.sh --cuda`, passed with `--library`).\n" if library else "")
    layout = [f"{name}/config.pbtxt   ONNX Runtime backend, dynamic batching, the adapter table ({ADAPTER_KEY}*)",
              f"{name}/<version>/model.onnx   the model; its banks hold that version's adapters",
              f"{name}/<version>/manifest.json   sites, bank ranks and slots of that version",
              f"{name}/README.md   this file"]
    if library:
        layout.append(f"{name}/{library.rsplit('/', 1)[-1]}   the custom-op library")
    layout_text = "\n".join(layout)
    outputs_text = "\n".join(f'{_var(o.name)} = result.as_numpy("{o.name}")' for o in outputs)
    return f"""# Triton model `{name}`

Written by `rewrite triton` from `{source}`: switching `{switching}`, {capacity} adapter slots. Which adapter is in
which slot is in `config.pbtxt` (`parameters {ADAPTER_KEY}<name>`), which the server hands to clients.

```
{layout_text}
```
{lib}
## Serve

```bash
docker run --rm -p 8000:8000 -p 8001:8001 -v "{repo_here}:{repo_in_server}" nvcr.io/nvidia/tritonserver:<release>-py3 \\
    tritonserver --model-repository={repo_in_server} --model-control-mode=explicit --load-model={name}
```

## Call

Each request carries its own adapter id (`{ids}`, one INT64, -1 for the base model); requests for different adapters
that arrive together run as one batch.

```python
import numpy as np
import tritonclient.http as httpclient

client = httpclient.InferenceServerClient("localhost:8000")
parameters = client.get_model_config("{name}")["parameters"]
slots = {{key[len("{ADAPTER_KEY}"):]: int(value["string_value"]) for key, value in parameters.items()
         if key.startswith("{ADAPTER_KEY}")}}
{feeds}
{_var(ids)} = np.array([[{f"slots[{first!r}]" if first else "-1"}]], np.int64)   # -1: the base model
inputs = [{infer_inputs}]
for tensor, array in zip(inputs, [{arrays}]):
    tensor.set_data_from_numpy(array)
result = client.infer("{name}", inputs)
{outputs_text}
```

`examples/triton_client.py` in the rewrite repository does this for several adapters at once.

An id that is neither -1 nor a slot holding an adapter in the served version fails the request (the guard node
`adapter_ids_check` in the model), never answers with another adapter or the base model.

## Add or remove an adapter while serving

```bash
rewrite triton-version REPO/{name} --add tenant=peft/tenant --remove old   # writes REPO/{name}/<next version>/
```

```python
client.load_model("{name}")   # POST v2/repository/models/{name}/load (--model-control-mode=explicit)
```

The new version directory holds the same model with the bank slots changed; `config.pbtxt` gets the new adapter
table. The load call reads both; requests in flight finish on the old version, and the new one replaces it without
a gap (a failed load keeps the old one serving). Delete old version directories once the load has returned.
"""
