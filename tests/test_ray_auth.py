"""The local Ray instance pcrl starts (``data_prep.shard --ray local``, ``launch/tune.py`` without
``--address``) refuses a client that lacks its token: a real Ray instance, real clients in other processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.pool import Pool

ray = pytest.importorskip("ray")

# A client as any program on the network would be: connect to the instance's address, run a task.
CLIENT = (
    "import sys, ray\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
    "print('ANSWER', ray.get(ray.remote(lambda: 6 * 7).remote()))\n"
)


def _client(address: str, home: Path, **auth: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    # No token file of this machine's user either, and two connection attempts instead of Ray's twenty.
    env.update(HOME=str(home), RAY_gcs_server_port_wait_time_s="2", **auth)
    return subprocess.run(
        [sys.executable, "-c", CLIENT, address], env=env, capture_output=True, text=True, timeout=180
    )


def test_local_ray_refuses_a_client_without_its_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started the way ``data_prep`` starts it (``Pool(ray="local")``), in an environment that asks for no
    authentication (``RAY_AUTH_MODE=disabled``, no token anywhere), the instance still runs in token mode with a
    token of its own that is written nowhere; a client without it (auth unset, disabled, or a wrong token) is
    refused by the instance, and the same client with the token runs a task."""
    home = tmp_path / "home"
    home.mkdir()
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("HOME", str(home))

    with Pool(workers=1, ray="local") as pool:
        assert list(pool.map(abs, [(-3,)])) == [3]
        address = ray.get_runtime_context().gcs_address
        assert os.environ["RAY_AUTH_MODE"] == "token"
        token = os.environ["RAY_AUTH_TOKEN"]
        assert len(token) == 64
        assert not (home / ".ray").exists(), "the instance's token was written to disk"

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        for auth in (
            {},
            {"RAY_AUTH_MODE": "disabled"},
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        ):
            refused = _client(address, elsewhere, **auth)
            out = refused.stdout + refused.stderr
            assert refused.returncode != 0, (
                f"a client with {auth or 'no auth settings'} got in:\n{out[-2000:]}"
            )
            assert "ANSWER" not in out
            assert "InvalidAuthToken" in out or "AuthenticationError" in out, out[-2000:]

        allowed = _client(address, elsewhere, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        assert allowed.returncode == 0, (allowed.stdout + allowed.stderr)[-2000:]
        assert "ANSWER 42" in allowed.stdout
    assert not ray.is_initialized()


def test_token_path_that_names_no_file_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``RAY_AUTH_TOKEN_PATH`` naming a missing file is an error naming the variable (Ray would otherwise make a
    token elsewhere), before any Ray process starts."""
    from pcrl.ray_local import RayAuthError, start_local_ray

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(RayAuthError, match=r"RAY_AUTH_TOKEN_PATH=.*missing: no such file"):
        start_local_ray(num_cpus=1)
    assert not ray.is_initialized()
