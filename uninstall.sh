#!/usr/bin/env bash
# Reverses install.sh: removes the links, the config sections and the git
# exclude lines it added, and (with sudo) the installed helper, its files and
# its system user. The config files return to their previous bytes.
# The printer identity is kept unless --purge is given: the installed one is
# given back to the printer's user at ~/.config/encprint/printer.key (losing
# it loses every file encrypted for this printer), with a copy of the print
# counts and records beside it.
set -eu

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/system_layout.sh
. "$REPO/scripts/system_layout.sh"
KLIPPER="$HOME/klipper"
MOONRAKER="$HOME/moonraker"
DATA="$HOME/printer_data"
IDENTITY="$HOME/.config/encprint/printer.key"
KLIPPER_SERVICE="klipper"
MOONRAKER_SERVICE="moonraker"
RESTART=1
REMOVE_IDENTITY=0
SYSTEM_ROOT=""
HELPER_GECOS="klipper-encprint helper"  # as install.sh creates it

usage() {
    cat <<USAGE
Usage: uninstall.sh [--klipper DIR] [--moonraker DIR] [--data DIR] [--instance N]
                    [--identity FILE] [--purge] [--no-restart] [--system-root DIR]

Without --purge the printer identity stays: the installed one (behind the
helper's user) is given back to you at --identity FILE, with a copy of the
print counts beside it. --purge deletes it: every file encrypted for this
printer can then never be printed again. --system-root DIR is install.sh's
(for tests and unusual layouts). --remove-identity is the old name of --purge.
USAGE
}

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --klipper) KLIPPER="$2"; shift ;;
        --moonraker) MOONRAKER="$2"; shift ;;
        --data) DATA="$2"; shift ;;
        --instance) DATA="$HOME/printer_$2_data"; KLIPPER_SERVICE="klipper-$2"
                    MOONRAKER_SERVICE="moonraker-$2"; shift ;;
        --identity) IDENTITY="$2"; shift ;;
        --remove-identity|--purge) REMOVE_IDENTITY=1 ;;
        --system-root) SYSTEM_ROOT="$(cd "$2" && pwd)" || die "--system-root $2: no such directory"; shift ;;
        --no-restart) RESTART=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done
AS_ROOT=0
if [ "$(id -u)" -eq 0 ]; then
    # Klipper and Moonraker running as root (Creality K1): install.sh's
    # layout without the privilege step.
    [ "$(stat -c %u "$DATA/config/moonraker.conf" 2>/dev/null)" = 0 ] \
        || die "do not run uninstall.sh as root: run it as the user that runs Klipper and Moonraker"
    AS_ROOT=1
fi
system_layout
SYSTEM=0
if [ -e "$LIBEXEC" ] || [ -e "$SYS_LIB" ] || [ -e "$SYS_ETC" ]; then
    SYSTEM=1
    if ! command -v sudo >/dev/null 2>&1 || ! { sudo -n true 2>/dev/null || { [ -t 0 ] && sudo -v; }; }; then
        die "this printer has the installed helper ($LIBEXEC); removing it needs sudo, which does not work here without a terminal. Run $REPO/uninstall.sh from a terminal (ssh). Nothing was changed"
    fi
fi

unlink_ours() {  # unlink_ours LINK TARGET
    if [ -L "$1" ] && [ "$(readlink "$1")" = "$2" ]; then
        rm -f "$1"
        info "removed $1"
    fi
}

unexclude() {  # unexclude REPO PATH
    local f="$1/.git/info/exclude"
    [ -f "$f" ] || return 0
    if grep -qxF "$2" "$f"; then
        grep -vxF "$2" "$f" > "$f.tmp" || true
        mv "$f.tmp" "$f"
    fi
}

