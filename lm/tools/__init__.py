"""Tools around runs: benchmarks against their peers (`bench`, `bench_accel`, `peer_torch`),
ahead-of-time memory and FLOPs planning (`plan`), comparing runs (`compare`) and run
directories to and from Hugging Face folders (`hf_runs`)."""
