// Package seekgz implements encprint's seekable gzip: G-code compressed in
// independent blocks, so that a printer holds the compressed file in memory
// and still reads any cleartext byte by inflating one block.
//
// A seekable gzip is a concatenation of RFC 1952 gzip members, which every
// gzip tool reads as one stream (`age -d part.gcode | gunzip` gives the
// G-code byte for byte):
//
//	block member 0 .. n-1   one fixed-size block of cleartext each
//	index member(s)         empty members whose extra field lists the sizes of the block members
//	footer member           an empty member whose extra field says where the index is
//
// docs/format.md is the specification; this package follows it.
package seekgz

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Format constants (docs/format.md, "Seekable gzip payload").
const (
	// DefaultBlockSize is the cleartext size of a block. One block is what
	// the Klipper extra inflates at a time inside Klipper's reactor; see
	// docs/adr/007 for the stall it costs.
	DefaultBlockSize = 64 << 10
	MinBlockSize     = 4 << 10
	MaxBlockSize     = 1 << 20
	// Version is the footer's format version.
	Version = 1

	// blockHeaderSize is the gzip header of a block member: the 10 fixed
	// bytes, XLEN, and the "Eb" subfield holding the member's size.
	blockHeaderSize = 10 + 2 + 4 + 4
	trailerSize     = 8 // CRC-32 and ISIZE
	// emptyDeflate is a final, fixed-Huffman deflate block with no data.
	emptyDeflateSize = 2
	// maxIndexEntries is how many u32 entries fit one index member's extra
	// field (XLEN <= 65535).
	maxIndexEntries = (65535 - 4) / 4
	footerDataSize  = 32
	// FooterSize is the length of the footer member, the last bytes of
	// every seekable gzip.
	FooterSize = 10 + 2 + 4 + footerDataSize + emptyDeflateSize + trailerSize
	// minBlockMember is the smallest block member: header, a 2-byte
	// deflate stream, trailer.
	minBlockMember = blockHeaderSize + 2 + trailerSize
)

// gzipHead is the start of every member this package writes: ID1 ID2, CM=8
// (deflate), FLG=FEXTRA, MTIME=0, XFL=0, OS=255 (unknown).
var gzipHead = [10]byte{0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255}

// Subfield identifiers of the extra fields (RFC 1952 section 2.3.1.1).
var (
	blockID  = [2]byte{'E', 'b'}
	indexID  = [2]byte{'E', 'i'}
	footerID = [2]byte{'E', 'f'}
)

// Magic is the first bytes of every seekable gzip with at least one block:
// a gzip member header with an "Eb" extra subfield of 4 bytes.
var Magic = append(gzipHead[:], 8, 0, blockID[0], blockID[1], 4, 0)

// IsGzip reports whether a payload starts like gzip (ID1 ID2). G-code is
// text and never does; a gzip payload must be a valid seekable gzip.
func IsGzip(prefix []byte) bool {
	return len(prefix) >= 2 && prefix[0] == 0x1f && prefix[1] == 0x8b
}

// maxMemberSize bounds the block member of a block of n cleartext bytes:
// deflate's worst case is stored blocks (5 bytes per 65,535), plus a few
// empty blocks encoders add when they flush; the bound is generous.
func maxMemberSize(n int64) int64 {
	return blockHeaderSize + n + n/64 + 64 + trailerSize
}

// Index is the parsed, structurally checked index of a seekable gzip.
type Index struct {
	BlockSize int64 // cleartext bytes per block (the last may be shorter)
	ClearSize int64 // total cleartext (G-code) bytes
	// Offsets[i] is the payload offset of block member i; Offsets[n] is
	// where the index members start.
	Offsets []int64
}

// Blocks is the number of blocks.
func (ix *Index) Blocks() int { return len(ix.Offsets) - 1 }

// ClearLen is the cleartext size of block i.
func (ix *Index) ClearLen(i int) int64 {
	return min(ix.BlockSize, ix.ClearSize-int64(i)*ix.BlockSize)
}

// IndexError reports a footer or index that does not describe the payload:
// the file was made wrongly or crafted.
type IndexError struct{ Reason string }

func (e *IndexError) Error() string { return "seekable gzip index: " + e.Reason }

// LimitError reports a footer claiming more cleartext than Limits allow,
// found before anything is inflated (a decompression bomb, or a G-code
// larger than the reader accepts).
type LimitError struct{ Claimed, Limit int64 }

