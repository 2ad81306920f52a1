//go:build linux

// Package memfd creates the sealed in-memory file that carries cleartext
// G-code from the helper to Klipper.
package memfd

import (
	"errors"
	"fmt"
	"os"

	"github.com/klipper-encprint/encprint/helper/contract"
	"golang.org/x/sys/unix"
)

// AllSeals are the seals a finished memfd carries: its size and content can
// no longer change, and no further seal can be added or removed.
const AllSeals = contract.RequiredSeals

// ErrUnavailable means the kernel cannot create a memfd (older than 3.17, or
// memfd_create is blocked).
var ErrUnavailable = errors.New("this kernel cannot create an in-memory file (memfd_create is missing or blocked; Linux 3.17 or later is required)")

// Create returns a new memfd of exactly size bytes whose size is already
// sealed (F_SEAL_GROW|F_SEAL_SHRINK). It asks for MFD_NOEXEC_SEAL and falls
// back without it on kernels older than 6.3, which reject the flag with EINVAL.
func Create(name string, size int64) (*os.File, error) {
	flags := unix.MFD_CLOEXEC | unix.MFD_ALLOW_SEALING
	fd, err := unix.MemfdCreate(name, flags|unix.MFD_NOEXEC_SEAL)
	if errors.Is(err, unix.EINVAL) {
		fd, err = unix.MemfdCreate(name, flags)
	}
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		return nil, ErrUnavailable
	}
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "memfd:"+name)
	if err := unix.Ftruncate(fd, size); err != nil {
		f.Close()
		return nil, fmt.Errorf("sizing the in-memory file to %d bytes: %w", size, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), contract.FAddSeals, contract.SealGrow|contract.SealShrink); err != nil {
		f.Close()
		return nil, fmt.Errorf("sealing the in-memory file's size: %w", err)
	}
	return f, nil
}

// Map maps the first size bytes of the memfd shared and read-only, to read
// back what was written to it with pwrite(2). Writers use pwrite, not a
// writable mapping: the kernel allocates shmem pages in the write path far
// faster than it takes one page fault per 4 KiB page, and a read-only
// mapping of pages already there costs little (docs/benchmarks.md,
// BenchmarkFill256MiB). The mapping is kept out of core dumps.
func Map(f *os.File, size int64) ([]byte, error) {
	if size == 0 {
		return []byte{}, nil
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping the in-memory file: %w", err)
	}
	unix.Madvise(b, unix.MADV_DONTDUMP)
	return b, nil
}

// Unmap undoes Map.
func Unmap(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	return unix.Munmap(b)
}

// Seal adds the remaining seals and returns the resulting seal set, which is
// checked to contain AllSeals.
func Seal(f *os.File) (int, error) {
	fd := int(f.Fd())
	if _, err := unix.FcntlInt(uintptr(fd), contract.FAddSeals, contract.SealWrite|contract.SealSeal); err != nil {
		return 0, fmt.Errorf("sealing the in-memory file: %w", err)
	}
	seals, err := unix.FcntlInt(uintptr(fd), contract.FGetSeals, 0)
	if err != nil {
		return 0, fmt.Errorf("reading the seals back: %w", err)
	}
	if seals&AllSeals != AllSeals {
		return seals, fmt.Errorf("seals are %#x, want at least %#x", seals, AllSeals)
	}
	return seals, nil
}
