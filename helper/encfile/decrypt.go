package encfile

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"

	"filippo.io/age"
)

const (
	chunkSize    = 64 << 10 // age STREAM plaintext chunk
	chunkOverlay = 16       // Poly1305 tag per chunk
	nonceSize    = 16       // payload nonce after the header
	segmentSize  = 16 * chunkSize
)

// Errors Open and DecryptTo/DecryptInto return; callers branch on them with
// errors.Is/As. A failure to read the file itself is a *ReadError, never one
// of these.
var (
	ErrWrongIdentity = errors.New("this printer is not a recipient of the file (encrypted for other printers)")
	ErrHeaderAuth    = errors.New("header authentication failed: the header or its metadata was altered, or the file is corrupt")
	ErrPayloadEnd    = errors.New("the end of the encrypted payload does not authenticate: the file is truncated, has bytes appended, or is corrupt near its end")
	ErrSizeMismatch  = errors.New("plaintext size differs from the size the publisher signed")
	ErrDigest        = errors.New("plaintext SHA-256 differs from the digest the publisher signed")
)

// ChunkError reports a payload chunk that failed authentication.
type ChunkError struct {
	Index  int64 // 0-based chunk number
	Offset int64 // ciphertext byte offset where the chunk starts
}

func (e *ChunkError) Error() string {
	return fmt.Sprintf("payload chunk %d (at byte %d) failed authentication: the file was altered or is corrupt", e.Index, e.Offset)
}

// File is an encrypted file whose header has been authenticated with an
// identity. Its plaintext size is authenticated too (age decrypts and
// authenticates the final chunk first); the rest of the payload is
// authenticated as it is decrypted.
type File struct {
	Header    *Header
	Public    *Public
	PlainSize int64
	// Progress, if set, is called from DecryptTo's goroutine with the
	// number of plaintext bytes authenticated so far, in order.
	Progress func(done int64)
	// SkipSHA256 leaves Result.SHA256 zero unless a v1 signature needs it:
	// age's AEAD authenticates every chunk, so a file without a signature
	// needs no plaintext digest, and the in-order SHA-256 is the one serial
	// part of decrypting.
	SkipSHA256 bool
	// CheckUTF8 has the decrypting workers check each segment as UTF-8
	// while it is in their cache, for Result.UTF8: a plain payload then
	// needs no second pass over memory (CheckPayload).
	CheckUTF8 bool

	plain io.ReaderAt
}

// source marks the errors of the underlying file as *ReadError, so that a
// disk error is never mistaken for tampering.
type source struct{ r io.ReaderAt }

func (s source) ReadAt(p []byte, off int64) (int, error) {
	n, err := s.r.ReadAt(p, off)
	if err != nil && err != io.EOF {
		err = &ReadError{Offset: off, Err: err}
	}
	return n, err
}

// ParseFile reads only the public parts of an encrypted file: no key needed,
// nothing authenticated.
func ParseFile(src io.ReaderAt, size int64) (*Header, *Public, error) {
	h, err := ParseHeader(io.NewSectionReader(source{src}, 0, size))
	if err != nil {
		return nil, nil, err
	}
	p, err := ParsePublic(h)
	if err != nil {
		return nil, nil, err
	}
	return h, p, nil
}

// Open parses the header, authenticates it with one of ids, and decrypts and
// authenticates the final payload chunk, which authenticates the plaintext
// size. Its cost does not depend on the file size.
func Open(src io.ReaderAt, size int64, ids ...age.Identity) (*File, error) {
	h, p, err := ParseFile(src, size)
	if err != nil {
		return nil, err
	}
	fileKey, err := decryptHeader(h, ids)
	if err != nil {
		return nil, err
	}
	if size < h.Size()+nonceSize {
		return nil, ErrPayloadEnd
	}
	plain, ptSize, err := age.DecryptReaderAt(source{src}, size, age.NewInjectedFileKeyIdentity(fileKey))
	var re *ReadError
	var nm *age.NoIdentityMatchError
	switch {
	case errors.As(err, &re):
		return nil, re
	case errors.As(err, &nm):
		return nil, ErrHeaderAuth // the header changed under us between the two reads
	case err != nil:
		return nil, fmt.Errorf("%w (%v)", ErrPayloadEnd, err)
	}
	if p.Signature != nil && p.Signature.Size != uint64(ptSize) {
		return nil, ErrSizeMismatch
	}
	return &File{Header: h, Public: p, PlainSize: ptSize, plain: plain}, nil
}

