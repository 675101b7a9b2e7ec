"""The one exception hierarchy of airflow-remote-ml.

Every error says what is wrong and what to do about it. Whether Airflow retries a task depends on the
class: configuration problems never heal by retrying, transient API trouble does.
"""

from __future__ import annotations

from collections.abc import Iterable


class RemoteMLError(Exception):
    """Base class of every error raised by airflow-remote-ml."""


class ConfigError(RemoteMLError):
    """A step spec, a backend option or a connection is wrong. Retrying cannot help."""

    def __init__(self, field: str, problem: str, fix: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{field}: {problem}" if field else problem
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class BackendNotFoundError(ConfigError):
    """No backend of that name is registered."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        import difflib

        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"known backends: {', '.join(known) or 'none'}"
        super().__init__("backend", f"no such backend: {name!r}", fix)
        self.name = name
        self.known = known


class BackendUnavailableError(RemoteMLError):
    """The backend exists but its optional dependencies are not installed."""

    def __init__(self, backend: str, extra: str, missing: str) -> None:
        super().__init__(
            f"backend {backend!r} needs {missing!r}, which is not installed; "
            f"install it with: pip install 'airflow-remote-ml[{extra}]'"
        )
        self.backend = backend
        self.extra = extra


class BackendAPIError(RemoteMLError):
    """The remote API refused a request."""

    def __init__(self, backend: str, message: str, status_code: int | None = None) -> None:
        super().__init__(f"{backend}: {message}" + (f" (HTTP {status_code})" if status_code else ""))
        self.backend = backend
        self.status_code = status_code


class TransientBackendError(BackendAPIError):
    """429, 5xx, a reset connection or a timeout: worth retrying."""

    def __init__(
        self,
        backend: str,
        message: str,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(backend, message, status_code)
        self.retry_after = retry_after


class InvalidRequestError(ConfigError, BackendAPIError):
    """The remote API refused the request as invalid (a 400/422 naming a field): fail once, never retry.

    What the spec lets us know is refused before submit; this is for what only the remote side knows.
    It is both a ``ConfigError`` (the task fails without retries) and a ``BackendAPIError`` (it carries
    the backend and the HTTP status).
    """

    def __init__(self, backend: str, field: str, message: str, status_code: int | None = None,
                 fix: str | None = None) -> None:
        problem = f"{backend} refused it: {message}" + (f" (HTTP {status_code})" if status_code else "")
        self.field, self.problem, self.fix = field, problem, fix
        self.backend = backend
        self.status_code = status_code
        RemoteMLError.__init__(self, f"{field}: {problem}" + (f"; {fix}" if fix else ""))

    def with_field(self, field: str) -> InvalidRequestError:
        """The same refusal, naming the place the refused value was written (a profile, the settings)."""
        moved = InvalidRequestError.__new__(type(self))
        moved.__dict__.update(self.__dict__)
        moved.field = field
        RemoteMLError.__init__(moved, f"{field}: {self.problem}" + (f"; {self.fix}" if self.fix else ""))
        return moved


class StepFailedError(RemoteMLError):
    """The step ran and failed. Carries the exit code, the log tail and the remote URL."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        log_tail: Iterable[str] = (),
        url: str | None = None,
        backend: str | None = None,
        job_id: str | None = None,
    ) -> None:
        self.reason = message
        self.exit_code = exit_code
        self.log_tail = list(log_tail)
        self.url = url
        self.backend = backend
        self.job_id = job_id
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"step failed on {self.backend}" if self.backend else "step failed"
        if self.job_id:
            head += f" (job {self.job_id})"
        parts = [f"{head}: {self.reason}"]
        if self.exit_code is not None:
            parts.append(f"exit code: {self.exit_code}")
        if self.url:
            parts.append(f"remote job: {self.url}")
        if self.log_tail:
            parts.append("last log lines:\n" + "\n".join(f"  | {line}" for line in self.log_tail))
        return "\n".join(parts)


class StepCancelledError(StepFailedError):
    """The remote job was cancelled (by a user, by Airflow or by the platform)."""


class StepTimeoutError(StepFailedError):
    """The step ran longer than its timeout and was cancelled."""


class RemoteJobLostError(StepFailedError):
    """The remote job disappeared: nobody can tell how it ended."""


class ArtifactError(RemoteMLError):
    """A declared output is missing, a manifest is unreadable, or a URI is bad."""
