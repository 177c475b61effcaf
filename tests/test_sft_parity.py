"""SFT parity with the Hugging Face stack (skipped when torch/transformers/TRL are absent; CI installs them).

1. The SFT loss follows TRL's `SFTTrainer(assistant_only_loss=True)` convention: the same token
   ids, the same supervised tokens (assistant content and the <|end|> closing it) and the same
   mean loss over the batch's supervised tokens, computed by TRL's own dataset preparation,
   collator and `compute_loss` on the exported model.
2. A LoRA run exported to Hugging Face (adapters merged) gives the logits of the un-merged model.
3. The exported chat template gives our generation prompt, and transformers' greedy `generate`
   continues it with our greedy tokens.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import conversations, sft_config

from lm.config import LoraConfig

torch = pytest.importorskip("torch", reason="torch not installed (CI installs it)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs it)")

QUIET = dict(log=lambda *_: None)
pytestmark = pytest.mark.slow  # peer parity: run by .ci/run after make test


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()


@pytest.fixture(scope="module")
def exported(sft_run, tmp_path_factory):
    """The shared short full-parameter SFT run (conftest.sft_run), loaded, and its Hugging Face export."""
    from lm.tools.hf_runs import export_run
    from lm.train.run import load_run

    hf = export_run(sft_run["run"], str(tmp_path_factory.mktemp("sft_parity") / "hf"), **QUIET)
    return {"run": sft_run["run"], "hf": hf, "loaded": load_run(sft_run["run"], **QUIET)}


# ---------------------------------------------------------------------------------------
# 1. The loss convention of TRL's SFTTrainer


def _with_generation_markers(template: str) -> str:
    """The exported template with TRL's `{% generation %}` markers around each assistant reply and
    its closing <|end|> (what `return_assistant_tokens_mask` needs); the rendered text is unchanged."""
    turn = ("{%- if message['content'] -%}{{- ' ' ~ message['content'] -}}{%- endif -%}"
            "{{- '<|end|>' -}}")
    assert template.count(turn) == 1, "the exported chat template changed: update _with_generation_markers"
    marked = ("{%- if message['role'] == 'assistant' -%}{%- generation -%}" + turn
              + "{%- endgeneration -%}{%- else -%}" + turn + "{%- endif -%}")
    return template.replace(turn, marked)


def _trl_batch_and_loss(hf_dir, convs, out_dir):
    """TRL's SFTTrainer with assistant_only_loss: its prepared batch and its loss on it."""
    datasets = pytest.importorskip("datasets", reason="datasets not installed (comes with trl)")
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    plain = tok.chat_template
    if not has_generation_markers(plain):
        tok.chat_template = _with_generation_markers(plain)
    assert is_chat_template_stop_token_trained(tok)  # TRL's own check: <|end|> is trained
    for c in convs:  # the markers do not change the rendering
        assert tok.apply_chat_template(c["messages"], tokenize=False) == \
            tok.apply_chat_template(c["messages"], tokenize=False, chat_template=plain)
    model = _hf_model(hf_dir)
    args = SFTConfig(output_dir=str(out_dir), assistant_only_loss=True, per_device_train_batch_size=len(convs),
                     max_length=None, packing=False, padding_free=False, shuffle_dataset=False,
                     report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(convs),
                         processing_class=tok)
    prepared = trainer.train_dataset
    assert len(prepared) == len(convs)
    batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, dict(batch)))
        # the plain transformers causal-LM loss with these labels is the same number
        hf_loss = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss)
    return {k: v.numpy() for k, v in batch.items()}, loss, hf_loss


def _rows(rendered, row_len: int, packed: bool) -> dict:
    """Rows of `row_len` tokens as the chat pipeline builds them (one conversation per row, or
    packed first-fit, then padded with empty rows to one row per conversation), turned into SFT
    examples by `to_sft_example`."""
    from data_pipeline.chat_data import to_sft_example

    bins: list[list] = []
    for ids, mask in rendered:
        assert len(ids) <= row_len
        for b in bins if packed else []:
            if sum(len(i) for i, _ in b) + len(ids) <= row_len:
                b.append((ids, mask))
                break
        else:
            bins.append([(ids, mask)])
    examples = []
    for b in bins + [[]] * (len(rendered) - len(bins)):
        row = {k: np.zeros(row_len, np.int32) for k in ("tokens", "tokens_segment_ids", "tokens_positions", "mask")}
        at = 0
        for s, (ids, mask) in enumerate(b, 1):
            n = len(ids)
            row["tokens"][at: at + n] = ids
            row["mask"][at: at + n] = mask
            row["tokens_segment_ids"][at: at + n] = s
            row["tokens_positions"][at: at + n] = np.arange(n)
            at += n
        examples.append(to_sft_example(row))
    keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    return {k: np.stack([e[k] for e in examples]) for k in keys}


