"""Training, whatever the stage: the engine (state born sharded, one compiled step: `engine`),
the host loop (`loop`), optimisers (`optim`), checkpoints (`checkpoint`), run directories
(`rundir`: locks, config continuity, strict JSON), signals (`interrupt`), metrics and plots
(`logger`), peak FLOPs (`perf`), starting points (`init`: another run or a Hugging Face
folder) and opening a trained run (`run.load_run`)."""
