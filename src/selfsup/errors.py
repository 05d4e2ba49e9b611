"""The errors a user can meet, in one home at the ground layer; each message names the file, key or step and what to do.

``check_field`` and ``check_choice`` are the one-line checks every config's ``validate`` uses.
"""
import difflib


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


class DataError(ValueError):
    """The data cannot be used as it is; the message names the file or folder and what to do."""


class BadImageError(DataError):
    """One or more image files cannot be decoded (and ``on_bad_image`` is ``"error"``)."""


class DataNotFoundError(FileNotFoundError):
    """A data set is not on this machine; the message lists the places searched and how to get it."""


class NoTestSplitError(DataNotFoundError, DataError):
    """A data set has no held-out (``test``) split: a flat or val-less image folder, a single ``hf:`` Dataset, a store
    prepared without one. Evaluation and the kNN monitor then hold out part of the training split instead."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible; the message says which and what to do."""


class CheckpointWriteError(CheckpointError):
    """Writing into the run folder failed (disk full, read-only, no permission); older files are untouched."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message names the step and checkpoint."""


class BackboneChangedError(RuntimeError):
    """A frozen-encoder evaluation changed the encoder's weights or buffers (it must leave them untouched)."""


def check_field(key: str, ok: bool, msg: str) -> None:
    """``ConfigError("key: msg")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def check_choice(key: str, value: str, options: tuple) -> None:
    """``ConfigError`` naming the key and the closest option unless ``value`` is one of ``options``."""
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}{hint}")
