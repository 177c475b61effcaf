"""Parity with lm-evaluation-harness itself (skipped without lm-eval, torch, transformers).

A small random model with the project's real tokenizer is exported to Hugging Face and
imported as a run directory (the same weights on both sides). HellaSwag, ARC-Easy, PIQA,
Winogrande and LAMBADA items (../shared/data where present, else made-up items in the
same formats) become harness tasks defined over local JSON files, run end to end by
`lm_eval.simple_evaluate` twice: on the export through the harness's Hugging Face backend
(HFLM), and on the run through our adapter (lm.interop.lm_eval, "lm-jax"). Our own scorer
(lm.evaluate, what `lm eval` runs) scores the same items. Per request the log-likelihoods
agree within 1e-3, and per item acc and acc_norm are identical.
"""

import json
import os
import time

import numpy as np
import pytest
from helpers import corpus_tokenizer, write_task_files

from data_pipeline.config import SHARED_DATA

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (optional: pip install lm-eval)")
torch = pytest.importorskip("torch", reason="torch not installed (CI installs it)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs it)")
from lm_eval.models.huggingface import HFLM  # noqa: E402

SHARED = SHARED_DATA  # optional (LM_DATA, else ../shared/data beside the repository)
N_ITEMS = 100
TASKS = ("hellaswag", "arc_easy", "piqa", "winogrande", "lambada")