// decryptHeader unwraps the file key with one of ids and checks the header
// MAC. A recipient stanza an identity cannot parse is a malformed header; a
// MAC that does not verify is ErrHeaderAuth.
func decryptHeader(h *Header, ids []age.Identity) ([]byte, error) {
	marked := make([]age.Identity, len(ids))
	for i, id := range ids {
		marked[i] = stanzaIdentity{id}
	}
	fileKey, err := age.DecryptHeader(h.Raw, marked...)
	var nm *age.NoIdentityMatchError
	var se *recipientStanzaError
	switch {
	case errors.As(err, &nm):
		return nil, ErrWrongIdentity
	case errors.As(err, &se):
		return nil, &HeaderError{Reason: "recipient stanza: " + se.err.Error()}
	case err != nil && strings.HasPrefix(err.Error(), "failed to read header"):
		return nil, &HeaderError{Reason: err.Error()} // age's grammar is stricter than ours somewhere
	case err != nil:
		return nil, fmt.Errorf("%w (%v)", ErrHeaderAuth, err)
	}
	return fileKey, nil
}

// stanzaIdentity marks the errors an identity returns for a stanza it
// recognises but cannot parse, which age does not tell apart from a bad MAC.
type stanzaIdentity struct{ age.Identity }

type recipientStanzaError struct{ err error }

func (e *recipientStanzaError) Error() string { return e.err.Error() }

func (s stanzaIdentity) Unwrap(stanzas []*age.Stanza) ([]byte, error) {
	key, err := s.Identity.Unwrap(stanzas)
	if err != nil && !errors.Is(err, age.ErrIncorrectIdentity) {
		var nm *age.NoIdentityMatchError
		if !errors.As(err, &nm) {
			return nil, &recipientStanzaError{err}
		}
	}
	return key, err
}

// Result is what a full decryption proved about the plaintext.
type Result struct {
	Size   int64
	SHA256 [32]byte // zero with SkipSHA256 (unless a v1 signature needed it)
	Tree   [32]byte // TreeDigest, computed when a v2 signature needs it
	// UTF8 is, with CheckUTF8, the *UTF8Error of the plaintext's first
	// byte that is not UTF-8, or nil if it is all UTF-8.
	UTF8 error
}

// DecryptTo decrypts the whole payload into dst at the same offsets, using
// workers goroutines (0 means one per CPU), and returns its size and
// SHA-256. Every chunk is authenticated before DecryptTo returns nil; on any
// error dst holds a partial plaintext that the caller must discard. Memory
// use is about 2*workers*1 MiB whatever the file size.
func (f *File) DecryptTo(dst io.WriterAt, workers int) (Result, error) {
	return f.decrypt(&writerSink{dst: dst}, workers)
}

// DecryptInto is DecryptTo into memory the caller provides, such as a
// shared mapping of a memfd: workers decrypt straight into dst, so page
// faults happen in parallel and no plaintext is copied twice. len(dst) must
// be PlainSize.
func (f *File) DecryptInto(dst []byte, workers int) (Result, error) {
	if int64(len(dst)) != f.PlainSize {
		return Result{}, fmt.Errorf("destination holds %d bytes, plaintext has %d", len(dst), f.PlainSize)
	}
	return f.decrypt(sliceSink(dst), workers)
}

// A sink supplies the buffer a segment is decrypted into, and takes it back
// once the segment is authenticated (store) and hashed (release).
type sink interface {
	buffer(w int, off int64, n int, stop <-chan struct{}) ([]byte, bool)
	store(b []byte, off int64) error
	release(w int, b []byte)
}

type sliceSink []byte

func (s sliceSink) buffer(_ int, off int64, n int, _ <-chan struct{}) ([]byte, bool) {
	return s[off : off+int64(n)], true
}
func (s sliceSink) store([]byte, int64) error { return nil }
func (s sliceSink) release(int, []byte)       {}

// writerSink recycles two buffers per worker.
type writerSink struct {
	dst  io.WriterAt
	free []chan []byte
}

func (s *writerSink) init(workers int) {
	s.free = make([]chan []byte, workers)
	for i := range s.free {
		s.free[i] = make(chan []byte, 2)
		s.free[i] <- make([]byte, segmentSize)
		s.free[i] <- make([]byte, segmentSize)
	}
}

func (s *writerSink) buffer(w int, _ int64, n int, stop <-chan struct{}) ([]byte, bool) {
	select {
	case b := <-s.free[w]:
		return b[:n], true
	case <-stop:
		return nil, false
	}
}

func (s *writerSink) store(b []byte, off int64) error {
	if _, err := s.dst.WriteAt(b, off); err != nil {
		return fmt.Errorf("writing plaintext: %w", err)
	}
	return nil
}

func (s *writerSink) release(w int, b []byte) { s.free[w] <- b[:cap(b)] }

