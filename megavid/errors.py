"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits 2."""


class MegavidError(Exception):
    """Base of every error that names a user-fixable problem."""


class ConfigError(MegavidError, ValueError):
    """Bad config key, value or combination."""


class DataError(MegavidError):
    """Missing data path, empty shard list, unreadable annotations, too many bad samples."""


class CheckpointError(MegavidError):
    """Missing or incompatible checkpoint."""


class LaunchError(MegavidError):
    """Malformed hostfile, unreachable host, bad launcher environment."""
