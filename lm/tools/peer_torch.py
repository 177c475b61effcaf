"""The PyTorch peers of the benchmarks: Hugging Face LLaMA of the same shape.

Decoding (`HFDecoder`): our model exported with `lm.interop.hf.export_llama` and loaded by
`transformers.LlamaForCausalLM.from_pretrained`, greedy `generate` in eager mode with its
own KV cache, exactly `new` tokens per prompt (no early stop), float32; with `int8=True`
its linear layers (the output head included) go through torch's dynamic int8 quantisation
(`torch.ao.quantization.quantize_dynamic`: int8 weights, activations quantised per step).

Training:
The same model (LlamaForCausalLM built from our ModelConfig: RoPE, RMSNorm, SwiGLU,
grouped-query attention, same vocabulary/width/depth), the same batch of token ids, one
AdamW step per iteration, timed like ours (median of repeats, after warm-up). On a GPU:
bfloat16 autocast over float32 parameters, SDPA attention (flash, causal), fused AdamW;
on a CPU: float32. `compile=True` wraps the model in `torch.compile` (`compile_mode`: its
mode, e.g. "max-autotune", which on a CPU also tunes its own matrix-product kernels). Gradient
checkpointing mirrors `model.remat="full"` where asked. `fused=True` uses AdamW's fused
kernel (on a CPU too, where it is often the faster one), else its multi-tensor one.

Own process: a peer timed inside the JAX process ran about 20% slower than alone (two
runtimes' thread pools on the same cores), so the benchmarks run it here as a child
process (`Peer`): `python -m lm.tools.peer_torch` reads one JSON command per line on stdin
("train", "load_decoder", "generate") and answers one JSON line on stdout, idle in between;
the JAX process waits while it runs. Interleaving rounds of ours and the peer's keeps a
drift of the machine's speed from favouring either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from lm.config import ModelConfig


def hf_config(cfg: ModelConfig, seq_len: int):
    import transformers  # optional: the PyTorch peer

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_size, max_position_embeddings=max(seq_len, cfg.max_seq_len), rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu")


def train_rate(cfg: ModelConfig, batch: int, seq_len: int, *, device: str = "cpu", bf16: bool = False,
               compile: bool = False, grad_ckpt: bool = False, steps: int = 10, warmup: int = 3,
               repeats: int = 3, threads: int | None = None, fused: bool | None = None,
               compile_mode: str | None = None) -> dict:
    """Training tokens/s of the Hugging Face LLaMA peer (and its peak device memory on GPU)."""
    import torch  # optional: the PyTorch peer
    import transformers  # optional: the PyTorch peer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(hf_config(cfg, seq_len), attn_implementation="sdpa",
                                                        dtype=torch.float32).to(device)
    if grad_ckpt:  # the newer name first (transformers >= 5.2x), the older one otherwise
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    fused = device == "cuda" if fused is None else fused
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused, foreach=not fused or None)
    fwd = torch.compile(model, mode=compile_mode) if compile else model
    rng = np.random.default_rng(0)
    xs = [torch.from_numpy(rng.integers(4, cfg.vocab_size, size=(batch, seq_len))).to(device) for _ in range(4)]

    def step(x):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(input_ids=x, labels=x, use_cache=False).loss  # the model shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        loss = step(xs[i % 4])
    float(loss.detach())
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(steps):
            loss = step(xs[i % 4])
        float(loss.detach())
        sync()
        times.append((time.perf_counter() - t) / steps)
    step_time = float(np.median(times))
    out = {"step_time_s": step_time, "tokens_per_s": batch * seq_len / step_time}
    if device == "cuda":
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


class HFDecoder:
    """Greedy `transformers.generate` on an exported model (a folder written by export_llama)."""

    def __init__(self, hf_dir: str, int8: bool = False):
        import torch  # optional: the PyTorch peer
        import transformers  # optional: the PyTorch peer

        self.torch = torch
        self.model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # exactly `new` tokens
        if int8:
            from torch.ao.quantization import quantize_dynamic  # optional: the PyTorch peer

            self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.default_threads = torch.get_num_threads()

    def generate(self, prompts: list[list[int]], new: int, threads: int | None = None) -> list[list[int]]:
        """Equal-length prompts -> exactly `new` greedy tokens each, on `threads` CPU threads
        (default: torch's own choice, one per core)."""
        self.torch.set_num_threads(threads or self.default_threads)
        x = self.torch.tensor(prompts, dtype=self.torch.long)
        with self.torch.no_grad():
            out = self.model.generate(x, attention_mask=self.torch.ones_like(x), max_new_tokens=new,
                                      do_sample=False, pad_token_id=0)
        return out[:, x.shape[1]:].tolist()


# ---------------------------------------------------------------------------------------
# The peer in its own process


def _serve() -> None:
    """The child's loop: a JSON command per line in, a JSON answer per line out."""
    decoders = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "train":
                cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cmd["model"].items()})
                out = train_rate(cfg, cmd["batch"], cmd["seq_len"], **cmd.get("options", {}))
            elif cmd["op"] == "load_decoder":
                decoder = decoders[cmd.get("name", "")] = HFDecoder(cmd["hf_dir"], int8=cmd.get("int8", False))
                out = {"default_threads": decoder.default_threads}
            elif cmd["op"] == "generate":
                t = time.perf_counter()
                tokens = decoders[cmd.get("name", "")].generate(cmd["prompts"], cmd["new"], cmd.get("threads"))
                out = {"seconds": time.perf_counter() - t, "tokens": tokens}
            else:
                out = {"error": f"unknown op {cmd['op']!r}"}
        except Exception as e:  # noqa: BLE001 -- the parent reports it
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


class Peer:
    """The PyTorch peer in a child process (see the module docstring): `call(op, **args)`."""

    def __init__(self):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen([sys.executable, "-m", "lm.tools.peer_torch"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def call(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the peer process exited")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__":
    _serve()
