# Sourced by the scripts: puts the project's pinned tools first on PATH.
# node_modules/.bin comes before anything else so that wasm-opt is binaryen's from npm, never Debian's.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$ROOT/node_modules/.bin:$ROOT/.tools/cargo/bin:$PATH"
export CHROMEDRIVER=${CHROMEDRIVER:-/usr/bin/chromedriver}
# Chromium's background services try the network, which is closed here; the runner reads webdriver.json.
export WASM_BINDGEN_TEST_TIMEOUT=${WASM_BINDGEN_TEST_TIMEOUT:-600}
