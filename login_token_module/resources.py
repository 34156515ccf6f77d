"""The module's web resources: the get_token endpoint, at each of its paths.

(The reference host's own resources, ``/login`` and the rest, are in
``host/resources.py``.) A resource reads the request and hands it to a job:
``GetTokenResource`` to :meth:`Issuing.issue_token <login_token_module.issuing.Issuing.issue_token>`,
the ``Pair*Resource`` classes to :class:`~login_token_module.pairing.Pairings`.
"""

from __future__ import annotations

from twisted.web.server import Request

from login_token_module.api import JsonDict, ModuleApi
from login_token_module.http import JsonResource, client_address, parse_json_object
from login_token_module.issuing import Issuing
from login_token_module.pairing import Pairings

STABLE_PATH = "/_matrix/client/v1/login/get_token"
# MSC3882 revision 0: the first unstable path, answering `expires_in` in seconds.
UNSTABLE_R0_PATH = "/_matrix/client/unstable/org.matrix.msc3882/login/token"
UNSTABLE_R1_PATH = "/_matrix/client/unstable/org.matrix.msc3882/login/get_token"
# Each path with its MSC3882 revision.
GET_TOKEN_PATHS = ((STABLE_PATH, 1), (UNSTABLE_R1_PATH, 1), (UNSTABLE_R0_PATH, 0))


class GetTokenResource(JsonResource):
    def __init__(
        self, issuing: Issuing, api: ModuleApi, path: str, revision: int, *, revokes_on_logout: bool
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._issuing = issuing
        self._api = api
        self._path = path
        self._revision = revision
        self._revokes_on_logout = revokes_on_logout

    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        api = self._api
        requester = await api.get_user_by_req(request)
        body = parse_json_object(request, allow_empty=True)
        device_id = requester.device_id

        async def still_signed_in() -> bool:
            assert device_id is not None
            return await api.is_device_signed_in(requester.user_id, device_id)

        token, lifetime_ms = await self._issuing.issue_token(
            requester,
            body,
            self._path,
            client_address(request),
            # Only where a logout revokes tokens does a logout racing the mint revoke this one.
            still_signed_in if self._revokes_on_logout and device_id is not None else None,
        )
        response: JsonDict = {"login_token": token, "expires_in_ms": lifetime_ms}
        if self._revision == 0:
            response["expires_in"] = lifetime_ms // 1000
        return 200, response


def _query_arg(request: Request, name: bytes) -> object:
    values = request.args.get(name) if request.args else None
    if not values:
        return None
    if len(values) != 1:
        return None
    return values[0].decode("utf-8", "replace")


class PairStartResource(JsonResource):
    """``pair/start``: the new device begins (no access token)."""

    def __init__(self, pairings: Pairings) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._pairings = pairings

    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        body = parse_json_object(request, allow_empty=True)
        return 200, await self._pairings.start(body, client_address(request))


class PairPollResource(JsonResource):
    """``pair/poll``: the new device asks whether it was approved (its pairing_id is its proof)."""

    def __init__(self, pairings: Pairings) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._pairings = pairings

    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        body = parse_json_object(request)
        return 200, await self._pairings.poll(body, client_address(request))


class PairApproveResource(JsonResource):
    """``pair/approve``: a signed-in device sees what asks (GET), then approves it after UIA (POST)."""

    def __init__(self, pairings: Pairings, api: ModuleApi, *, revokes_on_logout: bool) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._pairings = pairings
        self._api = api
        self._revokes_on_logout = revokes_on_logout

    async def on_GET(self, request: Request) -> tuple[int, JsonDict]:
        requester = await self._api.get_user_by_req(request)
        code = _query_arg(request, b"user_code")
        return 200, await self._pairings.describe(requester, code, client_address(request))

    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        api = self._api
        requester = await api.get_user_by_req(request)
        body = parse_json_object(request)
        device_id = requester.device_id

        async def still_signed_in() -> bool:
            assert device_id is not None
            return await api.is_device_signed_in(requester.user_id, device_id)

        return 200, await self._pairings.approve(
            requester,
            body,
            client_address(request),
            still_signed_in if self._revokes_on_logout and device_id is not None else None,
        )


class PairDenyResource(JsonResource):
    """``pair/deny``: a signed-in device refuses a code."""

    def __init__(self, pairings: Pairings, api: ModuleApi) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._pairings = pairings
        self._api = api

    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        requester = await self._api.get_user_by_req(request)
        body = parse_json_object(request)
        return 200, await self._pairings.deny(requester, body, client_address(request))
