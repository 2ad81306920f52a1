//go:build linux

package main

import (
	"bytes"
	"errors"
	"runtime"

	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/klipper-encprint/encprint/helper/ipc"
	"github.com/klipper-encprint/encprint/helper/seekgz"
)

// maxGcodeSize is the most G-code a compressed payload may claim. Checking
// a payload inflates all of it (about 190 MB/s per core), so the footer's
// claim is refused above this before anything is inflated. The largest
// G-code people print is under 1 GB.
const maxGcodeSize = 4 << 30

// checkPayload checks the decrypted payload before the memfd is sealed and
// returns the size of the G-code it holds. A plain payload must be UTF-8,
// which Klipper requires. A payload starting with the gzip magic must be a
// seekable gzip (docs/format.md) whose index describes it and whose every
// block inflates to its cleartext, which must be UTF-8 (the offsets of an
// error are G-code offsets): Klipper then never meets a block it cannot
// read, hours into a print.
func checkPayload(payload []byte) (int64, error) {
	if !seekgz.IsGzip(payload) {
		return int64(len(payload)), encfile.CheckUTF8(payload)
	}
	src := bytes.NewReader(payload)
	ix, err := seekgz.ReadIndex(src, int64(len(payload)), seekgz.Limits{MaxClearSize: maxGcodeSize})
	if err != nil {
		return 0, err
	}
	u := encfile.NewUTF8Blocks(ix.BlockSize, ix.Blocks())
	err = ix.ValidateEach(src, runtime.GOMAXPROCS(0), u.Block)
	var be *seekgz.BlockError
	var ue *encfile.UTF8Error
	switch {
	case errors.As(err, &be) && errors.As(err, &ue):
		return 0, u.First(be.Block, ue)
	case err != nil:
		return 0, err
	}
	return ix.ClearSize, u.First(-1, nil)
}

// classifyPayload maps the errors of checkPayload that are about the
// payload's encoding to protocol errors, or returns nil.
func classifyPayload(name string, err error) *ipc.Error {
	var ie *seekgz.IndexError
	var be *seekgz.BlockError
	var le *seekgz.LimitError
	var ue *encfile.UTF8Error
	switch {
	case errors.As(err, &ue):
		return nil // not_utf8, as for a plain payload
	case errors.As(err, &le):
		return fail(contract.CodeTooLarge, "%s: its compressed G-code claims %s once inflated, more than the %s this printer accepts (a damaged or crafted file?); nothing was inflated: ask its sender for a file in several parts",
			name, human(le.Claimed), human(le.Limit))
	case errors.Is(err, seekgz.ErrNotSeekable):
		return fail(contract.CodeNotSeekable, "%s: %v", name, err)
	case errors.As(err, &ie), errors.As(err, &be):
		return fail(contract.CodeBadPayload, "%s: its compressed G-code is damaged or was not made by encprint (%v); nothing was printed: ask its sender to encrypt the G-code again with encprint encrypt",
			name, err)
	}
	return nil
}
