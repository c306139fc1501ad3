"""Exceptions users see. Messages state the rule that was broken, the values, and the fix."""


class ConfigError(ValueError):
    """Bad configuration or input, found before any heavy work starts."""


class ScheduleError(ValueError):
    """A schedule that is malformed or would deadlock; the message shows the grid."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite: the run stops before the update."""
