//go:build linux

package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/klipper-encprint/encprint/helper/ipc"
	"github.com/klipper-encprint/encprint/helper/memfd"
	"github.com/klipper-encprint/encprint/helper/seekgz"
)

// maxGcodeSize is the most G-code a compressed payload may claim. Checking
// a payload inflates all of it (about 190 MB/s per core), so the footer's
// claim is refused above this before anything is inflated. The largest
// G-code people print is under 1 GB.
const maxGcodeSize = 4 << 30

// checkPayload checks the decrypted payload before the memfd is sealed and
// returns the size of the G-code it holds: Klipper then never meets a byte
// it cannot read, nor a compressed block that does not inflate, hours into
// a print.
func checkPayload(payload []byte) (int64, error) {
	return encfile.CheckPayload(payload, maxGcodeSize)
}

// checkMemfd is checkPayload of the payload decrypted into the memfd f,
// which res describes. A plain payload was checked as UTF-8 while it was
// decrypted (res.UTF8); a compressed one is read back through a read-only
// mapping that is gone again when checkMemfd returns (sealing comes next).
func checkMemfd(f *os.File, res encfile.Result) (int64, error) {
	var magic [2]byte
	n, err := f.ReadAt(magic[:], 0)
	if err != nil && n < len(magic) && res.Size >= int64(len(magic)) {
		return 0, fmt.Errorf("reading the in-memory file back: %w", err)
	}
	if !seekgz.IsGzip(magic[:n]) {
		return res.Size, res.UTF8
	}
	payload, err := memfd.Map(f, res.Size)
	if err != nil {
		return 0, err
	}
	size, err := checkPayload(payload)
	if uerr := memfd.Unmap(payload); uerr != nil && err == nil {
		err = uerr
	}
	return size, err
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
