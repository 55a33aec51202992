"""One exception class per failure mode, each mapped to a process exit code.

Torch-free: the runtime on a device raises these too. The CLI turns any `MistError` into one line on stderr and
its `exit_code` (2 = bad usage or input, 1 = a runtime failure), never a traceback.
"""

from __future__ import annotations


class MistError(Exception):
    """Base class; `str(err)` is the one-line message shown to the user."""

    exit_code = 1


class InputError(MistError):
    """A file, folder or value given by the user is missing, malformed or inconsistent."""

    exit_code = 2


class UsageError(MistError):
    """Contradictory or unsupported options."""

    exit_code = 2


class DataError(InputError):
    """A dataset (image folder, list file, image) cannot be read as expected."""


class CheckpointError(InputError):
    """A checkpoint or its config is missing, corrupt or does not match what it is used with."""


class BundleError(InputError):
    """An exported bundle is incomplete, tampered with or inconsistent with its manifest."""


class CodecError(InputError):
    """An encoded feature payload cannot be decoded: truncated, corrupt or for another codec/shape."""


class DependencyError(MistError):
    """An optional dependency (an extra) is not installed, or a resource (model hub) is unreachable."""

    exit_code = 1


class ExportError(MistError):
    """An export ran but failed its own validation (parity, agreement); nothing was written."""

    exit_code = 1


class ResourceLimitError(MistError):
    """A device profile's resource cap (memory) was exceeded."""

    exit_code = 1
