"""Install with `pip install -e .[test]` (the Makefile does it in a virtual environment)."""

from setuptools import find_packages, setup

setup(
    name="lm",
    version="0.1.0",
    description="A JAX/Flax codebase from raw text to a chat model: tokenizer, pretraining, SFT, RLHF, eval.",
    python_requires=">=3.11",
    packages=find_packages(include=["lm", "lm.*", "data_pipeline", "data_pipeline.*", "experiments"]),
    package_data={"lm.sampling": ["*.cc"], "lm.model": ["*.cc"]},  # CPU kernels' sources, compiled on first use
    install_requires=[
        "jax>=0.7,<0.12",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12,<0.3",
        "sentencepiece>=0.2,<0.3",
        "tensorflow-datasets>=4.9,<5",
        "numpy>=1.26",
        "tqdm>=4.66",  # progress bars
        "matplotlib>=3.8",  # loss-curve PNGs
        "tensorboardX>=2.6",  # TensorBoard scalars without TensorFlow
        "sacrebleu>=2.3,<3",  # BLEU and chrF as the field computes them (lm eval translation tasks)
    ],
    extras_require={
        # the official OpenAI client and httpx drive a live `lm serve` in tests/test_server.py;
        # pytest-xdist runs the suite on two workers (`make test`: the tests are mostly one-core)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "openai>=1.40", "httpx>=0.27"],
        # `lm serve`: Starlette (the ASGI toolkit FastAPI is built on) on uvicorn
        "serve": ["starlette>=0.40", "uvicorn>=0.30"],
        # Hugging Face parity tests (optional): a CPU build of torch and transformers; sentencepiece
        # and protobuf let AutoTokenizer also read the exported tokenizer.model (slow tokenizers)
        "hf": ["torch>=2.4", "transformers>=4.45", "sentencepiece>=0.2", "protobuf>=3.20"],
        # lm-evaluation-harness: lm eval --harness, the lm-jax adapter and the harness-parity tests
        "harness": ["lm-eval[api]>=0.4.8", "torch>=2.4", "transformers>=4.45"],
        # `lm data curate`: datatrove, a well-kept curation engine that also runs on Slurm/Ray clusters
        # (orjson: its JSON Lines reader and writer; warcio: WARC/WET inputs; pyarrow: Parquet output)
        "curate": ["datatrove>=0.10", "py3langid>=0.3", "trafilatura>=2.0", "orjson>=3", "warcio>=1.7",
                   "pyarrow>=14"],
        "cuda": ["jax[cuda12]>=0.7,<0.12"],
        "tpu": ["jax[tpu]>=0.7,<0.12"],
    },
    entry_points={"console_scripts": ["lm=lm.cli:main"]},
)
