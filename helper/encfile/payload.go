package encfile

import (
	"bytes"
	"errors"
	"runtime"

	"github.com/klipper-encprint/encprint/helper/seekgz"
)

// CheckPayload checks a decrypted payload held in memory and returns the
// size of the G-code it holds. A plain payload must be UTF-8 (Klipper reads
// G-code as strict UTF-8). A payload starting with the gzip magic must be a
// seekable gzip (docs/format.md): its footer may claim at most maxGcode
// bytes of G-code (0: no limit; a *seekgz.LimitError, before anything is
// inflated), its index must describe it (*seekgz.IndexError, or
// seekgz.ErrNotSeekable for other gzip), every block must inflate to its
// cleartext (*seekgz.BlockError), and the inflated text must be UTF-8
// (*UTF8Error with the G-code offset). Blocks are inflated on every CPU;
// memory besides payload is two blocks per CPU and 16 bytes per block.
func CheckPayload(payload []byte, maxGcode int64) (int64, error) {
	if !seekgz.IsGzip(payload) {
		return int64(len(payload)), CheckUTF8(payload)
	}
	src := bytes.NewReader(payload)
	ix, err := seekgz.ReadIndex(src, int64(len(payload)), seekgz.Limits{MaxClearSize: maxGcode})
	if err != nil {
		return 0, err
	}
	u := NewUTF8Blocks(ix.BlockSize, ix.Blocks())
	err = ix.ValidateEach(src, runtime.GOMAXPROCS(0), u.Block)
	var be *seekgz.BlockError
	var ue *UTF8Error
	switch {
	case errors.As(err, &be) && errors.As(err, &ue):
		return 0, u.First(be.Block, ue)
	case err != nil:
		return 0, err
	}
	return ix.ClearSize, u.First(-1, nil)
}
