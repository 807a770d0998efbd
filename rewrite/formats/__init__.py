"""File formats shared by the exporter and the runtime (torch-free): the manifest, adapter files.

    manifest          manifest.json of an export
    peft_dir          Hugging Face PEFT LoRA directories (every PEFT key-name rule) and the LoRA scale formula
    adapter_file      our adapter .safetensors (matmul layout + "rewrite" metadata)
    onnx_adapter      ONNX Runtime's .onnx_adapter
    safetensors_file  the safetensors reader and writer the adapter formats share (numpy, bfloat16 via ml_dtypes)

Nothing is imported here: import the module you need.
"""
