"""Command line: `lm train|info|sample|chat|serve|bench ...` (also `python -m lm ...`)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
import time
import traceback

from tqdm import tqdm

from data_pipeline.errors import UserError


def _log(msg: str) -> None:
    tqdm.write(str(msg))


HEARTBEAT_S = 30


def _distributed(args) -> None:
    """Join a multi-process job: explicit flags, or auto-detection (TPU pods, SLURM, ...)."""
    import jax  # heavy: a command imports JAX when it runs

    if args.coordinator and (args.num_processes is None or args.process_id is None):
        raise UserError("--coordinator needs --num-processes N and --process-id I (0 to N-1) too")
    if args.coordinator and args.process_id >= args.num_processes:
        raise UserError(f"--process-id {args.process_id} is out of range: 0 to {args.num_processes - 1} "
                        f"with --num-processes {args.num_processes}")
    if args.coordinator or os.environ.get("LM_DISTRIBUTED"):
        if args.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        if args.coordinator:
            kwargs = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                          process_id=args.process_id)
        # a process that stops answering (killed, its host gone) is noticed by the others in
        # HEARTBEAT_S, not the default 100 s
        jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=HEARTBEAT_S)


def cmd_train(args) -> int:
    from lm.train import interrupt, supervise  # lazy: a command imports what it runs

    if (args.coordinator or os.environ.get("LM_DISTRIBUTED")) and not supervise.is_worker():
        # one process of several: run the work in a watched child (lm/train/supervise.py)
        from lm import experiment  # lazy: a command imports what it runs

        cfg = experiment.load(args.experiment, args.set)  # bad keys fail here, in one line
        process = f"process {args.process_id}" if args.process_id is not None else f"process on {os.uname()[1]}"
        return supervise.run(args.argv, args.run_dir or os.path.join("runs", cfg.name), process)

    # SIGTERM/SIGINT end the run promptly in every phase (lm/train/interrupt.py). A run stopped by
    # one leaves with os._exit: threads of a data source that hangs must not keep the
    # process alive, nor native threads crash it on the way out.
    with interrupt.handling(watchdog=True) as signals:
        try:
            code = _train(args)
        except interrupt.Interrupted as e:  # nothing new to save
            _exit_now(interrupt.message(e.signum, e.phase), e.exit_code)
        except (UserError, OSError) as e:
            if not supervise.is_worker() or isinstance(e, UserError) or e.errno in _PATH_ERRNOS:
                raise  # one line in _run (one process of several then leaves at once: see main)
            traceback.print_exc()  # a bug, in one process of several: out at once (below)
            _exit_now(None, 1)
        except Exception:  # noqa: BLE001 -- in a watched child: a collective failed (a peer died?)
            if not supervise.is_worker():
                raise
            traceback.print_exc()  # for the watcher's report, then out at once: jax.distributed's
            _exit_now(None, 1)  # shutdown barrier would wait for the dead peer's heartbeat timeout
        if signals.received:
            _exit_now(None, code)
    return code


def _quiet(*_) -> None:
    """The log of a process other than process 0 (which says it once for all)."""


def _is_train_worker() -> bool:
    from lm.train import supervise  # lazy: a command imports what it runs

    return supervise.is_worker()


def _exit_now(line: str | None, code: int) -> None:
    sys.stdout.flush()
    if line:
        print(line, file=sys.stderr, flush=True)
    sys.stderr.flush()
    os._exit(code)


def _train(args) -> int:
    from lm import experiment  # lazy: a command imports what it runs
    from lm.stages.runner import train  # lazy: a command imports what it runs

    cfg = experiment.load(args.experiment, args.set)  # bad keys fail here, before any work
    cfg.check_inputs()  # and files it names that must exist
    _distributed(args)
    run_dir = args.run_dir or os.path.join("runs", cfg.name)
    _log(f"run directory: {run_dir}")
    summary = train(cfg, run_dir, log=_log, progress=not args.no_progress, resume=not args.fresh)
    if summary.get("stopped"):  # preempted (saved: a clean exit) or diverged (error)
        return 0 if "received" in summary["stopped"] else 1
    _log(f"done: {summary['headline']}" if summary.get("headline") else "done (no held-out figures)")
    return 0


def cmd_info(args) -> int:
    from lm import experiment  # lazy: a command imports what it runs
    from lm.config import all_keys  # lazy: a command imports what it runs
    from lm.model.transformer import flops_per_token, param_count  # lazy: a command imports what it runs

    cfg = experiment.load(args.experiment, args.set)
    if args.keys:
        for k in all_keys(cfg):
            obj = cfg
            for part in k.split("."):
                obj = getattr(obj, part)
            print(f"{k} = {obj!r}")
        return 0
    m = cfg.model
    n = param_count(m)
    fpt = flops_per_token(m, cfg.data.seq_len)
    print(f"experiment        {cfg.name}")
    print(f"parameters        {n:,} ({n / 1e6:.1f}M)")
    print(f"non-embedding     {n - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2):,}")
    print(f"shape             D={m.d_model} L={m.n_layers} N={m.n_heads} K={m.n_kv_heads} "
          f"H={m.head_size} F={m.d_ff} V={m.vocab_size} context={m.max_seq_len}")
    print(f"train FLOPs/token {fpt:,.0f} ({fpt / 1e9:.2f} GFLOP) at seq_len={cfg.data.seq_len}")
    tokens = cfg.data.batch_size * cfg.data.seq_len
    print(f"tokens/step       {tokens:,}; {cfg.trainer.steps} steps = {tokens * cfg.trainer.steps / 1e9:.3f}B tokens, "
          f"{fpt * tokens * cfg.trainer.steps:.2e} FLOPs")
    return 0


def cmd_compare(args) -> int:
    from lm.tools.compare import compare  # lazy: a command imports what it runs

    text, png = compare(args.run_dirs, args.out, args.metric, args.clock)
    print(text)
    print(f"plot: {png}")
    return 0


def cmd_ladder(args) -> int:
    from lm.tools import ladder  # lazy: a command imports what it runs

    targets = []
    if args.target_compute:
        targets.append((f"{args.target_compute:.3g} FLOPs", args.target_compute))
    if args.target:
        flops, what = ladder.target_compute(args.target, args.target_tokens)
        targets.append((what, flops))
    elif args.target_tokens:
        raise UserError("--target-tokens goes with --target EXPERIMENT")
    report = ladder.ladder(args.experiment, args.set, widths=args.widths, rungs=args.rungs, min_width=args.min_width,
                           max_width=args.max_width, tokens_per_param=args.tokens_per_param, lr_rule=args.lr_rule,
                           aspect=args.aspect, holdout=args.holdout, out=args.out, png=args.plot, targets=targets,
                           dry_run=args.dry_run, fit_only=args.fit_only, counted=args.count, fit_all=args.fit_all,
                           log=_log)
    print(report["text"])
    if report.get("png"):
        print(f"plot: {report['png']}")
    return 0


def _widths(text: str) -> list[int]:
    """--widths 64,96,128: positive integers, comma-separated."""
    try:
        out = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        msg = f"{text!r} is not a comma-separated list of integers (e.g. 64,96,128)"
        raise argparse.ArgumentTypeError(msg) from None
    if not out or any(w <= 0 for w in out):
        raise argparse.ArgumentTypeError(f"{text!r}: widths must be positive integers (e.g. 64,96,128)")
    return out


def cmd_export_hf(args) -> int:
    from lm.tools.hf_runs import export_run  # lazy: a command imports what it runs

    export_run(args.run_dir, args.out_dir, log=_log, force=args.force)
    return 0


def cmd_import_hf(args) -> int:
    from lm.tools.hf_runs import import_run  # lazy: a command imports what it runs

    import_run(args.hf_dir, args.run_dir, log=_log, force=args.force)
    return 0


def cmd_sample(args) -> int:
    from lm.sampling.sampler import generate, stream  # lazy: a command imports what it runs
    from lm.train.run import load_run  # lazy: a command imports what it runs

    _check_draft_flags(args)
    run = load_run(args.run_dir, log=_log, tensor=args.tensor)
    weights = run.decode_weights(_log, args.quantize) if args.tensor > 1 or args.quantize else None
    tok = run.tokenizer
    if args.chat is not None:  # one question, answered with the chat template
        from lm.serve.chat import Chat, is_chat_model  # lazy: a command imports what it runs

        if not is_chat_model(run):
            raise UserError(f"{args.run_dir} is a base model (stage {run.cfg.stage!r}) without chat fine-tuning; "
                            "use --prompt to continue text, or fine-tune it (make sft)")
        chat = Chat(run, system=args.system, max_new=args.max_new, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, weights=weights, tools=_tools(args),
                    draft=_load_draft(run, args) if args.draft else None, draft_k=args.draft_k)
        try:
            chat.reply(args.chat, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
                       on_tool=_show_tool_call)
        except ValueError as e:  # a question (with --max-new) the context cannot hold: as `lm chat` says it
            raise UserError(f"not sent: {e}") from None
        sys.stdout.write("\n")
        return 0
    stops = [tok.eos_id]
    max_len = run.cfg.model.max_seq_len
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    prompt_ids = tok.encode(args.prompt, bos=True)
    if args.draft:
        return _sample_speculative(run, args, prompt_ids, weights)
    n_prompt = len(prompt_ids)
    if n_prompt > max(1, max_len - args.max_new):
        print(f"note: the prompt is {n_prompt} tokens; with --max-new {args.max_new} the {max_len}-token context "
              f"keeps only its last {max(1, max_len - args.max_new)}", file=sys.stderr)
    if args.num > 1:  # a batch, all at once
        outs = generate(run.graphdef, run.params, [prompt_ids] * args.num, args.max_new,
                        max_len, stop_ids=stops, seed=args.seed, weights=weights, **kw)
        for i, o in enumerate(outs):
            print(f"--- sample {i} ---\n{args.prompt}{tok.decode_after(prompt_ids, [t for t in o if t not in stops])}")
        return 0
    sys.stdout.write(args.prompt)
    ids: list[int] = []
    shown = ""
    for t in stream(run.graphdef, run.params, prompt_ids, args.max_new, max_len,
                    stop_ids=stops, seed=args.seed, weights=weights, **kw):
        if t in stops:
            break
        ids.append(t)
        text = tok.decode_after(prompt_ids, ids)  # the whole tail (pieces can merge), its first space kept
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return 0


def _tools(args) -> list:
    """The tools named by --tools (lm/agent/registry.py), or []."""
    if not getattr(args, "tools", None):
        return []
    from lm.agent import registry  # lazy: a command imports what it runs

    try:
        return registry.resolve(args.tools)
    except registry.ToolError as e:
        raise UserError(f"--tools: {e}") from None


def _show_tool_call(name: str, arguments: str, result: str) -> None:
    print(f"\n  [tool {name}({arguments}) -> {result}]", flush=True)


def _sample_speculative(run, args, prompt_ids, weights) -> int:
    """`lm sample --draft`: one sample, printed whole, then the draft's acceptance rate."""
    from lm.sampling import decode, speculative  # lazy: a command imports what it runs
    from lm.sampling.sampler import generate  # lazy: a command imports what it runs

    if args.num > 1:
        raise UserError("--draft decodes one sample: drop --num")
    draft = _load_draft(run, args)
    target = weights if weights is not None else decode.prepare(run.graphdef, run.params)
    stops = [run.tokenizer.eos_id]
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=stops, seed=args.seed)
    max_len = run.cfg.model.max_seq_len

    def speculate():
        return speculative.generate(target, draft, prompt_ids, args.max_new, max_len, k=args.draft_k, **kw)

    try:
        speculate()  # compiles
    except ValueError as e:
        raise UserError(f"--draft {args.draft}: {e}") from None
    t = time.perf_counter()
    r = speculate()
    seconds = time.perf_counter() - t
    ids = [x for x in r.tokens if x not in stops]
    print(args.prompt + run.tokenizer.decode_after(prompt_ids, ids))
    rate = r.accepted / max(1, r.drafted)
    print(f"speculative decoding (k={args.draft_k}): {r.accepted} of {r.drafted} drafted tokens accepted "
          f"({rate:.0%}), {len(r.tokens) / max(1, r.rounds + 1):.2f} tokens per pass of the target, "
          f"{len(r.tokens) / seconds:,.1f} tokens/s", file=sys.stderr)
    if args.speedup:
        def alone():
            return generate(run.graphdef, run.params, [prompt_ids], args.max_new, max_len, weights=target, **kw)

        alone()  # compiles
        t = time.perf_counter()
        n = len(alone()[0])
        alone_rate = n / (time.perf_counter() - t)
        speedup = len(r.tokens) / seconds / alone_rate
        print(f"the target alone: {alone_rate:,.1f} tokens/s; speculative decoding {speedup:.2f}x", file=sys.stderr)
    return 0


