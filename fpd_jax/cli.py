"""What every command-line entry point shares: quiet logs and one-line user errors."""

import sys
from typing import Callable

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


def initialize_distributed() -> None:
  """Joins a multi-process run (`jax.distributed.initialize()`, coordinator auto-detected on TPU, SLURM, GKE)."""
  import jax  # pylint: disable=g-import-not-at-top  # Keep `--help` fast.
  try:
    jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:
    raise UserError(f'jax.distributed.initialize() failed ({_one_line(e)}); start one process per host with the '
                    'launch/ scripts, or drop --config.distributed=True for a single-process run.') from e
  logging.warning('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
                  jax.local_device_count(), jax.device_count())


def _one_line(e: Exception) -> str:
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
    print(f'error: {_one_line(e)}', file=sys.stderr)
  sys.exit(2)
