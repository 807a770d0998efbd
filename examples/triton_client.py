"""Call a model that `rewrite triton` wrote, on a running Triton server, with a different adapter per request.

    python examples/triton_client.py --url localhost:8000 --model mlp --requests 8
    python examples/triton_client.py --model mlp --load     # after `rewrite triton-version`: load the new version

Everything the script needs comes from the server: the model's inputs (names, types, dims) and its adapter table
(`parameters rewrite.adapter.<name>` in config.pbtxt). It sends `--requests` requests at once, cycling through the
base model (-1) and every adapter, so Triton's dynamic batcher runs them as one batch with one adapter per row, and
prints what each request got back. Needs `pip install tritonclient[http]` and numpy only.
"""
from __future__ import annotations

import argparse

import numpy as np
import tritonclient.http as httpclient

NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
         "TYPE_BOOL": np.bool_}
ADAPTER_KEY = "rewrite.adapter."


def adapter_table(config: dict) -> tuple[str, dict[str, int]]:
    """(the adapter id input, {adapter name: slot}) from the model configuration the server returns."""
    parameters = config.get("parameters", {})
    slots = {key[len(ADAPTER_KEY):]: int(value["string_value"]) for key, value in parameters.items()
             if key.startswith(ADAPTER_KEY)}
    return parameters["rewrite.ids_input"]["string_value"], dict(sorted(slots.items(), key=lambda item: item[1]))


def random_request(config: dict, ids_input: str, slot: int, seq: int, rng: np.random.Generator) -> dict:
    """One request (batch 1): random model inputs (dynamic axes of size `seq`) and the adapter's slot."""
    request = {}
    for spec in config["input"]:
        if spec["name"] == ids_input:
            request[ids_input] = np.array([[slot]], np.int64)
            continue
        shape = [1, *(seq if int(d) == -1 else int(d) for d in spec["dims"])]
        dtype = NUMPY[spec["data_type"]]
        request[spec["name"]] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                                 else rng.integers(0, 2, shape).astype(dtype))
    return request


def send(client, model: str, request: dict):
    inputs = []
    for name, array in request.items():
        tensor = httpclient.InferInput(name, list(array.shape), NAMES[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.async_infer(model, inputs)


NAMES = {np.dtype(v): k.removeprefix("TYPE_") for k, v in NUMPY.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8000", help="Triton's HTTP endpoint")
    parser.add_argument("--model", required=True, help="the model name (its directory in the repository)")
    parser.add_argument("--requests", type=int, default=8, help="requests sent at once")
    parser.add_argument("--seq", type=int, default=3, help="size of the inputs' dynamic axes")
    parser.add_argument("--load", action="store_true", help="first (re)load the model: its newest version and table")
    args = parser.parse_args()
    client = httpclient.InferenceServerClient(args.url, concurrency=max(args.requests, 1))
    if args.load:
        client.load_model(args.model)  # POST v2/repository/models/<model>/load
        print(f"loaded {args.model}")
    config = client.get_model_config(args.model)
    ids_input, slots = adapter_table(config)
    choices = [("base", -1), *slots.items()]
    rng = np.random.default_rng(0)
    picked = [choices[i % len(choices)] for i in range(args.requests)]
    pending = [send(client, args.model, random_request(config, ids_input, slot, args.seq, rng)) for _, slot in picked]
    outputs = [o["name"] for o in config["output"]]
    print(f"{args.requests} requests to {args.model} ({len(slots)} adapters: {', '.join(slots) or 'none'})")
    for (adapter, slot), future in zip(picked, pending):
        result = future.get_result()
        first = result.as_numpy(outputs[0])
        print(f"adapter {adapter} (id {slot}): {outputs[0]} {list(first.shape)} mean {float(first.mean()):+.5f}")


if __name__ == "__main__":
    main()
