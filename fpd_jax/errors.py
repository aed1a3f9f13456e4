"""User-facing errors: one line naming the problem and the fix, never a traceback from deep inside JAX."""


class UserError(Exception):
  """A problem the user can fix (bad config, missing package or file, wrong checkpoint).

  The entry points catch it, print `error: <message>` on one line and exit with status 2
  (the full traceback only with `--config.verbose=True`).
  """


def check_positive(key: str, value, fix: str) -> None:
  """Raises `UserError('config.<key>=<value> must be > 0; <fix>')` unless `value > 0` (NaN fails too)."""
  if not value > 0:
    raise UserError(f'config.{key}={value!r} must be > 0; {fix}')
