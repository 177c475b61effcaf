"""Pretrain the 1.2B `base` model with a 4096-token context: the entry-level small LLM.

For one GPU (H100 80 GB), a TPU slice or a multi-host cluster (`lm train` under
`jax.distributed`): bfloat16 compute, float32 parameters and Adam moments, FSDP over all
devices, full rematerialisation of each layer, fused (flash) attention with document masking. Global
batch 128 x 4096 = 0.5M tokens, reached by gradient accumulation when memory is short.
Expected: a steady loss decrease; on the default corpus this is a throughput check,
not a useful model (the standard library holds ~3M tokens).
"""

from lm.config import Config, DataConfig, MeshConfig, OptimConfig, TrainerConfig
from lm.model.sizes import LEARNING_RATES, size


def config() -> Config:
    return Config(
        name="pretrain_base",
        model=size("base"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        optim=OptimConfig(lr=LEARNING_RATES["base"], warmup_steps=2000, schedule="wsd"),
        data=DataConfig(corpus="default", seq_len=4096, batch_size=128, tokenizer_sample_mb=20),
        trainer=TrainerConfig(steps=50_000, microbatches=16, log_every=10, eval_every=1000),
    )