def _check_draft_flags(args) -> None:
    """--draft's refusals, before anything is loaded."""
    if args.draft and (args.tensor > 1 or args.quantize):
        raise UserError("--draft decodes on one device in float32: drop --tensor and --quantize")
    if args.draft_k is not None and not args.draft:
        raise UserError("--draft-k sets how many tokens a draft proposes: give the draft with --draft RUN_DIR")
    if args.draft_k is None:
        args.draft_k = 4


SELF_INT8 = "int8"  # --draft int8: the run's own weights in int8 (a run directory named int8: --draft ./int8)


def _load_draft(run, args):
    """--draft RUN_DIR: its decode weights, after checking that it can draft for `run`;
    --draft int8: `run`'s own weights in int8 (the same model, a quarter of the bytes to read
    a step: on a CPU, where a step reads its weights, about 3x faster, and it agrees with
    the target but for near-ties)."""
    from lm.sampling import decode  # lazy: a command imports what it runs
    from lm.train.run import load_run  # lazy: a command imports what it runs

    if args.draft == SELF_INT8:
        _log("drafting with this run's own weights in int8")
        return decode.prepare(run.graphdef, run.params, int8=True)
    draft_run = load_run(args.draft, log=_log)
    if draft_run.tokenizer is None or not _same_file(draft_run.tokenizer.path, run.tokenizer.path):
        raise UserError(f"--draft {args.draft}: its tokenizer is not {args.run_dir}'s; a draft must share the "
                        "target's tokenizer (train it with the same data.tokenizer settings, or point "
                        "data.tokenizer at the target's)")
    if draft_run.cfg.model.vocab_size != run.cfg.model.vocab_size:
        raise UserError(f"--draft {args.draft}: its vocabulary has {draft_run.cfg.model.vocab_size} tokens, "
                        f"{args.run_dir}'s {run.cfg.model.vocab_size}: a draft needs the target's tokenizer")
    return decode.prepare(draft_run.graphdef, draft_run.params)


