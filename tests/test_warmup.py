"""Batch-size and sequence-length warm-up (lm/train/warmup.py): the plan of shapes, the cut
of a batch, the one-line refusals, and (slow) a run that trains through every shape and
resumes exactly across a change of shape."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lm.config import Config, ConfigError, DataConfig, TrainerConfig
from lm.train import warmup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from helpers import cpu_env, train_cmd, write_experiment  # noqa: E402


def _cfg(**trainer) -> Config:
    return Config(data=DataConfig(seq_len=32, batch_size=8), trainer=TrainerConfig(steps=20, **trainer))


def test_stages_double_in_equal_shares_of_the_warm_up():
    assert warmup.stages(100, 64, 256) == [(0, 64), (50, 128), (100, 256)]
    assert warmup.stages(90, 1, 8) == [(0, 1), (30, 2), (60, 4), (90, 8)]
    assert warmup.stages(0, 1, 8) == [(0, 8)]  # off
    shapes = warmup.Shapes(_cfg(seq_warmup_steps=6, seq_warmup_start=8, batch_warmup_steps=4, batch_warmup_start=2))
    assert [shapes.at(s) for s in range(8)] == [(2, 8), (2, 8), (4, 8), (4, 16), (8, 16), (8, 16), (8, 32), (8, 32)]
    assert shapes.all() == [(2, 8), (4, 8), (4, 16), (8, 16), (8, 32)]
    assert not warmup.Shapes(_cfg()).active


def test_the_cut_keeps_the_first_rows_and_makes_each_a_row_of_pieces():
    shapes = warmup.Shapes(_cfg(seq_warmup_steps=4, seq_warmup_start=8, batch_warmup_steps=4, batch_warmup_start=4))
    rng = np.random.default_rng(0)
    local = {k: rng.integers(0, 100, (8, 32)) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    local["source_id"] = np.arange(8)
    out = shapes.cut(local, 0, processes=1, shards=1)  # 4 rows in pieces of 8 tokens
    for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask"):
        assert out[k].shape == (16, 8)
        np.testing.assert_array_equal(out[k][5], local[k][1, 8:16])  # row 1's second piece
        np.testing.assert_array_equal(out[k].reshape(4, 32), local[k][:4])  # nothing reordered or lost
    np.testing.assert_array_equal(out["source_id"], [0, 1, 2, 3])  # a row's source follows its row
    two = shapes.cut({k: v[:4] for k, v in local.items()}, 0, processes=2, shards=2)  # process 0's half
    assert two["inputs"].shape == (8, 8) and two["source_id"].tolist() == [0, 1]
    # 2 data shards in one process: the batch is their blocks of 4 rows, one after the other; the
    # warm-up keeps the first 2 rows of each, the rows two processes would keep between them
    sharded = shapes.cut(local, 0, processes=1, shards=2)
    assert sharded["source_id"].tolist() == [0, 1, 4, 5]
    np.testing.assert_array_equal(sharded["inputs"].reshape(4, 32), local["inputs"][[0, 1, 4, 5]])
    full = shapes.cut(local, 4, processes=1, shards=1)
    assert all(full[k] is not None and np.array_equal(full[k], local[k]) for k in local)


@pytest.mark.parametrize("trainer, message", [
    (dict(seq_warmup_steps=4, seq_warmup_start=12), "trainer.seq_warmup_start=12 must be data.seq_len=32 divided"),
    (dict(seq_warmup_steps=4, seq_warmup_start=32), "trainer.seq_warmup_start=32 must be"),
    (dict(seq_warmup_steps=4, seq_warmup_start=0), "trainer.seq_warmup_start=0 must be"),
    (dict(batch_warmup_steps=4, batch_warmup_start=3), "trainer.batch_warmup_start=3 must be data.batch_size=8"),
    (dict(batch_warmup_steps=-1), "trainer.batch_warmup_steps=-1 must not be negative"),
    (dict(seq_warmup_steps=21, seq_warmup_start=8), "trainer.seq_warmup_steps=21 exceeds trainer.steps=20"),
    (dict(seq_warmup_steps=4, seq_warmup_start=2, mtp=2), "model.mtp_tokens=2 must be less than trainer.seq_warmup"),
])
def test_warm_ups_that_mean_nothing_are_refused_in_one_line(trainer, message):
    mtp = trainer.pop("mtp", 0)
    cfg = _cfg(**trainer)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mtp_tokens=mtp))
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shapes_that_do_not_split_over_the_devices_are_refused():
    shapes = warmup.Shapes(_cfg(batch_warmup_steps=4, batch_warmup_start=1))
    shapes.check(shards=1, data_parallel=1, microbatches=1)
    with pytest.raises(ConfigError, match="1 rows cut into pieces of 32 tokens .1 rows. do not split over "
                                          "trainer.microbatches=1 x the 2 data-parallel devices"):
        shapes.check(shards=1, data_parallel=2, microbatches=1)
    with pytest.raises(ConfigError, match="the 2 data shards"):
        shapes.check(shards=2, data_parallel=1, microbatches=1)
    seq = warmup.Shapes(_cfg(seq_warmup_steps=4, seq_warmup_start=8, batch_warmup_steps=4, batch_warmup_start=2))
    seq.check(shards=2, data_parallel=8, microbatches=1)  # 2 rows (one per shard) in 4 pieces each: 8 pieces
    with pytest.raises(ConfigError, match="microbatches=2 x the 8"):  # 8 pieces in 2 micro-batches of 4: not over 8
        seq.check(shards=1, data_parallel=8, microbatches=2)


EXPERIMENT = """
from lm.config import Config, DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainerConfig

