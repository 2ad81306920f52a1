#!/usr/bin/env bash
# Installs klipper-encprint into an existing Klipper + Moonraker setup.
# Idempotent: running it again changes nothing. uninstall.sh reverses it.
set -eu

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/system_layout.sh
. "$REPO/scripts/system_layout.sh"
KLIPPER="$HOME/klipper"
KLIPPY_ENV="$HOME/klippy-env"
MOONRAKER="$HOME/moonraker"
MOONRAKER_ENV="$HOME/moonraker-env"
DATA="$HOME/printer_data"
IDENTITY="$HOME/.config/encprint/printer.key"
KLIPPER_SERVICE="klipper"
MOONRAKER_SERVICE="moonraker"
RESTART=1
PRIVILEGE_STEP=1    # 0: --no-privilege-step, or decided by check_privilege
SYSTEM_ROOT=""      # --system-root: the installed helper's files under DIR
AS_ROOT=0           # Klipper and Moonraker run as root (Creality K1)
HELPER_GECOS="klipper-encprint helper"  # uninstall.sh removes only this user
# Where release binaries are downloaded from (a release dir per tag); the
# tests point it at a local file:// folder.
RELEASE_URL="${ENCPRINT_RELEASE_URL:-https://github.com/klipper-encprint/encprint/releases/download}"

usage() {
    cat <<EOF
Usage: install.sh [options]

Installs encrypted G-code printing: links the Klipper extra and the Moonraker
component, installs msgpack into Moonraker's virtualenv, builds the helper
with Go (a checkout of a release tag without Go downloads that release's
binaries and checks their SHA-256 instead), installs it with sudo behind a
privilege boundary (a system user $HELPER_USER owns the printer identity, the
trust policy and the print counts; an identity and counts of an earlier
install move there), adds the config sections, and restarts Klipper and
Moonraker. Without sudo it installs the helper as the printer's user and
says what that exposes. See docs/install.md.

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
  --no-privilege-step    do not use sudo: the identity, counts and policy stay
                         with the printer's user (exposed to the web UI)
  --system-root DIR      for tests and unusual layouts: the installed helper
                         and its files under DIR instead of / (the helper is
                         built with those paths; needs Go)
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
            --no-privilege-step) PRIVILEGE_STEP=0 ;;
            --system-root) SYSTEM_ROOT="$(cd "$2" && pwd)" || die "--system-root $2: no such directory"; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown option $1" ;;
        esac
        shift
    done
    system_layout
}

check_user() {
    [ "$(id -u)" -eq 0 ] || return 0
    # Creality K1-class images run Klipper and Moonraker as root: their
    # config belongs to root, and there is no other user to protect from.
    if [ "$(stat -c %u "$DATA/config/moonraker.conf" 2>/dev/null)" = 0 ]; then
        AS_ROOT=1
        return
    fi
    die "do not run install.sh as root: run it as the user that runs Klipper and Moonraker (it uses sudo for the steps that need root)"
}

# check_privilege decides whether the helper goes behind the privilege
# boundary (sudo works: passwordless, or a password typed on this
# terminal) or stays with the printer's user; WHY_NOT says why not.
check_privilege() {
    WHY_NOT=""
    if [ "$AS_ROOT" -eq 1 ]; then
        WHY_NOT="Klipper and Moonraker run as root here, so no user on this printer is kept from the key"
    elif [ "$PRIVILEGE_STEP" -eq 0 ]; then
        WHY_NOT="--no-privilege-step was given"
    elif ! command -v sudo >/dev/null 2>&1; then
        WHY_NOT="sudo is not installed"
    elif sudo -n true 2>/dev/null; then
        :
    elif [ -t 0 ]; then
        step "sudo asks for $(id -un)'s password (to install the helper behind its own user)"
        sudo -v || WHY_NOT="sudo refused"
    else
        WHY_NOT="sudo needs a password and there is no terminal to type it on"
    fi
    if [ -n "$WHY_NOT" ]; then
        PRIVILEGE_STEP=0
        # Never fall back over an installed helper: that would replace the
        # printer's key with a new one.
        if [ -e "$INSTALLED_HELPER" ] || [ -e "$SYS_LIB" ]; then
            die "this printer has the installed helper ($INSTALLED_HELPER), and install.sh needs sudo to update it, but $WHY_NOT. Run $REPO/install.sh from a terminal (ssh) where sudo can ask for the password"
        fi
    elif [ -n "$SYSTEM_ROOT" ]; then
        [ "$(stat -c %u "$SYSTEM_ROOT")" = 0 ] \
            || die "--system-root $SYSTEM_ROOT must belong to root: the helper trusts only files that only root can replace"
    fi
}

