"""A plain OAuth2 identity provider on loopback, for Synapse's single sign-on in tests.

Three endpoints, as Synapse's ``oidc_providers`` uses them without the
``openid`` scope (so no ID token to sign): ``/authorize`` signs in whoever
``signed_in`` names at once and redirects back with a one-time code,
``/token`` trades the code (with the client's secret) for an access token, and
``/userinfo`` says who that token belongs to.
"""

from __future__ import annotations

import json
import secrets
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CLIENT_ID = "synapse"
CLIENT_SECRET = secrets.token_urlsafe(16)


@dataclass
class OAuthProvider:
    server: ThreadingHTTPServer
    signed_in: dict[str, str] = field(default_factory=dict)  # the user who "logs in" at /authorize
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)
    authorizations: int = 0

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def synapse_config(self, idp_id: str = "loopback") -> dict[str, Any]:
        """Synapse's ``oidc_providers`` entry for this provider."""
        return {
            "idp_id": idp_id,
            "idp_name": "Loopback",
            "discover": False,
            "skip_verification": True,  # plain HTTP on loopback
            "issuer": self.base_url + "/",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "client_auth_method": "client_secret_post",
            "scopes": ["profile"],
            "authorization_endpoint": self.base_url + "/authorize",
            "token_endpoint": self.base_url + "/token",
            "userinfo_endpoint": self.base_url + "/userinfo",
            "user_profile_method": "userinfo_endpoint",
            "user_mapping_provider": {
                "config": {"subject_claim": "sub", "localpart_template": "{{ user.preferred_username }}"}
            },
        }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_oauth_provider() -> OAuthProvider:
    provider: OAuthProvider

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return None

        def _json(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            if url.path == "/authorize":
                if query.get("client_id") != CLIENT_ID or not provider.signed_in:
                    self._json(400, {"error": "invalid_request"})
                    return
                provider.authorizations += 1
                code = secrets.token_urlsafe(16)
                provider.codes[code] = dict(provider.signed_in)
                back = {"code": code, "state": query.get("state", "")}
                self.send_response(302)
                self.send_header("Location", query["redirect_uri"] + "?" + urllib.parse.urlencode(back))
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif url.path == "/userinfo":
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                user = provider.tokens.get(token)
                if user is None:
                    self._json(401, {"error": "invalid_token"})
                else:
                    self._json(200, user)
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            if self.path != "/token" or form.get("client_secret") != CLIENT_SECRET:
                self._json(401, {"error": "invalid_client"})
                return
            user = provider.codes.pop(form.get("code", ""), None)
            if user is None:
                self._json(400, {"error": "invalid_grant"})
                return
            token = secrets.token_urlsafe(16)
            provider.tokens[token] = user
            self._json(200, {"access_token": token, "token_type": "Bearer"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    provider = OAuthProvider(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return provider
