package encfile

import (
	"bytes"
	"fmt"
	"io"
	"math/rand"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/klipper-encprint/encprint/helper/seekgz"
)

var benchFile struct {
	once sync.Once
	ct   []byte
	id   *age.X25519Identity
}

// bench256 is a 256 MiB G-code file encrypted once for all benchmarks.
func bench256(b *testing.B) ([]byte, *age.X25519Identity) {
	benchFile.once.Do(func() {
		id, _ := age.GenerateX25519Identity()
		line := []byte("G1 X123.456 Y78.901 E0.04567 F2400 ; benchmark line\n")
		plain := bytes.Repeat(line, 256<<20/len(line))
		var out bytes.Buffer
		if err := Encrypt(&out, bytes.NewReader(plain), EncryptOptions{Recipients: []age.Recipient{id.Recipient()}}); err != nil {
			panic(err)
		}
		benchFile.ct, benchFile.id = out.Bytes(), id
	})
	return benchFile.ct, benchFile.id
}

// BenchmarkDecrypt256MiB compares, on the same file, the parallel decrypt
// the helper uses (into memory, as into its memfd mapping) with age's own
// sequential reader.
func BenchmarkDecrypt256MiB(b *testing.B) {
	ct, id := bench256(b)
	f, err := Open(bytes.NewReader(ct), int64(len(ct)), id)
	if err != nil {
		b.Fatal(err)
	}
	dst := make([]byte, f.PlainSize)
	b.Run("parallel-into-memory", func(b *testing.B) {
		b.SetBytes(f.PlainSize)
		for i := 0; i < b.N; i++ {
			if _, err := f.DecryptInto(dst, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	// What the helper needs for a stock-age or unsigned file: no digest.
	b.Run("parallel-into-memory-no-sha256", func(b *testing.B) {
		f.SkipSHA256 = true
		defer func() { f.SkipSHA256 = false }()
		b.SetBytes(f.PlainSize)
		for i := 0; i < b.N; i++ {
			if _, err := f.DecryptInto(dst, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel-hash-only", func(b *testing.B) {
		b.SetBytes(f.PlainSize)
		for i := 0; i < b.N; i++ {
			if _, err := f.DecryptTo(discardAt{}, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("age-sequential-reader", func(b *testing.B) {
		b.SetBytes(f.PlainSize)
		for i := 0; i < b.N; i++ {
			r, err := age.Decrypt(bytes.NewReader(ct), id)
			if err != nil {
				b.Fatal(err)
			}
			w := &sliceWriter{b: dst}
			if _, err := io.CopyBuffer(w, r, make([]byte, 64<<10)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// sliceWriter writes into preallocated memory, like the parallel path.
type sliceWriter struct {
	b []byte
	n int
}

func (w *sliceWriter) Write(p []byte) (int, error) {
	w.n += copy(w.b[w.n:], p)
	return len(p), nil
}

// processCPU is the user and system CPU time this process used so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type discardAt struct{}

func (discardAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

// BenchmarkCompressed64MiB: what the helper does for a file made with
// compression (decrypt without SHA-256, then validate every block) against
// age's sequential reader of the same file, which gives only the compressed
// bytes. ENCPRINT_BENCH_GCODE names real G-code to use (bench/dense_gcode.py);
// otherwise 64 MiB of varied G-code-like lines.
func BenchmarkCompressed64MiB(b *testing.B) {
	plain := benchGcode(b)
	id, _ := age.GenerateX25519Identity()
	var out bytes.Buffer
	if err := Encrypt(&out, bytes.NewReader(plain), EncryptOptions{Recipients: []age.Recipient{id.Recipient()},
		Compress: &seekgz.Options{}}); err != nil {
		b.Fatal(err)
	}
	ct := out.Bytes()
	f, err := Open(bytes.NewReader(ct), int64(len(ct)), id)
	if err != nil {
		b.Fatal(err)
	}
	f.SkipSHA256 = true
	dst := make([]byte, f.PlainSize)
	b.Logf("G-code %d bytes, payload %d (%.1f%%)", len(plain), f.PlainSize, 100*float64(f.PlainSize)/float64(len(plain)))
	b.Run("decrypt-and-validate", func(b *testing.B) {
		b.SetBytes(int64(len(plain)))
		for i := 0; i < b.N; i++ {
			if _, err := f.DecryptInto(dst, 0); err != nil {
				b.Fatal(err)
			}
			ix, err := seekgz.ReadIndex(bytes.NewReader(dst), int64(len(dst)), seekgz.Limits{})
			if err != nil {
				b.Fatal(err)
			}
			if err := ix.Validate(bytes.NewReader(dst), 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	// Validation alone, as the helper runs it (every block inflated on every
	// CPU, CRC-32, UTF-8): the part that inflate speed decides.
	b.Run("check-payload", func(b *testing.B) {
		if _, err := f.DecryptInto(dst, 0); err != nil {
			b.Fatal(err)
		}
		b.SetBytes(int64(len(plain)))
		cpu0 := processCPU()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := CheckPayload(dst, 0); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		// CPU time over wall time: how many cores the workers really got.
		b.ReportMetric((processCPU()-cpu0).Seconds()/b.Elapsed().Seconds(), "cores")
	})
	b.Run("age-sequential-reader", func(b *testing.B) {
		b.SetBytes(int64(len(plain)))
		for i := 0; i < b.N; i++ {
			r, err := age.Decrypt(bytes.NewReader(ct), id)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.CopyBuffer(&sliceWriter{b: dst}, r, make([]byte, 64<<10)); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func benchGcode(b *testing.B) []byte {
	if p := os.Getenv("ENCPRINT_BENCH_GCODE"); p != "" {
		data, err := os.ReadFile(p)
		if err != nil {
			b.Fatal(err)
		}
		return data
	}
	r := rand.New(rand.NewSource(1))
	var buf bytes.Buffer
	for buf.Len() < 64<<20 {
		fmt.Fprintf(&buf, "G1 X%.3f Y%.3f E%.5f\n", 50+r.Float64()*100, 50+r.Float64()*100, r.Float64()*0.1)
	}
	return buf.Bytes()
}
