// A second device signs in with a login token, through matrix-js-sdk's own calls.
//
// Usage: node sign_in_with_token.mjs BASE_URL USER PASSWORD
//
// Prints one line of JSON with what the library saw; tests/test_matrix_js_sdk.py
// checks it (and checks the server over HTTP itself). Exits non-zero on any
// unexpected error.
import { createClient, GET_LOGIN_TOKEN_CAPABILITY } from "matrix-js-sdk";
import { logger } from "matrix-js-sdk/lib/logger.js";

const [baseUrl, user, password] = process.argv.slice(2);
logger.setLevel("silent"); // stdout carries only the JSON result

// The error a call is expected to end with, as {status, errcode, data}.
async function refusal(call) {
    try {
        const result = await call();
        return { status: 200, unexpected: result };
    } catch (error) {
        return { status: error.httpStatus, errcode: error.errcode ?? null, data: error.data };
    }
}

// What the server offers, as a client deciding whether to show the feature reads it.
const anonymous = createClient({ baseUrl });
const { flows } = await anonymous.loginFlows();
const loginFlow = flows.find((flow) => flow.type === "m.login.token") ?? null;

// The existing device signs in with its password.
const identifier = { type: "m.id.user", user };
const first = await anonymous.loginRequest({
    type: "m.login.password",
    identifier,
    password,
    initial_device_display_name: "js-sdk old device",
});
const oldDevice = createClient({
    baseUrl,
    accessToken: first.access_token,
    userId: first.user_id,
    deviceId: first.device_id,
});
const capability = GET_LOGIN_TOKEN_CAPABILITY.findIn(await oldDevice.getCapabilities()) ?? null;

// requestLoginToken without auth: the server answers 401 with a UIA session ...
const challenge = await refusal(() => oldDevice.requestLoginToken());
// ... and again with the password in that session: the token.
const issued = await oldDevice.requestLoginToken({
    type: "m.login.password",
    identifier,
    password,
    session: challenge.data?.session,
});

// The new device signs in with the token alone, then asks who it is.
const newDevice = createClient({ baseUrl });
const second = await newDevice.loginWithToken(issued.login_token);
const whoami = await newDevice.whoami();

// The token is single-use: a third client trying it again is refused.
const replay = await refusal(() => createClient({ baseUrl }).loginWithToken(issued.login_token));

console.log(
    JSON.stringify({
        login_flow: loginFlow,
        capability,
        challenge: { status: challenge.status, flows: challenge.data?.flows, session: challenge.data?.session },
        issued,
        old_device: { user_id: first.user_id, device_id: first.device_id, access_token: first.access_token },
        new_device: { user_id: second.user_id, device_id: second.device_id, access_token: second.access_token },
        whoami,
        replay: { status: replay.status, errcode: replay.errcode },
    }),
);
