"""The engine every training stage shares: the state, born sharded, and one compiled step.

A stage (pretraining, SFT, reward modelling, DPO, ...) differs from another only in its
*objective*: a loss of (model, batch, frozen inputs) and the logical axes of its batch.
Everything else is here, once:

- `TrainState` is a plain pytree: step, the *trainable* parameters (the whole model, or
  only LoRA adapters), optimiser state and NaN/Inf skip counters. The model's graph
  definition is static and lives outside it, so the step is a pure function of arrays.
- *Frozen* inputs (a LoRA run's base weights, a DPO reference model) are a second pytree
  the step reads but never updates, donates or differentiates.
- `train_step` accumulates gradients over micro-batches (weighted by each micro-batch's
  loss weight, so the result equals one big batch), skips non-finite updates (a NaN/Inf
  loss or gradient, or an updated state that is not finite), and is compiled once with
  `jax.jit`, explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm.config import Config, ConfigError
from lm.model import lora
from lm.model.sharding import logical_to_spec, state_shardings, use_mesh
from lm.model.transformer import Transformer
from lm.objectives.next_token import NextToken
from lm.train.optim import make_optimizer, schedule


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the trainable parameters: an nnx.State of the model, or LoRA adapters
    opt_state: optax.OptState
    bad_streak: jax.Array  # consecutive steps whose loss or gradients were not finite
    skipped: jax.Array  # all steps skipped for that reason


class Objective(Protocol):
    """What a stage trains for.

    `batch_axes` maps each batch key to the logical axes of its array (("batch", "seq")
    for (B, T) token arrays); `frozen` names the parameter sets the loss reads besides the
    model (e.g. ("reference",) for DPO), each shaped like the model's parameters.
    `loss(model, batch, frozen)` returns (scalar loss, aux) where aux["weight"] is what the
    loss is a mean over (tokens, pairs, ...: micro-batches are combined by it) and every
    other entry of aux is a scalar mean to log. `aux["loss"]` is the headline number logged
    as "loss" (e.g. the cross-entropy without the z-loss term).
    """

    name: str
    batch_axes: dict[str, tuple[str | None, ...]]
    frozen: tuple[str, ...]

    def loss(self, model: Transformer, batch: dict, frozen: dict) -> tuple[jax.Array, dict]: ...


@dataclasses.dataclass(frozen=True)
class Engine:
    """Everything static about training: config, mesh, model graph, objective, optimiser, shardings."""

    cfg: Config
    mesh: Mesh
    graphdef: Any
    objective: Objective
    optimizer: optax.GradientTransformation
    state_sharding: Any
    param_sharding: Any  # shardings of the full model parameters (frozen sets are laid out alike)
    lr_schedule: optax.Schedule

    @property
    def lora(self) -> bool:
        return self.cfg.lora.rank > 0

    @property
    def frozen_names(self) -> tuple[str, ...]:
        return (("base",) if self.lora else ()) + tuple(self.objective.frozen)

    @property
    def frozen_sharding(self) -> dict:
        return {name: self.param_sharding for name in self.frozen_names}

    def model_params(self, trainable, frozen: dict):
        """The model's full parameters: the trainable ones, or the base with adapters merged."""
        return lora.merge(frozen["base"], trainable, self.cfg.lora) if self.lora else trainable

    def model(self, params) -> Transformer:
        """A model holding full parameters `params`."""
        return nnx.merge(self.graphdef, params)

    # -- state -------------------------------------------------------------------------

    def init_state(self, seed: int, params=None) -> tuple[TrainState, dict]:
        """(state, frozen), created directly in their sharded layout: no host holds them whole.

        `params` (full model parameters, e.g. from another run) replace the random ones;
        with LoRA they are the frozen base and the adapters start at zero update.
        """
        with use_mesh(self.mesh):
            if params is None:
                params = jax.jit(self._init_params, static_argnums=0, out_shardings=self.param_sharding)(seed)
            else:
                params = jax.device_put(params, self.param_sharding)
            frozen = {"base": params} if self.lora else {}
            for name in self.objective.frozen:  # e.g. DPO's reference: the starting parameters, copied
                frozen[name] = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_sharding)(params)
            init = jax.jit(self._init, static_argnums=0, out_shardings=self.state_sharding)
            state = init(seed, params)
        return state, frozen

    def _init_params(self, seed: int):
        return nnx.state(Transformer(self.cfg.model, nnx.Rngs(seed)), nnx.Param)

    def _init(self, seed: int, params) -> TrainState:
        trainable = lora.init_adapters(params, self.cfg.lora, seed) if self.lora else params
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=trainable, opt_state=self.optimizer.init(trainable),
                          bad_streak=zero, skipped=zero)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state (for restoring onto this mesh)."""
        shapes = jax.eval_shape(lambda: self._init(0, self._init_params(0)))
        return _with_shardings(shapes, self.state_sharding)

    def abstract_params(self):
        """Shapes, dtypes and shardings of the full model parameters."""
        return _with_shardings(jax.eval_shape(lambda: self._init_params(0)), self.param_sharding)

    # -- the step ----------------------------------------------------------------------

    def loss_fn(self, trainable, batch, frozen=None):
        model = self.model(self.model_params(trainable, frozen or {}))
        return self.objective.loss(model, batch, frozen or {})

    def _grads(self, params, batch, frozen):
        """Loss, aux and gradients, accumulated over `microbatches` slices of the batch."""
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        m = self.cfg.trainer.microbatches
        if m == 1:
            (loss, aux), grads = grad_fn(params, batch, frozen)
            return loss, aux, grads
        micro = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)

        def body(carry, mb):
            g_acc, loss_acc, aux_acc = carry
            (loss, aux), g = grad_fn(params, mb, frozen)
            w = aux["weight"]
            # Weight each micro-batch by what its loss averages over, so the result equals one big batch.
            g_acc = jax.tree.map(lambda a, b: a + b * w, g_acc, g)
            aux_acc = {k: aux_acc[k] + (v if k == "weight" else v * w) for k, v in aux.items()}
            return (g_acc, loss_acc + loss * w, aux_acc), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), frozen)[0][1]))
        (g, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.float32(0.0), aux0), micro)
        n = jnp.maximum(aux["weight"], 1e-9)
        aux = {k: v if k == "weight" else v / n for k, v in aux.items()}
        return loss / n, aux, jax.tree.map(lambda x: x / n, g)

    def train_step(self, state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
        loss, aux, grads = self._grads(state.params, batch, frozen)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A NaN/Inf loss or gradient, or an updated state that is not finite (optimiser
        # moments poisoned with NaN or 3e38, or lr=1e30 writing 1e30 into the parameters):
        # skip the update, keeping the last good parameters and optimiser state, and count
        # it; the host stops the run after too many in a row. The state is checked with one
        # fused reduction, its sum of squares: NaN/Inf if any value is, or if any |x| > 1.8e19.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(_sum_squares((new_params, new_opt_state)))
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (new_params, new_opt_state), (state.params, state.opt_state))
        bad = 1 - finite.astype(jnp.int32)
        metrics = {k: v for k, v in aux.items() if k != "weight"}
        metrics.setdefault("loss", loss)
        metrics.update(total_loss=loss, grad_norm=grad_norm, lr=self.lr_schedule(state.step), skipped=bad)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         bad_streak=jnp.where(finite, 0, state.bad_streak + 1), skipped=state.skipped + bad)
        return new, metrics

    def eval_step(self, params, batch, frozen) -> dict:
        """Weighted sums of the objective's metrics over a batch ("weight" is the total weight)."""
        _, aux = self.loss_fn(params, batch, frozen)
        w = aux["weight"]
        return {k: (v if k == "weight" else v * w) for k, v in aux.items()}

    @property
    def batch_sharding(self) -> dict:
        return {k: NamedSharding(self.mesh, logical_to_spec(axes, None, self.mesh))
                for k, axes in self.objective.batch_axes.items()}

    def compile_train_step(self) -> Callable:
        """step(state, batch, frozen=None) -> (state, metrics); the state is donated."""
        repl = NamedSharding(self.mesh, P())
        step = jax.jit(
            self.train_step,
            in_shardings=(self.state_sharding, self.batch_sharding, self.frozen_sharding),
            out_shardings=(self.state_sharding, repl),
            donate_argnums=0,
        )
        return _with_mesh(step, self.mesh, default_frozen=len(self.frozen_names) == 0)

    def compile_eval_step(self) -> Callable:
        """eval(trainable params, batch, frozen=None) -> weighted metric sums."""
        repl = NamedSharding(self.mesh, P())
        step = jax.jit(self.eval_step, in_shardings=(self.state_sharding.params, self.batch_sharding,
                                                     self.frozen_sharding), out_shardings=repl)
        return _with_mesh(step, self.mesh, default_frozen=len(self.frozen_names) == 0)


