"""Hugging Face interop: safetensors, export/import round trips, and (when torch and
transformers are installed) logits parity with transformers' LlamaForCausalLM."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import SHAPE_IDS, SHAPES, random_model, random_tokens

from lm.interop.hf import export_llama, import_llama, load_model, load_safetensors, save_safetensors
from lm.model.transformer import Transformer


def test_safetensors_round_trip_and_layout(tmp_path):
    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], np.int64)}
    path = str(tmp_path / "x.safetensors")
    save_safetensors(tensors, path)
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    assert header["a.weight"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
    assert (8 + n) % 8 == 0
    back = load_safetensors(path)
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])


@pytest.mark.parametrize("cfg", [SHAPES[0]] + [pytest.param(c, marks=pytest.mark.slow) for c in SHAPES[1:]],
                         ids=SHAPE_IDS)
def test_export_then_import_gives_the_same_model(cfg, tmp_path):
    model = random_model(cfg)
    export_llama(cfg, nnx.state(model, nnx.Param), str(tmp_path))
    cfg2, params = import_llama(str(tmp_path))
    assert dataclasses.replace(cfg2, max_seq_len=cfg.max_seq_len) == dataclasses.replace(
        cfg, head_dim=cfg.head_size)
    x = random_tokens(cfg)
    np.testing.assert_allclose(load_model(cfg2, params)(x), model(x), atol=1e-5)


def test_qk_norm_models_are_refused(tmp_path):
    cfg = dataclasses.replace(SHAPES[0], qk_norm=True)
    with pytest.raises(ValueError, match="qk-norm"):
        export_llama(cfg, nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param), str(tmp_path))


@pytest.mark.slow  # make test time; CI's slow phase runs it
def test_export_and_import_run_directories(tmp_path):
    from lm.config import Config, DataConfig, TrainerConfig
    from lm.stages.runner import train
    from lm.tools.hf_runs import export_run, import_run

    cfg = Config(model=SHAPES[0], data=DataConfig(corpus="synthetic", seq_len=16, batch_size=8),
                 trainer=TrainerConfig(steps=3, num_samples=0))
    run = tmp_path / "run"
    train(cfg, str(run), log=lambda *_: None, progress=False)
    export_run(str(run), str(tmp_path / "hf"), log=lambda *_: None)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
    from lm.config import ConfigError

    before = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match="holds a training run"):  # even with --force: it would ruin the run
        export_run(str(run), str(run), log=lambda *_: None, force=True)
    assert (run / "config.json").read_text() == before
    import_run(str(tmp_path / "hf"), str(tmp_path / "imported"), log=lambda *_: None)
    assert os.path.exists(tmp_path / "imported" / "config.json")
    # the imported run's step-0 checkpoint holds the trained parameters
    from lm.experiment import load
    from lm.model.sharding import make_mesh
    from lm.train.checkpoint import Checkpointer
    from lm.train.engine import make_trainer

    icfg = load(str(tmp_path / "imported" / "config.json"))
    trainer = make_trainer(icfg, make_mesh(icfg.mesh, jax.devices()[:1]))
    ck = Checkpointer(str(tmp_path / "imported"))
    state, _, _, step = ck.restore_latest(trainer.abstract_state())
    ck.close()
    _, params = import_llama(str(tmp_path / "hf"))
    x = random_tokens(SHAPES[0])
    np.testing.assert_allclose(trainer.model(state.params)(x), load_model(icfg.model, params)(x), atol=1e-6)
    assert step == 0
