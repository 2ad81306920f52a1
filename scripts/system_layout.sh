# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables are for the scripts that source this
# The installed helper's files, for install.sh and uninstall.sh (sourced).
# They are privsep's compiled-in paths (helper/privsep/start.go); the
# Makefile composes the same ones for SYSTEM_ROOT, and tests/test_install.py
# checks that all three agree.

HELPER_USER="encprint"
STATE_FILES="state.a state.b state"  # the two slots, the single file of earlier helpers

# system_layout: the paths under SYSTEM_ROOT (empty: the real system).
system_layout() {
    LIBEXEC="$SYSTEM_ROOT/usr/local/libexec/encprint"
    INSTALLED_HELPER="$LIBEXEC/encprint-helper"
    SYS_LIB="$SYSTEM_ROOT/var/lib/encprint"
    SYS_IDENTITY="$SYS_LIB/identity"
    SYS_STATE="$SYS_LIB/state"
    SYS_ETC="$SYSTEM_ROOT/etc/encprint"
    SYS_POLICY="$SYS_ETC/policy.json"
}

# has_state: the state directory holds a state, whole or not (it is never
# replaced, and uninstall copies it).
has_state() {
    local f
    for f in $STATE_FILES; do
        sudo test -e "$SYS_STATE/$f" && return 0
    done
    return 1
}
