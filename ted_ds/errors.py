"""Training's error types, each a ``UserError`` that entry points print as one line
(``ted-ds: error: ...``), never a traceback.

``UserError`` itself and the runner that prints it (``run_cli``) live in ``data_prep.errors``,
shared by both command lines; import them from there.
"""

from data_prep.errors import UserError

__all__ = ["CheckpointError", "ConfigError", "DeviceError", "DistributedError", "TrainingError"]


class ConfigError(UserError):
    """The run configuration is wrong or disagrees with the models/data it names."""


class CheckpointError(UserError):
    """A checkpoint is missing, partial, corrupted or incompatible with this run."""


class DeviceError(UserError):
    """The ranks of a host cannot each get a GPU of their own from the GPUs they see."""


class DistributedError(UserError):
    """A collective timed out or a peer rank died."""


class TrainingError(UserError):
    """Training cannot go on: the loss stayed non-finite, or a step would save non-finite weights."""
