"""Errors the CLI and the service turn into one-line messages instead of stack traces."""


class RecsaeError(Exception):
    """Base class: a problem with the user's input, data or artifacts (not a bug in recsae)."""


class DataError(RecsaeError):
    """A dataset file is missing, unreadable or malformed."""


class ArtifactError(RecsaeError):
    """A run folder, checkpoint or bundle is missing, corrupt or does not match what it is used with."""


class IncompleteError(ArtifactError):
    """An artifact its step has not finished: not written, cut short before its completion record, or made from
    inputs that have changed since. Running the step (again) is the remedy; corruption raises ArtifactError."""


class ConfigError(RecsaeError):
    """An option or configuration value is out of range or inconsistent."""
