"""The project's exceptions: every error that bad input or an unusable environment can cause is one of these.

They subclass ValueError, so code that catches ValueError keeps working. The command line prints them (and the
operating system's file errors) as one `error:` line with exit status 2; any other exception is a bug and keeps its
traceback.
"""


class DgemmaError(ValueError):
    """Bad input (an argument, a prompt, a file) or an unusable environment, named in the message."""


class CheckpointError(DgemmaError):
    """A checkpoint folder or one of its files: config.json, generation_config.json, tokenizer.json, the weights."""


class ExportError(DgemmaError):
    """An export or engine folder, or an export that cannot be written."""
