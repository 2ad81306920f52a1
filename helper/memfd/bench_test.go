//go:build linux

package memfd

import (
	"runtime"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkFill256MiB fills a fresh 256 MiB memfd from one goroutine per
// CPU, as the helper's decrypting workers do: through a shared writable
// mapping, with the memfd's pages allocated in different ways first (one
// page fault per 4 KiB page, or populated beforehand), and with pwrite(2).
func BenchmarkFill256MiB(b *testing.B) {
	const size = 256 << 20
	src := make([]byte, 1<<20)
	for i := range src {
		src[i] = byte(i)
	}
	for _, c := range []struct {
		name  string
		flags int                // added to the mmap flags
		fd    func(fd int) error // after ftruncate, before mmap
		m     func(m []byte) error
	}{
		{name: "page-faults"},
		{name: "map-populate", flags: unix.MAP_POPULATE},
		{name: "fallocate", fd: func(fd int) error { return unix.Fallocate(fd, 0, 0, size) }},
		{name: "madv-populate-write", m: func(m []byte) error { return unix.Madvise(m, unix.MADV_POPULATE_WRITE) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(size)
			for i := 0; i < b.N; i++ {
				f, err := Create("bench", size)
				if err != nil {
					b.Fatal(err)
				}
				if c.fd != nil {
					if err := c.fd(int(f.Fd())); err != nil {
						b.Fatal(err)
					}
				}
				m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|c.flags)
				if err != nil {
					b.Fatal(err)
				}
				if c.m != nil {
					if err := c.m(m); err != nil {
						b.Fatal(err)
					}
				}
				fill(m, src)
				unix.Munmap(m)
				f.Close()
			}
		})
	}
	// What the helper does: pwrite(2) from each worker's own buffer.
	b.Run("pwrite", func(b *testing.B) {
		b.SetBytes(size)
		for i := 0; i < b.N; i++ {
			f, err := Create("bench", size)
			if err != nil {
				b.Fatal(err)
			}
			pwriteFill(f.Fd(), size, src)
			f.Close()
		}
	})
}

// eachWorker runs work(buf, off) for every len(src)-sized piece of size bytes,
// one goroutine per CPU with a buffer of its own, each taking every
// GOMAXPROCS-th piece.
func eachWorker(size int, src []byte, work func(buf []byte, off int)) {
	var wg sync.WaitGroup
	workers := runtime.GOMAXPROCS(0)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, len(src))
			for off := w * len(src); off < size; off += workers * len(src) {
				work(buf, off)
			}
		}()
	}
	wg.Wait()
}

func fill(m, src []byte) {
	eachWorker(len(m), src, func(_ []byte, off int) { copy(m[off:], src) })
}

func pwriteFill(fd uintptr, size int, src []byte) {
	eachWorker(size, src, func(buf []byte, off int) {
		copy(buf, src)
		unix.Pwrite(int(fd), buf, int64(off))
	})
}
