"""Real Synapse for tests: a Synapse process with the module, behind a real reverse proxy.

Synapse is the pinned release in its own virtualenv, installed by
``benchmarks/servers.py`` (the same code the benchmarks use), started as
``python -m synapse.app.homeserver -c FILE`` with the module in its
``modules:`` list. In front of it runs nginx (or Caddy) with the very blocks
docs/synapse.md tells operators to paste, so the tests also prove those
blocks work.

When ``CI`` is set, a missing piece (Synapse, nginx, Caddy) fails the test;
elsewhere the test is skipped with a message saying what is missing.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import hmac
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import servers
from tests.external import missing
from tests.helpers import Response, call
from tests.watchdog import Watchdog, watch

ROOT = Path(__file__).resolve().parent.parent
SERVER_NAME = servers.SERVER_NAME
LOGIN = "/_matrix/client/v3/login"
CAPABILITIES = "/_matrix/client/v3/capabilities"
WHOAMI = "/_matrix/client/v3/account/whoami"
STABLE = "/_matrix/client/v1/login/get_token"
UNSTABLE_R1 = "/_matrix/client/unstable/org.matrix.msc3882/login/get_token"
UNSTABLE_R0 = "/_matrix/client/unstable/org.matrix.msc3882/login/token"
SPEC_PATHS = (STABLE, UNSTABLE_R1, UNSTABLE_R0)
# Where Synapse serves them (the reverse proxy rewrites to these).
MODULE_PREFIX = "/_synapse/client/login_token/"
# get_token where Synapse serves it, for tests that talk to Synapse without the proxy.
MODULE_STABLE = MODULE_PREFIX + STABLE.removeprefix("/_matrix/client/")
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def find_program(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SBIN)
    if found is None:
        missing(f"{name} is not installed (.ci/run installs it with apt-get)")
    return found


@functools.cache
def _synapse() -> tuple[Path | None, str]:
    return servers.ensure_synapse(lambda message: print(message, flush=True))


def synapse_python() -> Path:
    python, detail = _synapse()
    if python is None:
        missing(f"Synapse is not available: {detail}")
    return python


@functools.cache
def _template() -> Path:
    """Synapse's generated files, made once per test run and copied for each Synapse."""
    directory = Path(tempfile.mkdtemp(prefix="synapse-template-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    servers.generate_synapse_files(synapse_python(), directory)
    return directory


# -- HTTP ------------------------------------------------------------------------


@dataclass
class Client:
    """A client talking to one base URL (the proxy, or Synapse directly)."""

    base_url: str

    def post(self, path: str, body: Any = None, access_token: str | None = None) -> Response:
        return call(self.base_url, "POST", path, body, access_token)

    def get(self, path: str, access_token: str | None = None) -> Response:
        return call(self.base_url, "GET", path, None, access_token)

    def login(self, localpart: str, password: str) -> Response:
        identifier = {"type": "m.id.user", "user": localpart}
        return self.post(LOGIN, {"type": "m.login.password", "identifier": identifier, "password": password})

    def access_token(self, localpart: str, password: str) -> str:
        response = self.login(localpart, password)
        assert response.code == 200, response
        return str(response.json["access_token"])

    def challenge(self, access_token: str, path: str = STABLE) -> str:
        """Ask for a token with no auth: the UIA 401; returns its session."""
        response = self.post(path, {}, access_token)
        assert response.code == 401, response
        assert response.json["flows"] == [{"stages": ["m.login.password"]}], response
        assert "errcode" not in response.json, response
        return str(response.json["session"])

    def answer(self, access_token: str, session: str | None, password: str, path: str = STABLE) -> Response:
        auth: dict[str, Any] = {"type": "m.login.password", "password": password}
        if session is not None:
            auth["session"] = session
        return self.post(path, {"auth": auth}, access_token)

    def get_login_token(self, access_token: str, password: str, path: str = STABLE) -> str:
        response = self.answer(access_token, self.challenge(access_token, path), password, path)
        assert response.code == 200, response
        return str(response.json["login_token"])

    def token_login(self, token: str) -> Response:
        return self.post(LOGIN, {"type": "m.login.token", "token": token})


# -- Synapse -----------------------------------------------------------------------


@dataclass
class Synapse:
    server: servers.ServerProcess
    shared_secret: str
    directory: Path
    metrics_port: int | None = None
    # Kills Synapse if the test process dies without stop().
    watchdog: Watchdog | None = None

    @property
    def direct(self) -> Client:
        """Synapse itself, without the reverse proxy."""
        return Client(self.server.base_url)

    @property
    def port(self) -> int:
        return self.server.port

    def register(self, localpart: str, password: str, *, admin: bool = False) -> str:
        """Create a user through Synapse's shared-secret admin API (Synapse hashes the password)."""
        return str(self._register(localpart, password, admin=admin).json["user_id"])

    def register_signed_in(self, localpart: str, password: str) -> str:
        """Create a user as :meth:`register` does; returns the access token Synapse gives that
        registration (a way in that needs no password login)."""
        return str(self._register(localpart, password, admin=False).json["access_token"])

    def _register(self, localpart: str, password: str, *, admin: bool) -> Response:
        nonce = self.direct.get("/_synapse/admin/v1/register").json["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        role = b"admin" if admin else b"notadmin"
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), role]))
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        response = self.direct.post("/_synapse/admin/v1/register", body)
        assert response.code == 200, response
        return response

    def log(self) -> str:
        return (self.directory / "synapse.log").read_text(errors="replace")

    def log_once_it_shows(self, *lines: str, timeout: float = 20) -> str:
        """The log, once every one of ``lines`` is in it.

        Synapse's generated log config writes through a buffer that flushes every
        few seconds (or every few records), so a line logged during a request
        may reach the file only after the response.
        """
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            missing = [line for line in lines if line not in log]
            if not missing:
                return log
            assert time.monotonic() < deadline, f"not in Synapse's log after {timeout} s: {missing}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.server.stop()
        if self.watchdog is not None:
            self.watchdog.release()
            self.watchdog = None


