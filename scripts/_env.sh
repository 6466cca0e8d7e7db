# Shared set-up for the scripts: create .venv if absent (reuse it when present) and install the
# project with the requested extras, pinned by constraints.txt: the resolved set the test suite
# passed with on a fresh machine, so a new upstream release cannot break a fresh install.
# Re-installs when pyproject.toml, the constraints or the extras change.
#   LLAVA_SMOE_CONSTRAINTS=none   no pins: upgrade to the newest releases the lower bounds allow
#   LLAVA_SMOE_CONSTRAINTS=FILE   pin with another constraints file
# Refresh constraints.txt with scripts/refresh_constraints.sh.
# Usage (sourced): ensure_venv EXTRAS   e.g. ensure_venv dev,eval

ensure_venv() {
    local extras="$1"
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local venv="${LLAVA_SMOE_VENV:-$root/.venv}"
    local python="${PYTHON:-python3}"
    local constraints="${LLAVA_SMOE_CONSTRAINTS-$root/constraints.txt}"
    local pins mode
    if [ -z "$constraints" ] || [ "$constraints" = none ]; then
        pins=(--upgrade --upgrade-strategy eager)
        mode="unpinned"
    else
        [ -f "$constraints" ] || {
            echo "error: constraints file $constraints not found (LLAVA_SMOE_CONSTRAINTS=none installs without pins)" >&2
            return 1
        }
        pins=(--constraint "$constraints")
        mode="pinned by $(cat "$constraints" | sha256sum | cut -c1-16)"
    fi
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
            echo "error: Python >= 3.10 is required (found $("$python" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2
            return 1
        }
        echo "==> creating $venv"
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
    fi
    local stamp="$venv/.llava-smoe-installed"
    local want
    want="$(sha256sum < "$root/pyproject.toml" | cut -c1-16) [$extras] $mode"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "==> installing llava-smoe[$extras] into $venv ($mode; first time: torch and friends, a few minutes)"
        "$venv/bin/python" -m pip install --quiet "${pins[@]}" --editable "$root[$extras]"
        echo "$want" > "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}

# The browser tests (Gradio page) drive the distribution's Chromium through Playwright.
ensure_browser() {
    if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    fi
}