def _harness_task(task, items, folder):
    """A harness task config over a local JSON Lines file holding `items` (lm.evaluate's form)."""
    path = os.path.join(folder, f"{task}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            if task == "winogrande":  # the choice sits in the context (the harness's "multiple input")
                doc = {"gold": it["gold"], "options": it["contexts"], "target": it["continuations"][0].lstrip(" ")}
            elif task == "lambada":
                doc = {"context": it["contexts"][0], "target": it["continuations"][0]}
            else:
                doc = {"context": it["contexts"][0], "choices": it["choices"], "gold": it["gold"]}
            f.write(json.dumps(doc) + "\n")
    cfg = {"task": f"local_{task}", "dataset_path": "json", "test_split": "test",
           "dataset_kwargs": {"data_files": {"test": path}, "cache_dir": os.path.join(folder, "cache")},
           "metadata": {"version": 1.0}}
    if task == "lambada":
        return {**cfg, "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target",
                "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]}
    if task == "winogrande":
        return {**cfg, "output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_choice": "options",
                "doc_to_target": "target", "metric_list": [{"metric": "acc"}]}
    return {**cfg, "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
            "doc_to_target": "gold", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}


def _samples(out, task):
    """Per item: the request texts, the log-likelihoods and the harness's per-item metrics."""
    rows = sorted(out["samples"][f"local_{task}"], key=lambda s: s["doc_id"])
    return [{"args": [tuple(a) for a in s["arguments"]] if isinstance(s["arguments"][0], (list, tuple))
             else [tuple(s["arguments"])],
             "ll": [float(r[0][0]) for r in s["resps"]], "greedy": [bool(r[0][1]) for r in s["resps"]],
             **{m: s[m] for m in ("acc", "acc_norm", "perplexity") if m in s}} for s in rows]


@pytest.fixture(scope="module", params=[pytest.param(12, id="12-items", marks=pytest.mark.slow),
                                        pytest.param(N_ITEMS, id=f"{N_ITEMS}-items", marks=pytest.mark.slow)])
def world(request, tmp_path_factory):
    import jax
    from flax import nnx

    from lm.config import Config, MeshConfig, ModelConfig
    from lm.eval.evaluate import load_task, loglikelihood_texts, multiple_choice_requests
    from lm.eval.harness import JaxLM
    from lm.interop.hf import export_llama
    from lm.model.sharding import make_mesh
    from lm.model.transformer import Transformer
    from lm.train.engine import make_engine
    from lm.train.run import LoadedRun

    tmp = tmp_path_factory.mktemp("harness")
    tok = corpus_tokenizer(tmp)
    # init_std 0.2: a random model with peaked predictions, so choices differ clearly
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=256, init_std=0.2)
    model = Transformer(cfg, nnx.Rngs(0))
    # Greedy decoding should write text: no byte, control or unknown pieces (zero logits,
    # where the best of ~760 random others is far above zero); EOS stays possible.
    sp = tok.sp
    banned = [i for i in range(tok.vocab_size) if i != tok.eos_id and (sp.is_byte(i) or sp.is_control(i) or
                                                                       sp.is_unknown(i))]
    model.head[...] = model.head[...].at[:, np.asarray(banned)].set(0.0)
    export_llama(cfg, nnx.state(model, nnx.Param), str(tmp / "hf"), tokenizer_model=tok.path)
    # the run as lm.run.load_run gives it, over all 8 devices (test_evaluate_harness_on_a_run_directory
    # goes through a run directory)
    engine = make_engine(Config(model=cfg), make_mesh(MeshConfig(data=-1)))
    run = LoadedRun(cfg=Config(model=cfg), trainer=engine, step=0, tokenizer=tok,
                    params=jax.device_put(nnx.state(model, nnx.Param), engine.param_sharding))

    n = request.param
    data = SHARED if os.path.isdir(SHARED) else write_task_files(tmp, n=n)
    items = {t: load_task(t, data)[:n] for t in TASKS}
    configs = [_harness_task(t, items[t], str(tmp)) for t in TASKS]

    hf = HFLM(pretrained=str(tmp / "hf"), device="cpu", dtype="float32", batch_size=16)
    ours = JaxLM(run=run, batch_size=16, progress=False)
    from lm_eval.tasks import TaskManager

    # our tasks are configs over local files: no need to index the harness's ~10k task files
    kw = dict(tasks=configs, log_samples=True, bootstrap_iters=0, random_seed=0,
              task_manager=TaskManager(include_defaults=False))
    t0 = time.perf_counter()
    hf_out = lm_eval.simple_evaluate(model=hf, **kw)
    t1 = time.perf_counter()
    our_out = lm_eval.simple_evaluate(model=ours, **kw)
    t2 = time.perf_counter()
    # our scorer on the same items: the requests lm eval makes, all tasks in one call
    pairs = {t: [(it["contexts"][0], it["continuations"][0]) for it in items[t]] if t == "lambada"
             else multiple_choice_requests(items[t]) for t in TASKS}
    flat = [p for t in TASKS for p in pairs[t]]
    scores = loglikelihood_texts(ours.logits_fn, run.params, tok, flat, cfg.max_seq_len, 16,
                                 batch_sharding=ours.sharding)
    k, by_task = 0, {}
    for t in TASKS:
        by_task[t], k = (pairs[t], scores[k: k + len(pairs[t])]), k + len(pairs[t])
    print(f"\nHFLM {t1 - t0:.1f}s, lm-jax {t2 - t1:.1f}s, lm.evaluate {time.perf_counter() - t2:.1f}s "
          f"for {len(flat)} requests")
    return {"tok": tok, "items": items, "run": run, "hf": hf, "ours": ours, "data": data, "tmp": tmp,
            "configs": configs, "hf_out": hf_out, "our_out": our_out, "scores": by_task}


def _our_scores(world, task):
    return world["scores"][task]


@pytest.mark.parametrize("task", TASKS)
def test_loglikelihoods_match_the_harness_hf_backend(world, task):
    pairs, scores = _our_scores(world, task)
    hf = _samples(world["hf_out"], task)
    assert len(hf) == len(world["items"][task])
    assert [a for s in hf for a in s["args"]] == pairs  # the harness builds the same text requests
    hf_ll = np.array([v for s in hf for v in s["ll"]])
    our_ll = np.array([v for v, _ in scores])
    delta = np.abs(hf_ll - our_ll).max()
    print(f"{task}: {len(pairs)} requests, max |Δ loglik| = {delta:.2e}")
    assert delta < 1e-3
    assert [g for s in hf for g in s["greedy"]] == [g for _, g in scores]


@pytest.mark.parametrize("task", TASKS)
def test_metrics_per_item_match_the_harness(world, task):
    """The harness's own per-item acc/acc_norm, from HFLM and from our adapter, and ours."""
    from lm.eval.evaluate import lambada_metrics, multiple_choice_metrics

    hf, adapter = _samples(world["hf_out"], task), _samples(world["our_out"], task)
    np.testing.assert_allclose([v for s in adapter for v in s["ll"]], [v for s in hf for v in s["ll"]], atol=1e-3)
    metrics = ("acc",) if task in ("winogrande", "lambada") else ("acc", "acc_norm")
    _, scores = _our_scores(world, task)
    for m in metrics:
        agree = sum(a[m] == h[m] for a, h in zip(adapter, hf))
        print(f"{task} {m}: adapter and HFLM agree on {agree}/{len(hf)} items")
        assert agree == len(hf)
        if task != "lambada":  # our scorer's per-item choice, item by item
            k, ours = 0, []
            for it in world["items"][task]:
                n = max(len(it["contexts"]), len(it["continuations"]))
                ours.append(multiple_choice_metrics([it], [v for v, _ in scores[k: k + n]])[m])
                k += n
            assert ours == [h[m] for h in hf]
    items = world["items"][task]
    r = (lambada_metrics(scores) if task == "lambada"
         else multiple_choice_metrics(items, [v for v, _ in scores]))
    for m in metrics:  # the aggregates: the harness's (both backends) and ours
        theirs = world["hf_out"]["results"][f"local_{task}"][f"{m},none"]
        assert r[m] == pytest.approx(theirs) and world["our_out"]["results"][f"local_{task}"][f"{m},none"] == \
            pytest.approx(theirs)
    if task == "lambada":
        assert r["perplexity"] == pytest.approx(world["hf_out"]["results"]["local_lambada"]["perplexity,none"],
                                                rel=1e-4)


def test_rolling_loglikelihood_matches_the_harness(world):
    """Texts longer than the context: several windows. HFLM with add_bos_token=False encodes
    the text without BOS and predicts its first token from BOS, as we do."""
    from lm_eval.api.instance import Instance

    text = " ".join(it["contexts"][0] for it in world["items"]["lambada"][:6])
    while len(world["tok"].encode(text)) <= 2 * 256:  # made-up items are short
        text = text + "\n" + text
    texts = [text, "short text", "\n\nclass A:\n    pass\n"]
    assert len(world["tok"].encode(text)) > 2 * 256
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    hf = HFLM(pretrained=world["hf"].pretrained, device="cpu", dtype="float32",
                                         batch_size=16, add_bos_token=False)
    np.testing.assert_allclose(world["ours"].loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs),
                               atol=1e-3, rtol=1e-5)


