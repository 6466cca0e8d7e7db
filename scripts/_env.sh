# Shared set-up for the scripts: create .venv if absent (reuse it when present) and install the
# project with the requested extras. Re-installs only when pyproject.toml or the extras change.
# Usage (sourced): ensure_venv EXTRAS   e.g. ensure_venv dev,eval

ensure_venv() {
    local extras="$1"
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local venv="$root/.venv"
    local python="${PYTHON:-python3}"
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
    want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) [$extras]"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "==> installing llava-smoe[$extras] into $venv (first time: torch and friends, a few minutes)"
        "$venv/bin/python" -m pip install --quiet --editable "$root[$extras]"
        echo "$want" > "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}
