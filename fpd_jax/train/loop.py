"""The one training loop every stage uses: resume, step, log, check finiteness, checkpoint.

Metrics come back to the host only on logging, checkpoint and final steps (no sync between other steps); a
finiteness guard carried through the jitted steps (`guarded_step`) remembers the first NaN/Inf of any metric or of
the trained state, and is checked before every save.

A stage supplies a pure train step `step(state, [*frozen,] batch, rng) -> (state, metrics)`, a way to build the
initial state and the batch of a given step. The loop places everything on the configured mesh
(`fpd_jax.sharding.Partitioner`): the state is created already sharded, restored onto the current mesh's shardings
(whatever mesh wrote it), the frozen trees are placed by the same partition rules, the batch is split over the
data axes, and the step is jitted with in/out shardings and the state donated. Data order and randomness are functions of the step (the batch of step s is
`batch_fn(s)`, its key `fold_in(rng, s)`), so a resumed run continues exactly like an uninterrupted one.

SIGTERM (and the TPU preemption notice) stop a run cleanly: the step in progress finishes, is checkpointed, and
`PreemptedError` names it. A killed run (SIGKILL, power loss) resumes from its last committed checkpoint.
"""

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import sharding
from fpd_jax.errors import UserError


class NonFiniteLossError(UserError):
  """A metric or the trained state (parameters, optimizer states) became NaN/Inf; nothing from that step on is
  checkpointed."""


class PreemptedError(UserError):
  """SIGTERM or a TPU preemption notice stopped a stage after a whole step, which was checkpointed.

  A UserError, so the command-line entry points print `error: stage <name>: preempted (...) at step N; ...` and
  exit with status 2, like any other user error (there is no separate exit status for preemption). Rerunning the
  same command resumes from step N.
  """


@dataclasses.dataclass
class LoopConfig:
  """Loop settings (from `config.train`)."""
  num_steps: int
  checkpoint_every: int
  keep_checkpoints: int
  log_every: int
  batch_size: int  # For the images/s figure only.
  inject_nan_at_step: int = 0  # Test hook: pretend the loss of this step (1-based) was NaN (0 = off).


def loop_config(config, stage_cfg, batch_size: int | None = None) -> LoopConfig:
  """Builds the loop settings of a stage from the global `train` section and the stage's section."""
  return LoopConfig(num_steps=stage_cfg.num_steps, checkpoint_every=config.train.checkpoint_every,
                    keep_checkpoints=config.train.keep_checkpoints, log_every=config.train.log_every,
                    batch_size=batch_size or stage_cfg.batch_size,
                    inject_nan_at_step=config.train.get('inject_nan_at_step', 0))


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops rows written after `last_step` (by a run that died before its next checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line)['step'] <= last_step]
  with open(path, 'w') as f:
    f.writelines(rows)


def _host(metrics: dict) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


STATE_TERM = 'state'  # Name of the trained state (parameters, optimizer states, EMA) in the guard's bad terms.


def all_finite(tree) -> jax.Array:
  """Scalar bool, on device: no floating leaf of `tree` holds a NaN or Inf (one reduction per leaf)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def init_guard(step: int) -> dict:
  """The finiteness guard carried through the jitted steps (three int32 scalars, no host sync per step).

  `step`: the last step done; `first_bad`: the first step (1-based) since the run (re)started whose metrics or
  new state held a NaN/Inf (0: none); `bad_terms`: a bit mask of what was non-finite at that step, over
  `[STATE_TERM] + sorted(metric names)`.
  """
  return {k: np.asarray(v, np.int32) for k, v in (('step', step), ('first_bad', 0), ('bad_terms', 0))}


def guarded_step(step_fn: Callable, inject_nan_at_step: int = 0) -> Callable:
  """`step_fn(state, *args) -> (state, metrics)` as `((state, guard), *args) -> ((state, guard), metrics)`.

  Inside the same jitted step, checks every metric and every floating leaf of the new state (parameters,
  optimizer states, EMA, discriminator) and records the first non-finite step in the guard. The loop reads the
  guard only when it reads the metrics (logging, checkpoint and final steps) and before every save.
  `inject_nan_at_step` (test hook) makes the loss of that step NaN.
  """

  def step(carry, *args):
    state, guard = carry
    state, metrics = step_fn(state, *args)
    number = guard['step'] + 1
    if inject_nan_at_step:
      metrics = {**metrics, 'loss': jnp.where(number == inject_nan_at_step, jnp.nan, metrics['loss'])}
    names = sorted(metrics)
    if len(names) >= 31:
      raise ValueError(f'guarded_step tracks at most 30 metrics, the step returns {len(names)}.')
    finite = [all_finite(state)] + [jnp.all(jnp.isfinite(metrics[k])) for k in names]
    bad_terms = sum(jnp.where(ok, 0, 1 << i) for i, ok in enumerate(finite)).astype(jnp.int32)
    first = (guard['first_bad'] == 0) & (bad_terms != 0)
    guard = {'step': number, 'first_bad': jnp.where(first, number, guard['first_bad']),
             'bad_terms': jnp.where(first, bad_terms, guard['bad_terms'])}
    return (state, guard), metrics

  return step


def bad_term_names(bad_terms: int, metric_names) -> list[str]:
  """The names (`STATE_TERM` or metric names) set in a guard's `bad_terms` mask."""
  names = [STATE_TERM] + sorted(metric_names)
  return [n for i, n in enumerate(names) if bad_terms >> i & 1]


