//go:build linux

package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// install.sh's migration: the counts of Moonraker's database go into the
// installed helper's state through --import, run as the helper's own user;
// a file with 1 of 3 prints used has 2 left. The printer's user cannot run
// it through the set-user-ID bit, and a bad import changes nothing.
func TestImportKeepsTheCountsOfTheOldLayout(t *testing.T) {
	in := install(t, `{}`)
	as := func(uid int, input string, args ...string) (string, error) {
		cmd := exec.Command(in.helper, args...)
		cmd.Stdin = strings.NewReader(input)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	statePath := filepath.Join(in.stateDir, "state")
	before, _ := os.ReadFile(statePath)
	counts := `{"uid": 64542, "counts": {"` + fullID + `": 1}}`
	if out, err := as(printerID, counts, "--import", "-"); err == nil || !strings.Contains(out, "runs only as the helper's own user") {
		t.Fatalf("import by the printer's user: %v %s", err, out)
	}
	if out, err := as(helperID, `{"uid": 1, "counts": {"x": 1}}`, "--import", "-"); err == nil ||
		!strings.Contains(out, "standard input") || !strings.Contains(out, "not a file id") {
		t.Fatalf("import of a malformed export: %v %s", err, out)
	}
	if after, _ := os.ReadFile(statePath); !bytes.Equal(before, after) {
		t.Fatal("a refused import changed the state")
	}
	if out, err := as(helperID, counts, "--import", "-"); err != nil || !strings.Contains(out, "imported 1 print(s) of 1 file(s)") {
		t.Fatalf("import by the helper's user: %v %s", err, out)
	}
	for i := 1; i <= 2; i++ {
		if a := in.decrypt(t, "full.enc.gcode"); a.fds != 1 {
			t.Fatalf("print %d of the 2 left: %v", i, a.msg)
		}
	}
	if a := in.decrypt(t, "full.enc.gcode"); a.code() != "used_up" {
		t.Fatalf("a fourth print of a 3-print file: %v", a.msg)
	}
	// Importing again adds nothing: the count is already higher.
	if out, err := as(helperID, counts, "--import", "-"); err != nil || !strings.Contains(out, "imported 0 print(s)") {
		t.Fatalf("second import: %v %s", err, out)
	}
}

// A new install with migration creates the state and imports in one run.
func TestInitStateWithImport(t *testing.T) {
	in := install(t, `{}`)
	for _, name := range []string{"state.a", "state.b"} {
		os.Remove(filepath.Join(in.stateDir, name))
	}
	cmd := exec.Command(in.helper, "--init-state", "--import", "-")
	cmd.Stdin = strings.NewReader(`{"uid": 64542, "counts": {"` + fullID + `": 3}}`)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: helperID, Gid: helperID, Groups: []uint32{}}}
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "created the print-count state") ||
		!strings.Contains(string(out), "imported 3 print(s)") {
		t.Fatalf("--init-state --import: %v %s", err, out)
	}
	if a := in.decrypt(t, "full.enc.gcode"); a.code() != "used_up" {
		t.Fatalf("a file whose 3 prints were used before the migration: %v", a.msg)
	}
}
