# shellcheck shell=bash
# Shared by scripts/test and scripts/demo (source it): moves to the repository root, installs missing
# system packages, creates .venv and keeps the editable install in step with setup.cfg/pyproject.toml.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 1

VENV="$REPO_ROOT/.venv"
INSTALL_STAMP="$VENV/.install-stamp"
# Debian keeps daemons such as sshd and mariadbd in sbin, which a non-root PATH often lacks.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" ;; esac

# shellcheck disable=SC2034 # the colours are used by the scripts that source this file
if [[ -t 1 ]]; then
    BOLD=$'\e[1m' RED=$'\e[31m' GREEN=$'\e[32m' RESET=$'\e[0m'
else
    BOLD='' RED='' GREEN='' RESET=''
fi

missing_packages=()

say() { printf '%s==> %s%s\n' "$BOLD" "$*" "$RESET"; }
die() { printf '%serror:%s %s\n' "$RED" "$RESET" "$*" >&2; exit 1; }

# need_binary BINARY APT_PACKAGE: remember the package when the binary is not installed.
need_binary() {
    command -v "$1" >/dev/null 2>&1 || missing_packages+=("$2")
}

# The first of python3.11 and python3 that is at least 3.11.
pick_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

venv_is_usable() {
    [[ -x "$VENV/bin/python" ]] &&
        "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# Remember the packages needed to create the venv (Debian splits venv/ensurepip out of python3.x).
need_python() {
    venv_is_usable && return 0
    local python version
    if ! python="$(pick_python)"; then
        missing_packages+=(python3.11 python3.11-venv)
        return 0
    fi
    if ! "$python" -c 'import ensurepip' 2>/dev/null; then
        version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        missing_packages+=("python$version-venv")
    fi
}

# Install what need_* found missing: apt-get update once, then one install; as non-root, say what to run.
install_missing_packages() {
    ((${#missing_packages[@]})) || return 0
    local packages log
    packages="$(printf '%s\n' "${missing_packages[@]}" | sort -u | tr '\n' ' ')"
    packages="${packages% }"
    if [[ $EUID -ne 0 ]]; then
        die "missing system packages; install them with: sudo apt-get install -y $packages"
    fi
    command -v apt-get >/dev/null 2>&1 || die "no apt-get here; install these packages by hand: $packages"
    say "apt-get install $packages"
    log="$(mktemp)"
    # shellcheck disable=SC2086 # $packages is a list of words on purpose
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get failed"
    fi
    rm -f "$log"
    missing_packages=()
}

# Create .venv with Python >= 3.11 unless a usable one exists.
ensure_venv() {
    venv_is_usable && return 0
    local python
    python="$(pick_python)" || die "Python 3.11 or newer is needed (python3.11 or python3)"
    say "create .venv with $("$python" --version)"
    rm -rf "$VENV"
    "$python" -m venv "$VENV" || die "could not create .venv"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip || die "could not upgrade pip"
}

install_hash() {
    cat setup.cfg pyproject.toml 2>/dev/null | sha256sum | cut -d' ' -f1
}

# pip install -e '.[test]' when setup.cfg or pyproject.toml changed since the last install.
ensure_installed() {
    local wanted
    wanted="$(install_hash)"
    [[ -f "$INSTALL_STAMP" && "$(cat "$INSTALL_STAMP")" == "$wanted" ]] && return 0
    say "pip install -e '.[test]'"
    PIP_ROOT_USER_ACTION=ignore "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' ||
        die "pip install -e '.[test]' failed"
    echo "$wanted" >"$INSTALL_STAMP"
}

# Everything a script needs before it runs project commands; ends with the venv first on PATH.
prepare_venv() {
    need_python
    install_missing_packages
    ensure_venv
    ensure_installed
    export VIRTUAL_ENV="$VENV"
    export PATH="$VENV/bin:$PATH"
}
