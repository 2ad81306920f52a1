package seekgz

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os/exec"
	"strings"
	"testing"

	"github.com/klipper-encprint/encprint/helper/contract"
)

// gcode is deterministic G-code-like text of n bytes.
func gcode(n int, seed int64) []byte {
	r := rand.New(rand.NewSource(seed))
	var b bytes.Buffer
	for b.Len() < n {
		fmt.Fprintf(&b, "G1 X%.3f Y%.3f E%.5f\n", r.Float64()*200, r.Float64()*200, r.Float64())
	}
	return b.Bytes()[:n]
}

func encode(t testing.TB, clear []byte, opts Options) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := NewWriter(&out, opts)
	if err != nil {
		t.Fatal(err)
	}
	// Odd write sizes cross block boundaries.
	for p := clear; len(p) > 0; {
		k := min(len(p), 7919)
		if _, err := w.Write(p[:k]); err != nil {
			t.Fatal(err)
		}
		p = p[k:]
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func open(t testing.TB, payload []byte) (*Index, error) {
	t.Helper()
	ix, err := ReadIndex(bytes.NewReader(payload), int64(len(payload)), Limits{})
	if err != nil {
		return nil, err
	}
	return ix, ix.Validate(bytes.NewReader(payload), 0)
}

func TestRoundTrip(t *testing.T) {
	const bs = MinBlockSize
	for _, n := range []int{0, 1, bs - 1, bs, bs + 1, 3*bs + 17, 10 * bs} {
		clear := gcode(n, int64(n))
		payload := encode(t, clear, Options{BlockSize: bs, Workers: 3})
		ix, err := open(t, payload)
		if err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if ix.ClearSize != int64(n) || ix.Blocks() != (n+bs-1)/bs {
			t.Fatalf("%d bytes: index says %d bytes in %d blocks", n, ix.ClearSize, ix.Blocks())
		}
		got, err := io.ReadAll(io.NewSectionReader(NewReader(bytes.NewReader(payload), ix), 0, ix.ClearSize))
		if err != nil || !bytes.Equal(got, clear) {
			t.Fatalf("%d bytes: read back %d bytes, err %v", n, len(got), err)
		}
		// A standard gzip reader sees one stream: the G-code.
		zr, err := gzip.NewReader(bytes.NewReader(payload))
		if n == 0 && err != nil {
			t.Fatalf("empty: %v", err)
		}
		got, err = io.ReadAll(zr)
		if err != nil || !bytes.Equal(got, clear) {
			t.Fatalf("%d bytes: compress/gzip read %d bytes, err %v", n, len(got), err)
		}
	}
}

// TestGunzip: `gunzip` gives the G-code byte for byte.
func TestGunzip(t *testing.T) {
	gz, err := exec.LookPath("gzip")
	if err != nil {
		t.Skip("no gzip command")
	}
	clear := gcode(300_000, 1)
	cmd := exec.Command(gz, "-dc")
	cmd.Stdin = bytes.NewReader(encode(t, clear, Options{BlockSize: 16 << 10}))
	out, err := cmd.Output()
	if err != nil || !bytes.Equal(out, clear) {
		t.Fatalf("gzip -dc: %d bytes, err %v", len(out), err)
	}
}

func TestRandomAccessAtBoundaries(t *testing.T) {
	const bs = MinBlockSize
	clear := gcode(5*bs+123, 2)
	payload := encode(t, clear, Options{BlockSize: bs})
	ix, err := open(t, payload)
	if err != nil {
		t.Fatal(err)
	}
	r := NewReader(bytes.NewReader(payload), ix)
	for _, off := range []int64{0, bs - 1, bs, 2*bs - 1, 2 * bs, 2*bs + bs/2, 5 * bs, int64(len(clear)) - 1} {
		for _, n := range []int{1, 2, bs + 3} {
			p := make([]byte, n)
			got, err := r.ReadAt(p, off)
			want := min(n, len(clear)-int(off))
			if got != want || !bytes.Equal(p[:got], clear[off:off+int64(want)]) {
				t.Fatalf("ReadAt(%d, %d) = %d bytes (want %d), err %v", n, off, got, want, err)
			}
			if want < n && err != io.EOF {
				t.Fatalf("ReadAt(%d, %d) past the end: err %v, want EOF", n, off, err)
			}
		}
	}
	if n, err := r.ReadAt(make([]byte, 1), int64(len(clear))); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at EOF = %d, %v", n, err)
	}
}

