package encfile

import (
	"fmt"
	"unicode/utf8"
)

// UTF8Error reports cleartext that Klipper cannot read: virtual_sdcard
// decodes G-code as strict UTF-8 and stops at the first invalid byte.
type UTF8Error struct {
	Offset int64 // cleartext byte offset of the first invalid sequence
}

func (e *UTF8Error) Error() string {
	return fmt.Sprintf("the G-code is not valid UTF-8 at byte %d, which Klipper cannot read; re-export it from the slicer as UTF-8 and encrypt it again", e.Offset)
}

// CheckUTF8 returns a *UTF8Error naming the first byte of b that is not part
// of a valid UTF-8 sequence, or nil.
func CheckUTF8(b []byte) error {
	if utf8.Valid(b) {
		return nil
	}
	for i := 0; i < len(b); {
		r, n := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && n <= 1 {
			return &UTF8Error{Offset: int64(i)}
		}
		i += n
	}
	return nil
}
