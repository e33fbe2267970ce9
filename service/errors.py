"""The server's exception tree, and how each maps to an HTTP answer.

    ClrsearchError                 500, never raised for a client mistake
    ├── NotFound                   404  a study or trial that does not exist
    ├── Conflict                   409  the request clashes with current state
    │   ├── StudyExists            409  a study of that name already exists
    │   └── LeaseLost              409  the worker no longer holds the trial's lease
    ├── InvalidRequest             422  a value the schema allowed but the rules refuse
    └── Unauthorized               401/403  a missing or wrong token

Routes never build HTTP errors themselves: they raise these, and `service.app`
turns them into JSON answers with the message in `detail`.
"""

from __future__ import annotations


class ClrsearchError(Exception):
    """Base of every error the server raises on purpose."""

    status_code = 500


class NotFound(ClrsearchError):
    """Raised when a study, trial or worker named in a request does not exist."""

    status_code = 404


class Conflict(ClrsearchError):
    """Raised when the request is well formed but clashes with the current state."""

    status_code = 409


class StudyExists(Conflict):
    """Raised when a study is submitted under a name that is already taken."""


class LeaseLost(Conflict):
    """Raised when a worker writes to a trial whose lease it no longer holds."""


class InvalidRequest(ClrsearchError):
    """Raised when a value passes the schema but breaks a rule of the service."""

    status_code = 422


class Unauthorized(ClrsearchError):
    """Raised when a request lacks the token its route needs (401) or has the wrong kind."""

    status_code = 401

    def __init__(self, message: str, status_code: int = 401) -> None:
        super().__init__(message)
        self.status_code = status_code
