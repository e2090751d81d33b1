# Shared set-up for scripts/run and scripts/test: Debian peers and the project's .venv.
# Sourced, not executed. Idempotent: a second run installs nothing.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

log() { printf '[modelnode] %s\n' "$*" >&2; }

# ensure_debian_packages PKG:COMMAND ... — install PKG when COMMAND is missing.
ensure_debian_packages() {
    local missing=() spec pkg cmd
    for spec in "$@"; do
        pkg="${spec%%:*}"; cmd="${spec#*:}"
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
            missing+=("$pkg")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            log "missing Debian packages ${missing[*]} and not root: install them, then rerun"; return 1
        fi
    fi
    log "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The orthanc package starts a system instance on 4242/8042; tests start their own.
    if [[ " ${missing[*]} " == *" orthanc "* ]] && command -v systemctl >/dev/null 2>&1; then
        $sudo systemctl stop orthanc >/dev/null 2>&1 || true
    fi
}

# ensure_venv EXTRAS — create .venv and install the project (with EXTRAS, e.g. "test") when
# setup.cfg changed since the last install.
ensure_venv() {
    local extras="${1:-}" spec="." stamp
    [ -n "$extras" ] && spec=".[$extras]"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        "$PYTHON_BIN" -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    fi
    stamp="$VENV/.installed-$(sha256sum "$REPO_ROOT/setup.cfg" | cut -c1-16)-${extras:-base}"
    if [ ! -f "$stamp" ]; then
        log "installing modelnode${extras:+[$extras]} into $VENV"
        (cd "$REPO_ROOT" && "$VENV/bin/pip" install -q -e "$spec" 2>&1 | grep -v "is ignored" >&2 || true)
        "$VENV/bin/python" -c "import node, iods, models" || { log "install failed"; return 1; }
        touch "$stamp"
    fi
}