class SigtermFlag:
  """While active, SIGTERM only sets a flag, which every training loop (of any thread) reads after its step.

  Installed by the outermost `with` when it runs on the main thread of a single-process run: with several
  processes JAX's preemption service turns SIGTERM into a synchronised notice itself, and a per-host flag would
  make hosts stop at different steps. Nested uses (the pipeline holds it while stages run, in worker threads too)
  keep the outer handler; the previous handler is restored when the outermost `with` ends.
  """

  def __init__(self):
    self.event = threading.Event()
    self._lock = threading.Lock()
    self._depth = 0
    self._installed = False
    self._previous = None

  def __enter__(self):
    with self._lock:
      if self._depth == 0 and jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
        self.event.clear()
        self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
        self._installed = True
      self._depth += 1
    return self

  def __exit__(self, *exc):
    with self._lock:
      self._depth -= 1
      if self._depth == 0 and self._installed:  # `None`: the previous handler was not set from Python.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
        self._installed = False
    return False


SIGTERM = SigtermFlag()  # The one flag of this process (`stages.run_pipeline` holds it around all stages).


class _StopRequests:
  """Context manager: while active, SIGTERM only sets `SIGTERM.event`, which `reason(step)` reports after a step.

  `reason(step)` also asks Orbax whether all hosts reached JAX's preemption sync point (the TPU preemption
  notice; `jax.experimental.multihost_utils.reached_preemption_sync_point`), which every host must ask at every
  step.
  """

  def __init__(self, mngr):
    self._mngr = mngr

  def __enter__(self):
    SIGTERM.__enter__()
    return self

  def __exit__(self, *exc):
    return SIGTERM.__exit__(*exc)

  def sigterm_received(self) -> bool:
    """Whether a SIGTERM arrived since the flag was installed."""
    return SIGTERM.event.is_set()

  def reason(self, step: int) -> str | None:
    """'SIGTERM', 'TPU preemption notice' or None (no stop requested) after step `step`."""
    notice = self._mngr.reached_preemption(step)  # Always asked: a collective on multi-host runs.
    if self.sigterm_received():
      return 'SIGTERM'
    return 'TPU preemption notice' if notice else None


