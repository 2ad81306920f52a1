package seekgz

import (
	"encoding/binary"
	"io"
)

// ReadIndex reads the footer and index of the seekable gzip payload in src
// (size bytes) and checks that they describe it: block count, sizes and
// offsets agree with each other, with the payload size and with the header
// of every block member. It inflates nothing (Validate does); its memory is
// 8 bytes per block, bounded by the payload size.
func ReadIndex(src io.ReaderAt, size int64, lim Limits) (*Index, error) {
	if size < FooterSize {
		return nil, ErrNotSeekable
	}
	fb := make([]byte, FooterSize)
	if _, err := src.ReadAt(fb, size-FooterSize); err != nil {
		return nil, err
	}
	f, err := parseFooter(fb)
	if err != nil {
		return nil, err
	}
	if f.version != Version {
		return nil, indexErr("format version %d, this reader knows %d: update encprint", f.version, Version)
	}
	bs := int64(f.blockSize)
	if bs < MinBlockSize || bs > MaxBlockSize {
		return nil, indexErr("block size %d outside %d..%d", bs, MinBlockSize, MaxBlockSize)
	}
	if f.clearSize > 1<<62 {
		return nil, indexErr("claims %d bytes of G-code, an impossible size", f.clearSize)
	}
	if lim.MaxClearSize > 0 && int64(f.clearSize) > lim.MaxClearSize {
		return nil, &LimitError{Claimed: int64(f.clearSize), Limit: lim.MaxClearSize}
	}
	clear := int64(f.clearSize)
	n := (clear + bs - 1) / bs
	if int64(f.blocks) != n {
		return nil, indexErr("%d blocks listed for %d bytes of G-code in blocks of %d (want %d)", f.blocks, clear, bs, n)
	}
	// Every block member takes room in the payload: a count the payload
	// cannot hold is refused before anything is allocated for it.
	if n > size/minBlockMember {
		return nil, indexErr("%d blocks cannot fit in a payload of %d bytes", n, size)
	}
	il := indexLen(int(n))
	if int64(f.indexLen) != il || int64(f.indexOffset) < 0 || int64(f.indexOffset)+il+FooterSize != size {
		return nil, indexErr("index at %d+%d does not end where the footer starts (%d)", f.indexOffset, f.indexLen, size-FooterSize)
	}
	ib := make([]byte, il)
	if _, err := src.ReadAt(ib, int64(f.indexOffset)); err != nil {
		return nil, err
	}
	offsets := make([]int64, 0, n+1)
	var off int64
	for len(ib) > 0 {
		k := min(int(n)-len(offsets), maxIndexEntries)
		m := indexMemberSize(k)
		entries, err := parseIndexMember(ib[:m], k)
		if err != nil {
			return nil, err
		}
		for j := 0; j < k; j++ {
			i := len(offsets)
			s := int64(binary.LittleEndian.Uint32(entries[4*j:]))
			clearLen := min(bs, clear-int64(i)*bs)
			if s < minBlockMember || s > maxMemberSize(clearLen) {
				return nil, indexErr("block %d is listed as %d bytes, impossible for %d bytes of G-code", i, s, clearLen)
			}
			offsets = append(offsets, off)
			off += s
		}
		ib = ib[m:]
	}
	if off != int64(f.indexOffset) {
		return nil, indexErr("the blocks listed end at %d, the index starts at %d", off, f.indexOffset)
	}
	offsets = append(offsets, off)
	ix := &Index{BlockSize: bs, ClearSize: clear, Offsets: offsets}
	if err := ix.checkHeaders(src); err != nil {
		return nil, err
	}
	return ix, nil
}

func parseIndexMember(b []byte, k int) ([]byte, error) {
	want := appendIndex(nil, make([]uint32, k))
	if len(b) != len(want) || string(b[:16]) != string(want[:16]) || string(b[16+4*k:]) != string(want[16+4*k:]) {
		return nil, indexErr("malformed index member")
	}
	return b[16 : 16+4*k], nil
}

// checkHeaders checks that a block member starts at every listed offset and
// states the size the index lists.
func (ix *Index) checkHeaders(src io.ReaderAt) error {
	h := make([]byte, blockHeaderSize)
	for i := 0; i < ix.Blocks(); i++ {
		if _, err := src.ReadAt(h, ix.Offsets[i]); err != nil {
			return err
		}
		if string(h[:16]) != string(Magic) {
			return indexErr("no block member where the index puts block %d (payload byte %d)", i, ix.Offsets[i])
		}
		if s := int64(binary.LittleEndian.Uint32(h[16:])); s != ix.Offsets[i+1]-ix.Offsets[i] {
			return indexErr("block %d says it is %d bytes, the index says %d", i, s, ix.Offsets[i+1]-ix.Offsets[i])
		}
	}
	return nil
}
