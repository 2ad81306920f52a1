package seekgz

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/flate"
)

// Validate inflates every block of src in parallel (workers goroutines, 0
// means one per CPU) and checks that each inflates to exactly its cleartext
// size, that its CRC-32 and ISIZE match, and that its deflate stream ends
// exactly at its trailer. Output is bounded by the block size, so a block
// that inflates to more (a decompression bomb) stops at BlockSize+1 bytes.
// It returns the *BlockError of the first bad block. Memory: two blocks per
// worker.
func (ix *Index) Validate(src io.ReaderAt, workers int) error {
	return ix.ValidateEach(src, workers, nil)
}

// ValidateEach is Validate that also hands the cleartext of every good
// block to check (from the worker that inflated it, so concurrently, in no
// particular order; clear is valid only during the call). An error from
// check fails the block: the *BlockError returned wraps it.
func (ix *Index) ValidateEach(src io.ReaderAt, workers int, check func(block int, clear []byte) error) error {
	n := ix.Blocks()
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	workers = max(min(workers, n), 1)
	var (
		next  atomic.Int64
		mu    sync.Mutex
		first *BlockError
		wg    sync.WaitGroup
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := newBlockDecoder(ix)
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				mu.Lock()
				stop := first != nil && first.Block < i
				mu.Unlock()
				if stop {
					return
				}
				clear, err := d.block(src, i)
				if err == nil && check != nil {
					if err = check(i, clear); err != nil {
						err = &BlockError{Block: i, Offset: ix.Offsets[i], Reason: err.Error(), Err: err}
					}
				}
				if err != nil {
					var be *BlockError
					if !errors.As(err, &be) {
						be = &BlockError{Block: i, Offset: ix.Offsets[i], Reason: err.Error(), Err: err}
					}
					mu.Lock()
					if first == nil || be.Block < first.Block {
						first = be
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first
	}
	return nil
}

// blockDecoder inflates blocks into buffers it reuses.
type blockDecoder struct {
	ix     *Index
	member []byte
	out    []byte
	br     bytes.Reader
	fr     io.ReadCloser
}

func newBlockDecoder(ix *Index) *blockDecoder {
	return &blockDecoder{ix: ix, out: make([]byte, ix.BlockSize+1)}
}

// block returns the cleartext of block i, valid until the next call.
func (d *blockDecoder) block(src io.ReaderAt, i int) ([]byte, error) {
	ix := d.ix
	off, end := ix.Offsets[i], ix.Offsets[i+1]
	bad := func(reason string) error { return &BlockError{Block: i, Offset: off, Reason: reason} }
	size := int(end - off)
	if cap(d.member) < size {
		d.member = make([]byte, size)
	}
	m := d.member[:size]
	if _, err := src.ReadAt(m, off); err != nil {
		return nil, err
	}
	if size < minBlockMember || string(m[:16]) != string(Magic) || int(binary.LittleEndian.Uint32(m[16:])) != size {
		return nil, bad("not the block member the index lists")
	}
	want := ix.ClearLen(i)
	d.br.Reset(m[blockHeaderSize : size-trailerSize])
	if d.fr == nil {
		d.fr = flate.NewReader(&d.br)
	} else if err := d.fr.(flate.Resetter).Reset(&d.br, nil); err != nil {
		return nil, err
	}
	got, err := io.ReadFull(d.fr, d.out[:want+1])
	switch {
	case err == nil:
		return nil, bad("inflates to more than its block size (a decompression bomb or a corrupt block)")
	case err != io.ErrUnexpectedEOF && err != io.EOF:
		return nil, bad("corrupt deflate data: " + err.Error())
	case int64(got) != want:
		return nil, bad("inflates to fewer bytes than its block holds")
	case d.br.Len() != 0:
		return nil, bad("bytes between the deflate data and the trailer")
	}
	out := d.out[:got]
	trailer := m[size-trailerSize:]
	if crc32.ChecksumIEEE(out) != binary.LittleEndian.Uint32(trailer) {
		return nil, bad("CRC-32 does not match: the block was altered")
	}
	if binary.LittleEndian.Uint32(trailer[4:]) != uint32(got) {
		return nil, bad("ISIZE does not match its cleartext size")
	}
	return out, nil
}

// Reader reads the cleartext of a validated seekable gzip at any offset. It
// keeps the last block it inflated. It is not safe for concurrent use.
type Reader struct {
	src  io.ReaderAt
	ix   *Index
	d    *blockDecoder
	cur  int
	data []byte
}

// NewReader returns a Reader of the cleartext described by ix.
func NewReader(src io.ReaderAt, ix *Index) *Reader {
	return &Reader{src: src, ix: ix, d: newBlockDecoder(ix), cur: -1}
}

// Size is the cleartext size.
func (r *Reader) Size() int64 { return r.ix.ClearSize }

// ReadAt implements io.ReaderAt over the cleartext.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("seekgz: negative offset")
	}
	n := 0
	for n < len(p) {
		if off >= r.ix.ClearSize {
			return n, io.EOF
		}
		i := int(off / r.ix.BlockSize)
		if i != r.cur {
			data, err := r.d.block(r.src, i)
			if err != nil {
				r.cur = -1
				return n, err
			}
			r.cur, r.data = i, data
		}
		c := copy(p[n:], r.data[off-int64(i)*r.ix.BlockSize:])
		n += c
		off += int64(c)
	}
	return n, nil
}
