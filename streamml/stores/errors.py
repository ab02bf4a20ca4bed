"""Errors the remote stores raise, so callers (the service) can map them to statuses."""

__all__ = ["StoreUnavailable", "HeadMismatch"]


class StoreUnavailable(RuntimeError):
    """The backing server or file cannot be reached in time (Redis down, a write lock
    held past the busy timeout). Nothing was written by the failed call; retry later."""


class HeadMismatch(ValueError):
    """The stored state was learned against another head than the one being bound."""
