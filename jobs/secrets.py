"""How secrets reach peftfleet's processes without a Ray runtime env, a command line or a log.

>>> path = write_secrets_file(home, {"PEFTFLEET_STORE_URL": url})   # 0600, in a 0700 folder  # doctest: +SKIP
>>> # the launched process gets only PEFTFLEET_SECRETS_FILE=<path>, and at start:
>>> store_url()                       # loads the file once, then reads its own environment   # doctest: +SKIP

A secret is one of :data:`SECRET_NAMES`. A process finds it in its own environment (on Kubernetes,
from a Secret), else in the file ``PEFTFLEET_SECRETS_FILE`` names, which is refused unless this
user owns it and no one else can read it. ``PEFTFLEET_SECRETS=cluster`` says the cluster's own
environment holds the secrets: a missing one is then an error, not a silent fallback.
A store URL without a password (SQLite) is no secret and may travel as it is.
"""

from __future__ import annotations

import os
import re
import secrets as _random
import stat
from pathlib import Path

SECRET_NAMES = ("PEFTFLEET_STORE_URL", "PEFTFLEET_API_KEY")
FILE_ENV = "PEFTFLEET_SECRETS_FILE"
MODE_ENV = "PEFTFLEET_SECRETS"  # "cluster": the processes' own environment holds the secrets
API_KEY_FILE_ENV = "PEFTFLEET_API_KEY_FILE"


class SecretsError(RuntimeError):
    """A secret that should be there is not, or its file is not safe to read."""


def has_password(url: str | None) -> bool:
    """Whether ``url`` carries a password (``scheme://user:password@host/...``)."""
    return bool(url) and re.match(r"^[\w.+-]+://[^/@]*:[^/@]*@", str(url)) is not None


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(\b[\w.+-]+://[^/\s@:]*:)[^/\s@]*@", r"\1***@", str(text))


def write_secrets_file(home: str | os.PathLike, values: dict[str, str]) -> Path:
    """Write ``values`` (names from :data:`SECRET_NAMES`) to a new ``<home>/secrets/<random>.env``,
    readable by this user only, and return its path. The file appears whole or not at all."""
    unknown = sorted(set(values) - set(SECRET_NAMES))
    if unknown:
        raise ValueError(f"not secret names: {unknown}; expected some of {list(SECRET_NAMES)}")
    for name, value in values.items():
        if "\n" in value or "\r" in value:
            raise ValueError(f"{name} holds a line break; a secret must be one line")
    folder = Path(home) / "secrets"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    name = _random.token_hex(16)
    tmp, path = folder / f".{name}.tmp", folder / f"{name}.env"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in values.items()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_secrets_file(path: str | os.PathLike) -> dict[str, str]:
    """The secrets in ``path``; refused unless this user owns it and neither group nor others can read it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SecretsError(f"{FILE_ENV}: {path} is not a regular file")
        if info.st_uid != os.getuid():
            raise SecretsError(f"{FILE_ENV}: {path} belongs to another user; refusing to read it")
        if info.st_mode & 0o077:
            raise SecretsError(f"{FILE_ENV}: {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                               "it must be 0600")
        text = f.read()
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name in SECRET_NAMES:
            values[name] = value
    return values


def load_secrets() -> dict[str, str]:
    """Put the secrets of ``PEFTFLEET_SECRETS_FILE`` (when set) into this process's environment and
    return them. Only names in :data:`SECRET_NAMES` are read; the file wins over the environment."""
    path = os.environ.get(FILE_ENV)
    if not path:
        return {}
    values = read_secrets_file(path)
    os.environ.update(values)
    return values


def secret(name: str) -> str | None:
    """The secret ``name`` as this process has it (its environment, after :func:`load_secrets`), or None.

    Raises:
        SecretsError: ``PEFTFLEET_SECRETS=cluster`` and the environment lacks it, or the file is unsafe.
    """
    load_secrets()
    value = os.environ.get(name)
    if not value and os.environ.get(MODE_ENV) == "cluster":
        raise SecretsError(f"{MODE_ENV}=cluster but this process has no {name} in its environment; give the "
                           f"cluster's pods {name} from a Kubernetes Secret (see docs/security.md)")
    return value or None


def store_url() -> str | None:
    """The store URL this process was given (``PEFTFLEET_STORE_URL``, possibly through the secrets file)."""
    return secret("PEFTFLEET_STORE_URL")


def api_key_from_file(path: str | os.PathLike) -> str:
    """The API key in ``path`` (its one line; a mounted Kubernetes Secret, say)."""
    key = Path(path).read_text().strip()
    if not key or "\n" in key:
        raise SecretsError(f"{path} must hold the API key on one line")
    return key


def api_key() -> str | None:
    """The Serve API key: ``PEFTFLEET_API_KEY_FILE``'s content when set, else as :func:`secret` finds it."""
    path = os.environ.get(API_KEY_FILE_ENV)
    return api_key_from_file(path) if path else secret("PEFTFLEET_API_KEY")


__all__ = [
    "SECRET_NAMES", "SecretsError", "api_key", "api_key_from_file", "has_password", "load_secrets",
    "read_secrets_file", "redact", "secret", "store_url", "write_secrets_file",
]
