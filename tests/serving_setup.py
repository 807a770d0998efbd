"""What the serving tests (Triton repository, mixed batches, Ray Serve) share: three PEFT adapters on factories:mlp4
made by PEFT itself (`init_lora_weights=False`: non-zero A and B, so each adapter changes the answer), PEFT as the
oracle, and unmerged exports of two of them (`support`, `style`; `tenant` is added while serving), each export built
once per test session.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rewrite.cli import main

import factories
from test_unmerged import MLP_INPUTS, load_passes, peft_adapter

peft = pytest.importorskip("peft")

SITES = [f"layers.{i}" for i in range(4)]
ADAPTERS = {"support": dict(r=4, lora_alpha=8, target_modules=SITES),
            "style": dict(r=2, lora_alpha=4, target_modules=["layers.0", "layers.2"]),
            "tenant": dict(r=3, lora_alpha=6, target_modules=["layers.1", "layers.3"])}  # added while serving


class Setup:
    """PEFT adapters on factories:mlp4 (the oracle) and one export per switching mode (built on first use)."""

    def __init__(self, work: Path):
        self.work = work
        configs = {n: peft.LoraConfig(init_lora_weights=False, **kw) for n, kw in ADAPTERS.items()}
        self.peft_model = peft_adapter(factories.mlp4(), configs, work / "peft")
        self._exports: dict[str, Path] = {}

    def export(self, switching: str) -> Path:
        if switching not in self._exports:
            spec = self.work / f"spec-{switching}.toml"
            dirs = {name: self.work / "peft" / name for name in ("support", "style")}
            spec.write_text(f"version = 1\n{MLP_INPUTS}{load_passes(dirs)}[export]\nmode = \"unmerged\"\n"
                            f"switching = \"{switching}\"\n" + ("capacity = 4\n" if switching != "ort-adapters" else ""))
            out = self.work / f"out-{switching}"
            assert main(["apply", str(spec), "factories:mlp4", "-o", str(out), "--check", "-q"]) == 0
            self._exports[switching] = out
        return self._exports[switching]

    def peft(self, x: np.ndarray, adapter: str | None) -> np.ndarray:
        with torch.no_grad():
            if adapter is None:
                with self.peft_model.disable_adapter():
                    return self.peft_model(torch.from_numpy(x)).numpy()
            self.peft_model.set_adapter(adapter)
            return self.peft_model(torch.from_numpy(x)).numpy()


_made: list[Setup] = []


@pytest.fixture(scope="session", name="setup")
def setup_fixture(tmp_path_factory) -> Setup:
    """The session's one Setup (modules importing this fixture share it and its exports)."""
    if not _made:
        _made.append(Setup(tmp_path_factory.mktemp("serving")))
    return _made[0]


def need_custom_op(switching: str) -> None:
    from test_unmerged import need

    need(switching)
