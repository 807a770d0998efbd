"""Unmerged-export lowerings, one module per switching mode, registered by name (`[export] switching`).

    ort-adapters   one adapter per run (ONNX Runtime's adapter inputs)          ort_adapters.py
    bank           one adapter per batch row, standard ONNX ops (one-hot bank)  bank.py
    custom-op      one adapter per batch row, rewrite::LoraDelta kernel          custom_op.py

Elementwise kinds ((IA)^3, RoAd, BitFit) get their own modules (rows.py): a gather from their own banks in both
per-row modes, vector inputs at the identity that an adapter's .onnx_adapter replaces per run in ort-adapters.

A new mode is one file here (a `Lowering` subclass, base.py) plus its test plus one line below.
"""
from rewrite.export.lowerings.bank import Bank
from rewrite.export.lowerings.custom_op import CustomOp
from rewrite.export.lowerings.ort_adapters import OrtAdapters

LOWERINGS = {lowering.name: lowering for lowering in (OrtAdapters(), Bank(), CustomOp())}

__all__ = ["LOWERINGS"]
