"""Errors the CLI and the service turn into one-line messages instead of stack traces."""


class RecsaeError(Exception):
    """Base class: a problem with the user's input, data or artifacts (not a bug in recsae)."""


class DataError(RecsaeError):
    """A dataset file is missing, unreadable or malformed."""


class ArtifactError(RecsaeError):
    """A run folder, checkpoint or bundle is missing, corrupt or does not match what it is used with."""


class ConfigError(RecsaeError):
    """An option or configuration value is out of range or inconsistent."""
