"""The payload: a model's parts as safetensors bytes with feddiff's metadata, checked against the expected schema
before use, and models on disk in and out (diffusers folders, feddiff files)."""