def _our_loss(run, batch) -> tuple[float, float]:
    loss, aux = jax.jit(run.trainer.loss_fn)(run.params, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(aux["loss"]), float(aux["weight"])


def test_sft_loss_matches_trl_assistant_only_loss(exported, tmp_path):
    pytest.importorskip("trl", minversion="1.16", reason="trl>=1.16 not installed (CI installs it)")
    from data_pipeline.chat import render

    run = exported["loaded"]
    row_len = run.cfg.model.max_seq_len + 1
    # 8 conversations that fit a row whole, with and without a system prompt, of one and two turns
    convs = [c for c in conversations(40, seed=7) if len(render(run.tokenizer, c["messages"])[0]) <= row_len][:8]
    assert len(convs) == 8 and {len(c["messages"]) for c in convs} >= {2, 3, 4}
    trl_batch, trl_loss, hf_loss = _trl_batch_and_loss(exported["hf"], convs, tmp_path / "trl")
    rendered = [render(run.tokenizer, c["messages"]) for c in convs]

    # the same token ids, row by row (TRL pads on the right)
    attn = trl_batch["attention_mask"]
    for r, (ids, _) in enumerate(rendered):
        assert trl_batch["input_ids"][r][attn[r] == 1].tolist() == ids
        assert attn[r].sum() == len(ids) and attn[r][: len(ids)].all()

    # the same supervised tokens: TRL's label t (not -100) is predicted from position t-1 (the
    # causal-LM shift); ours: loss_mask[j] means target j+1
    labels = trl_batch["labels"]
    assert (labels[:, 0] == -100).all()
    theirs = {(r, t) for r, t in zip(*np.nonzero(labels != -100))}
    for r, t in theirs:
        assert labels[r, t] == trl_batch["input_ids"][r, t]
    unpacked = _rows(rendered, row_len, packed=False)
    ours = {(r, j + 1) for r, j in zip(*np.nonzero(unpacked["loss_mask"] > 0))}
    assert ours == theirs
    assert ours == {(r, t) for r, (_, mask) in enumerate(rendered) for t, m in enumerate(mask) if m}

    # the same mean loss over all supervised tokens of the batch, one conversation per row or packed
    loss, weight = _our_loss(run, unpacked)
    packed = _rows(rendered, row_len, packed=True)
    assert (packed["segment_ids"] == 0).all(axis=1).any()  # several conversations share a row
    packed_loss, packed_weight = _our_loss(run, packed)
    assert weight == packed_weight == len(theirs)
    np.testing.assert_allclose(hf_loss, trl_loss, rtol=0, atol=1e-5)
    np.testing.assert_allclose(loss, trl_loss, rtol=0, atol=1e-4)
    np.testing.assert_allclose(packed_loss, trl_loss, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------
# 2. LoRA: the merged export against the un-merged model


def test_lora_merged_export_matches_unmerged_model(base_run, tmp_path):
    from lm.model.sharding import make_mesh
    from lm.stages.runner import train
    from lm.tools.hf_runs import export_run
    from lm.train.checkpoint import Checkpointer
    from lm.train.engine import make_engine
    from lm.train.init import load_params

    cfg = dataclasses.replace(sft_config(base_run, steps=8, eval_every=8), lora=LoraConfig(rank=4, alpha=8.0))
    run = str(tmp_path / "lora")
    train(cfg, run, progress=False, **QUIET)
    hf_dir = export_run(run, str(tmp_path / "hf"), **QUIET)

    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1))
    engine = make_engine(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    ck = Checkpointer(run)
    adapters = ck.restore_latest(engine.abstract_state())[0].params
    ck.close()
    base, _ = load_params(base_run["run"], engine.abstract_params(), **QUIET)

    x = np.random.default_rng(0).integers(4, cfg.model.vocab_size, (3, 24))
    ours = np.asarray(engine.model(engine.model_params(adapters, {"base": base}))(jnp.asarray(x)))
    plain = np.asarray(engine.model(base)(jnp.asarray(x)))
    hf = _hf_model(hf_dir)
    with torch.no_grad():
        theirs = hf(torch.tensor(x, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - plain).max() > 1e-3  # the adapters were trained: the merge matters
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)

    # un-merged, independently: layer 0's q projection x @ W + (alpha/r) (x @ A) @ B
    m = cfg.model
    w = np.asarray(base.to_pure_dict()["blocks"]["attn"]["wq"][0]).reshape(m.d_model, m.n_heads * m.head_size)
    a, b = (np.asarray(adapters["q"][k][0]) for k in ("a", "b"))
    h = np.random.default_rng(1).standard_normal((5, m.d_model)).astype(np.float32)
    unmerged = h @ w + (cfg.lora.alpha / cfg.lora.rank) * ((h @ a) @ b)
    with torch.no_grad():
        q = hf.model.layers[0].self_attn.q_proj(torch.from_numpy(h)).numpy()
    assert np.abs((h @ a) @ b).max() > 1e-4
    np.testing.assert_allclose(q, unmerged, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 3. The exported chat template and greedy generation

PROMPTS = [
    [{"role": "user", "content": "reverse: quick fox"}],
    [{"role": "system", "content": "You reverse words."}, {"role": "user", "content": "reverse: the lazy dog"}],
    [{"role": "user", "content": "reverse: seven wizards"}, {"role": "assistant", "content": "wizards seven"},
     {"role": "user", "content": "reverse: hex over a brown"}],
]


def test_exported_chat_template_and_greedy_generation_match(exported):
    from data_pipeline.chat import chat_token_ids, generation_prompt
    from lm.sampling.sampler import generate

    run = exported["loaded"]
    tok = transformers.AutoTokenizer.from_pretrained(exported["hf"])
    hf = _hf_model(exported["hf"])
    stops = [chat_token_ids(run.tokenizer)["end"], run.tokenizer.eos_id]
    prompts = [generation_prompt(run.tokenizer, m) for m in PROMPTS]
    for messages, ids in zip(PROMPTS, prompts):
        hf_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        assert list(hf_ids) == ids
    # ours: the prompts in one batch (of different lengths); theirs: one at a time
    ours = generate(run.graphdef, run.params, prompts, 8, run.cfg.model.max_seq_len, temperature=0.0,
                    stop_ids=stops)
    for ids, mine in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=0)
        theirs = out[0, len(ids):].tolist()
        assert mine == theirs, (run.tokenizer.decode(ids), mine, theirs)
        assert len(mine) == 8 or mine[-1] in stops
    # the run learnt to answer: stopping at <|end|> is exercised (not only 8 tokens of a loop)
    assert any(o and o[-1] in stops for o in ours), ours