# give_back: the installed identity becomes the printer's user's file again,
# and the state a copy of theirs. Before anything else is removed.
give_back() {
    local stamp copy mine
    step "Giving the printer identity back to $(id -un): $IDENTITY"
    mkdir -p "$(dirname "$IDENTITY")"
    chmod 700 "$(dirname "$IDENTITY")"
    if [ -f "$IDENTITY" ]; then
        sudo cmp -s "$SYS_IDENTITY" "$IDENTITY" \
            || die "$IDENTITY exists and is not the installed identity $SYS_IDENTITY: move it somewhere safe, then run $REPO/uninstall.sh again. Nothing was removed"
    else
        sudo install -o "$(id -u)" -g "$(id -g)" -m 0600 "$SYS_IDENTITY" "$IDENTITY.tmp"
        mv "$IDENTITY.tmp" "$IDENTITY"
    fi
    mine=$("$REPO/bin/encprint" recipient "$IDENTITY" 2>/dev/null | head -1 || true)
    info "same recipient ${mine:-(bin/encprint is missing: not checked)}; it is a file of $(id -un) again,"
    info "so anyone with the web UI can now obtain it (docs/install.md)"
    if has_state; then
        stamp=$(date -u +%Y%m%dT%H%M%SZ)
        copy="$(dirname "$IDENTITY")/state-$stamp"
        mkdir -m 0700 "$copy"
        for f in $STATE_FILES; do
            if sudo test -e "$SYS_STATE/$f"; then
                sudo install -o "$(id -u)" -g "$(id -g)" -m 0600 "$SYS_STATE/$f" "$copy/$f"
            fi
        done
        info "kept a copy of the print counts and records: $copy"
        info "(the component counts in Moonraker's database again; install.sh imports those counts)"
    fi
}

remove_system() {
    step "Removing the installed helper, its files and the system user $HELPER_USER"
    local d
    for d in "$LIBEXEC" "$SYS_LIB" "$SYS_ETC"; do
        if [ -e "$d" ]; then
            sudo rm -rf "$d"
            info "removed $d"
        fi
    done
    if [ "$(getent passwd "$HELPER_USER" | cut -d: -f5)" = "$HELPER_GECOS" ]; then
        sudo userdel "$HELPER_USER"
        info "removed the user $HELPER_USER"
    elif getent passwd "$HELPER_USER" >/dev/null; then
        info "left the user $HELPER_USER alone: install.sh did not create it"
    fi
    if getent group "$HELPER_USER" >/dev/null && ! getent passwd "$HELPER_USER" >/dev/null; then
        sudo groupdel "$HELPER_USER"
        info "removed the group $HELPER_USER"
    fi
}

if [ "$SYSTEM" -eq 1 ] && [ "$REMOVE_IDENTITY" -eq 0 ] && sudo test -f "$SYS_IDENTITY"; then
    give_back
fi

step "Removing the links"
for d in extras plugins; do
    unlink_ours "$KLIPPER/klippy/$d/encrypted_file_bridge.py" "$REPO/klippy-extras/encrypted_file_bridge.py"
    unexclude "$KLIPPER" "klippy/$d/encrypted_file_bridge.py"
done
unlink_ours "$MOONRAKER/moonraker/components/encrypted_print.py" "$REPO/moonraker-component/encrypted_print.py"
unexclude "$MOONRAKER" "moonraker/components/encrypted_print.py"

step "Removing the config sections"
for f in "$DATA/config/moonraker.conf" "$DATA/config/printer.cfg"; do
    [ -f "$f" ] || continue
    info "$f: $(python3 "$REPO/scripts/config_edit.py" remove "$f")"
    rm -f "$f.encprint-backup"
done

step "Removing the owner page's link from Mainsail's sidebar"
info "$DATA/config/.theme/navi.json: $(python3 "$REPO/scripts/mainsail_navi.py" remove "$DATA/config" 2>&1 || true)"

[ "$SYSTEM" -eq 0 ] || remove_system

if [ "$REMOVE_IDENTITY" -eq 1 ]; then
    step "Removing the printer identity$([ "$SYSTEM" -eq 1 ] && echo " and the print counts") (--purge)"
    rm -f "$IDENTITY"
    info "every file encrypted for this printer can no longer be printed anywhere"
elif [ "$SYSTEM" -eq 0 ]; then
    step "Keeping the printer identity $IDENTITY (--purge deletes it)"
fi

if [ "$RESTART" -eq 1 ] && [ -d /run/systemd/system ]; then
    step "Restarting $KLIPPER_SERVICE and $MOONRAKER_SERVICE"
    sudo=sudo
    [ "$AS_ROOT" -eq 0 ] || sudo=""
    $sudo systemctl restart "$KLIPPER_SERVICE" "$MOONRAKER_SERVICE"
fi
printf '\nDone. The checkout %s can now be deleted.\n' "$REPO"