func (e *LimitError) Error() string {
	return fmt.Sprintf("claims %d bytes of G-code, more than the %d accepted", e.Claimed, e.Limit)
}

// BlockError reports a block member that does not inflate to its cleartext,
// or whose cleartext a ValidateEach check refused.
type BlockError struct {
	Block  int   // 0-based block number
	Offset int64 // payload offset of its member
	Reason string
	Err    error // the underlying error, if any (a read error, a check's)
}

func (e *BlockError) Error() string {
	return fmt.Sprintf("compressed block %d (at payload byte %d): %s", e.Block, e.Offset, e.Reason)
}

func (e *BlockError) Unwrap() error { return e.Err }

// ErrNotSeekable is returned for a gzip payload that is not a seekable
// gzip, e.g. one made by gzip itself.
var ErrNotSeekable = errors.New("the payload is gzip but not an encprint seekable gzip (compressed with another tool?): encrypt the plain G-code with encprint, which compresses it")

func indexErr(format string, args ...interface{}) error {
	return &IndexError{Reason: fmt.Sprintf(format, args...)}
}

// Limits bound what a reader accepts, so that a crafted index cannot make it
// allocate or inflate without bound.
type Limits struct {
	// MaxClearSize is the largest cleartext accepted (0: no limit).
	MaxClearSize int64
}

type footer struct {
	version     uint32
	blockSize   uint32
	clearSize   uint64
	indexOffset uint64
	blocks      uint32
	indexLen    uint32
}

func appendFooter(b []byte, f footer) []byte {
	b = append(b, gzipHead[:]...)
	b = binary.LittleEndian.AppendUint16(b, 4+footerDataSize)
	b = append(b, footerID[0], footerID[1])
	b = binary.LittleEndian.AppendUint16(b, footerDataSize)
	b = binary.LittleEndian.AppendUint32(b, f.version)
	b = binary.LittleEndian.AppendUint32(b, f.blockSize)
	b = binary.LittleEndian.AppendUint64(b, f.clearSize)
	b = binary.LittleEndian.AppendUint64(b, f.indexOffset)
	b = binary.LittleEndian.AppendUint32(b, f.blocks)
	b = binary.LittleEndian.AppendUint32(b, f.indexLen)
	return appendEmptyBody(b)
}

// appendEmptyBody ends a member with no data: an empty final deflate block,
// CRC-32 0 and ISIZE 0.
func appendEmptyBody(b []byte) []byte {
	return append(b, 0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 0)
}

func parseFooter(b []byte) (footer, error) {
	var f footer
	if len(b) != FooterSize {
		return f, indexErr("footer is %d bytes, want %d", len(b), FooterSize)
	}
	want := appendFooter(nil, footer{})
	// Everything but the data fields is fixed.
	if string(b[:16]) != string(want[:16]) || string(b[16+footerDataSize:]) != string(want[16+footerDataSize:]) {
		return f, ErrNotSeekable
	}
	d := b[16:]
	f.version = binary.LittleEndian.Uint32(d)
	f.blockSize = binary.LittleEndian.Uint32(d[4:])
	f.clearSize = binary.LittleEndian.Uint64(d[8:])
	f.indexOffset = binary.LittleEndian.Uint64(d[16:])
	f.blocks = binary.LittleEndian.Uint32(d[24:])
	f.indexLen = binary.LittleEndian.Uint32(d[28:])
	return f, nil
}

// indexMemberSize is the size of an index member with n entries.
func indexMemberSize(n int) int64 { return 10 + 2 + 4 + 4*int64(n) + emptyDeflateSize + trailerSize }

// indexLen is the total size of the index members for n blocks.
func indexLen(n int) int64 {
	var l int64
	for n > 0 {
		k := min(n, maxIndexEntries)
		l += indexMemberSize(k)
		n -= k
	}
	return l
}

func appendIndex(b []byte, sizes []uint32) []byte {
	for len(sizes) > 0 {
		k := min(len(sizes), maxIndexEntries)
		b = append(b, gzipHead[:]...)
		b = binary.LittleEndian.AppendUint16(b, uint16(4+4*k))
		b = append(b, indexID[0], indexID[1])
		b = binary.LittleEndian.AppendUint16(b, uint16(4*k))
		for _, s := range sizes[:k] {
			b = binary.LittleEndian.AppendUint32(b, s)
		}
		b = appendEmptyBody(b)
		sizes = sizes[k:]
	}
	return b
}
