//go:build linux

package memfd

import (
	"runtime"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkFill256MiB fills a fresh 256 MiB memfd through its shared
// mapping from one goroutine per CPU, as the helper's decrypting workers
// do, with the memfd's pages allocated in different ways first.
func BenchmarkFill256MiB(b *testing.B) {
	const size = 256 << 20
	src := make([]byte, 1<<20)
	for i := range src {
		src[i] = byte(i)
	}
	for _, c := range []struct {
		name    string
		prepare func(f int, m []byte) error
		flags   int
	}{
		{"page-faults", func(int, []byte) error { return nil }, 0},
		{"map-populate", func(int, []byte) error { return nil }, unix.MAP_POPULATE},
		{"fallocate", func(f int, _ []byte) error { return unix.Fallocate(f, 0, 0, size) }, 0},
		{"pwrite", nil, 0},
		{"madv-populate-write", func(_ int, m []byte) error { return unix.Madvise(m, unix.MADV_POPULATE_WRITE) }, 0},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(size)
			for i := 0; i < b.N; i++ {
				f, err := Create("bench", size)
				if err != nil {
					b.Fatal(err)
				}
				if c.name == "pwrite" {
					pwriteFill(f.Fd(), size, src)
					f.Close()
					continue
				}
				if c.name == "fallocate" {
					if err := c.prepare(int(f.Fd()), nil); err != nil {
						b.Fatal(err)
					}
				}
				m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|c.flags)
				if err != nil {
					b.Fatal(err)
				}
				if c.name == "madv-populate-write" {
					if err := c.prepare(0, m); err != nil {
						b.Fatal(err)
					}
				}
				fill(m, src)
				unix.Munmap(m)
				f.Close()
			}
		})
	}
}

func fill(m, src []byte) {
	var wg sync.WaitGroup
	workers := runtime.GOMAXPROCS(0)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := w * len(src); off < len(m); off += workers * len(src) {
				copy(m[off:], src)
			}
		}()
	}
	wg.Wait()
}

func pwriteFill(fd uintptr, size int, src []byte) {
	var wg sync.WaitGroup
	workers := runtime.GOMAXPROCS(0)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, len(src))
			for off := w * len(src); off < size; off += workers * len(src) {
				copy(buf, src)
				unix.Pwrite(int(fd), buf, int64(off))
			}
		}()
	}
	wg.Wait()
}
