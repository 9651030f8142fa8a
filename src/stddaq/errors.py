"""The exceptions stddaq raises on purpose.

    StddaqError                 base of everything below; CLI entry points turn it into one line
    ├── ConfigError             a detector config file is missing, not JSON, or invalid (exit 2)
    ├── UsageError              a command-line value is not allowed (exit 2)
    ├── BusError                the shared-memory / metadata bus cannot be used (exit 1)
    │   ├── BufferMissingError  a reader attached to a RAM buffer that no service has created
    │   └── BufferLayoutError   a RAM buffer exists but its size is not the one the config implies
    └── StorageError            an HDF5 file cannot be created, written or merged (exit 1)
        └── WriteFailed         images could not be written (disk full, I/O error); names them
"""

from __future__ import annotations


class StddaqError(Exception):
    """Base class; ``exit_code`` is what a CLI returns when this ends it."""

    exit_code = 1


class ConfigError(StddaqError):
    exit_code = 2


class UsageError(StddaqError):
    exit_code = 2


class BusError(StddaqError):
    exit_code = 1


class BufferMissingError(BusError):
    pass


class BufferLayoutError(BusError):
    pass


class StorageError(StddaqError):
    exit_code = 1


class WriteFailed(StorageError):
    """Images that were accepted but could not be written; ``image_ids`` lists them."""

    def __init__(self, message: str, image_ids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.image_ids = image_ids
