"""What every command-line entry point shares: quiet logs and one-line user errors."""

import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging

from fpd_jax.errors import UserError


def run_user_command(fn: Callable[[], object], verbose: bool) -> None:
  """Runs `fn`; a UserError prints `error: <message>` and exits 2 (re-raised with a traceback if `verbose`)."""
  if not verbose:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO.
  try:
    fn()
  except UserError as e:
    if verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def run_tool(define_flags: Callable[[], dict[str, flags.FlagHolder]], call: Callable[[dict], object],
             required: list[str]) -> None:
  """The `__main__` of a tool: defines its flags (a `{name: holder}` dict) and the common `--verbose`, marks
  `required`, and runs `call({name: value})` as a user command (one-line errors, exit status 2)."""
  holders = define_flags()
  module = define_flags.__module__  # Listed with the tool's own flags in --help (absl names __main__ by its file).
  holders['verbose'] = flags.DEFINE_bool('verbose', False, 'Full tracebacks for errors.',
                                         module_name=sys.argv[0] if module == '__main__' else module)
  flags.mark_flags_as_required(required)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    run_user_command(lambda: call({name: h.value for name, h in holders.items()}), holders['verbose'].value)

  app.run(main, flags_parser=parse_flags)


# Set by `launch/local.sh --processes N` for each process it starts (all three, or none: then JAX detects the
# cluster itself on TPU VMs, SLURM and GKE).
COORDINATOR_ENV = 'FPD_JAX_COORDINATOR'  # host:port of process 0's coordination service, e.g. 127.0.0.1:8476.
NUM_PROCESSES_ENV = 'FPD_JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'FPD_JAX_PROCESS_ID'


def initialize_distributed(heartbeat_timeout_s: int = 100) -> None:
  """Joins a multi-process run with `jax.distributed.initialize()`.

  The coordinator, process count and index come from `FPD_JAX_COORDINATOR`, `FPD_JAX_NUM_PROCESSES` and
  `FPD_JAX_PROCESS_ID` when set (`launch/local.sh --processes`), else JAX detects them (TPU VMs, SLURM, GKE).
  Collectives between CPU devices of different processes use gloo. A process that sends no heartbeat for
  `heartbeat_timeout_s` seconds is declared dead and JAX stops the others (they exit with status 134 after
  printing JAX's fatal error; see launch/README.md).
  """
  import jax  # pylint: disable=g-import-not-at-top  # Keep `--help` fast.
  names = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
  given = {n: os.environ[n] for n in names if os.environ.get(n)}
  if given and len(given) < len(names):
    raise UserError(f'set all of {", ".join(names)} or none of them (only {", ".join(given)} set).')
  kwargs = {}
  if given:
    try:
      kwargs = {'coordinator_address': given[COORDINATOR_ENV], 'num_processes': int(given[NUM_PROCESSES_ENV]),
                'process_id': int(given[PROCESS_ID_ENV])}
    except ValueError as e:
      raise UserError(f'{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} must be integers ({e}).') from e
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Only CPU devices use it.
  try:
    jax.distributed.initialize(heartbeat_timeout_seconds=int(heartbeat_timeout_s), **kwargs)
  except (RuntimeError, ValueError) as e:
    raise UserError(f'jax.distributed.initialize() failed ({one_line(e)}); start one process per host with the '
                    'launch/ scripts, or drop --config.distributed=True for a single-process run.') from e
  logging.warning('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
                  jax.local_device_count(), jax.device_count())


def one_line(e: Exception) -> str:
  """First and last line of an error (ml_collections embeds tracebacks and file lists in its messages)."""
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] if len(lines) == 1 else f'{lines[0].rstrip(":")}: {lines[-1]}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns a bad `--config`/`--config.*` into a one-line error (for `app.run`)."""
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      flags.FLAGS.config.keys()  # A config file that failed to load raises only when used: surface it here.
    return rest
  except (AttributeError, KeyError) as e:  # An override names a field the config lacks.
    key = str(e).strip('"\'')
    bad = [a.split('=')[0] for a in argv if a.startswith('--config.') and key in a.split('=')[0]]
    print(f'error: unknown config key {key!r} (in {", ".join(bad) or "a --config override"}); '
          'the config file lists every field.', file=sys.stderr)
  except (flags.Error, OSError, ValueError) as e:  # Wrong value type, missing flag or file, bad variant.
    print(f'error: {one_line(e)}', file=sys.stderr)
  sys.exit(2)
