"""Adapters that run an exported artifact in its real runtime (llama.cpp, onnxruntime, GPTQModel).

Each submodule imports its runtime lazily, inside its functions, so that importing
``qalora_export`` (or this package) never imports an optional runtime.
"""
