"""What a stage trains for, each an `Objective` of `lm.train.engine` (a loss of model, batch
and frozen parameters, and its batch's logical axes): next-token cross-entropy
(`next_token`, on `losses`), reward-model and DPO-family losses (`preference`), and the
policy losses of GRPO and PPO with their advantage estimates (`policy`)."""