def _same_file(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def cmd_chat(args) -> int:
    """A multi-turn loop: the chat template for a fine-tuned run; a base model continues the text."""
    from lm.serve.chat import Chat, is_chat_model  # lazy: a command imports what it runs
    from lm.train.run import load_run  # lazy: a command imports what it runs

    _check_draft_flags(args)
    run = load_run(args.run_dir, log=_log, tensor=args.tensor)
    weights = run.decode_weights(_log, args.quantize) if args.tensor > 1 or args.quantize else None
    if not is_chat_model(run):
        if args.draft:
            raise UserError(f"--draft: {args.run_dir} is a base model; speculative decoding is for chat models here "
                            "(for a base model: lm sample --draft)")
        return _chat_base(run, args, weights)
    draft = _load_draft(run, args) if args.draft else None
    chat = Chat(run, system=args.system, max_new=args.max_new, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, weights=weights, tools=_tools(args), draft=draft,
                draft_k=args.draft_k)
    # every program a conversation runs, compiled while the first message is typed (a turn
    # that needs one waits for it: no turn stalls to compile later)
    stop = threading.Event()
    warm = threading.Thread(target=chat.warm_up, args=(stop,), name="lm-chat-warm-up", daemon=True)
    warm.start()
    print(f"chatting with {args.run_dir} ({run.cfg.stage}, step {run.step}, context {run.cfg.model.max_seq_len} "
          "tokens)" + (f", system prompt {args.system!r}" if args.system else "")
          + ". /reset starts over; an empty line, /quit or Ctrl-D ends.")
    try:
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if not line.strip() or line.strip() in ("/quit", "/exit"):
                break
            if line.strip() == "/reset":
                chat.reset()
                print("(history cleared)")
                continue
            dropped = chat.dropped
            try:
                chat.reply(line, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
                           on_tool=_show_tool_call)
            except ValueError as e:
                print(f"(not sent: {e})")
                continue
            sys.stdout.write("\n" if chat.ended else " [reply cut at --max-new tokens]\n")
            if chat.dropped > dropped:
                print(f"(the oldest {chat.dropped - dropped} exchange(s) no longer fit the context and were left out)")
    finally:  # a compilation still running in the warm-up ends before the process does
        stop.set()
        warm.join()
    if draft is not None and chat.drafted:
        print(f"speculative decoding (k={args.draft_k}): {chat.accepted} of {chat.drafted} drafted tokens accepted "
              f"({chat.accepted / chat.drafted:.0%})", file=sys.stderr)
    return 0


def _chat_base(run, args, weights=None) -> int:
    """A base model has no chat template: it continues a plain-text transcript."""
    from lm.sampling.sampler import stream  # lazy: a command imports what it runs

    tok = run.tokenizer
    max_len = run.cfg.model.max_seq_len
    print(f"NOTE: {args.run_dir} is a base model (stage {run.cfg.stage!r}, step {run.step}), not fine-tuned to chat: "
          "it continues the transcript as text (fine-tune it with `make sft`). Empty line or Ctrl-D to quit.")
    transcript = ""
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            break
        transcript += line + "\n"
        ids, shown = [], ""
        context = tok.encode(transcript, bos=True)
        for t in stream(run.graphdef, run.params, context, args.max_new, max_len,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=[tok.eos_id],
                        seed=args.seed, weights=weights):
            if t == tok.eos_id:
                break
            ids.append(t)
            text = tok.decode_after(context, ids)
            if "\n\n" in text:  # a paragraph is a reply
                text = text[: text.index("\n\n")]
                sys.stdout.write(text[len(shown):])
                shown = text
                break
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
        sys.stdout.write("\n")
        transcript += shown + "\n"
    return 0


def cmd_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"lm serve needs starlette and uvicorn ({e}): pip install -e .[serve]") from None
    from lm.serve.server import serve  # lazy: a command imports what it runs

    api_key = args.api_key or os.environ.get("LM_API_KEY") or None
    if api_key is not None and (not api_key.isascii() or not api_key.isprintable() or " " in api_key):
        raise UserError("the API key must be printable ASCII without spaces (HTTP clients send it in a header)")
    return serve(args.run_dir, args.host, args.port, args.slots, args.max_len, api_key, args.model_name, log=_log,
                 request_timeout=args.request_timeout, tensor=args.tensor, quantize=args.quantize,
                 prefix_cache_mb=args.prefix_cache)


