#!/usr/bin/env bash
# Installs klipper-encprint into an existing Klipper + Moonraker setup.
# Idempotent: running it again changes nothing. uninstall.sh reverses it.
set -eu

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KLIPPER="$HOME/klipper"
KLIPPY_ENV="$HOME/klippy-env"
MOONRAKER="$HOME/moonraker"
MOONRAKER_ENV="$HOME/moonraker-env"
DATA="$HOME/printer_data"
IDENTITY="$HOME/.config/encprint/printer.key"
KLIPPER_SERVICE="klipper"
MOONRAKER_SERVICE="moonraker"
RESTART=1
# Where release binaries are downloaded from (a release dir per tag); the
# tests point it at a local file:// folder.
RELEASE_URL="${ENCPRINT_RELEASE_URL:-https://github.com/klipper-encprint/encprint/releases/download}"

usage() {
    cat <<EOF
Usage: install.sh [options]

Installs encrypted G-code printing: links the Klipper extra and the Moonraker
component, installs msgpack into Moonraker's virtualenv, builds the helper
with Go (a checkout of a release tag without Go downloads that release's
binaries and checks their SHA-256 instead), creates the printer identity,
adds the config sections, and restarts Klipper and Moonraker.

Options (defaults in brackets):
  --klipper DIR          Klipper checkout [$KLIPPER]
  --klippy-env DIR       Klipper's virtualenv [$KLIPPY_ENV]
  --moonraker DIR        Moonraker checkout [$MOONRAKER]
  --moonraker-env DIR    Moonraker's virtualenv [$MOONRAKER_ENV]
  --data DIR             printer data folder [$DATA]
  --instance N           KIAUH multi-instance: data ~/printer_N_data,
                         services klipper-N and moonraker-N
  --identity FILE        printer identity [$IDENTITY]
  --no-restart           do not restart the services
  -h, --help             this text
EOF
}

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --klipper) KLIPPER="$2"; shift ;;
            --klippy-env) KLIPPY_ENV="$2"; shift ;;
            --moonraker) MOONRAKER="$2"; shift ;;
            --moonraker-env) MOONRAKER_ENV="$2"; shift ;;
            --data) DATA="$2"; shift ;;
            --instance)
                DATA="$HOME/printer_$2_data"
                KLIPPER_SERVICE="klipper-$2"; MOONRAKER_SERVICE="moonraker-$2"; shift ;;
            --identity) IDENTITY="$2"; shift ;;
            --no-restart) RESTART=0 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option $1" ;;
        esac
        shift
    done
}

check_user() {
    if [ "$(id -u)" -eq 0 ]; then
        die "do not run install.sh as root: run it as the user that runs Klipper and Moonraker (it uses sudo only to restart them)"
    fi
}

check_sudo() {  # say once what passwordless sudo means for this printer
    local me
    me=$(id -un 2>/dev/null || id -u)
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        step "Note: $me can use sudo without a password"
        info "Klipper's macro templates run code as $me, so anyone who can add a macro"
        info "(by default anyone on the network with the web UI) is root on this printer."
        info "To require a password: remove the NOPASSWD rule for $me (sudo visudo -f"
        info "/etc/sudoers.d/010_pi-nopasswd on Raspberry Pi OS) and set one with passwd."
        info "Moonraker's update manager then asks for the sudo password in the UI."
    fi
}

check_layout() {
    step "Checking the installation"
    [ -d "$KLIPPER/klippy" ] || die "no Klipper checkout at $KLIPPER (expected $KLIPPER/klippy); use --klipper DIR"
    [ -d "$MOONRAKER/moonraker/components" ] || die "no Moonraker checkout at $MOONRAKER (expected $MOONRAKER/moonraker/components); use --moonraker DIR"
    [ -x "$MOONRAKER_ENV/bin/python" ] || die "no Moonraker virtualenv at $MOONRAKER_ENV; use --moonraker-env DIR"
    [ -f "$DATA/config/moonraker.conf" ] || die "no $DATA/config/moonraker.conf; use --data DIR (or --instance N for KIAUH multi-instance)"
    [ -f "$DATA/config/printer.cfg" ] || die "no $DATA/config/printer.cfg; use --data DIR"
    if [ -d "$KLIPPER/klippy/plugins" ]; then
        EXTRA_DIR="$KLIPPER/klippy/plugins"   # Kalico
    else
        EXTRA_DIR="$KLIPPER/klippy/extras"
    fi
    info "Klipper:   $KLIPPER (extras in ${EXTRA_DIR#"$KLIPPER"/})"
    info "Moonraker: $MOONRAKER, virtualenv $MOONRAKER_ENV"
    info "data:      $DATA"
}

