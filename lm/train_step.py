"""The training state, born sharded, and the one compiled train step.

`TrainState` is a plain pytree: step, parameters (an nnx.State) and optimiser state.
The model's graph definition is static and lives outside it, so `train_step` is a pure
function of arrays that `jax.jit` compiles once, with explicit shardings and the state
donated (updated in place in device memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.config import Config
from lm.losses import chunked_cross_entropy, cross_entropy
from lm.model import Transformer
from lm.optim import make_optimizer, schedule
from lm.sharding import batch_sharding, state_shardings, use_mesh


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    bad_streak: jax.Array  # consecutive steps whose loss or gradients were not finite
    skipped: jax.Array  # all steps skipped for that reason


# Batches are dicts of (B, T) arrays: inputs, targets, segment_ids, positions, loss_mask.
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything static about training: config, mesh, model graph, optimiser, shardings."""

    cfg: Config
    mesh: Mesh
    graphdef: Any
    optimizer: optax.GradientTransformation
    state_sharding: Any
    lr_schedule: optax.Schedule

    def model(self, params: nnx.State) -> Transformer:
        return nnx.merge(self.graphdef, params)

    # -- state -------------------------------------------------------------------------

    def init_state(self, seed: int) -> TrainState:
        """Create the state directly in its sharded layout: no host holds it whole."""
        init = jax.jit(self._init, static_argnums=0, out_shardings=self.state_sharding)
        with use_mesh(self.mesh):
            return init(seed)

    def _init(self, seed: int) -> TrainState:
        model = Transformer(self.cfg.model, nnx.Rngs(seed))
        params = nnx.state(model, nnx.Param)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=self.optimizer.init(params),
                          bad_streak=zero, skipped=zero)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state (for restoring onto this mesh)."""
        shapes = jax.eval_shape(lambda: self._init(0))
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            shapes, self.state_sharding)

    # -- the step ----------------------------------------------------------------------

    def loss_fn(self, params, batch):
        model = self.model(params)
        b, t = batch["inputs"].shape
        h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])  # (B*T, D)
        targets, mask = batch["targets"].reshape(-1), batch["loss_mask"].reshape(-1)
        chunks = self.cfg.trainer.loss_chunks
        if chunks > 1 and t % chunks == 0:
            loss, ce, n = chunked_cross_entropy(h, model.output_weights(), targets, mask,
                                                self.cfg.optim.z_loss, b, chunks)
        else:
            loss, ce, n = cross_entropy(model.logits(h), targets, mask, self.cfg.optim.z_loss)
        return loss, (ce, n)

    def _grads(self, params, batch):
        """Loss and gradients, accumulated over `microbatches` slices of the batch."""
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        m = self.cfg.trainer.microbatches
        if m == 1:
            (loss, (ce, _)), grads = grad_fn(params, batch)
            return loss, ce, grads
        micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)

        def body(carry, mb):
            g_acc, loss_acc, ce_acc, n_acc = carry
            (loss, (ce, n)), g = grad_fn(params, mb)
            # Weight each micro-batch by its token count so the result equals one big batch.
            g_acc = jax.tree.map(lambda a, b: a + b * n, g_acc, g)
            return (g_acc, loss_acc + loss * n, ce_acc + ce * n, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (g, loss, ce, n), _ = jax.lax.scan(body, (zeros, 0.0, 0.0, 0.0), micro)
        return loss / n, ce / n, jax.tree.map(lambda x: x / n, g)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, ce, grads = self._grads(state.params, batch)
        grad_norm = optax.global_norm(grads)
        # A NaN/Inf loss or gradient: skip the update (keep the last good parameters and
        # optimiser state), count it; the host stops the run after too many in a row.
        # A cond rather than a select: the normal path costs nothing extra.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
        bad = 1 - finite.astype(jnp.int32)
        metrics = {
            "loss": ce,
            "total_loss": loss,
            "grad_norm": grad_norm,
            "lr": self.lr_schedule(state.step),
            "skipped": bad,
        }
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         bad_streak=jnp.where(finite, 0, state.bad_streak + 1), skipped=state.skipped + bad)
        return new, metrics

    def eval_step(self, params, batch) -> dict:
        _, (ce, n) = self.loss_fn(params, batch)
        return {"loss_sum": ce * n, "tokens": n}

    @property
    def batch_sharding(self) -> dict:
        return {k: batch_sharding(self.mesh) for k in BATCH_KEYS}

    def compile_train_step(self) -> Callable:
        repl = NamedSharding(self.mesh, P())
        step = jax.jit(
            self.train_step,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, repl),
            donate_argnums=0,
        )
        return _with_mesh(step, self.mesh)

    def compile_eval_step(self) -> Callable:
        repl = NamedSharding(self.mesh, P())
        step = jax.jit(self.eval_step, in_shardings=(self.state_sharding.params, self.batch_sharding),
                       out_shardings=repl)
        return _with_mesh(step, self.mesh)


def _with_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Trace `fn` with `mesh` active so activation constraints (`shard`) apply."""

    def wrapped(*args):
        with use_mesh(mesh):
            return fn(*args)

    wrapped.lower = lambda *a: _lower(fn, mesh, *a)  # for cost analysis / AOT inspection
    return wrapped


def _lower(fn, mesh, *args):
    with use_mesh(mesh):
        return fn.lower(*args)


def make_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    """Build the static parts: model graph, optimiser and the state's shardings."""
    cfg.validate()
    with use_mesh(mesh):
        abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    lr = schedule(cfg.optim, cfg.trainer.steps)
    optimizer = make_optimizer(cfg.optim, abstract_params, cfg.trainer.steps)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    param_sh = state_shardings(abstract_params, mesh)
    # Optimiser moments mirror the parameters; anything else (counts) is replicated.
    opt_sh = _opt_state_shardings(abstract_opt, abstract_params, param_sh, mesh)
    repl = NamedSharding(mesh, P())
    state_sh = TrainState(step=repl, params=param_sh, opt_state=opt_sh, bad_streak=repl, skipped=repl)
    return Trainer(cfg=cfg, mesh=mesh, graphdef=graphdef, optimizer=optimizer,
                   state_sharding=state_sh, lr_schedule=lr)


def _opt_state_shardings(abstract_opt, abstract_params, param_sh, mesh):
    """Optimiser moments take their parameter's sharding; counters are replicated.

    A moment is matched to its parameter by path suffix: optax nests the moments of
    `params['blocks']['attn']['wq']` at paths ending in the same keys.
    """
    by_path = {}
    for path, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]:
        by_path[tuple(str(k) for k in path)] = sh
    repl = NamedSharding(mesh, P())

    def one(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            sh = by_path.get(keys[start:])
            if sh is not None and len(sh.spec) <= len(getattr(leaf, "shape", ())):
                return sh
        return repl

    return jax.tree_util.tree_map_with_path(one, abstract_opt)
