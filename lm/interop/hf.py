"""Hugging Face interop for LLaMA-family models, without torch.

`export_llama(model_config, params, out_dir)` writes `config.json`, `model.safetensors`
(float32) and, given a SentencePiece model, the tokenizer files, in the layout that
`transformers.LlamaForCausalLM.from_pretrained(out_dir)` and
`AutoTokenizer.from_pretrained(out_dir)` load. `import_llama(hf_dir)` reads such a
checkpoint (grouped-query attention, tied or untied embeddings, any RoPE theta and
RMSNorm epsilon) into `(ModelConfig, params)`, where `params` is the nested dict of
arrays that `nnx.replace_by_pure_dict` puts into a `Transformer`.

Both sides use the "rotate half" RoPE convention, so no permutation of the query/key
weights is needed. Safetensors are read and written here directly (a JSON header and
raw little-endian arrays).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any

import numpy as np
import sentencepiece as spm
from flax import nnx

from data_pipeline.chat import CHAT_TEMPLATE
from data_pipeline.errors import NotFound
from data_pipeline.tokenizer import CHAT_TOKENS, TOOL_TOKENS
from lm.config import ConfigError, ModelConfig
from lm.model.transformer import Transformer

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64, "I64": np.int64, "I32": np.int32}


# ---------------------------------------------------------------------------------------
# safetensors


def save_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write float32/int arrays in the safetensors format (atomically)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        code = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
                np.dtype(np.int32): "I32", np.dtype(np.float64): "F64"}[a.dtype]
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read a safetensors file; a truncated or malformed one raises HFFormatError naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HFFormatError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:  # a random or truncated file claims a header larger than itself
            raise HFFormatError(f"{path} is not a valid safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise HFFormatError(f"{path} is not a valid safetensors file (unreadable header)") from None
        data = f.read()
    if not isinstance(header, dict):
        raise HFFormatError(f"{path} is not a valid safetensors file (header is not an object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            count = int(np.prod(info["shape"]))
        except (KeyError, TypeError, ValueError):
            raise HFFormatError(f"{path}: tensor {name!r} has a malformed entry in the header") from None
        if info.get("dtype") not in _DTYPES or not 0 <= lo <= hi <= len(data):
            raise HFFormatError(f"{path}: tensor {name!r} is truncated or has an unknown dtype ({info.get('dtype')}); "
                                "the file is incomplete or corrupted")
        width = 2 if info["dtype"] in ("BF16", "F16") else np.dtype(_DTYPES[info["dtype"]]).itemsize
        if hi - lo != count * width:
            raise HFFormatError(f"{path}: tensor {name!r} holds {hi - lo} bytes for shape {info['shape']}")
        buf = data[lo:hi]
        if info["dtype"] == "BF16":  # widen bfloat16 to float32 by shifting into the high half
            a = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(buf, np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = a.reshape(info["shape"]).astype(a.dtype.newbyteorder("="))
    return out


# ---------------------------------------------------------------------------------------
# Export


def export_llama(cfg: ModelConfig, params: dict, out_dir: str, tokenizer_model: str | None = None,
                 bos_id: int = 2, eos_id: int = 3, pad_id: int = 0, chat_template: bool = True) -> str:
    """Write a Hugging Face LLaMA checkpoint of `params` (a pure dict or nnx.State).

    A model with a "reward" head (a reward model, lm/stages/reward.py) is written as
    `LlamaForSequenceClassification` with one label: its `score` layer is the head, which
    transformers reads at each row's last token that is not padding, as we do. Other
    scalar heads (PPO's "value") are training-time only and are not exported."""
    if cfg.qk_norm:
        raise ConfigError("LLaMA has no qk-norm: a model trained with model.qk_norm=true cannot be exported as LLaMA")
    if cfg.mlp != "swiglu":
        raise ConfigError(f"LLaMA's MLP is SwiGLU: a model trained with model.mlp={cfg.mlp} cannot be exported as LLaMA")
    if cfg.window:
        raise ConfigError(f"LLaMA attends to the whole prefix in every layer: a model trained with model.window="
                          f"{cfg.window} cannot be exported as LLaMA")
    if cfg.value_embeds:
        raise ConfigError("LLaMA has no value embeddings: a model trained with model.value_embeds=true cannot be "
                          "exported as LLaMA")
    if cfg.unet_skips:
        raise ConfigError("LLaMA has no skip connections between layers: a model trained with model.unet_skips=true "
                          "cannot be exported as LLaMA")
    if cfg.logit_softcap:
        raise ConfigError(f"LLaMA has no logit soft-capping: a model trained with model.logit_softcap="
                          f"{cfg.logit_softcap} cannot be exported as LLaMA (its logits would differ)")
    p = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    p = _to_numpy(p)
    d, n, k, h, f, v, layers = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.d_ff,
                                cfg.vocab_size, cfg.n_layers)
    b, attn, mlp = p["blocks"], p["blocks"]["attn"], p["blocks"]["mlp"]
    t = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(layers):
        pre = f"model.layers.{i}."
        t[pre + "self_attn.q_proj.weight"] = attn["wq"][i].reshape(d, n * h).T
        t[pre + "self_attn.k_proj.weight"] = attn["wk"][i].reshape(d, k * h).T
        t[pre + "self_attn.v_proj.weight"] = attn["wv"][i].reshape(d, k * h).T
        t[pre + "self_attn.o_proj.weight"] = attn["wo"][i].reshape(n * h, d).T
        t[pre + "mlp.gate_proj.weight"] = mlp["w_gate"][i].T
        t[pre + "mlp.up_proj.weight"] = mlp["w_up"][i].T
        t[pre + "mlp.down_proj.weight"] = mlp["w_down"][i].T
        t[pre + "input_layernorm.weight"] = b["attn_norm"]["scale"][i]
        t[pre + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"][i]
    classifier = "reward" in cfg.scalar_heads
    if classifier:
        t["score.weight"] = p["scalar_heads"]["reward"][None, :]
    elif not cfg.tie_embeddings:
        t["lm_head.weight"] = p["head"].T
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors({name: np.asarray(a, np.float32) for name, a in t.items()},
                     os.path.join(out_dir, "model.safetensors"))
    config = {
        "architectures": ["LlamaForSequenceClassification" if classifier else "LlamaForCausalLM"],
        "model_type": "llama", "torch_dtype": "float32",
        "vocab_size": v, "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
        "num_attention_heads": n, "num_key_value_heads": k, "head_dim": h,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }
    if classifier:
        config.update(num_labels=1, id2label={"0": "reward"}, label2id={"reward": 0})
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    # Generation stops at EOS, and in a chat model also at the end-of-turn token.
    stops = [eos_id]
    if tokenizer_model:
        _export_tokenizer(tokenizer_model, out_dir, chat_template)

        end = _chat_tokens(spm.SentencePieceProcessor(model_file=tokenizer_model))
        stops += [i for i, piece in end.items() if piece == "<|end|>"]
    with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
        json.dump({"bos_token_id": bos_id, "eos_token_id": stops if len(stops) > 1 else eos_id,
                   "pad_token_id": pad_id, "do_sample": False}, fh, indent=2)
    return out_dir


def _export_tokenizer(model_path: str, out_dir: str, chat_template: bool = True) -> None:
    """tokenizer.json (+ tokenizer.model, tokenizer_config.json) that `AutoTokenizer` loads
    with exactly our ids: see `tokenizer_json` for how SentencePiece is reproduced.

    When the model has the chat role tokens (data_pipeline.chat), they are exported as special
    added tokens (so HF keeps each one a single id when it meets its text) together with the chat
    template, so `apply_chat_template` gives the ids of `data_pipeline.chat.render`
    (`chat_template` false: a model not fine-tuned to chat gets no template; `lm import-hf`
    reads its presence as "a chat model").
    """
    sp = spm.SentencePieceProcessor(model_file=model_path)
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))  # for SentencePiece users and import-hf
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(tokenizer_json(model_path), fh, ensure_ascii=False)
    special = {"bos_token": sp.id_to_piece(sp.bos_id()), "eos_token": sp.id_to_piece(sp.eos_id()),
               "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(sp.pad_id())}
    # The generic fast tokenizer reads tokenizer.json as written (transformers 4 and 5); a named
    # class (LlamaTokenizer) would rebuild the normaliser with its own prefix-space rules.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000, **special}
    chat = _chat_tokens(sp)
    if chat:
        # "additional_special_tokens" (transformers 4; read as "extra_special_tokens" by 5)
        special["additional_special_tokens"] = list(chat.values())
        config.update(special, **({"chat_template": CHAT_TEMPLATE} if chat_template else {}), added_tokens_decoder={
            str(i): {"content": piece, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                     "single_word": False} for i, piece in chat.items()})
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as fh:
        json.dump(special, fh, indent=2)


# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_pieces(model_path: str) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every id of a SentencePiece model, read from its protobuf.

    The Python API does not tell user-defined symbols from learned pieces, and the generated
    protobuf module needs the protobuf package: the few fields needed are decoded here
    (ModelProto field 1 = repeated SentencePiece {1: piece, 2: score, 3: type})."""

    def varint(buf, i):
        out = shift = 0
        while True:
            b = buf[i]
            out |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return out, i

    def fields(buf):  # (field number, wire type, value) of one message
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            num, wire = key >> 3, key & 7
            if wire == 0:
                val, i = varint(buf, i)
            elif wire == 1:
                val, i = buf[i: i + 8], i + 8
            elif wire == 2:
                n, i = varint(buf, i)
                val, i = buf[i: i + n], i + n
            elif wire == 5:
                val, i = buf[i: i + 4], i + 4
            else:
                raise ValueError(f"{model_path}: not a SentencePiece model (protobuf wire type {wire})")
            yield num, wire, val

    with open(model_path, "rb") as f:
        raw = f.read()
    pieces = []
    for num, wire, val in fields(raw):
        if num == 1 and wire == 2:
            piece, score, kind = "", 0.0, _NORMAL
            for n, w, v in fields(val):
                if n == 1:
                    piece = bytes(v).decode("utf-8")
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            pieces.append((piece, score, kind))
    return pieces


def tokenizer_json(model_path: str) -> dict:
    """A `tokenizers` BPE that gives the ids of our SentencePiece model for every text.

    What it takes (checked on 150k lines of code, prose, German and unicode text in
    tests/test_hf_tokenizer.py):
    - normaliser Prepend("▁") then Replace(" " -> "▁"), and no pre-tokeniser: SentencePiece's
      dummy prefix goes before every text, also one that already starts with a space (HF's
      Metaspace pre-tokeniser, which LlamaTokenizer uses, adds none there: " is using" lost a
      space), and before each chunk between special tokens (SentencePiece encodes chat contents
      one by one);
    - a merge (a, b) for every learned piece a+b made of two learned pieces, ranked by the
      piece's score: SentencePiece BPE merges the adjacent pair whose union has the best score;
    - byte fallback for characters outside the vocabulary, as SentencePiece's <0xNN> pieces;
    - user-defined symbols ("\\n") stay plain vocabulary entries (no learned piece contains
      them, so they never merge); as added tokens they would split the text and lose the
      dummy prefix: "\\n\\nclass" would differ;
    - control and unknown pieces are special added tokens: HF reads their literal text ("<s>",
      "<|user|>") as the token, SentencePiece as plain characters; pass
      `split_special_tokens=True` to encode such text as SentencePiece does.
    Decoding strips the one leading space the dummy prefix gives, as SentencePiece does.
    """
    pieces = sentencepiece_pieces(model_path)
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    learned = {p for p, _, kind in pieces if kind == _NORMAL}
    merges = []
    for i, (p, score, kind) in enumerate(pieces):
        if kind != _NORMAL:
            continue
        for k in range(1, len(p)):
            if p[:k] in learned and p[k:] in learned:
                merges.append((-score, i, vocab[p[:k]], p[:k], p[k:]))
    merges.sort()
    kinds = {kind: i for i, (_, _, kind) in reversed(list(enumerate(pieces)))}
    unk = pieces[kinds[_UNKNOWN]][0] if _UNKNOWN in kinds else None

    sp = spm.SentencePieceProcessor(model_file=model_path)
    bos = sp.id_to_piece(sp.bos_id())
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (p, _, kind) in enumerate(pieces) if kind in (_CONTROL, _UNKNOWN)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {  # BOS first, as Tokenizer.encode(text, bos=True)
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for *_, a, b in merges]},
    }


def _chat_tokens(sp) -> dict[int, str]:
    """id -> piece of the chat role tokens in a SentencePiece model ({} for a tokenizer trained without them)."""
    ids = {sp.piece_to_id(piece): piece for piece in CHAT_TOKENS}
    if sp.unk_id() in ids:
        return {}
    tools = {sp.piece_to_id(piece): piece for piece in TOOL_TOKENS}  # with the tool tokens, if trained with them
    return ids if sp.unk_id() in tools else {**ids, **tools}


# ---------------------------------------------------------------------------------------
# Import


def import_llama(hf_dir: str) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face LLaMA checkpoint into (ModelConfig, params as a pure dict).

    A malformed folder (missing or invalid config.json, missing keys, missing or extra
    layers, truncated or random safetensors) raises HFFormatError saying what is wrong."""
    try:
        return _import_llama(hf_dir)
    except HFFormatError:
        raise
    except KeyError as e:
        raise HFFormatError(f"{hf_dir}: missing {e} (in config.json or the weights); not a complete LLaMA "
                            "checkpoint") from None
    except (ValueError, TypeError) as e:
        raise HFFormatError(f"{hf_dir}: {e}") from None


class HFFormatError(ConfigError):
    """A Hugging Face folder this code cannot read; the message says what is wrong."""


def _import_llama(hf_dir: str) -> tuple[ModelConfig, dict]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir) or not os.path.exists(path):
        raise HFFormatError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    try:
        with open(path) as fh:
            c = json.load(fh)
    except ValueError as e:
        raise HFFormatError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise HFFormatError(f"{path} is not a JSON object")
    if c.get("model_type") not in (None, "llama", "mistral"):
        raise ValueError(f"{hf_dir}: model_type {c.get('model_type')!r} is not LLaMA-family")
    # transformers >= 5 keeps RoPE settings in "rope_parameters"; older files at the top level
    rope = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"{hf_dir}: RoPE scaling {scaling} is not supported yet")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    d, n = c["hidden_size"], c["num_attention_heads"]
    k = c.get("num_key_value_heads") or n
    h = c.get("head_dim") or d // n
    layers = c["num_hidden_layers"]
    tied = bool(c.get("tie_word_embeddings", False))
    cfg = ModelConfig(vocab_size=c["vocab_size"], d_model=d, n_layers=layers, n_heads=n, n_kv_heads=k,
                      head_dim=h, d_ff=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
                      rope_theta=float(theta), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                      tie_embeddings=tied)
    t = {}
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise NotFound(f"{hf_dir}: no .safetensors files (PyTorch .bin checkpoints are not read)")
    for name in files:
        t.update(load_safetensors(os.path.join(hf_dir, name)))

    layer_ids = {int(k.split(".")[2]) for k in t if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if layer_ids != set(range(layers)):
        missing, extra = sorted(set(range(layers)) - layer_ids), sorted(layer_ids - set(range(layers)))
        raise HFFormatError(f"{hf_dir}: config.json says {layers} layers but the weights have "
                            + (f"no layer(s) {missing[:5]}" if missing else "") + (" and " if missing and extra else "")
                            + (f"extra layer(s) {extra[:5]}" if extra else ""))

    def stack(fmt, fn):
        return np.stack([fn(t[fmt.format(i)]) for i in range(layers)])

    pre = "model.layers.{}."
    params = {
        "embed": t["model.embed_tokens.weight"],
        "final_norm": {"scale": t["model.norm.weight"]},
        "blocks": {
            "attn": {
                "wq": stack(pre + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, n, h)),
                "wk": stack(pre + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, h)),
                "wv": stack(pre + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, h)),
                "wo": stack(pre + "self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d)),
            },
            "mlp": {
                "w_gate": stack(pre + "mlp.gate_proj.weight", lambda w: w.T),
                "w_up": stack(pre + "mlp.up_proj.weight", lambda w: w.T),
                "w_down": stack(pre + "mlp.down_proj.weight", lambda w: w.T),
            },
            "attn_norm": {"scale": stack(pre + "input_layernorm.weight", lambda w: w)},
            "mlp_norm": {"scale": stack(pre + "post_attention_layernorm.weight", lambda w: w)},
        },
    }
    if not tied:
        if "lm_head.weight" not in t and "score.weight" in t:
            raise HFFormatError(f"{hf_dir} is a reward model (a 'score' head, no language-model head: "
                                f"{', '.join(c.get('architectures') or ['LlamaForSequenceClassification'])}); "
                                "import-hf reads language models: score with the run it was exported from "
                                "(lm reward RUN_DIR --pairs FILE)")
        params["head"] = t["lm_head.weight"].T
    return cfg, _as_float32(params)


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _as_float32(tree):
    if isinstance(tree, dict):
        return {k: _as_float32(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


def load_model(cfg: ModelConfig, params: dict):
    """A Transformer holding `params` (from `import_llama`): `load_model(*import_llama(d))(tokens)`."""

    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model