def run(name: str, stage_dir: str, cfg: LoopConfig, init_state: Callable[[], Any],
        step_fn: Callable[[Any, Any, jax.Array], tuple[Any, dict]], batch_fn: Callable[[int], Any],
        rng: jax.Array, on_checkpoint: Callable[[int, Any], None] | None = None, *,
        partitioner: sharding.Partitioner, frozen: tuple = ()) -> Any:
  """Trains a stage to `cfg.num_steps`, resuming from its latest checkpoint, and returns the final state.

  A SIGTERM (or JAX's preemption notice) received meanwhile ends the run after the step in progress: that step
  is checkpointed, and PreemptedError raised. Rerunning the same command resumes from it.

  Args:
    name: stage name (progress bar, messages).
    stage_dir: `DIR/<stage>`; checkpoints go to `checkpoints/`, rows to `metrics.jsonl`.
    cfg: loop settings.
    init_state: builds the initial state pytree (a dict with 'step'); also the restore target.
    step_fn: the pure train step `(state, *frozen, batch, rng) -> (state, metrics)` (jitted here with the
      partitioner's shardings). Its metrics must include 'loss'.
    batch_fn: step -> this host's rows of the global batch of that step.
    rng: the stage's root key; step s uses `fold_in(rng, s)`.
    on_checkpoint: optional hook called after each save.
    partitioner: the mesh and partition rules (`sharding.Partitioner.from_config(config)`).
    frozen: trees the step reads but never updates (e.g. teacher parameters), placed by the partition rules.

  Raises:
    NonFiniteLossError: a metric or the new state of some step held a NaN/Inf (`guarded_step` records the first
      such step on device; it is checked whenever metrics are read: log, checkpoint and final steps, so before
      every save). Nothing from that step on is saved; earlier checkpoints stay.
    PreemptedError: SIGTERM or a preemption notice; the step reached is saved (and the save finished).
    UserError: the checkpoints do not fit the configured model, or none of them restores.
  """
  os.makedirs(stage_dir, exist_ok=True)
  metrics_path = os.path.join(stage_dir, 'metrics.jsonl')
  mngr = ckpt_lib.manager(os.path.join(stage_dir, 'checkpoints'), cfg.keep_checkpoints)
  state = partitioner.init(init_state)
  start, state = ckpt_lib.restore_latest(mngr, state)
  start = 0 if start is None else start
  frozen = tuple(partitioner.put(f) for f in frozen)
  carry = (state, partitioner.put(init_guard(start)))
  jitted = partitioner.jit_step(guarded_step(step_fn, cfg.inject_nan_at_step), carry, *frozen)
  main_host = jax.process_index() == 0  # Only process 0 writes metrics rows and shows progress.
  if main_host:
    _truncate_metrics(metrics_path, start)
  if start:
    print(f'[{name}] resuming from step {start}')

  def save(step, state):
    mngr.save(step, args=ckpt_lib.ocp.args.StandardSave(state), force=True)
    if on_checkpoint:
      on_checkpoint(step, state)

  bar = tqdm(total=cfg.num_steps, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0,
             disable=not main_host)
  window_t, window_steps = time.perf_counter(), 0
  done, stop_reason = start, None
  with _StopRequests(mngr) as stop, open(metrics_path if main_host else os.devnull, 'a') as log:
    for step in range(start, cfg.num_steps):
      carry, metrics = jitted(carry, *frozen, partitioner.batch(batch_fn(step)), jax.random.fold_in(rng, step))
      done = step + 1
      window_steps += 1
      bar.update(1)
      stop_reason = stop.reason(done)
      log_now = done % cfg.log_every == 0 or done == cfg.num_steps
      save_now = done % cfg.checkpoint_every == 0 or done == cfg.num_steps or stop_reason
      if not (log_now or save_now):
        continue  # Nothing read back: the device runs ahead, the guard keeps the first bad step.
      metrics = _host(metrics)  # Waits for this step; also the guard (same step) below.
      _check_guard(name, jax.device_get(carry[1]), metrics, done, mngr)
      if log_now:
        elapsed = time.perf_counter() - window_t
        row = {'step': done, **metrics, 'steps_per_sec': window_steps / elapsed,
               'images_per_sec': window_steps * cfg.batch_size / elapsed}
        log.write(json.dumps(row) + '\n')
        log.flush()
        bar.set_postfix(loss=f'{metrics["loss"]:.4f}', img_s=f'{row["images_per_sec"]:.0f}')
        window_t, window_steps = time.perf_counter(), 0
      if save_now:
        save(done, carry[0])
      if stop_reason:
        break
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if stop.sigterm_received() and not stop_reason:
      stop_reason = 'SIGTERM'  # Arrived during the final save, which is complete: still stop the pipeline.
  if stop_reason:
    raise PreemptedError(f'stage {name}: preempted ({stop_reason}) at step {done}; checkpoint saved, rerun the '
                         'same command to resume.')
  return carry[0]


def _check_guard(name: str, guard: dict, metrics: dict[str, float], done: int, mngr) -> None:
  """Raises NonFiniteLossError if any step up to `done` went non-finite (called before every save)."""
  first_bad = int(guard['first_bad'])
  if not first_bad:
    return
  mngr.wait_until_finished()
  bad = ', '.join(n if n != STATE_TERM else 'parameters/optimizer state'
                  for n in bad_term_names(int(guard['bad_terms']), metrics))
  values = ', '.join(f'{k}={v:.4g}' for k, v in metrics.items())
  raise NonFiniteLossError(
      f'stage {name}: non-finite {bad} at step {first_bad} (step {done}: {values}); nothing was saved from step '
      f'{first_bad} on, the last good checkpoint is step {mngr.latest_step()}. Lower the learning rate or check '
      'the inputs.')
