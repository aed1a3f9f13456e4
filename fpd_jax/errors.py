"""User-facing errors: one line naming the problem and the fix, never a traceback from deep inside JAX."""


class UserError(Exception):
  """A problem the user can fix (bad config, missing package or file, wrong checkpoint).

  The entry points catch it, print `error: <message>` on one line and exit with status 2
  (the full traceback only with `--config.verbose=True`).
  """