# exclude_in_git REPO PATH: keep the update manager from reporting our link
exclude_in_git() {
    local repo=$1 path=$2 exclude
    exclude="$repo/.git/info/exclude"
    [ -d "$repo/.git" ] || return 0
    mkdir -p "$repo/.git/info"
    touch "$exclude"
    grep -qxF "$path" "$exclude" || echo "$path" >> "$exclude"
}

link() {  # link SRC DST
    if [ -L "$2" ] && [ "$(readlink "$2")" = "$1" ]; then
        info "$2 already links to $1"
        return
    fi
    [ -e "$2" ] && [ ! -L "$2" ] && die "$2 exists and is not our link; move it away first"
    ln -sfn "$1" "$2"
    info "linked $2"
}

link_plugins() {
    step "Linking the Klipper extra and the Moonraker component"
    link "$REPO/klippy-extras/encrypted_file_bridge.py" "$EXTRA_DIR/encrypted_file_bridge.py"
    exclude_in_git "$KLIPPER" "${EXTRA_DIR#"$KLIPPER"/}/encrypted_file_bridge.py"
    link "$REPO/moonraker-component/encrypted_print.py" "$MOONRAKER/moonraker/components/encrypted_print.py"
    exclude_in_git "$MOONRAKER" "moonraker/components/encrypted_print.py"
}

install_requirements() {
    step "Installing the component's Python requirement into $MOONRAKER_ENV"
    "$MOONRAKER_ENV/bin/python" -m pip install -q --disable-pip-version-check \
        -r "$REPO/moonraker-component/requirements.txt"
    info "$(tr '\n' ' ' < "$REPO/moonraker-component/requirements.txt")installed"
}

go_ok() {  # a Go new enough for go.mod
    command -v go >/dev/null 2>&1 || return 1
    local want have
    want=$(sed -n 's/^go \([0-9]*\.[0-9]*\).*/\1/p' "$REPO/go.mod")
    have=$(go env GOVERSION 2>/dev/null | sed -n 's/^go\([0-9]*\.[0-9]*\).*/\1/p')
    [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" = "$want" ]
}

helper_arch() {
    case "$(uname -m)" in
        x86_64) echo amd64 ;;
        aarch64|arm64) echo arm64 ;;
        armv7l) echo armv7 ;;
        armv6l) echo armv6 ;;
        # Creality K1-class hosts are little-endian MIPS; byte 5 of an ELF
        # header is 1 for little-endian.
        mips) if [ "$(od -An -tx1 -j5 -N1 /bin/sh | tr -d ' ')" = 01 ]; then echo mipsle; else echo unknown; fi ;;
        *) echo unknown ;;
    esac
}

provision_helper() {
    step "Providing the helper (bin/encprint-helper) for $(uname -m)"
    if go_ok; then
        make -s -C "$REPO" build
        info "built with $(go env GOVERSION)"
        return
    fi
    local arch tag tmp
    arch=$(helper_arch)
    tag=$(git -C "$REPO" describe --tags --exact-match 2>/dev/null || true)
    if [ "$arch" = unknown ] || [ -z "$tag" ] || ! command -v curl >/dev/null 2>&1; then
        die "cannot build the helper: Go $(sed -n 's/^go //p' "$REPO/go.mod") or newer is needed (https://go.dev/dl), and no release binary fits (architecture $(uname -m), release tag '${tag:-none}'). Install Go, then run: $REPO/install.sh"
    fi
    # Removed on any exit, die included (a RETURN trap would outlive this
    # function and fire, with tmp unset, at the next function's return).
    DOWNLOAD_DIR=$(mktemp -d)
    trap 'rm -rf "$DOWNLOAD_DIR"' EXIT
    tmp=$DOWNLOAD_DIR
    for f in "encprint-helper-linux-$arch" "encprint-linux-$arch" SHA256SUMS; do
        curl -fsSL -o "$tmp/$f" "$RELEASE_URL/$tag/$f" || die "cannot download $f of release $tag; install Go and run $REPO/install.sh again"
    done
    # Both binaries must be listed, and both must match.
    [ "$(grep -cE " (encprint-helper|encprint)-linux-$arch\$" "$tmp/SHA256SUMS")" -eq 2 ] \
        || die "SHA256SUMS of release $tag does not list both binaries for $arch; do not use them"
    (cd "$tmp" && grep -E " (encprint-helper|encprint)-linux-$arch\$" SHA256SUMS | sha256sum -c --quiet -) \
        || die "checksum mismatch for the $tag release binaries; do not use them"
    mkdir -p "$REPO/bin"
    install -m 0755 "$tmp/encprint-helper-linux-$arch" "$REPO/bin/encprint-helper"
    install -m 0755 "$tmp/encprint-linux-$arch" "$REPO/bin/encprint"
    info "downloaded release $tag for $arch, checksums verified"
}