def synapse_metrics(synapse: Synapse) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert synapse.metrics_port is not None
    reply = call(f"http://127.0.0.1:{synapse.metrics_port}", "GET", "/_synapse/metrics")
    assert reply.code == 200, reply
    text = reply.body.decode() if isinstance(reply.body, bytes) else str(reply.body)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def transactions(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], desc: str) -> float:
    """How many database transactions named ``desc`` Synapse has counted."""
    return sum(
        value
        for (name, labels), value in metrics.items()
        if name.startswith("synapse_storage_transaction_time_count") and dict(labels).get("desc") == desc
    )


def synapse_config(
    directory: Path, module_config: dict[str, Any] | None, extra: dict[str, Any] | None = None
) -> tuple[Path, str]:
    python = synapse_python()
    return servers.synapse_config(
        python,
        directory,
        bcrypt_rounds=4,
        port=servers.free_port(),
        module_config=module_config,
        extra=extra,
        template=_template(),
    )


def start_synapse(
    directory: Path,
    module_config: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    *,
    metrics_port: int | None = None,
) -> Synapse:
    """A running Synapse with the module loaded with ``module_config`` (None: as ``extra`` says);
    with ``metrics_port``, Synapse's own metrics listener (``type: metrics``) there too."""
    config_path, secret = synapse_config(directory, module_config, extra)
    config = yaml.safe_load(config_path.read_text())
    if metrics_port is not None:
        config["enable_metrics"] = True
        config["listeners"].append({"type": "metrics", "port": metrics_port, "bind_addresses": ["127.0.0.1"]})
        config_path.write_text(yaml.safe_dump(config))
    port = int(config["listeners"][0]["port"])
    server = servers.start_synapse(synapse_python(), config_path, port)
    return Synapse(server, secret, directory, metrics_port, watch(pids=[server.pid]))


