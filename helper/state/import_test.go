//go:build linux

package state

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const fileB = "ffeeddccbbaa99887766554433221100"

func TestImportAddsTheMissingPrintsAndLimitsStillHold(t *testing.T) {
	s, _ := newStore(t)
	c, err := ParseCounts(strings.NewReader(`{"uid": 1000, "counts": {"`+fileA+`": 1, "`+fileB+`": 0}}`), "export.json")
	if err != nil {
		t.Fatal(err)
	}
	added, err := s.Import(c, 99)
	if err != nil || added != 1 {
		t.Fatalf("import: added %d, %v", added, err)
	}
	st, _ := s.Load()
	want := Decryption{FileID: fileA, Time: 99, PID: ImportedPID, UID: 1000, CountAfter: 1}
	if st.Used(fileA) != 1 || len(st.Records) != 1 || st.Records[0] != want {
		t.Fatalf("after import: %+v", st)
	}
	// A 3-print file printed once before: two prints left, then refused.
	for want := 2; want <= 3; want++ {
		if d, err := s.Commit(Decryption{FileID: fileA, MaxPrints: 3}); err != nil || d.CountAfter != want {
			t.Fatalf("print %d after import: %+v, %v", want, d, err)
		}
	}
	var used *UsedUpError
	if _, err := s.Commit(Decryption{FileID: fileA, MaxPrints: 3}); !errors.As(err, &used) {
		t.Fatalf("fourth print of a 3-print file: %v", err)
	}
}

func TestImportNeverLowersACount(t *testing.T) {
	s, dir := newStore(t)
	for i := 0; i < 3; i++ {
		s.Commit(Decryption{FileID: fileA, PID: 7})
	}
	before, _ := os.ReadFile(filepath.Join(dir, "state"))
	c := &Counts{UID: 1000, Counts: map[string]int{fileA: 1}}
	if added, err := s.Import(c, 99); err != nil || added != 0 {
		t.Fatalf("import of a lower count: added %d, %v", added, err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "state")); !bytes.Equal(before, after) {
		t.Fatal("an import that added nothing rewrote the state")
	}
	c.Counts[fileA] = 5
	if added, err := s.Import(c, 99); err != nil || added != 2 {
		t.Fatalf("import of a higher count: added %d, %v", added, err)
	}
	if st, _ := s.Load(); st.Used(fileA) != 5 || len(st.Records) != 5 || st.Records[2].PID != 7 {
		t.Fatalf("after raising 3 to 5: %+v", st)
	}
}

func TestImportRefusesAMissingOrDamagedStateAndLeavesIt(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := &Counts{Counts: map[string]int{fileA: 1}}
	if _, err := s.Import(c, 1); !errors.Is(err, ErrMissing) {
		t.Fatalf("import without a state: %v", err)
	}
	for _, name := range slotNames {
		if _, err := os.Stat(filepath.Join(dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("import created %s", name)
		}
	}
	s.Close()
	os.WriteFile(filepath.Join(dir, slotNames[0]), []byte("junk"), 0o600)
	os.WriteFile(filepath.Join(dir, slotNames[1]), nil, 0o600)
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var ce *CorruptError
	if _, err := s.Import(c, 1); !errors.As(err, &ce) {
		t.Fatalf("import into a damaged state: %v", err)
	}
	if data, _ := os.ReadFile(filepath.Join(dir, slotNames[0])); string(data) != "junk" {
		t.Fatal("import replaced a damaged state")
	}
}

func TestParseCountsRefusesWhatIsNotCounts(t *testing.T) {
	cases := map[string]string{
		"not json":      `counts`,
		"unknown key":   `{"uid": 1, "counts": {}, "reset": true}`,
		"no counts":     `{"uid": 1}`,
		"negative uid":  `{"uid": -1, "counts": {}}`,
		"short id":      `{"uid": 1, "counts": {"00ff": 1}}`,
		"uppercase id":  `{"uid": 1, "counts": {"` + strings.ToUpper(fileA) + `": 1}}`,
		"path as id":    `{"uid": 1, "counts": {"../../etc/passwd": 1}}`,
		"negative":      `{"uid": 1, "counts": {"` + fileA + `": -1}}`,
		"huge":          `{"uid": 1, "counts": {"` + fileA + `": 100000000}}`,
		"trailing data": `{"uid": 1, "counts": {}} {}`,
	}
	for name, in := range cases {
		if _, err := ParseCounts(strings.NewReader(in), "export.json"); err == nil ||
			!strings.Contains(err.Error(), "export.json") {
			t.Errorf("%s: %v", name, err)
		}
	}
}
