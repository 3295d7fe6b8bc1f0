"""Compression methods: one file per method (`method_<name>.py`), the shared interface and the registry.

`compression_registry.py` is the only list of method names; `token_compressor.py` the interface every method
implements. Modules here import torch, the standard library and `..deft` stages; never the model.
"""
