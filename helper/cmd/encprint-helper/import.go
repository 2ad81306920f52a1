//go:build linux

package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/klipper-encprint/encprint/helper/privsep"
	"github.com/klipper-encprint/encprint/helper/state"
)

// importCounts adds the print counts of an install that kept them in
// Moonraker's database (install.sh's migration) to the state: each file's
// count rises to at least the imported one, never falls. from is a file, or
// "-" for standard input. Like --init-state, only the helper's own user may
// run it: run set-user-ID by anyone else it refuses (the printer's user
// could only burn their own prints with it, but the keeper is the one
// writer of the state that anyone else can reach).
func importCounts(t *trust, from string, out io.Writer) error {
	if t.privileged() || t.err != nil { // it started set-user-ID
		t.close()
		return errors.New("--import runs only as the helper's own user (sudo -u encprint encprint-helper --import FILE)")
	}
	r, name := io.Reader(os.Stdin), "standard input"
	if from != "-" {
		f, err := os.Open(from)
		if err != nil {
			return fmt.Errorf("cannot read the counts to import: %w", err)
		}
		defer f.Close()
		r, name = f, from
	}
	c, err := state.ParseCounts(r, name)
	if err != nil {
		return err
	}
	s, err := state.Open(privsep.StateDir)
	if err != nil {
		return err
	}
	defer s.Close()
	n, err := s.Import(c, now().Unix())
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "imported %d print(s) of %d file(s) into the print-count state %s\n", n, len(c.Counts), s.Path())
	return nil
}
