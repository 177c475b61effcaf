"""Decoding: the KV-cache decode math on the model's weights (`decode`) and the compiled
samplers built on it (`sampler`): `generate` (a batch of prompts), `stream` (one prompt,
token by token) and `rollout` (RL: G samples per prompt with their log-probabilities)."""

from lm.sampling.decode import filter_logits, token_logps
from lm.sampling.sampler import generate, rollout, stream

__all__ = ["filter_logits", "generate", "rollout", "stream", "token_logps"]
