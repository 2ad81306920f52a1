//go:build linux

package state

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"sort"

	"golang.org/x/sys/unix"
)

// ImportedPID is the pid of a record that Import added: not a decryption
// this helper handed out, but a print counted before the helper kept the
// state (in Moonraker's database, by the component).
const ImportedPID = 0

// maxImport bounds an import file.
const maxImport = 16 << 20

// maxImportedCount bounds one file's imported count, so that a typo cannot
// make the state grow without limit (one record per print).
const maxImportedCount = 100000

// Counts is an import file: the print counts of an install that kept them
// in Moonraker's database (scripts/moonraker_counts.py writes it).
type Counts struct {
	// UID is the printer's user, whose Moonraker database counted the
	// prints; it is written into each imported record.
	UID int `json:"uid"`
	// Counts maps a file id (32 hex digits) to the prints used.
	Counts map[string]int `json:"counts"`
}

// ParseCounts reads an import file strictly; name is where it came from,
// for messages.
func ParseCounts(r io.Reader, name string) (*Counts, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxImport+1))
	if err != nil {
		return nil, fmt.Errorf("cannot read the counts to import from %s: %w", name, err)
	}
	if len(data) > maxImport {
		return nil, fmt.Errorf("the counts to import from %s are larger than %d bytes", name, maxImport)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	c := &Counts{}
	if err := dec.Decode(c); err != nil {
		return nil, fmt.Errorf("the counts to import from %s are not valid: %v (expected {\"uid\": 1000, \"counts\": {\"<file id>\": 1}})", name, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("the counts to import from %s have content after their JSON object", name)
	}
	if c.Counts == nil {
		return nil, fmt.Errorf("the counts to import from %s have no \"counts\"", name)
	}
	if c.UID < 0 {
		return nil, fmt.Errorf("the counts to import from %s: uid %d is not a user id", name, c.UID)
	}
	for id, n := range c.Counts {
		if b, err := hex.DecodeString(id); err != nil || len(b) != 16 || hex.EncodeToString(b) != id {
			return nil, fmt.Errorf("the counts to import from %s: %q is not a file id (32 lowercase hex digits)", name, id)
		}
		if n < 0 || n > maxImportedCount {
			return nil, fmt.Errorf("the counts to import from %s: file %s has count %d (0 to %d expected)", name, id, n, maxImportedCount)
		}
	}
	return c, nil
}

// Import raises each file's count to at least the imported one, appending a
// record (pid ImportedPID, time now) for every print it adds. It only ever
// adds: a count already as high stays as it is, and no record is removed.
// The state must exist (Init creates it); a damaged state is an error and
// stays as it is. It returns how many prints it added, and writes nothing
// when that is none.
func (s *Store) Import(c *Counts, now int64) (int, error) {
	if err := s.flock(unix.LOCK_EX); err != nil {
		return 0, err
	}
	defer s.flock(unix.LOCK_UN)
	st, err := s.read()
	if err != nil {
		return 0, err
	}
	ids := make([]string, 0, len(c.Counts))
	for id := range c.Counts {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	added := 0
	for _, id := range ids {
		for st.Counts[id] < c.Counts[id] {
			st.Counts[id]++
			st.Records = append(st.Records, Decryption{FileID: id, Time: now, PID: ImportedPID,
				UID: c.UID, CountAfter: st.Counts[id]})
			added++
		}
	}
	if added == 0 {
		return 0, nil
	}
	return added, s.write(st)
}