check_sudo() {  # say once what passwordless sudo means for this printer
    local me
    me=$(id -un 2>/dev/null || id -u)
    [ "$AS_ROOT" -eq 0 ] || return 0
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
    HELPER_SRC="$REPO/bin/encprint-helper"
    if go_ok; then
        make -s -C "$REPO" build
        info "built with $(go env GOVERSION)"
        if [ "$PRIVILEGE_STEP" -eq 1 ] && [ -n "$SYSTEM_ROOT" ]; then
            make -s -C "$REPO" bin/encprint-helper-sysroot SYSTEM_ROOT="$SYSTEM_ROOT"
            HELPER_SRC="$REPO/bin/encprint-helper-sysroot"
            info "and bin/encprint-helper-sysroot, its privileged files under $SYSTEM_ROOT"
        fi
        return
    fi
    local arch tag tmp
    arch=$(helper_arch)
    tag=$(git -C "$REPO" describe --tags --exact-match 2>/dev/null || true)
    if [ "$arch" = unknown ] || [ -z "$tag" ] || ! command -v curl >/dev/null 2>&1; then
        die "cannot build the helper: Go $(sed -n 's/^go //p' "$REPO/go.mod") or newer is needed (https://go.dev/dl), and no release binary fits (architecture $(uname -m), release tag '${tag:-none}'). Install Go, then run: $REPO/install.sh"
    fi
    if [ "$PRIVILEGE_STEP" -eq 1 ] && [ -n "$SYSTEM_ROOT" ]; then
        die "--system-root needs Go to build the helper with its paths under $SYSTEM_ROOT: release binaries have the system paths compiled in"
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

# create_identity is the layout without the privilege step: the identity is
# a file of the printer's user.
# Hook: the config-parser-proof envelope identity (issue 13) replaces the
# keygen call below when it exists; the rest of this branch stays.
create_identity() {
    step "Printer identity"
    if [ -f "$IDENTITY" ] && [ "$(head -c1 "$IDENTITY" | od -An -tx1 | tr -d ' ')" = ff ]; then
        info "keeping the existing identity $IDENTITY"
    elif [ -f "$IDENTITY" ]; then
        # A plain identity of an earlier install: the same key, put in the
        # envelope that Klipper's and Moonraker's config readers refuse
        # (docs/adr/010-identity-envelope.md).
        rm -f "$IDENTITY.new"
        "$REPO/bin/encprint" identity -o "$IDENTITY.new" "$IDENTITY" >/dev/null
        chmod 600 "$IDENTITY.new"
        mv -f "$IDENTITY.new" "$IDENTITY"
        info "kept the identity $IDENTITY, now in an envelope that config readers refuse to show"
    else
        mkdir -p "$(dirname "$IDENTITY")"
        chmod 700 "$(dirname "$IDENTITY")"
        "$REPO/bin/encprint" keygen -o "$IDENTITY" >/dev/null
        info "created $IDENTITY (mode 0600, outside the config folder)"
    fi
    RECIPIENT=$("$REPO/bin/encprint" recipient "$IDENTITY" | head -1)
}

# -- the privilege step (docs/adr/007-privilege-boundary.md) ------------------

# put_file MODE OWNER:GROUP SRC DST: install SRC at DST unless DST already
# has its bytes, owner and mode; returns 1 when nothing changed.
put_file() {
    local mode=$1 owner=$2 src=$3 dst=$4
    if sudo test -f "$dst" && sudo cmp -s "$src" "$dst" \
        && [ "$(sudo stat -c '%U:%G %a' "$dst")" = "$owner ${mode#0}" ]; then
        return 1
    fi
    sudo install -o "${owner%:*}" -g "${owner#*:}" -m "$mode" "$src" "$dst.new"
    sudo mv -f "$dst.new" "$dst"
}

ensure_helper_user() {
    step "System user $HELPER_USER (the helper's; no login, no home)"
    local gecos
    if gecos=$(getent passwd "$HELPER_USER"); then
        [ "$(echo "$gecos" | cut -d: -f5)" = "$HELPER_GECOS" ] \
            || die "a user $HELPER_USER exists that install.sh did not create (its comment is not \"$HELPER_GECOS\"): it would own the printer's key. Remove or rename it, then run $REPO/install.sh again"
        info "$HELPER_USER exists"
        return
    fi
    if getent group "$HELPER_USER" >/dev/null; then
        die "a group $HELPER_USER exists without the user: remove it (sudo groupdel $HELPER_USER), then run $REPO/install.sh again"
    fi
    sudo useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "$HELPER_GECOS" "$HELPER_USER"
    info "created the system user and group $HELPER_USER"
}

install_helper() {
    step "Installing the helper in $LIBEXEC (set-user-ID $HELPER_USER)"
    sudo install -d -o root -g root -m 0755 "$LIBEXEC" "$SYS_LIB" "$SYS_ETC"
    if put_file 6755 "$HELPER_USER:$HELPER_USER" "$HELPER_SRC" "$INSTALLED_HELPER"; then
        info "installed $INSTALLED_HELPER ($("$HELPER_SRC" --version))"
    else
        info "$INSTALLED_HELPER is up to date"
    fi
    # The command-line tool, so that the helper's user can read its identity's
    # recipient (it cannot reach a home that is not world-readable).
    put_file 0755 root:root "$REPO/bin/encprint" "$LIBEXEC/encprint" || true
}

system_recipient() {
    sudo -u "$HELPER_USER" "$LIBEXEC/encprint" recipient "$SYS_IDENTITY" | head -1
}

# system_identity: keep the installed identity, or move the printer's user's
# identity there (migration), or create one. MIGRATED=1 when it moved.
system_identity() {
    step "Printer identity $SYS_IDENTITY (only $HELPER_USER reads it)"
    MIGRATED=0
    local mine=""
    if [ -f "$IDENTITY" ]; then
        mine=$("$REPO/bin/encprint" recipient "$IDENTITY" | head -1)
    fi
    if sudo test -f "$SYS_IDENTITY"; then
        RECIPIENT=$(system_recipient)
        info "keeping the installed identity"
        if [ -n "$mine" ]; then
            [ "$mine" = "$RECIPIENT" ] || die "$IDENTITY (recipient $mine) is not the installed identity $SYS_IDENTITY (recipient $RECIPIENT). Files encrypted for either need it: move $IDENTITY somewhere safe off the printer, then run $REPO/install.sh again"
            rm -f "$IDENTITY"
            rmdir "$(dirname "$IDENTITY")" 2>/dev/null || true
            info "removed $IDENTITY, a copy of the installed identity"
        fi
    elif [ -n "$mine" ]; then
        sudo install -o "$HELPER_USER" -g "$HELPER_USER" -m 0600 "$IDENTITY" "$SYS_IDENTITY"
        RECIPIENT=$(system_recipient)
        [ "$RECIPIENT" = "$mine" ] || die "the copy $SYS_IDENTITY of $IDENTITY has another recipient ($RECIPIENT, not $mine); $IDENTITY is kept"
        rm -f "$IDENTITY"
        rmdir "$(dirname "$IDENTITY")" 2>/dev/null || true
        MIGRATED=1
        info "moved $IDENTITY there: same recipient, and the printer's user no longer holds it"
        info "(copies of it elsewhere, such as backups, still decrypt every file sent to this printer)"
    else
        sudo "$LIBEXEC/encprint" keygen -o "$SYS_IDENTITY" >/dev/null
        sudo chown "$HELPER_USER:$HELPER_USER" "$SYS_IDENTITY"
        sudo chmod 0600 "$SYS_IDENTITY"
        RECIPIENT=$(system_recipient)
        info "created a new identity"
    fi
}

system_policy() {
    step "Trust policy $SYS_POLICY (only root changes it)"
    local want tmp
    want=$(python3 "$REPO/scripts/config_edit.py" policy "$DATA/config/moonraker.conf") \
        || die "cannot read require_signature and trusted_publishers in $DATA/config/moonraker.conf; fix the file, then run $REPO/install.sh again"
    if [ -f "$SYS_POLICY" ]; then
        info "keeping it; change it with: sudoedit $SYS_POLICY"
        if [ "$(cat "$SYS_POLICY")" != "$want" ]; then
            info "moonraker.conf's require_signature or trusted_publishers differ from it: moonraker.conf can only tighten it"
        fi
        return
    fi
    tmp=$(mktemp)
    printf '%s\n' "$want" > "$tmp"
    sudo install -o root -g root -m 0644 "$tmp" "$SYS_POLICY"
    rm -f "$tmp"
    info "written from moonraker.conf's [encrypted_print] require_signature and trusted_publishers"
}

# system_state creates the print-count state, or keeps it; a new state or a
# migrated identity gets the counts that Moonraker's database holds.
system_state() {
    step "Print counts $SYS_STATE (only $HELPER_USER writes them)"
    sudo install -d -o "$HELPER_USER" -g "$HELPER_USER" -m 0700 "$SYS_STATE"
    local args=() counts out
    if has_state; then
        info "keeping the existing state"
        [ "$MIGRATED" -eq 1 ] || return 0
    else
        args+=(--init-state)
    fi
    counts=$(python3 "$REPO/scripts/moonraker_counts.py" "$DATA/database") \
        || die "cannot read the print counts in Moonraker's database $DATA/database (above); nothing was imported. Fix it, then run $REPO/install.sh again"
    out=$(printf '%s\n' "$counts" | sudo -u "$HELPER_USER" "$INSTALLED_HELPER" "${args[@]}" --import -) \
        || die "the helper could not set up its state (above); run $REPO/install.sh again once it is fixed"
    while IFS= read -r line; do info "$line"; done <<< "$out"
    info "(from Moonraker's database; the component keeps counting there only as a mirror)"
}

# The set-user-ID bit has no effect in a service with NoNewPrivileges.
check_no_new_privileges() {
    [ -d /run/systemd/system ] || return 0
    if [ "$(systemctl show -p NoNewPrivileges --value "$MOONRAKER_SERVICE" 2>/dev/null)" = yes ]; then
        step "Warning: Moonraker's service runs with NoNewPrivileges=yes: the installed helper's set-user-ID bit has no effect"
        info "Nothing prints until it is removed: sudo systemctl edit $MOONRAKER_SERVICE (see docs/install.md)"
    fi
}

privilege_step() {
    ensure_helper_user
    install_helper
    system_identity
    system_policy
    system_state
    check_no_new_privileges
}

say_exposed() {
    step "No privilege step: $WHY_NOT"
    info "The printer identity $IDENTITY, the print counts (Moonraker's database) and"
    info "the trust settings (moonraker.conf) belong to $(id -un), the user Klipper and"
    info "Moonraker run as. Anyone who can edit printer.cfg, run a macro or restore a"
    info "database backup (by default anyone on the network with the web UI) can read"
    info "the key and decrypt every file sent to this printer, and give prints back."
    if [ "$AS_ROOT" -eq 1 ]; then
        info "Fix: run Klipper and Moonraker as a user of their own, then install.sh as that user."
    else
        info "Fix: make sudo work for $(id -un) (a password typed on a terminal is fine), then"
        info "run $REPO/install.sh again from a terminal: the identity and counts move behind"
        info "the helper's own user (docs/install.md)."
    fi
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
    local helper=$REPO/bin/encprint-helper identity=$IDENTITY lines
    if [ "$PRIVILEGE_STEP" -eq 1 ]; then
        helper=$INSTALLED_HELPER identity=""  # the installed helper has its own
    fi
    lines="helper: $helper"
    [ -z "$identity" ] || lines="identity: $identity
$lines"
    add_config "$DATA/config/moonraker.conf" "[encrypted_print]
$lines

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
    # An earlier install's block: point it at this layout's helper and
    # identity, leaving the lines the user added to it.
    local a b
    a=$(python3 "$REPO/scripts/config_edit.py" set "$DATA/config/moonraker.conf" encrypted_print helper "$helper")
    if [ -n "$identity" ]; then
        b=$(python3 "$REPO/scripts/config_edit.py" set "$DATA/config/moonraker.conf" encrypted_print identity "$identity")
    else
        b=$(python3 "$REPO/scripts/config_edit.py" set "$DATA/config/moonraker.conf" encrypted_print identity)
    fi
    if [ "$a" = updated ] || [ "$b" = updated ]; then
        info "[encrypted_print] now names helper: $helper${identity:+ and identity: $identity}"
    fi
    if ! grep -qxF "helper: $helper" "$DATA/config/moonraker.conf"; then
        info "your own [encrypted_print] section must say helper: $helper${identity:+ and identity: $identity}${identity:-, and no identity:}"
    fi
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
    if [ "$AS_ROOT" -eq 0 ] && [ "$PRIVILEGE_STEP" -eq 0 ] && ! sudo -n true 2>/dev/null && [ ! -t 0 ]; then
        step "Restart $KLIPPER_SERVICE and $MOONRAKER_SERVICE yourself ($WHY_NOT)"
        return
    fi
    local sudo=sudo
    [ "$AS_ROOT" -eq 0 ] || sudo=""
    step "Restarting $KLIPPER_SERVICE and $MOONRAKER_SERVICE"
    $sudo systemctl restart "$KLIPPER_SERVICE" "$MOONRAKER_SERVICE"
}

main() {
    parse_args "$@"
    check_user
    check_layout
    check_privilege
    check_sudo
    link_plugins
    install_requirements
    provision_helper
    if [ "$PRIVILEGE_STEP" -eq 1 ]; then
        privilege_step
    else
        create_identity
        say_exposed
    fi
    configure
    add_mainsail_link
    restart_services
    printf '\nDone. The owner page: http://<this printer>/server/encrypted_print/page\n'
    printf '(Mainsail: "Encrypted prints" in the sidebar). This printer'"'"'s recipient\n'
    printf '(give it to whoever encrypts files for you):\n\n    %s\n\n' "$RECIPIENT"
}

main "$@"