def _sum_squares(tree) -> jax.Array:
    """Σx² over the floating-point arrays of `tree`, in float32: finite only if every value is
    finite and no |x| exceeds ~1.8e19 (whose square overflows; no trained network holds such
    values)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0.0))


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


def _with_mesh(fn: Callable, mesh: Mesh, default_frozen: bool) -> Callable:
    """Trace `fn` with `mesh` active so activation constraints (`shard`) apply. Objectives
    without frozen inputs may be called without them."""

    def args_of(args):
        if default_frozen and len(args) == 2:
            args = (*args, {})
        return args

    def wrapped(*args):
        with use_mesh(mesh):
            return fn(*args_of(args))

    def lower(*args):  # for cost analysis / AOT inspection
        with use_mesh(mesh):
            return fn.lower(*args_of(args))

    wrapped.lower = lower
    return wrapped


def make_engine(cfg: Config, mesh: Mesh, objective: Objective | None = None) -> Engine:
    """Build the static parts: model graph, optimiser and the state's shardings."""
    cfg.validate()
    ways = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch is split over these devices
    per_micro = cfg.data.batch_size // cfg.trainer.microbatches
    if per_micro % ways:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (/ trainer.microbatches={cfg.trainer.microbatches}) "
                          f"does not divide over the {ways} data-parallel devices (mesh data*fsdp); use a multiple "
                          f"of {ways * cfg.trainer.microbatches}, or more mesh.tensor")
    objective = objective or NextToken(cfg)
    if cfg.lora.rank:
        lora.check(cfg.lora)
    with use_mesh(mesh):
        abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    param_sh = state_shardings(abstract_params, mesh)
    if cfg.lora.rank:  # the optimiser sees only the adapters
        abstract_trainable = jax.eval_shape(lambda p: lora.init_adapters(p, cfg.lora, 0), abstract_params)
        trainable_sh = lora_shardings(abstract_trainable, mesh)
    else:
        abstract_trainable, trainable_sh = abstract_params, param_sh
    lr = schedule(cfg.optim, cfg.trainer.steps)
    optimizer = make_optimizer(cfg.optim, abstract_trainable, cfg.trainer.steps)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
    # Optimiser moments mirror the parameters; anything else (counts) is replicated.
    opt_sh = _opt_state_shardings(abstract_opt, trainable_sh, mesh)
    repl = NamedSharding(mesh, P())
    state_sh = TrainState(step=repl, params=trainable_sh, opt_state=opt_sh, bad_streak=repl, skipped=repl)
    return Engine(cfg=cfg, mesh=mesh, graphdef=graphdef, objective=objective, optimizer=optimizer,
                  state_sharding=state_sh, param_sharding=param_sh, lr_schedule=lr)


def lora_shardings(abstract_adapters, mesh: Mesh):
    """Adapters are laid out by their logical axes (`lora.adapter_axes`)."""
    axes = lora.adapter_axes(abstract_adapters)
    return jax.tree.map(lambda x, a: NamedSharding(mesh, logical_to_spec(a, x.shape, mesh)), abstract_adapters, axes)


def _opt_state_shardings(abstract_opt, param_sh, mesh):
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
                return _fit(sh, leaf.shape)
        return repl

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def _fit(sh: NamedSharding, shape) -> NamedSharding:
    """`sh` with the mesh axes of a dimension dropped where the moment's dimension does not
    split over them (a moment reduced over a parameter's axis, NorMuon's, has size 1 there)."""
    spec = []
    for i, axes in enumerate(sh.spec):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        ways = 1
        for name in names:
            ways *= sh.mesh.shape[name]
        spec.append(axes if shape[i] % ways == 0 else None)
    return NamedSharding(sh.mesh, P(*spec))


# The pretraining code before the engine took objectives called these Trainer/make_trainer.
Trainer = Engine
make_trainer = make_engine