// TestManyBlocks crosses one index member (16,382 entries).
func TestManyBlocks(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB")
	}
	clear := make([]byte, (maxIndexEntries+5)*MinBlockSize+9)
	copy(clear[len(clear)-9:], "G28\nM84\n\n")
	payload := encode(t, clear, Options{BlockSize: MinBlockSize})
	ix, err := open(t, payload)
	if err != nil {
		t.Fatal(err)
	}
	if ix.Blocks() != maxIndexEntries+6 {
		t.Fatalf("%d blocks", ix.Blocks())
	}
	p := make([]byte, 9)
	if _, err := NewReader(bytes.NewReader(payload), ix).ReadAt(p, int64(len(clear)-9)); err != nil || string(p) != "G28\nM84\n\n" {
		t.Fatalf("last bytes %q, %v", p, err)
	}
}

func sample(t *testing.T) ([]byte, *Index) {
	payload := encode(t, gcode(4*MinBlockSize+100, 3), Options{BlockSize: MinBlockSize})
	ix, err := open(t, payload)
	if err != nil {
		t.Fatal(err)
	}
	return payload, ix
}

// footerField returns the offset of a footer data field in payload.
func footerField(payload []byte, field int) int { return len(payload) - FooterSize + 16 + field }

func TestIndexThatLies(t *testing.T) {
	base, ix := sample(t)
	cases := map[string]func(p []byte){
		"clear size one block more": func(p []byte) {
			o := footerField(p, 8)
			binary.LittleEndian.PutUint64(p[o:], binary.LittleEndian.Uint64(p[o:])+MinBlockSize)
		},
		"clear size one byte less in the last block": func(p []byte) {
			o := footerField(p, 8)
			binary.LittleEndian.PutUint64(p[o:], binary.LittleEndian.Uint64(p[o:])-1)
		},
		"block count":  func(p []byte) { p[footerField(p, 24)]++ },
		"index offset": func(p []byte) { p[footerField(p, 16)]-- },
		"block size":   func(p []byte) { binary.LittleEndian.PutUint32(p[footerField(p, 4):], MinBlockSize*2) },
		"version":      func(p []byte) { p[footerField(p, 0)] = 2 },
		"two sizes swapped": func(p []byte) {
			o := int(ix.Offsets[ix.Blocks()]) + 16
			a, b := binary.LittleEndian.Uint32(p[o:]), binary.LittleEndian.Uint32(p[o+4:])
			if a == b {
				t.Skip("equal sizes")
			}
			binary.LittleEndian.PutUint32(p[o:], b)
			binary.LittleEndian.PutUint32(p[o+4:], a)
		},
		"a block's own size field": func(p []byte) { p[ix.Offsets[2]+16]++ },
		"a block's header":         func(p []byte) { p[ix.Offsets[1]+12] = 'X' },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			p := bytes.Clone(base)
			mutate(p)
			_, err := open(t, p)
			var ie *IndexError
			var be *BlockError
			if !errors.As(err, &ie) && !errors.As(err, &be) {
				t.Fatalf("accepted (err %v)", err)
			}
		})
	}
}

func TestTamperedBlockRefused(t *testing.T) {
	base, ix := sample(t)
	for _, where := range []string{"deflate data", "crc", "isize"} {
		p := bytes.Clone(base)
		end := ix.Offsets[3]
		switch where {
		case "deflate data":
			p[ix.Offsets[2]+blockHeaderSize+40] ^= 0x10
		case "crc":
			p[end-8] ^= 1
		case "isize":
			p[end-1] ^= 1
		}
		_, err := open(t, p)
		var be *BlockError
		if !errors.As(err, &be) || be.Block != 2 {
			t.Fatalf("%s: err %v, want a BlockError for block 2", where, err)
		}
	}
}