def config():
    return Config(
        name="warmup",
        model=ModelConfig(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                          max_seq_len=32, attention_block=16),
        optim=OptimConfig(name="muon", lr=3e-3, warmup_steps=2),
        data=DataConfig(corpus="sources", seq_len=32, batch_size=8, tokenizer={tok!r},
                        sources=(SourceConfig(name="a", kind="jsonl", paths=({a!r},), weight=0.7),
                                 SourceConfig(name="b", kind="text", doc_per="block", paths=({b!r},),
                                              weight=0.3))),
        trainer=TrainerConfig(steps=8, log_every=1, checkpoint_every=2, eval_batches=2, num_samples=0,
                              peak_flops_per_device=1e9, seq_warmup_steps=6, seq_warmup_start=8,
                              batch_warmup_steps=4, batch_warmup_start=2))
"""


def _train(experiment, run_dir, *sets, devices=1):
    p = subprocess.run(train_cmd(experiment, run_dir, sets), cwd=ROOT, env=cpu_env(devices), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.mark.slow  # make test-all / CI's slow phase
def test_a_warmed_up_run_trains_each_shape_once_and_resumes_exactly_across_a_change_of_shape(tmp_path):
    experiment = write_experiment(tmp_path, EXPERIMENT, "warmup")
    ref = tmp_path / "ref"
    out = _train(experiment, ref)
    for shape in ("2 rows cut into pieces of 8 tokens", "4 rows cut into pieces of 8 tokens",
                  "4 rows cut into pieces of 16 tokens", "8 rows cut into pieces of 16 tokens", "8 rows"):
        assert out.count(f"compiling the train step for {shape}\n") == 1, out[-3000:]
    rows = [json.loads(line) for line in open(ref / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # tokens per second count the rows that train: step 2 trains 2 rows, step 8 all 8
    assert rows[1]["tokens_per_s"] == pytest.approx(2 * 32 / rows[1]["step_time_s"], rel=1e-6)
    assert rows[7]["tokens_per_s"] == pytest.approx(8 * 32 / rows[7]["step_time_s"], rel=1e-6)
    # resumed from step 4 (pieces of 16 tokens; the next step has 8 rows): the same steps again
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for d in os.listdir(run / "checkpoints"):
        if d.isdigit() and int(d) > 4:
            shutil.rmtree(run / "checkpoints" / d)
    out = _train(experiment, run)
    assert "resumed from the checkpoint of step 4" in out, out[-2000:]
    again = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]
    # 8 devices split each shape's pieces (2 rows of 4 pieces: 8 rows of 8 tokens)
    out = _train(experiment, tmp_path / "eight", "mesh.data=8", devices=8)
    eight = [json.loads(line) for line in open(tmp_path / "eight" / "metrics.jsonl")]
    np.testing.assert_allclose([r["loss"] for r in eight], [r["loss"] for r in rows], rtol=2e-4)


def test_stages_that_train_on_pairs_or_rollouts_refuse_the_warm_ups():
    from types import SimpleNamespace

    from lm.train.loop import _check_warmup

    cfg = _cfg(seq_warmup_steps=4, seq_warmup_start=8)
    engine = SimpleNamespace(objective=SimpleNamespace(name="preference"))
    with pytest.raises(ConfigError, match="cut next-token rows; stage 'dpo' trains on preference batches: set them "
                                          "to 0"):
        _check_warmup(warmup.Shapes(cfg), dataclasses.replace(cfg, stage="dpo"), engine, 1, print)


def test_sft_refuses_the_sequence_warm_up_before_it_reads_anything(tmp_path):
    from lm.stages import sft

    cfg = dataclasses.replace(_cfg(seq_warmup_steps=4, seq_warmup_start=8), stage="sft")
    with pytest.raises(ConfigError, match="replies apart from their prompts: set it to 0 for SFT"):
        sft.setup(cfg, str(tmp_path), None, print)
    assert not any(tmp_path.iterdir())