def test_greedy_generation_matches_the_harness(world):
    """The adapter's generate_until: the new tokens are those of transformers' greedy
    generate on the export, the text is cut at the first stop string; where the tokens hold
    no invalid UTF-8, the text is HFLM's too (less the leading space HF drops when it decodes
    the new tokens alone). Byte pieces that are not UTF-8 (a random model writes them)
    decode differently: SentencePiece replaces each bad byte, HF the whole run of bytes."""
    from lm_eval.api.instance import Instance

    ours_lm, tok = world["ours"], world["tok"]
    prompts = [it["contexts"][0] for it in world["items"]["hellaswag"][:15]] + ["Question: What is it?\nAnswer:"]
    until = ["\n", "."]
    reqs = [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": 12, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
    ours = ours_lm.generate_until(reqs)
    theirs = world["hf"].generate_until(reqs)
    compared = 0
    for prompt, o, t in zip(prompts, ours, theirs):
        ids = tok.encode(prompt, bos=True)
        with torch.no_grad():
            new = world["hf"].model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                             eos_token_id=tok.eos_id, pad_token_id=0)[0, len(ids):].tolist()
        new = [i for i in new if i != tok.eos_id]
        text = ours_lm._continuation(ids, new)
        for stop in until:
            text = text.split(stop)[0]
        assert o == text
        if "\ufffd" not in tok.decode(new):
            assert (o[1:] if o.startswith(" ") else o) == t
            compared += 1
    assert compared >= 10


@pytest.mark.slow
def test_evaluate_harness_on_a_run_directory(world, tmp_path):
    """`lm eval RUN --harness`'s function on a run directory (imported from the export):
    the harness's figures, task versions and item counts merged into RUN/eval.json."""
    from lm_eval.tasks import TaskManager

    from lm.eval.harness import evaluate_harness
    from lm.tools.hf_runs import import_run

    run_dir = str(tmp_path / "run")
    import_run(str(world["tmp"] / "hf"), run_dir, log=lambda *_: None)
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump({"hellaswag": {"acc": 0.5}}, f)  # an earlier result of another task stays
    configs = [c for c in world["configs"] if c["task"] in ("local_piqa", "local_lambada")]
    r = evaluate_harness(run_dir, configs, batch_size=16, log=lambda *_: None, progress=False,
                         task_manager=TaskManager(include_defaults=False))
    saved = json.load(open(os.path.join(run_dir, "eval.json")))
    assert saved["hellaswag"] == {"acc": 0.5}
    for task in ("local_piqa", "local_lambada"):
        theirs = world["hf_out"]["results"][task]
        assert saved[f"harness:{task}"]["acc"] == pytest.approx(theirs["acc,none"]) == r[f"harness:{task}"]["acc"]
        assert saved[f"harness:{task}"]["n"] == len(world["items"][task[6:]])
        assert saved[f"harness:{task}"]["version"] == 1.0
