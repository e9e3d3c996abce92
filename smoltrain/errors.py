"""User-facing errors: one exception family that the CLI prints as one line (exit code 2).

Programming errors are anything else and keep their traceback.
"""


class SmoltrainError(Exception):
    """A mistake in what the user gave us (config, file, path), explained in one line."""


class ConfigError(SmoltrainError):
    """A config key or value is wrong; the message names the key."""


class DataError(SmoltrainError):
    """An input file is wrong; the message names the file (and line when there is one)."""


class CheckpointError(SmoltrainError):
    """A checkpoint or model folder is missing, corrupt or of an unsupported kind."""


class StoppedBySignal(KeyboardInterrupt):
    """A run saved its checkpoint and stopped on SIGTERM / SIGINT (preemption, Ctrl-C): not an error;
    the CLI exits 128 + the signal's number (143 for SIGTERM), as `smoltrain train` does, and the
    same command resumes."""

    def __init__(self, signal_name: str, message: str = ""):
        super().__init__(message or f"stopped by {signal_name}")
        self.signal_name = signal_name
