"""File formats shared by the exporter and the runtime (torch-free): the manifest, adapter files.

    manifest          manifest.json of an export
    peft_dir          Hugging Face PEFT directories: the rules every tuner shares (targets, keys, config checks)
    peft_lora         PEFT LoRA directories: config, key names, rank agreement and the LoRA scale formula
    peft_rows         PEFT IA3 / ROAD / BEFT directories, and their tensors read as row vectors (the elementwise kinds)
    adapter_file      our adapter .safetensors (matmul layout + "rewrite" metadata)
    onnx_adapter      ONNX Runtime's .onnx_adapter
    safetensors_file  the safetensors reader and writer the adapter formats share (numpy, bfloat16 via ml_dtypes)

Nothing is imported here: import the module you need.
"""
