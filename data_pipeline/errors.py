"""The one error type for mistakes a user can fix: a bad config value, input file, path or
command-line value.

Both `lm` and `data_pipeline` raise subclasses of `UserError` whose message names the bad
input and what to do about it (`lm.config.ConfigError`, `data_pipeline.sources.DataError`,
`data_pipeline.chat.ChatFormatError`, `NotFound`, ...). The command line catches
`UserError` in one place (`lm.cli.main`) and prints it as one line on stderr, exit code 2.
Any other exception is a bug and keeps its traceback. It lives here, in the data
pipeline, because `data_pipeline` never imports `lm`.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and how to fix it."""


class NotFound(UserError, FileNotFoundError):
    """A file, folder, checkpoint or run that a command needs does not exist."""
