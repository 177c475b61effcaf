"""Evaluation: held-out and downstream tasks scored as lm-evaluation-harness does
(`evaluate`), BLEU and chrF (`text_metrics`), reward-model scoring (`reward_model`) and the
harness's own tasks through the `lm-jax` model (`harness`)."""
