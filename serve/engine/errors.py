"""The error of a request the engine refuses; its own module so that every part of the engine can raise it."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot take; the message says why."""
