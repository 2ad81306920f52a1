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

// UTF8Blocks checks text cut into consecutive blocks of blockSize bytes
// that are inflated, and so checked, one at a time in any order and on
// several goroutines at once: Block checks what lies inside block i (safe
// concurrently for distinct i), Boundaries what straddles two blocks, once
// the blocks are checked. A character cut by a block boundary is therefore
// neither refused nor missed. Memory: 8 bytes per block.
type UTF8Blocks struct {
	blockSize int64
	edges     []blockEdge
}

// blockEdge keeps the bytes of a block that belong to a character of a
// neighbour: its leading continuation bytes and its trailing incomplete
// sequence (each at most utf8.UTFMax-1 bytes).
type blockEdge struct {
	head, tail   [utf8.UTFMax - 1]byte
	nhead, ntail uint8
}

// NewUTF8Blocks prepares the check of blocks blocks of blockSize bytes (the
// last may be shorter); blockSize is at least utf8.UTFMax, so that a
// character straddles at most one boundary.
func NewUTF8Blocks(blockSize int64, blocks int) *UTF8Blocks {
	return &UTF8Blocks{blockSize: blockSize, edges: make([]blockEdge, blocks)}
}

// Block checks block i, b, and returns a *UTF8Error with the cleartext
// offset of its first invalid byte, not counting its edges.
func (u *UTF8Blocks) Block(i int, b []byte) error {
	start, end := 0, len(b)
	if i > 0 {
		for start < len(b) && start < utf8.UTFMax-1 && !utf8.RuneStart(b[start]) {
			start++
		}
	}
	if i < len(u.edges)-1 {
		for k := len(b) - 1; k >= start && k >= len(b)-(utf8.UTFMax-1); k-- {
			if utf8.RuneStart(b[k]) {
				if !utf8.FullRune(b[k:]) {
					end = k
				}
				break
			}
		}
	}
	e := &u.edges[i]
	e.nhead = uint8(copy(e.head[:], b[:start]))
	e.ntail = uint8(copy(e.tail[:], b[end:]))
	if err := CheckUTF8(b[start:end]); err != nil {
		err.(*UTF8Error).Offset += int64(i)*u.blockSize + int64(start)
		return err
	}
	return nil
}

// Boundaries checks the characters that straddle the boundaries before
// block upto (all of them: len(blocks)), whose blocks Block checked.
func (u *UTF8Blocks) Boundaries(upto int) error {
	for i := 1; i < len(u.edges) && i <= upto; i++ {
		prev, cur := &u.edges[i-1], &u.edges[i]
		s := append(append([]byte(nil), prev.tail[:prev.ntail]...), cur.head[:cur.nhead]...)
		if err := CheckUTF8(s); err != nil {
			err.(*UTF8Error).Offset += int64(i)*u.blockSize - int64(prev.ntail)
			return err
		}
	}
	return nil
}

// First returns the first invalid byte of the text, given the error err of
// the first block that Block refused (failed; -1 and nil if none did) and
// every block before it checked: a character straddling an earlier
// boundary comes before anything inside that block.
func (u *UTF8Blocks) First(failed int, err error) error {
	upto := len(u.edges)
	if failed >= 0 {
		upto = failed
	}
	if berr := u.Boundaries(upto); berr != nil {
		return berr
	}
	return err
}
