"""Talking to a run: continuous batching over one cache (`batching`), the OpenAI-compatible
HTTP server (`server`) and multi-turn chat (`chat`)."""
