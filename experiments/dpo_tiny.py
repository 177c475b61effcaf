"""DPO on the fine-tuned `tiny` model, on a CPU in a few minutes.

Starts from runs/sft_tiny (`make sft`), which is also the frozen reference, and trains on
the embedded preference set (data_pipeline/default_preferences.py, "mismatched": a stdlib
answer preferred to the answer of another question; no download). Expected: the held-out
preference accuracy, P(log p(chosen) > log p(rejected)), and the mean log-likelihood
margin of chosen over rejected rise from the SFT model's (both printed before and after). `--set pref.loss=ipo|simpo|orpo` trains the variants.
"""


from experiments import sft_tiny
from lm.config import Config, DataConfig, OptimConfig, PreferenceConfig, TrainerConfig


def config() -> Config:
    base = sft_tiny.config()
    return Config(
        name="dpo_tiny",
        stage="dpo",
        model=base.model,
        pref=PreferenceConfig(loss="dpo", beta=0.1),
        optim=OptimConfig(lr=1e-4, warmup_steps=10, schedule="cosine", weight_decay=0.0),
        data=DataConfig(corpus="default", seq_len=128, batch_size=16, heldout_fraction=0.05),
        trainer=TrainerConfig(steps=100, log_every=10, eval_every=50, eval_batches=8, checkpoint_every=50,
                              init_from="runs/sft_tiny", num_samples=0),
    )
