"""The fixed reference configuration of the training benchmark (`make bench`).

Vocabulary 4096, width 256, 4 layers, 4 heads, 4 KV heads, SwiGLU hidden 704, sequence
256, batch 8, float32, AdamW. It is kept fixed so throughput and MFU figures compare
across commits and against other frameworks run on the same machine. Implementation
choices that do not change the model are ours to make: attention is `model.attention="flash"`,
on a CPU our native kernel (lm/model/attention_cpu.cc; XLA's attention over blocks of 64
queries where it cannot be built), and each layer keeps its matrix products' outputs and the
attention kernel's and recomputes the rest in the backward pass (`remat="dots"`). On a 2-core
Intel Xeon (2026-12-07), alternated in one process: 427 ms a step with XLA's attention and
`remat="full"`, 350-362 with the kernel, 341-348 with the kernel and "dots". MFU counts
model FLOPs only (6N per token plus attention), never the recomputation.
"""

from lm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainerConfig


def config() -> Config:
    return Config(
        name="bench_reference",
        model=ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                          d_ff=704, max_seq_len=256, remat="dots", attention="flash", attention_block=64),
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
        data=DataConfig(corpus="synthetic", seq_len=256, batch_size=8),
        trainer=TrainerConfig(steps=30, log_every=10, eval_batches=2, num_samples=0),
    )
