package seekgz

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"runtime"
	"sync"
)

// Options tune a Writer; the zero value is the default.
type Options struct {
	BlockSize int // cleartext bytes per block; 0 means DefaultBlockSize
	Level     int // flate level; 0 means flate.DefaultCompression
	Workers   int // blocks compressed at once; 0 means one per CPU
}

// Writer compresses a stream into a seekable gzip. Blocks are compressed in
// parallel, a batch of Workers blocks at a time, and written in order; the
// index and footer are written by Close. Memory: about three blocks per
// worker plus 4 bytes per block for the index.
type Writer struct {
	dst     io.Writer
	opts    Options
	batch   [][]byte // filled cleartext blocks waiting to be compressed
	free    [][]byte // block buffers to reuse
	cur     []byte
	out     []*bytes.Buffer
	fws     []*flate.Writer
	sizes   []uint32
	written int64
	clear   int64
	err     error
	closed  bool
}

// NewWriter returns a Writer that writes a seekable gzip to dst.
func NewWriter(dst io.Writer, opts Options) (*Writer, error) {
	if opts.BlockSize == 0 {
		opts.BlockSize = DefaultBlockSize
	}
	if opts.BlockSize < MinBlockSize || opts.BlockSize > MaxBlockSize {
		return nil, fmt.Errorf("block size %d outside %d..%d", opts.BlockSize, MinBlockSize, MaxBlockSize)
	}
	if opts.Level == 0 {
		opts.Level = flate.DefaultCompression
	}
	if opts.Workers <= 0 {
		opts.Workers = runtime.GOMAXPROCS(0)
	}
	w := &Writer{dst: dst, opts: opts}
	for i := 0; i < opts.Workers; i++ {
		fw, err := flate.NewWriter(io.Discard, opts.Level)
		if err != nil {
			return nil, err
		}
		w.fws = append(w.fws, fw)
		w.out = append(w.out, new(bytes.Buffer))
	}
	w.cur = w.take()
	return w, nil
}

// Write buffers p and compresses every block it completes.
func (w *Writer) Write(p []byte) (int, error) {
	if w.closed {
		return 0, errors.New("seekgz: write after Close")
	}
	n := 0
	for len(p) > 0 && w.err == nil {
		c := copy(w.cur[len(w.cur):w.opts.BlockSize], p)
		w.cur = w.cur[:len(w.cur)+c]
		p = p[c:]
		n += c
		if len(w.cur) == w.opts.BlockSize {
			w.push()
		}
	}
	return n, w.err
}

func (w *Writer) push() {
	w.clear += int64(len(w.cur))
	w.batch = append(w.batch, w.cur)
	if len(w.batch) == w.opts.Workers {
		w.flush()
	}
	w.cur = w.take()
}

func (w *Writer) take() []byte {
	if k := len(w.free); k > 0 {
		b := w.free[k-1]
		w.free = w.free[:k-1]
		return b[:0]
	}
	return make([]byte, 0, w.opts.BlockSize)
}

// flush compresses the batch in parallel and writes it in order.
func (w *Writer) flush() {
	if w.err != nil || len(w.batch) == 0 {
		return
	}
	var wg sync.WaitGroup
	errs := make([]error, len(w.batch))
	for i, blk := range w.batch {
		wg.Add(1)
		go func(i int, blk []byte) {
			defer wg.Done()
			errs[i] = w.compress(w.out[i], w.fws[i], blk)
		}(i, blk)
	}
	wg.Wait()
	for i := range w.batch {
		if w.err = errs[i]; w.err != nil {
			return
		}
		b := w.out[i].Bytes()
		if _, w.err = w.dst.Write(b); w.err != nil {
			return
		}
		w.sizes = append(w.sizes, uint32(len(b)))
		w.written += int64(len(b))
	}
	w.free = append(w.free, w.batch...)
	w.batch = w.batch[:0]
}

// compress writes one block member into out.
func (w *Writer) compress(out *bytes.Buffer, fw *flate.Writer, blk []byte) error {
	out.Reset()
	out.Write(Magic)
	out.Write([]byte{0, 0, 0, 0}) // the member size, filled in below
	fw.Reset(out)
	if _, err := fw.Write(blk); err != nil {
		return err
	}
	if err := fw.Close(); err != nil {
		return err
	}
	var t [trailerSize]byte
	binary.LittleEndian.PutUint32(t[:], crc32.ChecksumIEEE(blk))
	binary.LittleEndian.PutUint32(t[4:], uint32(len(blk)))
	out.Write(t[:])
	b := out.Bytes()
	if int64(len(b)) > maxMemberSize(int64(len(blk))) {
		return fmt.Errorf("internal error: block member of %d bytes for %d bytes", len(b), len(blk))
	}
	binary.LittleEndian.PutUint32(b[16:], uint32(len(b)))
	return nil
}

// Close compresses the last block and writes the index and footer. It does
// not close dst.
func (w *Writer) Close() error {
	if w.closed {
		return w.err
	}
	w.closed = true
	if w.err != nil {
		return w.err
	}
	if len(w.cur) > 0 {
		w.clear += int64(len(w.cur))
		w.batch = append(w.batch, w.cur)
	}
	w.flush()
	if w.err != nil {
		return w.err
	}
	if int64(len(w.sizes)) > 1<<32-1 {
		return errors.New("seekgz: too many blocks")
	}
	tail := appendIndex(nil, w.sizes)
	tail = appendFooter(tail, footer{version: Version, blockSize: uint32(w.opts.BlockSize),
		clearSize: uint64(w.clear), indexOffset: uint64(w.written), blocks: uint32(len(w.sizes)),
		indexLen: uint32(indexLen(len(w.sizes)))})
	_, w.err = w.dst.Write(tail)
	return w.err
}

// ClearSize is the number of cleartext bytes written so far.
func (w *Writer) ClearSize() int64 { return w.clear + int64(len(w.cur)) }