create_identity() {
    step "Printer identity"
    if [ -f "$IDENTITY" ]; then
        info "keeping the existing identity $IDENTITY"
    else
        mkdir -p "$(dirname "$IDENTITY")"
        chmod 700 "$(dirname "$IDENTITY")"
        "$REPO/bin/encprint" keygen -o "$IDENTITY" >/dev/null
        info "created $IDENTITY (mode 0600, outside the config folder)"
    fi
    RECIPIENT=$("$REPO/bin/encprint" recipient "$IDENTITY" | head -1)
}

add_config() {  # add_config FILE BLOCK
    local file=$1 block=$2 res tmp
    tmp=$(mktemp)
    printf '%s\n' "$block" > "$tmp"
    res=$(python3 "$REPO/scripts/config_edit.py" add "$file" "$tmp")
    rm -f "$tmp"
    case "$res" in
        added) info "added to $file (the previous version is $file.encprint-backup)" ;;
        present) info "$file already has our sections" ;;
        exists*) info "$file already has ${res#exists: }: left as is" ;;
    esac
}

configure() {
    step "Configuring Moonraker and Klipper"
    local origin
    origin=$(git -C "$REPO" remote get-url origin 2>/dev/null || echo "https://github.com/klipper-encprint/encprint.git")
    add_config "$DATA/config/moonraker.conf" "[encrypted_print]
identity: $IDENTITY
helper: $REPO/bin/encprint-helper

[update_manager encrypted_print]
type: git_repo
path: $REPO
origin: $origin
primary_branch: main
managed_services: klipper moonraker
virtualenv: $MOONRAKER_ENV
requirements: moonraker-component/requirements.txt
info_tags:
  desc=Encrypted G-code printing"
    add_config "$DATA/config/printer.cfg" "[encrypted_file_bridge]"
}

add_mainsail_link() {
    step "Linking the owner page in Mainsail's sidebar ($DATA/config/.theme/navi.json)"
    local res
    if ! res=$(python3 "$REPO/scripts/mainsail_navi.py" add "$DATA/config" 2>&1); then
        info "not linked: $res"
        return
    fi
    case "$res" in
        created) info "created navi.json with the link \"Encrypted prints\"" ;;
        added) info "added the link \"Encrypted prints\"; the other entries are unchanged" ;;
        present) info "navi.json already has the link" ;;
    esac
}

restart_services() {
    if [ "$RESTART" -eq 0 ]; then
        step "Not restarting (--no-restart): restart $KLIPPER_SERVICE and $MOONRAKER_SERVICE yourself"
        return
    fi
    if [ ! -d /run/systemd/system ]; then
        step "No systemd: restart Klipper and Moonraker yourself"
        return
    fi
    step "Restarting $KLIPPER_SERVICE and $MOONRAKER_SERVICE"
    sudo systemctl restart "$KLIPPER_SERVICE" "$MOONRAKER_SERVICE"
}

main() {
    parse_args "$@"
    check_user
    check_sudo
    check_layout
    link_plugins
    install_requirements
    provision_helper
    create_identity
    configure
    add_mainsail_link
    restart_services
    printf '\nDone. The owner page: http://<this printer>/server/encrypted_print/page\n'
    printf '(Mainsail: "Encrypted prints" in the sidebar). This printer'"'"'s recipient\n'
    printf '(give it to whoever encrypts files for you):\n\n    %s\n\n' "$RECIPIENT"
}

main "$@"
