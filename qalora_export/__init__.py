"""qalora-export: QA-LoRA on group-quantized LLMs, folded into zero-points, exported and verified.

Importing the package is cheap: it initialises no CUDA and imports no optional runtime.
"""

__version__ = "0.1.0"