def cmd_eval(args) -> int:
    from lm.eval.evaluate import DEFAULT_DATA, TASKS, format_table  # lazy: a command imports what it runs
    from lm.stages.runner import evaluate_run  # lazy: a command imports what it runs

    results = {}
    if args.harness:  # lm-evaluation-harness's own tasks, through the lm-jax adapter
        try:
            from lm.eval.harness import evaluate_harness  # lazy: a command imports what it runs
        except ImportError as e:
            raise UserError(f"--harness needs lm-evaluation-harness ({e}); pip install lm-eval") from None
        names = [t.strip() for t in args.harness.split(",") if t.strip()]
        results.update(evaluate_harness(args.run_dir, names, args.limit, args.batch_size, log=_log))
    tasks = [] if args.harness and args.tasks is None else TASKS if args.tasks in (None, "all") else [
        t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks and not args.harness:
        raise UserError(f"--tasks {args.tasks!r} names no task; available: {', '.join(TASKS)}")
    if not os.access(args.run_dir, os.W_OK) and os.path.isdir(args.run_dir):  # before the work, not after
        raise UserError(f"cannot write {os.path.join(args.run_dir, 'eval.json')} (the run directory is not "
                        "writable): evaluate a copy of the run")
    data_dir = args.data_dir or DEFAULT_DATA
    if tasks and args.tasks in (None, "all") and not os.path.isdir(data_dir):  # every task: those that need no files
        _log(f"note: no task files ({os.path.normpath(data_dir)} does not exist; --data-dir or LM_DATA names "
             "them): evaluating the held-out data only")
        tasks = ["heldout"]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {unknown}; available: {', '.join(TASKS)} (lm-evaluation-harness "
                        "tasks go in --harness)")
    if tasks:
        results.update(evaluate_run(args.run_dir, tasks, data_dir, args.limit,
                                    args.batch_size, log=_log, all_tasks=args.tasks in (None, "all")))
    print(format_table(results))
    for task, r in results.items():  # sacreBLEU says how its numbers were computed
        for metric, sig in (r.get("signature") or {}).items() if isinstance(r, dict) else ():
            print(f"{task} {metric}: sacreBLEU signature {sig}")
    print(f"results: {os.path.join(args.run_dir, 'eval.json')}")
    return 0


def cmd_reward(args) -> int:
    """A reward model's pairwise accuracy, on every device (of every process: the same flags
    as `lm train`); every process computes the same figures and process 0 prints them."""
    _distributed(args)  # before anything touches a device
    import jax  # heavy: a command imports JAX when it runs

    from lm.eval import reward_model as reward  # lazy: a command imports what it runs

    main = jax.process_index() == 0
    r = reward.pair_accuracy(args.run_dir, args.pairs, args.format, args.limit, log=_log if main else _quiet,
                             out=args.scores)
    if not main:
        return 0
    print(f"{r['pairs']} pairs ({r['bad_records']} bad records and {r['too_long']} over-long pairs skipped): "
          f"pairwise accuracy {r['accuracy']:.3f} "
          f"(chance {r['chance']:.1f}), mean reward margin {r['margin']:+.3f}")
    return 0


def cmd_plan(args) -> int:
    from lm.tools import plan  # lazy: a command imports what it runs

    if args.serve:  # shapes only: no devices needed
        from lm import experiment  # lazy: a command imports what it runs

        cfg = experiment.load(args.experiment, args.set)
        try:
            r = plan.serve_plan(cfg.model, args.devices or 1, args.slots, args.max_len, args.hbm)
        except ValueError as e:  # (its own words name the option at fault)
            raise UserError(str(e)) from None
        print(plan.serve_report(r))
        return 0
    return plan.main(args.experiment, args.set, args.devices or 8, args.hbm)


def cmd_bench(args) -> int:
    if args.which == "accel":
        from lm.tools import bench_accel  # lazy: a command imports what it runs

        return bench_accel.main([])
    from lm.tools import bench  # lazy: a command imports what it runs

    code = bench.main(args.which) if args.which != "serve" else 0
    if args.which in ("all", "serve"):
        from lm.serve import bench as serve_bench  # lazy: a command imports what it runs

        serve_bench.main_serve()
        serve_bench.main_serve(rounds=3, model="small")
        serve_bench.main_prefix()
    return code


def _number(kind, low=None, high=None, low_open=False, what=""):
    """An argparse type: a number in [low, high] ((low, high] with low_open), checked at parse time."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if (low is not None and (v < low or (low_open and v == low))) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return v

    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm", description="Train and inspect language models.")
    sub = p.add_subparsers(dest="command", required=True)

    def distributed_args(sp):  # (or LM_DISTRIBUTED=1: jax.distributed.initialize() finds them: TPU pods, SLURM)
        sp.add_argument("--coordinator", help="host:port of process 0, for multi-process runs")
        sp.add_argument("--num-processes", type=_number(int, 1, what="at least 1"))
        sp.add_argument("--process-id", type=_number(int, 0, what="0 or more"))
        sp.add_argument("--cpu-collectives", action="store_true", help="gloo collectives for CPU processes")

    def experiment_args(sp):
        sp.add_argument("experiment", help="experiments/NAME.py, experiments.NAME or NAME")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")

    t = sub.add_parser("train", help="train an experiment (its stage: pretrain, sft, ...)")
    experiment_args(t)
    t.add_argument("--run-dir", help="where outputs go (default runs/<experiment name>)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--fresh", action="store_true",
                   help="start from scratch, deleting the run's checkpoints (default: resume from the latest)")
    distributed_args(t)
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("info", help="parameter count and FLOPs of an experiment")
    experiment_args(i)
    i.add_argument("--keys", action="store_true", help="list every config key and its value")
    i.set_defaults(fn=cmd_info)

    rw = sub.add_parser("reward", help="a reward model's pairwise accuracy on a file of preference pairs")
    rw.add_argument("run_dir")
    rw.add_argument("--pairs", required=True, help="JSON Lines / JSON file of pairs (hh, sharegpt or prompt layout)")
    rw.add_argument("--format", default="auto", choices=["auto", "hh", "sharegpt", "prompt"])
    rw.add_argument("--limit", type=_number(int, 1, what="at least 1"), help="score the first N pairs")
    rw.add_argument("--scores", metavar="FILE", help="also write each pair's rewards (JSON Lines: where, chosen, "
                                                     "rejected)")
    distributed_args(rw)
    rw.set_defaults(fn=cmd_reward)

    pl = sub.add_parser("plan", help="compile the train step ahead of time for N devices: memory and FLOPs "
                                     "per device, and whether it fits")
    experiment_args(pl)
    pl.add_argument("--devices", type=_number(int, 1, 4096, what="1 to 4096 (each is a fake CPU device in this process)"),
                    help="number of devices (fake CPU devices stand in for them; default 8, or 1 with --serve)")
    pl.add_argument("--hbm", type=_number(float, 0.0, low_open=True, what="more than 0"), default=80.0,
                    help="memory per device in GiB (default 80: an H100)")
    pl.add_argument("--serve", action="store_true",
                    help="plan `lm serve --tensor DEVICES` instead: decode weights, key/value cache and logits per "
                         "device (from the shapes; nothing compiled)")
    pl.add_argument("--slots", type=_number(int, 1, 1 << 20, what="at least 1"), default=8,
                    help="with --serve: sequences decoded together (default 8)")
    pl.add_argument("--max-len", type=_number(int, 2, what="at least 2"),
                    help="with --serve: tokens per sequence (default: the model's context)")
    pl.set_defaults(fn=cmd_plan)

    from data_pipeline.cli import add_data_parser, add_tokenizer_parser  # lazy: a command imports what it runs
    from lm.experiment import load as load_experiment  # lazy: a command imports what it runs

    add_tokenizer_parser(sub, load_experiment)
    add_data_parser(sub, load_experiment)

    def decoding_args(sp):
        sp.add_argument("run_dir")
        sp.add_argument("--max-new", type=_number(int, 1, what="at least 1"), default=128)
        sp.add_argument("--temperature", type=_number(float, 0.0, what="0 (greedy) or more"), default=0.8,
                        help="0 for greedy")
        sp.add_argument("--top-k", type=_number(int, 0, what="0 (off) or more"), default=0)
        sp.add_argument("--top-p", type=_number(float, 0.0, 1.0, low_open=True, what="in (0, 1]"), default=0.95)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--tools", metavar="NAMES",
                        help="a chat model trained to call tools: the tools it may call, comma-separated: built-ins "
                             "(calculator) or module:function; each call and its result is shown")
        tensor_arg(sp)

    def tensor_arg(sp):
        sp.add_argument("--tensor", type=_number(int, 1, 4096, what="1 to 4096"), default=1,
                        help="split the model over this many devices (tensor parallel: heads and MLP width; "
                             "default 1). They must divide model.n_heads, n_kv_heads and d_ff")
        sp.add_argument("--quantize", choices=["int8"],
                        help="hold the weight matrices in int8 (per-output-channel scales; about a quarter of "
                             "float32's bytes)")

    sp = sub.add_parser("sample", help="continue a prompt with a trained run (streams tokens)")
    decoding_args(sp)
    sp.add_argument("--prompt", default="", help="text to continue")
    sp.add_argument("--num", type=_number(int, 1, 256, what="1 to 256 (one batch; for more, run again with "
                                                          "another --seed)"),
                    default=1, help="samples (more than 1: generated as a batch)")
    sp.add_argument("--chat", metavar="QUESTION", help="a fine-tuned run: answer QUESTION with the chat template")
    sp.add_argument("--system", default="", help="with --chat: a system prompt")
    sp.add_argument("--draft", metavar="RUN_DIR",
                    help="speculative decoding: a smaller run with the same tokenizer proposes tokens that this run "
                         "checks several at a time (same greedy output; sampled output follows this run's "
                         "distribution); prints the acceptance rate. `--draft int8`: this run's own weights in int8 "
                         "draft (a run directory named int8: ./int8)")
    sp.add_argument("--draft-k", type=_number(int, 1, 16, what="1 to 16"), default=None,
                    help="with --draft: tokens the draft proposes per round (default 4)")
    sp.add_argument("--speedup", action="store_true",
                    help="with --draft: also decode with this run alone, and print the speed-up")
    sp.set_defaults(fn=cmd_sample)
    ch = sub.add_parser("chat", help="talk to a fine-tuned run (multi-turn, streaming; /reset)")
    decoding_args(ch)
    ch.add_argument("--system", default="", help="a system prompt")
    ch.add_argument("--draft", metavar="RUN_DIR",
                    help="speculative decoding: a smaller chat run with the same tokenizer proposes tokens that this "
                         "run checks several at a time (the same greedy replies; sampled replies follow this run's "
                         "distribution; each reply is shown when it is done); the acceptance rate is printed at "
                         "the end. `--draft int8`: this run's own weights in int8 draft")
    ch.add_argument("--draft-k", type=_number(int, 1, 16, what="1 to 16"), default=None,
                    help="with --draft: tokens the draft proposes per round (default 4)")
    ch.set_defaults(fn=cmd_chat)
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a run (continuous batching)")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_number(int, 0, 65535, what="in [0, 65535]"), default=8000,
                    help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--slots", type=_number(int, 1, 1024, what="in [1, 1024]"), default=8,
                    help="sequences decoded together (default 8); more requests wait in a queue")
    sv.add_argument("--max-len", type=_number(int, 2, what="at least 2"),
                    help="tokens per sequence, prompt included (default: the model's context)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: the LM_API_KEY environment "
                                      "variable; none if unset)")
    sv.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    tensor_arg(sv)
    sv.add_argument("--request-timeout", type=_number(float, 0.0, low_open=True, what="positive"), default=30.0,
                    help="seconds a client has to send a request's headers, then its body (default 30); a "
                         "stalled connection is closed, a stalled body answered 408")
    sv.add_argument("--prefix-cache", metavar="MIB", type=_number(float, 0.0, what="0 (off) or more"), default=64.0,
                    help="memory for saved prompts' keys/values (default 64 MiB; 0: off): a prompt that begins like a "
                         "saved one (a system prompt, few-shot examples) is not prefilled again up to there; the "
                         "least recently used are evicted")
    sv.set_defaults(fn=cmd_serve)
    ev = sub.add_parser("eval", help="evaluate a run: held-out loss and downstream tasks")
    ev.add_argument("run_dir")
    ev.add_argument("--tasks", help="comma-separated: heldout,hellaswag,arc_easy,arc_challenge,piqa,winogrande,"
                                    "lambada,gsm8k,wmt22_en_de,wmt22_de_en,multi30k_en_de (default all, or none "
                                    "with --harness)")
    ev.add_argument("--harness", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks (e.g. "
                                                       "hellaswag,arc_easy), run through the harness on this run "
                                                       "(needs lm-eval and its task data)")
    ev.add_argument("--data-dir", help="folder with the task files (default: LM_DATA, else the optional "
                                       "shared/data folder beside the repository)")
    ev.add_argument("--limit", type=_number(int, 1, what="at least 1"), help="items per task (default all)")
    ev.add_argument("--batch-size", type=_number(int, 1, what="at least 1"), default=16)
    ev.set_defaults(fn=cmd_eval)

    e = sub.add_parser("export-hf", help="a run's newest checkpoint as a Hugging Face LLaMA folder")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--force", action="store_true", help="export into a non-empty folder (replacing the export's files)")
    e.set_defaults(fn=cmd_export_hf)
    m = sub.add_parser("import-hf", help="a Hugging Face LLaMA folder as a run this codebase trains")
    m.add_argument("hf_dir")
    m.add_argument("run_dir")
    m.add_argument("--force", action="store_true", help="replace the run already in RUN_DIR")
    m.set_defaults(fn=cmd_import_hf)

    cp = sub.add_parser("compare", help="held-out loss of several runs against steps, tokens and wall-clock "
                                        "(a PNG and a table)")
    cp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cp.add_argument("--out", default="compare.png", help="the PNG to write (default compare.png)")
    cp.add_argument("--metric", default="eval_loss", help="the held-out metric to plot (default eval_loss)")
    cp.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="time axis: wall-clock, or the process's CPU time (for runs on a shared, busy machine)")
    cp.set_defaults(fn=cmd_compare)

    ld = sub.add_parser("ladder", help="a scaling ladder: train a family of sizes, fit L(C) = E + A*C^-alpha to their "
                                       "held-out losses, plot it and predict a bigger run")
    experiment_args(ld)
    ld.add_argument("--widths", type=_widths, metavar="D1,D2,...",
                    help="the rungs' widths (d_model), each a multiple of 2 x the base's heads")
    ld.add_argument("--rungs", type=_number(int, 1, 64, what="1 to 64"),
                    help="without --widths: this many widths spaced geometrically from --min-width to --max-width "
                         "(default 5)")
    ld.add_argument("--min-width", type=_number(int, 1, what="at least 1"), help="default: the base's d_model / 8")
    ld.add_argument("--max-width", type=_number(int, 1, what="at least 1"), help="default: the base's d_model / 2")
    ld.add_argument("--aspect", type=_number(float, 0.0, low_open=True, what="more than 0"),
                    help="width per layer: L = max(1, round(D / aspect)) (default: the base's d_model / n_layers)")
    ld.add_argument("--tokens-per-param", type=_number(float, 0.0, low_open=True, what="more than 0"), default=20.0,
                    help="training tokens per parameter (default 20; --count says which parameters)")
    ld.add_argument("--count", choices=["non-embedding", "total"], default="non-embedding",
                    help="the parameters --tokens-per-param counts: non-embedding (all but the input embedding and "
                         "the output head; default) or total")
    ld.add_argument("--lr-rule", choices=["constant", "inverse-width"], default="constant",
                    help="constant: the base's learning rates for every rung (default); inverse-width: optim.lr x "
                         "D0/D (optim.muon_lr unchanged)")
    ld.add_argument("--holdout", type=_number(int, 0, what="0 or more"), default=0,
                    help="train the K largest rungs but leave them out of the fit: their predicted and measured "
                         "losses are compared")
    ld.add_argument("--target-compute", type=_number(float, 0.0, low_open=True, what="more than 0"), metavar="FLOPS",
                    help="print the predicted held-out loss at this training compute")
    ld.add_argument("--target", metavar="EXPERIMENT",
                    help="print the predicted held-out loss of this experiment's training compute (same data and "
                         "tokenizer assumed)")
    ld.add_argument("--target-tokens", type=_number(int, 1, what="at least 1"),
                    help="with --target: its training tokens (default: its steps x batch x context)")
    ld.add_argument("--out", help="the ladder's folder (default runs/ladder_<experiment name>)")
    ld.add_argument("--plot", metavar="PNG", help="the plot (default OUT/ladder.png)")
    ld.add_argument("--dry-run", action="store_true", help="print the rungs (sizes, tokens, FLOPs); train nothing")
    ld.add_argument("--fit-only", action="store_true", help="fit the finished rungs; train nothing")
    ld.add_argument("--fit-all", action="store_true",
                    help="fit rungs whose loss is not below the unigram entropy of the held-out tokens too (left out "
                         "by default)")
    ld.set_defaults(fn=cmd_ladder)

    b = sub.add_parser("bench", help="benchmarks (training throughput and MFU, data pipeline)")
    b.add_argument("which", nargs="?", default="all",
                   choices=["all", "train", "data", "decode", "serve", "curate", "accel"],
                   help="accel: the accelerator benchmark (python -m lm.tools.bench_accel --help for its options); "
                        "curate: lm data curate on a planted corpus (needs the curate extra; not part of all)")
    b.set_defaults(fn=cmd_bench)

    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    code = _run(args)
    if args.command == "train" and code == 2 and _is_train_worker():
        # a user error in one process of several: its line is out; leave at once (an
        # interpreter exit would wait at jax.distributed's shutdown barrier for peers stuck in
        # the next collective; they stop when this process is gone)
        _exit_now(None, code)
    if argv is None and args.command == "train":  # this process is `lm train`
        _leave_without_stragglers(code)
    return code


_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.ENOTDIR,
                errno.EISDIR, errno.ENAMETOOLONG}


def _refused(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or e}{where} (check the path, its permissions and free space)"


def _run(args) -> int:
    try:
        return args.fn(args)
    except BrokenPipeError:  # the reader of our output left (`lm chat ... | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (Python would complain flushing stdout at exit)
        return 0
    except (UserError, OSError) as e:  # the one place user errors end: one line, exit code 2
        if not isinstance(e, UserError) and e.errno not in _PATH_ERRNOS:
            raise  # not a path the system refused (permissions, a read-only or full disk): a bug
        print(f"lm: error: {e if isinstance(e, UserError) else _refused(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in the other commands (lm train: see cmd_train)
        print("lm: interrupted", file=sys.stderr)
        return 130


def _leave_without_stragglers(code: int, wait_s: float = 10.0) -> None:
    """Python waits at exit for every non-daemon thread: one of a data source's reader
    threads stuck in a read that hangs (the run ended with an error) would keep `lm train`
    alive for ever. Give them `wait_s` seconds, then leave without them."""

    deadline = time.monotonic() + wait_s
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        _exit_now(None, code)
