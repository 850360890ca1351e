"""Errors a user can cause and fix. The CLI prints them as one line on stderr and exits with 2."""


class LowbandError(Exception):
    """Base class: bad input or a state on disk that lowband refuses to touch."""


class ConfigError(LowbandError):
    """A flag or config value that cannot work (unknown preset, malformed --link, workers < 1...)."""


class DataError(LowbandError):
    """A data path that is missing, empty, unreadable or in an unknown format."""


class CheckpointError(LowbandError):
    """A checkpoint that is corrupt, incomplete, or belongs to a different run."""


class RunDirError(LowbandError):
    """An output folder that already holds a different run (nothing is overwritten)."""


class RunFileError(LowbandError):
    """A file of a run folder (config, checkpoint sidecar, summary, elastic file) that cannot be
    read, is not valid JSON, or does not hold what lowband writes there. The message names the
    file; nothing is changed on disk."""
