"""``login-token-module pair`` against a running reference host (a child process):
the code and QR code shown, approval by a signed-in device, the credentials
file (0600, never printed), and the QR code decoded back to the URL by a real
decoder (Debian's zbarimg) from the PNG segno rendered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from login_token_module.pairing import APPROVE_PATH, DENY_PATH
from tests.helpers import (
    PASSWORD,
    ChildServer,
    Launcher,
    access_token,
    cli,
    homeserver_yaml,
    register,
    sync_call,
    write_config,
)

CODE_LINE = re.compile(r"approve the code ([A-Z]{4}-[A-Z]{4})")
WHOAMI = "/_matrix/client/v3/account/whoami"


@pytest.fixture
def server(tmp_path: Path, launch: Launcher) -> ChildServer:
    raw = homeserver_yaml(
        tmp_path,
        {"store": {"type": "sqlite", "path": "tokens.db"}, "pairing": {"enabled": True, "interval_ms": 100}},
    )
    path = write_config(tmp_path, raw)
    register(path)
    return launch(path)


@pytest.fixture
def pair_process(tmp_path: Path, server: ChildServer) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "login_token_module.host.cli",
            "pair",
            "--homeserver",
            server.base_url,
            "--device-name",
            "Build bot",
            "--credentials",
            str(tmp_path / "credentials.json"),
            "--qr-png",
            str(tmp_path / "qr.png"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.wait(10)


def read_code(process: subprocess.Popen[str]) -> tuple[str, list[str]]:
    """The code the command shows, and the lines it printed up to then."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, f"the command ended: {lines} {process.stderr.read() if process.stderr else ''}"
        lines.append(line)
        if "Waiting for approval" in line:
            match = CODE_LINE.search("".join(lines))
            assert match is not None, lines
            return match.group(1), lines
    pytest.fail(f"no code shown: {lines}")


def approve(base: str, code: str, token: str) -> None:
    status, challenge = sync_call(base, "POST", APPROVE_PATH, {"user_code": code}, token)
    assert status == 401, challenge
    auth = {"type": "m.login.password", "password": PASSWORD, "session": challenge["session"]}
    status, approved = sync_call(base, "POST", APPROVE_PATH, {"user_code": code, "auth": auth}, token)
    assert status == 200 and approved["initial_device_display_name"] == "Build bot", approved


def test_pair_signs_in_and_writes_private_credentials(
    tmp_path: Path, server: ChildServer, pair_process: subprocess.Popen[str]
) -> None:
    code, shown = read_code(pair_process)
    printed = "".join(shown)
    page = f"{server.base_url}/_synapse/client/login_token/pair"
    assert page in printed
    # A QR code in the terminal: rows of block characters.
    assert sum(1 for line in shown if set(line.strip()) <= set("█▀▄ ") and len(line.strip()) > 20) > 10

    # The PNG the same library rendered decodes, with a real decoder, to the complete URL.
    if shutil.which("zbarimg") is None:
        if os.environ.get("CI"):
            pytest.fail("zbarimg (zbar-tools) is required under CI")
    else:
        decoded = subprocess.run(
            ["zbarimg", "--quiet", "--raw", str(tmp_path / "qr.png")],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        assert decoded == f"{page}?code={code}"

    approve(server.base_url, code, access_token(server.base_url))
    out, err = pair_process.communicate(timeout=30)
    assert pair_process.returncode == 0, err

    credentials_file = tmp_path / "credentials.json"
    assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
    credentials = json.loads(credentials_file.read_text())
    assert set(credentials) == {"homeserver", "user_id", "device_id", "access_token"}
    assert credentials["homeserver"] == server.base_url
    assert credentials["user_id"] == "@alice:test.local"
    assert f"Signed in as @alice:test.local, device {credentials['device_id']}" in out
    # The access token is written, never printed.
    assert credentials["access_token"] not in printed + out + err
    status, whoami = sync_call(server.base_url, "GET", WHOAMI, access_token=credentials["access_token"])
    assert status == 200 and whoami["device_id"] == credentials["device_id"], whoami
    assert not list(tmp_path.glob(".credentials-*"))

    # The operators' history shows the new device, paired.
    history = cli("tokens", "history", "-c", str(tmp_path / "homeserver.yaml"), "--user", "alice")
    assert history.returncode == 0, history.stderr
    last = history.stdout.strip().splitlines()[-1].split()
    assert last[-2:] == ["pairing", credentials["device_id"]], history.stdout


def test_a_denied_pair_says_so_in_one_line_and_writes_nothing(
    tmp_path: Path, server: ChildServer, pair_process: subprocess.Popen[str]
) -> None:
    code, _ = read_code(pair_process)
    status, body = sync_call(
        server.base_url, "POST", DENY_PATH, {"user_code": code}, access_token(server.base_url)
    )
    assert status == 200, body
    _, err = pair_process.communicate(timeout=30)
    assert pair_process.returncode == 1
    assert err.strip().splitlines() == ["login-token-module: the code was denied on the approving device"]
    assert not (tmp_path / "credentials.json").exists()


def test_pair_against_a_homeserver_without_pairing_is_one_line(tmp_path: Path, launch: Launcher) -> None:
    path = write_config(tmp_path, homeserver_yaml(tmp_path))
    server = launch(path)
    result = cli("pair", "--homeserver", server.base_url, "--credentials", str(tmp_path / "c.json"))
    assert result.returncode == 1
    assert "does not offer pairing" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for bad in ("matrix.example.org", "ftp://x", "http://a b"):
        result = cli("pair", "--homeserver", bad, "--credentials", str(tmp_path / "c.json"))
        assert result.returncode == 1 and "--homeserver" in result.stderr, result.stderr
    result = cli("pair", "--homeserver", server.base_url, "--credentials", str(tmp_path / "no" / "c.json"))
    assert result.returncode == 1 and "does not exist" in result.stderr, result.stderr
