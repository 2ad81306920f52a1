#!/usr/bin/env bash
# Reverses install.sh: removes the links, the config sections and the git
# exclude lines it added. The config files return to their previous bytes.
# The printer identity is kept unless --remove-identity is given.
set -eu

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KLIPPER="$HOME/klipper"
MOONRAKER="$HOME/moonraker"
DATA="$HOME/printer_data"
IDENTITY="$HOME/.config/encprint/printer.key"
KLIPPER_SERVICE="klipper"
MOONRAKER_SERVICE="moonraker"
RESTART=1
REMOVE_IDENTITY=0

usage() {
    cat <<USAGE
Usage: uninstall.sh [--klipper DIR] [--moonraker DIR] [--data DIR] [--instance N]
                    [--identity FILE] [--remove-identity] [--no-restart]
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
        --remove-identity) REMOVE_IDENTITY=1 ;;
        --no-restart) RESTART=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
    shift
done
[ "$(id -u)" -ne 0 ] || die "do not run uninstall.sh as root: run it as the user that runs Klipper and Moonraker"

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

if [ "$REMOVE_IDENTITY" -eq 1 ]; then
    step "Removing the printer identity $IDENTITY"
    rm -f "$IDENTITY"
else
    step "Keeping the printer identity $IDENTITY (--remove-identity deletes it)"
fi

if [ "$RESTART" -eq 1 ] && [ -d /run/systemd/system ]; then
    step "Restarting $KLIPPER_SERVICE and $MOONRAKER_SERVICE"
    sudo systemctl restart "$KLIPPER_SERVICE" "$MOONRAKER_SERVICE"
fi
printf '\nDone. The checkout %s can now be deleted.\n' "$REPO"
