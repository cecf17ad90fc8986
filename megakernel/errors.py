"""Exceptions the engine raises for problems a user can fix.

Each carries a one-line message; the CLI prints it without a traceback. They subclass
ValueError / RuntimeError so callers catching the builtin kinds keep working.
"""


class MegakernelError(Exception):
    """Base class for every error the engine raises on purpose."""


class UnsupportedModelError(MegakernelError, ValueError):
    """The checkpoint describes a model the engine cannot run exactly."""


class CheckpointError(MegakernelError, ValueError):
    """The checkpoint is missing, unreadable, corrupt or incomplete."""


class InvalidRequestError(MegakernelError, ValueError):
    """A generate() argument is out of range (prompt, lengths, sampling parameters)."""


class KVCacheExhaustedError(MegakernelError, RuntimeError):
    """The paged KV pool has no free page left for the requested sequence length."""


class BackendUnavailableError(MegakernelError, RuntimeError):
    """The requested backend cannot run here (no CUDA, extension not built, old GPU)."""


class KernelFaultError(MegakernelError, RuntimeError):
    """The persistent kernel stopped on a watchdog timeout or a device fault.

    `record` holds what the kernel wrote: instruction index, opcode, layer, counter,
    value seen and target.
    """

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record or {}


class DeviceHungError(KernelFaultError):
    """The device did not finish queued work in time (a launch that no watchdog ended).

    The engine refuses new work until the device is idle again; a kernel that never ends
    only clears when the process exits.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's multi-line one."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
