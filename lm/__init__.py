"""A JAX/Flax codebase from raw text to a chat model.

The packages, from the bottom up (each imports only from the ones below it; tests/test_layering.py
checks it): `data_pipeline` (beside `lm`: reading, tokenizing, packing), `config` and
`experiment`, `model`, `sampling` and `interop`, `objectives`, `train`, `eval`, `stages`,
`serve` and `tools`, `cli`.
"""
