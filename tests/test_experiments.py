"""Every experiment in experiments/ builds: its stage's objective, the engine on the 8 fake
CPU devices, and the whole train state abstractly (jax.eval_shape: nothing is allocated,
trained or read, so the largest experiments take seconds too). A broken experiment, or an
engine change one of them cannot take, fails here rather than minutes into `lm train`."""

import ast
import dataclasses
import importlib
import inspect
import math
import os

import jax
import pytest
from helpers import ROOT

from lm import experiment, stages
from lm.config import ConfigError, MeshConfig
from lm.model.sharding import make_mesh
from lm.model.transformer import expected_param_count
from lm.objectives.next_token import NextToken
from lm.objectives.policy import GRPOObjective, PPOObjective
from lm.objectives.preference import PreferenceObjective, RewardObjective
from lm.train.engine import make_engine

# The objective each stage builds its engine with (its module's setup: checked below).
OBJECTIVES = {"pretrain": NextToken, "sft": NextToken, "reward": RewardObjective, "dpo": PreferenceObjective,
              "grpo": GRPOObjective, "ppo": PPOObjective}


def _with_config() -> list[str]:
    """The modules of experiments/ that define config() (read with ast, not imported)."""
    folder = os.path.join(ROOT, "experiments")
    names = []
    for name in experiment.list_experiments():
        with open(os.path.join(folder, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        if any(isinstance(n, ast.FunctionDef) and n.name == "config" for n in tree.body):
            names.append(name)
    return names


EXPERIMENTS = _with_config()


def test_every_stage_has_its_objective_here():
    assert set(OBJECTIVES) == set(stages.STAGES)
    for stage, cls in OBJECTIVES.items():
        source = inspect.getsource(importlib.import_module(stages.STAGES[stage]).setup)
        assert f"{cls.__name__}(cfg)" in source, f"the {stage} stage no longer builds {cls.__name__}: update OBJECTIVES"
    assert len(EXPERIMENTS) >= 10 and "pretrain_tiny" in EXPERIMENTS


def _on_eight_devices(cfg):
    """The config, its mesh and batch changed only where they do not fit the 8 devices: a mesh
    that does not split 8 takes them all for data parallelism, and the batch is rounded up to
    whole rows per data-parallel device (per micro-batch)."""
    try:
        mesh = make_mesh(cfg.mesh)
    except (ConfigError, ValueError):
        cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=-1, fsdp=1, tensor=1))
        mesh = make_mesh(cfg.mesh)
    unit = mesh.shape["data"] * mesh.shape["fsdp"] * cfg.trainer.microbatches
    batch = -(-cfg.data.batch_size // unit) * unit
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch)), mesh


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_its_engine_and_train_state(name):
    cfg, mesh = _on_eight_devices(experiment.load(name))
    assert jax.device_count() == 8 and mesh.size == 8
    objective = OBJECTIVES[cfg.stage](cfg)
    engine = make_engine(cfg, mesh, objective)
    state = engine.abstract_state()
    params = engine.abstract_params()

    # the whole model: the parameter count of its shape (each scalar head one (D,) vector)
    m = cfg.model
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert n_params == expected_param_count(m) + len(m.scalar_heads) * m.d_model
    # what trains: the model, or (LoRA) adapters only, over the frozen base
    n_trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    if cfg.lora.rank:
        assert 0 < n_trainable < n_params / 10 and "base" in engine.frozen_names
    else:
        assert jax.tree.structure(state.params) == jax.tree.structure(params) and n_trainable == n_params
    # every array of the state has its place on this mesh, and the optimiser state is there
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.mesh.shape == mesh.shape
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(state.opt_state)) >= n_trainable
    # the objective's frozen parameter sets (a DPO reference, a LoRA base) and batch fit the engine
    assert set(engine.frozen_sharding) == set(engine.frozen_names) >= set(objective.frozen)
    assert set(engine.batch_sharding) == set(objective.batch_axes)
    # a post-training experiment starts from a run, which its stage cannot do without
    if cfg.stage in ("grpo", "ppo", "dpo", "reward"):
        assert cfg.trainer.init_from
