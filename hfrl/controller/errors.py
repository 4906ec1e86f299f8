"""Errors the single controller raises on rank 0."""
from __future__ import annotations


class RemoteError(RuntimeError):
    """A worker method raised on another rank. Carries rank, role, method and traceback."""

    def __init__(self, rank: int, role: str, method: str, exc_type: str, message: str,
                 remote_traceback: str):
        self.rank, self.role, self.method = rank, role, method
        self.exc_type, self.remote_message = exc_type, message
        self.remote_traceback = remote_traceback
        super().__init__(f"{role}.{method} failed on rank {rank}: {exc_type}: {message}\n"
                         f"--- remote traceback (rank {rank}) ---\n{remote_traceback}")

    def __reduce__(self):
        return (RemoteError, (self.rank, self.role, self.method, self.exc_type,
                              self.remote_message, self.remote_traceback))


class WorkerLostError(RuntimeError):
    """A rank stopped answering: its process died or its connection broke."""


class NotRunError(RuntimeError):
    """A rank skipped its share of a call because rank 0's share of the same call had already
    failed: a consequence of that failure, never its cause (rank 0 reports its own error)."""
