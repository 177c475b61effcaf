"""Named model sizes, in one place. Experiments import one and change what they study.

| name   | params | D    | L  | N  | K | F    | context | vocab | lr    |
|--------|--------|------|----|----|---|------|---------|-------|-------|
| tiny   | ~5M    | 256  | 4  | 4  | 2 | 704  | 256     | 4096  | 3e-3  |
| small  | ~110M  | 768  | 12 | 12 | 12| 2048 | 1024    | 32000 | 6e-4  |
| medium | ~340M  | 1024 | 24 | 16 | 16| 2816 | 2048    | 32000 | 3e-4  |
| base   | ~1.2B  | 2048 | 22 | 16 | 8 | 5632 | 4096    | 32000 | 3e-4  |

`base` is the entry-level "small-scale LLM": 1.2B parameters with a 4096-token context.
`tiny` recomputes each layer in the backward pass (remat="full"): on a CPU, moving saved
activations through memory costs more than recomputing them (measured: 245 ms against
295 ms per step of the benchmark's reference configuration on a 2-core CPU).
Sizes above tiny compute in bfloat16 (float32 parameters) and are meant for GPUs/TPUs.
"""

from __future__ import annotations

import dataclasses

from lm.config import ModelConfig

SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                        d_ff=704, max_seq_len=256, remat="full"),
    "small": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                         d_ff=2048, max_seq_len=1024, tie_embeddings=True,
                         compute_dtype="bfloat16", attention="flash"),
    "medium": ModelConfig(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                          d_ff=2816, max_seq_len=2048, tie_embeddings=True,
                          compute_dtype="bfloat16", attention="flash", remat="dots_no_batch"),
    "base": ModelConfig(vocab_size=32000, d_model=2048, n_layers=22, n_heads=16, n_kv_heads=8,
                        d_ff=5632, max_seq_len=4096, rope_theta=500_000.0,
                        compute_dtype="bfloat16", attention="flash", remat="full"),
}

# Default peak learning rates (AdamW, batch of ~0.5M tokens for the larger sizes).
LEARNING_RATES = {"tiny": 3e-3, "small": 6e-4, "medium": 3e-4, "base": 3e-4}


def size(name: str, **changes) -> ModelConfig:
    """The named size, with optional field changes: size("tiny", n_layers=2)."""
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; choose from {sorted(SIZES)}")
    return dataclasses.replace(SIZES[name], **changes)
