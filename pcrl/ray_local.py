"""A local Ray instance with token authentication: the one ``data_prep.shard --ray local`` and
``launch/tune.py`` (without ``--address``) start.

Ray's processes listen on all network interfaces, and anyone who reaches one can run code. With token
authentication (Ray 2.60 and newer), every Ray gRPC and HTTP server refuses a client that does not send the
instance's token. :func:`start_local_ray` turns it on explicitly (``RAY_AUTH_MODE=token`` for this process
and every process Ray starts from it), whatever the environment says, rather than relying on Ray's default.

The token, in the order Ray looks for it: ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``. With none of them, a new random token is made for this instance and kept in this
process's environment only (``RAY_AUTH_TOKEN``, inherited by Ray's processes): nothing is written to disk,
and no other program can join the instance. To reach it from another shell (``ray status``), make a token
first with ``ray get-auth-token --generate`` (it writes ``~/.ray/auth_token``, which pcrl then uses).

Example::

    start_local_ray(num_cpus=4, include_dashboard=False)
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["RAY_MIN_VERSION", "RayAuthError", "start_local_ray"]

log = logging.getLogger(__name__)

RAY_MIN_VERSION = (2, 60)
"""The oldest Ray pcrl runs with (token authentication; pyproject.toml's ``ray`` extra says the same)."""


class RayAuthError(RuntimeError):
    """Ray is too old for token authentication, or the token it is pointed at is missing."""


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _token_available() -> bool:
    """Whether Ray will find a token of the user's own (environment or file); raises if one is named but missing."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        if not Path(path).expanduser().is_file():
            raise RayAuthError(
                f"RAY_AUTH_TOKEN_PATH={path}: no such file; make one with `ray get-auth-token --generate` and "
                "point RAY_AUTH_TOKEN_PATH at ~/.ray/auth_token, or unset RAY_AUTH_TOKEN_PATH"
            )
        return True
    try:
        return (Path.home() / ".ray" / "auth_token").is_file()
    except (RuntimeError, KeyError):  # no home folder: no default token file either
        return False


def start_local_ray(**init_kwargs: Any) -> None:
    """Start a new local Ray instance (``ray.init(address="local", ...)``) with token authentication on.

    Args:
        init_kwargs: passed to ``ray.init`` (``num_cpus``, ``include_dashboard``, ``logging_level``, ...).

    Raises:
        RayAuthError: Ray older than :data:`RAY_MIN_VERSION`, or ``RAY_AUTH_TOKEN_PATH`` naming no file.
        Exception: whatever ``ray.init`` raises when the instance does not start.
    """
    import ray

    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        AuthenticationTokenLoader = Config = None
    if _version(ray.__version__) < RAY_MIN_VERSION or Config is None:
        need = ".".join(map(str, RAY_MIN_VERSION))
        raise RayAuthError(
            f"Ray {ray.__version__} has no token authentication, so its instance would be open to anyone on the "
            f"network; pcrl needs Ray >= {need}: pip install -U 'pcrl[ray]'"
        )
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.warning(
            "RAY_AUTH_MODE=%s ignored: pcrl's local Ray instance always uses token authentication", mode
        )
    os.environ["RAY_AUTH_MODE"] = "token"
    if not _token_available():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray reads its settings once per process: read them again, so that this process (the driver) sends the
    # token too, as Ray does itself when it turns token mode on by default.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    ray.init(address="local", **init_kwargs)