func (f *File) decrypt(out sink, workers int) (Result, error) {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	nseg := (f.PlainSize + segmentSize - 1) / segmentSize
	if int64(workers) > nseg {
		workers = int(max(nseg, 1))
	}
	if ws, ok := out.(*writerSink); ok {
		ws.init(workers)
	}
	sig := f.Public.Signature
	wantTree := sig != nil && sig.Version == SigVersion2
	wantSHA := !f.SkipSHA256 || (sig != nil && !wantTree)
	var leaves [][32]byte
	if wantTree {
		leaves = make([][32]byte, nseg) // each worker fills its own segments
	}
	var (
		u       *UTF8Blocks
		utf8Mu  sync.Mutex
		utf8Seg int64 = -1 // the first segment that is not UTF-8
		utf8Err error
	)
	if f.CheckUTF8 {
		u = NewUTF8Blocks(segmentSize, int(nseg))
	}
	// Worker w handles segments w, w+W, w+2W...; the hasher reads the
	// per-worker queues round-robin, so it hashes in file order.
	queues := make([]chan []byte, workers)
	for i := range queues {
		queues[i] = make(chan []byte, 2)
	}
	var (
		errMu    sync.Mutex
		firstErr error
		errSeg   int64 = -1
		stop           = make(chan struct{})
		stopOnce sync.Once
	)
	fail := func(idx int64, err error) {
		errMu.Lock()
		if errSeg < 0 || idx < errSeg {
			errSeg, firstErr = idx, err
		}
		errMu.Unlock()
		stopOnce.Do(func() { close(stop) })
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			defer close(queues[w])
			for i := int64(w); i < nseg; i += int64(workers) {
				off := i * segmentSize
				n := int(min(segmentSize, f.PlainSize-off))
				buf, ok := out.buffer(w, off, n, stop)
				if !ok {
					return
				}
				if _, err := f.plain.ReadAt(buf, off); err != nil && !(err == io.EOF && n > 0) {
					fail(i, f.explain(err, off, n))
					return
				}
				if err := out.store(buf, off); err != nil {
					fail(i, err)
					return
				}
				if wantTree {
					leaves[i] = sha256.Sum256(buf)
				}
				if u != nil {
					if err := u.Block(int(i), buf); err != nil {
						utf8Mu.Lock()
						if utf8Seg < 0 || i < utf8Seg {
							utf8Seg, utf8Err = i, err
						}
						utf8Mu.Unlock()
					}
				}
				select {
				case queues[w] <- buf:
				case <-stop:
					return
				}
			}
		}(w)
	}
	h := sha256.New()
	var hashed int64
	for i := int64(0); i < nseg; i++ {
		w := int(i % int64(workers))
		buf, ok := <-queues[w]
		if !ok {
			break
		}
		if wantSHA {
			h.Write(buf)
		}
		hashed += int64(len(buf))
		out.release(w, buf)
		if f.Progress != nil {
			f.Progress(hashed)
		}
	}
	wg.Wait()
	if firstErr != nil {
		return Result{}, firstErr
	}
	if hashed != f.PlainSize {
		return Result{}, fmt.Errorf("internal error: hashed %d of %d bytes", hashed, f.PlainSize)
	}
	r := Result{Size: f.PlainSize}
	if u != nil {
		r.UTF8 = u.First(int(utf8Seg), utf8Err)
	}
	if wantSHA {
		h.Sum(r.SHA256[:0])
	}
	got := r.SHA256[:]
	if wantTree {
		r.Tree = TreeDigest(f.PlainSize, leaves)
		got = r.Tree[:]
	}
	if sig != nil && !bytes.Equal(sig.SignedDigest(), got) {
		return Result{}, ErrDigest
	}
	return r, nil
}

// explain turns the failure err of the segment at plaintext offset off into
// a precise error: the *ReadError of a failed read, or the ChunkError of the
// first chunk that does not authenticate.
func (f *File) explain(err error, off int64, n int) error {
	var re *ReadError
	if errors.As(err, &re) {
		return re
	}
	buf := make([]byte, chunkSize)
	for c := off; c < off+int64(n); c += chunkSize {
		m := int(min(chunkSize, f.PlainSize-c))
		_, cerr := f.plain.ReadAt(buf[:m], c)
		if cerr == nil || (cerr == io.EOF && m > 0) {
			continue
		}
		if errors.As(cerr, &re) {
			return re
		}
		idx := c / chunkSize
		return &ChunkError{Index: idx, Offset: f.Header.Size() + nonceSize + idx*(chunkSize+chunkOverlay)}
	}
	// Every chunk authenticated when read again: the file changed while it
	// was read (a new upload over it), which is a read problem, not tampering.
	return &ReadError{Offset: f.Header.Size() + nonceSize, Err: fmt.Errorf("the file read differently twice (%v); was it replaced during the read?", err)}
}

// Head returns the first min(n, PlainSize) bytes of the payload, enough to
// tell a seekable gzip from G-code (seekgz.IsGzip). It authenticates the
// chunk they are in.
func (f *File) Head(n int) ([]byte, error) {
	b := make([]byte, min(int64(n), f.PlainSize))
	if _, err := f.plain.ReadAt(b, 0); err != nil && !(err == io.EOF && len(b) > 0) {
		return nil, f.explain(err, 0, len(b))
	}
	return b, nil
}
