"""What the GPTQ output adds to the checkpoint layout of ``qalora_export/checkpoint/gptq.py``: the
metadata key that records the merge, the output dtypes, and the tolerances of both verify levels.
"""

from __future__ import annotations

import torch

META_KEY = "qalora_export"

# Weight level (verify): the decoded artifact must equal the declared merge (exact fold, or the
# rounded/clamped fold) to float64 round-off; fp16 scales are copied, codes are integers.
WEIGHT_TOLERANCE = 1e-9  # relative to the layer's max |W|

# dtypes of a layer's tensors in this format's output (checkpoint/gptq_codec.py's table); qzeros is re-encoded.
OUTPUT_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
                 "bias": torch.float16}

# --------------------------------------------------------------------------------------- runtime

# Runtime level (docs/design.md §4): GPTQModel's torch kernel dequantizes in fp16, so even the plain
# base differs from our float64-exact PyTorch model by a floor measured in the same run (base in
# GPTQModel vs base in PyTorch). The artifact must stay within FLOOR_FACTOR x that floor (+ eps
# for floors that are exactly 0, as with 2-bit codes whose fp16 products are exact).
FLOOR_FACTOR = 4.0
FLOOR_EPS_LOGIT = 1e-3
FLOOR_EPS_KL = 1e-6
MIN_TOP1 = 0.98
GREEDY_TOKENS = 12
