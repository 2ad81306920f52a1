//go:build linux

package memfd

import (
	"testing"

	"github.com/klipper-encprint/encprint/helper/contract"
	"golang.org/x/sys/unix"
)

// The contract's fcntl numbers are the kernel's.
func TestContractMatchesTheKernelHeaders(t *testing.T) {
	for _, c := range []struct {
		name       string
		ours, unix int
	}{
		{"F_ADD_SEALS", contract.FAddSeals, unix.F_ADD_SEALS},
		{"F_GET_SEALS", contract.FGetSeals, unix.F_GET_SEALS},
		{"F_SEAL_SEAL", contract.SealSeal, unix.F_SEAL_SEAL},
		{"F_SEAL_SHRINK", contract.SealShrink, unix.F_SEAL_SHRINK},
		{"F_SEAL_GROW", contract.SealGrow, unix.F_SEAL_GROW},
		{"F_SEAL_WRITE", contract.SealWrite, unix.F_SEAL_WRITE},
	} {
		if c.ours != c.unix {
			t.Errorf("%s: contract has %d, the kernel %d", c.name, c.ours, c.unix)
		}
	}
}

func TestSealedMemfdCarriesEverySeal(t *testing.T) {
	f, err := Create(contract.MemfdTokenPrefix+"test", 10)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	seals, err := Seal(f)
	if err != nil {
		t.Fatal(err)
	}
	if seals&contract.RequiredSeals != contract.RequiredSeals {
		t.Fatalf("seals %#x", seals)
	}
	if _, err := f.WriteAt([]byte("x"), 0); err == nil {
		t.Fatal("a sealed memfd accepted a write")
	}
}

// What the helper writes with pwrite(2) reads back through Map, and the
// memfd seals once the mapping is gone.
func TestMapReadsBackWhatWasWritten(t *testing.T) {
	f, err := Create(contract.MemfdTokenPrefix+"test", 3*4096)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("G28\n"), 4096-2); err != nil {
		t.Fatal(err)
	}
	m, err := Map(f, 3*4096)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(m[4096-2 : 4096+2]); got != "G28\n" || m[0] != 0 || m[len(m)-1] != 0 {
		t.Fatalf("mapping reads %q around the page boundary", got)
	}
	if err := Unmap(m); err != nil {
		t.Fatal(err)
	}
	if _, err := Seal(f); err != nil {
		t.Fatalf("sealing after Unmap: %v", err)
	}
}
