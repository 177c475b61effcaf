"""SentencePiece tokenizer: training on a text sample, and a small batched wrapper.

The vocabulary reserves ids 0-3 for PAD, UNK, BOS and EOS, then control tokens for
chat roles (used by SFT later; they are never produced by encoding plain text). Pieces
are BPE with byte fallback, so any string round-trips exactly; whitespace and newlines
are kept as they are (identity normalisation), which code needs; digits are split.
"""

from __future__ import annotations

import filecmp
import hashlib
import io
import os
import random
import shutil
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from data_pipeline.errors import NotFound
from data_pipeline.sources import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Tool use (data_pipeline/chat.py): the tool definitions' turn, an assistant's call, a tool's
# result. Reserved only in tokenizers trained with them (data.tool_tokens): adding them to
# every tokenizer would change every existing run's vocabulary.
TOOL_TOKENS = ("<|tools|>", "<|tool_call|>", "<|tool|>")
NEWLINE = "\n"


def _chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Cut documents into pieces of at most `max_chars`, at line boundaries where possible.

    SentencePiece trains on "sentences"; feeding whole lines groups (newlines included)
    lets it learn pieces for indentation and line breaks.
    """
    for text in texts:
        buf = []
        size = 0
        for line in text.splitlines(keepends=True):
            while len(line) > max_chars:  # a very long line: hard cut
                yield line[:max_chars]
                line = line[max_chars:]
            if size + len(line) > max_chars and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_prefix: str,
                    model_type: str = "bpe", num_threads: int | None = None, tool_tokens: bool = False) -> "Tokenizer":
    """Train a SentencePiece model on `texts`; writes `out_prefix`.model and returns it
    (`tool_tokens`: with the tool-use control tokens, TOOL_TOKENS, besides the chat ones)."""
    controls = list(CHAT_TOKENS) + (list(TOOL_TOKENS) if tool_tokens else [])
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)

    smallest = 256 + 4 + len(controls) + 1  # byte pieces, PAD/UNK/BOS/EOS, role tokens, newline
    if vocab_size < smallest:
        raise DataError(f"vocab_size={vocab_size} is too small: byte fallback and the special tokens take "
                        f"{smallest} pieces; use at least a few hundred more")
    model = io.BytesIO()
    stopped: list[BaseException] = []
    try:
        _train(_stoppable(texts, stopped), vocab_size, model_type, num_threads, model, controls)
    except RuntimeError as e:
        if stopped:  # an interruption (Ctrl-C, SIGTERM) while reading the texts: SentencePiece lost its type
            raise stopped[0] from None
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        if "Vocabulary size too high" in str(e):
            raise DataError(f"the training text is too small for vocab_size={vocab_size} ({first}); "
                            "use a smaller vocab_size or more text") from None
        if "Vocabulary size" in str(e):
            raise DataError(f"vocab_size={vocab_size} is too small for this text: byte fallback reserves 256 "
                            f"pieces and every frequent character needs one ({first}); use a larger vocab_size") from None
        if "empty" in str(e).lower() or "no sentence" in str(e).lower() or "Sentence" in str(e):
            raise DataError(f"no usable training text for the tokenizer ({first}); check the sources") from None
        raise DataError(f"training the tokenizer failed ({first}); check the sources and vocab_size") from None
    path = out_prefix + ".model"
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)  # atomic: a crash never leaves half a tokenizer
    return Tokenizer(path)


def _stoppable(texts: Iterable[str], stopped: list) -> Iterator[str]:
    """`texts`, recording an interruption raised while reading them (SentencePiece turns any
    exception of its sentence iterator into a RuntimeError)."""
    try:
        yield from texts
    except Exception:
        raise
    except BaseException as e:
        stopped.append(e)
        raise


def _train(texts, vocab_size, model_type, num_threads, model, controls) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts, 2048),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        treat_whitespace_as_suffix=False,
        user_defined_symbols=[NEWLINE],
        control_symbols=controls,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        max_sentence_length=4096,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )


def file_sha256(path: str) -> str:
    """SHA-256 of a file (identifies a tokenizer model in checkpoints and token caches)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def valid_text(text: str) -> str:
    """`text` as valid Unicode: bytes that were not UTF-8 (which Python keeps in command-line
    arguments and terminal input as lone surrogates, and which SentencePiece refuses) become
    U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "replace")
        return raw.decode("utf-8", "replace")


class Tokenizer:
    """A thin wrapper over a SentencePiece model with batched encode/decode."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise NotFound(f"tokenizer model {path!r} does not exist")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(valid_text(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = self.sp.encode([valid_text(t) for t in texts], num_threads=os.cpu_count() or 1)
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def decode_after(self, context: Sequence[int], ids: Sequence[int]) -> str:
        """The text `ids` add after the tokens `context`: what prompt + answer reads as, less
        the prompt. (Decoding `ids` alone drops the space that starts their first piece:
        SentencePiece strips it at the start of a text.) Decodes from the last context
        token on and cuts that token's own text off."""
        ids = [int(i) for i in ids]
        for k in range(1, min(len(context), 8) + 1):  # back far enough to end on a whole character
            tail = [int(i) for i in context[-k:]]
            head = self.decode(tail)
            if head.endswith("\ufffd"):  # a character cut off in the context's last bytes
                continue
            full = self.decode(tail + ids)
            if full.startswith(head):
                return full[len(head):]
        return self.decode(ids)

    def token_texts(self, context: Sequence[int], ids: Sequence[int]) -> list[str]:
        """Each of `ids`' own text after the tokens before it: pieces that join into
        `decode_after(context, ids)` where no character spans two tokens (a byte piece of a
        longer character reads as U+FFFD)."""
        before = [int(i) for i in context[-8:]]
        out = []
        for i in ids:
            out.append(self.decode_after(before, [i]))
            before = (before + [int(i)])[-8:]
        return out

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def token_bytes(self, i: int, text: str) -> list[int]:
        """The UTF-8 bytes token `i` stands for, given its `text` (a byte piece's own byte)."""
        if self.sp.is_byte(int(i)):
            return [int(self.piece(i)[3:5], 16)]  # "<0xE2>"
        return list(text.encode())

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def byte_lengths(self):
        """UTF-8 bytes each id stands for (byte pieces 1, control tokens 0): for bits per byte."""
        out = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                out[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


# ---------------------------------------------------------------------------------------
# The tokenizer of a run


def sample_texts(sources, megabytes: float, seed: int) -> Iterator[str]:
    """About `megabytes` of text from (DocumentSource, weight) pairs, in proportion to the weights."""
    total = sum(w for _, w in sources) or 1.0
    for k, (docs, w) in enumerate(sources):
        budget = megabytes * 1e6 * w / total
        order = list(range(len(docs)))
        random.Random(seed + k).shuffle(order)
        for i in order:
            rec = docs[i]
            if rec.text:
                yield rec.text
                budget -= len(rec.text)
                if budget <= 0:
                    break


def tokenizer_for_run(sources, vocab_size: int, run_dir: str, path: str | None = None,
                      sample_mb: float = 4.0, seed: int = 0, log: Callable = print, *, store: bool = True,
                      fix: str | None = None, tool_tokens: bool = False) -> Tokenizer:
    """The run's tokenizer, copied into the run directory and checked: the one routine every
    stage uses.

    `path` (a SentencePiece .model), else the one stored in the run (RUN_DIR/tokenizer.model),
    else one trained on a sample of `sources` and stored there. A tokenizer from elsewhere is
    copied into the run directory (atomically; with `store` false, by another process, it is
    read where it is), so that the run is self-contained. Its vocabulary must equal the
    model's: a mismatch fails here, before any training, with both numbers and `fix`."""
    stored = os.path.join(run_dir, "tokenizer.model")
    if path is None and os.path.exists(stored):
        path = stored
    if path is not None:
        tok = Tokenizer(path)  # (read first: a path that is not a tokenizer fails here, before any copy)
        if store:
            _store(path, stored)
    else:
        t0 = time.time()
        tok = train_tokenizer(sample_texts(sources, sample_mb, seed), vocab_size, os.path.join(run_dir, "tokenizer"),
                              tool_tokens=tool_tokens)
        log(f"trained a {vocab_size}-piece BPE tokenizer on {sample_mb:g} MB in "
            f"{time.time() - t0:.1f}s -> {tok.path}")
    if tok.vocab_size != vocab_size:
        raise DataError(f"tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size={vocab_size}; "
                        + (fix or f"use --set model.vocab_size={tok.vocab_size} or another tokenizer"))
    return tok


def _store(path: str, stored: str) -> str:
    """`path` copied to `stored` unless it holds the same bytes already; returns `stored`."""
    if os.path.exists(stored) and (os.path.samefile(path, stored) or filecmp.cmp(path, stored, shallow=False)):
        return stored
    os.makedirs(os.path.dirname(stored) or ".", exist_ok=True)
    tmp = f"{stored}.{os.getpid()}.tmp"
    shutil.copyfile(path, tmp)
    os.replace(tmp, stored)
    return stored