// TestBomb: a block whose deflate data inflates to far more than a block is
// refused after BlockSize+1 bytes, and a footer claiming more G-code than
// allowed is refused before anything is inflated.
func TestBomb(t *testing.T) {
	big := make([]byte, 8<<20)
	var z bytes.Buffer
	fw, _ := flate.NewWriter(&z, flate.BestCompression)
	fw.Write(big)
	fw.Close()
	member := append(bytes.Clone(Magic), 0, 0, 0, 0)
	member = append(member, z.Bytes()...)
	member = binary.LittleEndian.AppendUint32(member, 0)
	member = binary.LittleEndian.AppendUint32(member, MinBlockSize)
	binary.LittleEndian.PutUint32(member[16:], uint32(len(member)))
	payload := appendIndex(bytes.Clone(member), []uint32{uint32(len(member))})
	payload = appendFooter(payload, footer{version: Version, blockSize: MinBlockSize, clearSize: MinBlockSize,
		indexOffset: uint64(len(member)), blocks: 1, indexLen: uint32(indexLen(1))})
	_, err := open(t, payload)
	var ie *IndexError
	var be *BlockError
	if !errors.As(err, &ie) && !errors.As(err, &be) {
		t.Fatalf("bomb accepted: %v", err)
	}
	good := encode(t, gcode(3*MinBlockSize, 4), Options{BlockSize: MinBlockSize})
	_, err = ReadIndex(bytes.NewReader(good), int64(len(good)), Limits{MaxClearSize: 2 * MinBlockSize})
	var le *LimitError
	if !errors.As(err, &le) || le.Claimed != 3*MinBlockSize || le.Limit != 2*MinBlockSize {
		t.Fatalf("over MaxClearSize: %v", err)
	}
}

func TestPlainGzipIsNotSeekable(t *testing.T) {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write(gcode(10000, 5))
	zw.Close()
	if !IsGzip(b.Bytes()) {
		t.Fatal("IsGzip false for gzip")
	}
	if _, err := ReadIndex(bytes.NewReader(b.Bytes()), int64(b.Len()), Limits{}); !errors.Is(err, ErrNotSeekable) {
		t.Fatalf("err %v, want ErrNotSeekable", err)
	}
	if IsGzip([]byte("G28\n")) {
		t.Fatal("IsGzip true for G-code")
	}
}

func FuzzReadIndex(f *testing.F) {
	f.Add(encode(f, gcode(3*MinBlockSize+5, 6), Options{BlockSize: MinBlockSize}))
	f.Add(encode(f, nil, Options{}))
	f.Fuzz(func(t *testing.T, p []byte) {
		ix, err := ReadIndex(bytes.NewReader(p), int64(len(p)), Limits{MaxClearSize: 64 << 20})
		if err != nil {
			return
		}
		if ix.Validate(bytes.NewReader(p), 2) == nil {
			got, err := io.ReadAll(io.NewSectionReader(NewReader(bytes.NewReader(p), ix), 0, ix.ClearSize))
			if err != nil || int64(len(got)) != ix.ClearSize {
				t.Fatalf("validated but reads %d of %d bytes: %v", len(got), ix.ClearSize, err)
			}
		}
	})
}

// The format's constants are those of proto/contract.json (which
// helper/contract checks), so the Klipper extra sniffs what this writes.
func TestFormatEqualsContract(t *testing.T) {
	if string(Magic) != contract.SeekgzMagic || !strings.HasPrefix(contract.SeekgzMagic, contract.GzipMagic) ||
		FooterSize != contract.FooterSize || Version != contract.FooterVersion ||
		DefaultBlockSize != contract.DefaultBlockSize || MinBlockSize != contract.MinBlockSize || MaxBlockSize != contract.MaxBlockSize {
		t.Fatal("helper/seekgz and helper/contract disagree")
	}
	if !IsGzip([]byte(contract.GzipMagic)) || IsGzip([]byte("\x1f")) || IsGzip([]byte("; G-code")) {
		t.Fatal("IsGzip does not recognise the contract's magic")
	}
}
