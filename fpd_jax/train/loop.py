"""The one training loop every stage uses: resume, step, log, check finiteness, checkpoint.

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
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import sharding
from fpd_jax.errors import UserError


class NonFiniteLossError(UserError):
  """A loss or metric became NaN/Inf; the state of that step is never checkpointed."""


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
    NonFiniteLossError: a metric of some step was NaN/Inf (that state is not saved; earlier checkpoints stay).
    PreemptedError: SIGTERM or a preemption notice; the step reached is saved (and the save finished).
    UserError: the checkpoints do not fit the configured model, or none of them restores.
  """
  os.makedirs(stage_dir, exist_ok=True)
  metrics_path = os.path.join(stage_dir, 'metrics.jsonl')
  mngr = ckpt_lib.manager(os.path.join(stage_dir, 'checkpoints'), cfg.keep_checkpoints)
  state = partitioner.init(init_state)
  start, state = ckpt_lib.restore_latest(mngr, state)
  frozen = tuple(partitioner.put(f) for f in frozen)
  jitted = partitioner.jit_step(step_fn, state, *frozen)
  start = 0 if start is None else start
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
      state, metrics = jitted(state, *frozen, partitioner.batch(batch_fn(step)), jax.random.fold_in(rng, step))
      metrics = _host(metrics)
      if step + 1 == cfg.inject_nan_at_step:
        metrics['loss'] = float('nan')
      bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
      if bad:
        mngr.wait_until_finished()
        raise NonFiniteLossError(
            f'stage {name}: non-finite {", ".join(bad)} at step {step + 1} '
            f'({", ".join(f"{k}={metrics[k]}" for k in bad)}); nothing was saved from this step, the last good '
            f'checkpoint is step {mngr.latest_step()}. Lower the learning rate or check the inputs.')
      done = step + 1
      window_steps += 1
      bar.update(1)
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        elapsed = time.perf_counter() - window_t
        row = {'step': done, **metrics, 'steps_per_sec': window_steps / elapsed,
               'images_per_sec': window_steps * cfg.batch_size / elapsed}
        log.write(json.dumps(row) + '\n')
        log.flush()
        bar.set_postfix(loss=f'{metrics["loss"]:.4f}', img_s=f'{row["images_per_sec"]:.0f}')
        window_t, window_steps = time.perf_counter(), 0
      stop_reason = stop.reason(done)
      if done % cfg.checkpoint_every == 0 or done == cfg.num_steps or stop_reason:
        save(done, state)
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
  return state
