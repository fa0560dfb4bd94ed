"""Error types whose message is meant for the user as one line.

Every user-facing failure in sparsebench raises a subclass of :class:`SparsebenchError`.
``run.py`` catches them, prints ``error: <message>`` on one line and exits with code 2
(no traceback unless ``HYDRA_FULL_ERROR=1`` or ``SPARSEBENCH_DEBUG=1`` is set).
"""


class SparsebenchError(Exception):
    """Base class: a problem the user can fix; ``str(err)`` is a complete one-line message, printed as
    ``<prefix>: <message>`` with exit code :attr:`exit_code`."""

    exit_code = 2
    prefix = "error"


class ConfigError(SparsebenchError, ValueError):
    """A configuration key has an unknown name, a wrong type or an impossible value.

    The message starts with the dotted key, e.g. ``method.density=1.5: must be in (0, 1]``.
    """


class DataError(SparsebenchError, RuntimeError):
    """A dataset file is missing, truncated or malformed; the message names the file."""


class TrainingError(SparsebenchError, RuntimeError):
    """Training cannot continue (NaN/inf loss, out of memory); the message names the step."""