def synapse_refuses_to_start(
    directory: Path, module_config: dict[str, Any], extra: dict[str, Any] | None = None
) -> tuple[int, str]:
    """Run Synapse with this config until it exits; returns (exit code, what it printed)."""
    config_path, _ = synapse_config(directory, module_config, extra)
    try:
        done = subprocess.run(
            [str(synapse_python()), "-m", "synapse.app.homeserver", "-c", str(config_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=directory,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("Synapse started (or hung) with a config it should refuse")
    return done.returncode, done.stdout + done.stderr


# -- docs/synapse.md's blocks ---------------------------------------------------------


SYNAPSE_PAGE = ROOT / "docs" / "synapse.md"


def doc_block(language: str, index: int = 0) -> str:
    """The ``index``-th fenced block in ``language`` of docs/synapse.md."""
    text = SYNAPSE_PAGE.read_text()
    blocks = re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) > index, f"no ```{language} block #{index} in docs/synapse.md"
    return str(blocks[index])


# -- reverse proxies ----------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    # Kills the proxy if the test process dies without stop().
    watchdog: Watchdog | None = None

    def __post_init__(self) -> None:
        if self.watchdog is None:
            self.watchdog = watch(pids=[self.process.pid])

    @property
    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.watchdog is not None:
            self.watchdog.release()
            self.watchdog = None


def _wait_for_port(proxy: Proxy, log: Path, timeout: float = 30) -> Proxy:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.process.poll() is not None:
            break
        try:
            # Any HTTP answer means it listens; the proxy forwards this one to Synapse.
            call(proxy.client.base_url, "GET", "/_matrix/client/versions")
            return proxy
        except OSError:
            time.sleep(0.05)
    proxy.stop()
    raise RuntimeError(f"{proxy.name} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def upstream(block: str, synapse_port: int) -> str:
    """A doc block with its example upstream (localhost:8008) pointed at the test's Synapse."""
    assert "localhost:8008" in block, block
    return block.replace("localhost:8008", f"127.0.0.1:{synapse_port}")


def plain_http_site(site: str, port: int) -> str:
    """The documented nginx ``server {}`` (TLS on 443 for matrix.example.com) as plain HTTP on
    127.0.0.1:``port``: its listen and certificate lines swapped, every ``location`` as written."""
    tls_lines = [
        "listen 443 ssl;",
        "listen [::]:443 ssl;",
        "server_name matrix.example.com;",
        "ssl_certificate /etc/letsencrypt/live/matrix.example.com/fullchain.pem;",
        "ssl_certificate_key /etc/letsencrypt/live/matrix.example.com/privkey.pem;",
    ]
    lines = site.splitlines()
    stripped = [line.strip() for line in lines]
    assert stripped[0] == "server {" and stripped[-1] == "}", site
    for expected in tls_lines:
        assert expected in stripped, f"docs/synapse.md's nginx site has no {expected!r}"
    kept = [line for line, bare in zip(lines, stripped, strict=True) if bare not in tls_lines]
    kept.insert(1, f"    listen 127.0.0.1:{port};\n    server_name localhost;")
    return "\n".join(kept)


WORKER_UPSTREAM_PORT = "localhost:8081"
MODULE_PROXY_PASS = "proxy_pass http://localhost:8008;"


def worker_site(site: str, main_port: int, worker_port: int) -> tuple[str, str]:
    """docs/synapse.md's site as a deployment with one worker does it: its upstream block
    (the main process and the worker), and the site with the module's ``location``
    sending to that upstream as the page says, and the pairing paths' ``location``
    added (the rest still to the main process)."""
    upstream_block = doc_block("nginx", 1)
    assert WORKER_UPSTREAM_PORT in upstream_block, upstream_block
    upstream_block = upstream(upstream_block, main_port).replace(
        WORKER_UPSTREAM_PORT, f"127.0.0.1:{worker_port}"
    )
    proxy_pass = doc_block("nginx", 2).strip().splitlines()[-1].strip()
    assert proxy_pass.startswith("proxy_pass http://") and proxy_pass.endswith(";"), proxy_pass
    # The first proxy_pass of the site is the module's location's.
    assert site.index(MODULE_PROXY_PASS) < site.index("# Synapse's usual location"), site
    site = site.replace(MODULE_PROXY_PASS, proxy_pass, 1)
    # The pairing paths' location, placed in the site as the page says (anywhere in it).
    pairing = doc_block("nginx", 3)
    assert "location ^~ /_synapse/client/login_token/pair" in pairing, pairing
    usual = site.index("    # Synapse's usual location")
    return upstream_block, site[:usual] + pairing + "\n" + site[usual:]


def start_nginx(directory: Path, synapse_port: int, *, worker_port: int | None = None) -> Proxy:
    """nginx in the foreground, as the current user, serving docs/synapse.md's nginx site;
    with ``worker_port``, the module's paths go to the main process and that worker as the
    page's worker section says. The access log names the upstream of each request."""
    nginx = find_program("nginx")
    directory.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    site = doc_block("nginx")
    upstreams = ""
    if worker_port is not None:
        upstreams, site = worker_site(site, synapse_port, worker_port)
    config = f"""
daemon off;
master_process off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$upstream_addr $status $request_uri';
    access_log {directory}/access.log upstreams;
{upstreams}
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
{plain_http_site(upstream(site, synapse_port), port)}
}}
"""
    config_path = directory / "nginx.conf"
    config_path.write_text(config)
    log = directory / "stdout.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [nginx, "-p", str(directory), "-c", str(config_path), "-e", str(directory / "error.log")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return _wait_for_port(Proxy("nginx", process, port, directory), directory / "error.log")


def start_caddy(directory: Path, synapse_port: int) -> Proxy:
    """Caddy in the foreground serving docs/synapse.md's Caddyfile block (plain HTTP, no admin API)."""
    caddy = find_program("caddy")
    directory.mkdir(parents=True, exist_ok=True)
    port = servers.free_port()
    site = upstream(doc_block("caddyfile"), synapse_port)
    assert "matrix.example.com" in site, site
    site = site.replace("matrix.example.com", f"http://127.0.0.1:{port}")
    config_path = directory / "Caddyfile"
    config_path.write_text("{\n\tadmin off\n}\n\n" + site)
    log = directory / "caddy.log"
    env = {
        **os.environ,
        "HOME": str(directory),
        "XDG_DATA_HOME": str(directory / "data"),
        "XDG_CONFIG_HOME": str(directory / "config"),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [caddy, "run", "--config", str(config_path), "--adapter", "caddyfile"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return _wait_for_port(Proxy("caddy", process, port, directory), log)


def unique(prefix: str, counter: Iterator[int]) -> str:
    """A fresh localpart, so tests sharing one Synapse never share a user."""
    return f"{prefix}{next(counter)}"
