"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(ValueError):
    """A problem with the user's input (config, data, weights), not a bug in finetune."""
