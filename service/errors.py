"""Errors answered over HTTP: a status code and a one-line message, never a 500."""

from __future__ import annotations


class RequestError(Exception):
    """A problem with one request, answered with `status` and a one-line message (never a 500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message
