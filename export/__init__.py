"""Exporters: merged ONNX, manifest, adapter files (ours and PEFT)."""
