//go:build linux

// Package state keeps the printer's print counts and the record of every
// decryption, in a directory that only the helper's own user can write
// (docs/adr/007-privilege-boundary.md).
//
// Every decryption is one Commit: under an exclusive flock the state is read,
// the file's count is checked against its limit, a record is appended, and the
// whole state is written to a temporary file, fsynced, renamed over the old
// one and the directory fsynced. Power loss at any point leaves either the old
// or the new state on disk, never a mix, and a Commit that returned has
// reached the disk. A caller hands out the decrypted file only after Commit
// returned, so a decryption that was handed out is never uncounted.
//
// A missing, truncated or altered state is an error, never an empty state:
// the helper refuses to print until someone with the helper user's rights
// repairs it. Nothing in this package ever lowers a count or removes a record.
package state

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// File names inside the state directory.
const (
	stateName = "state"
	tempName  = "state.tmp"
	lockName  = "lock"
)

// magic starts the first line of a state file; the SHA-256 of the rest of
// the file follows it.
const magic = "encprint-state v1 sha256="

// Decryption is the record of one decryption handed out by the helper.
type Decryption struct {
	FileID     string `json:"file_id"`    // hex of the file's 16-byte id
	Publisher  string `json:"publisher"`  // encprint-pub:... or "" when unsigned
	Time       int64  `json:"time"`       // Unix seconds, the helper's clock
	PID        int    `json:"pid"`        // the process that asked for it
	UID        int    `json:"uid"`        // its real uid
	MaxPrints  int    `json:"max_prints"` // the file's limit, 0: none
	CountAfter int    `json:"count"`      // prints of this file id, this one included
}

// State is the content of the state file.
type State struct {
	Counts  map[string]int `json:"counts"`
	Records []Decryption   `json:"records"`
}

// Used is how many decryptions of fileID were handed out.
func (s *State) Used(fileID string) int { return s.Counts[fileID] }

// ErrMissing means the state directory or file does not exist. It is never
// replaced by an empty state: that would give every file its prints back.
var ErrMissing = errors.New("missing")

// MissingError says which state is missing and how it is created.
type MissingError struct{ Path string }

func (e *MissingError) Error() string {
	return fmt.Sprintf("the print-count state %s does not exist; nothing prints until it does. "+
		"On a new printer `sudo ./install.sh` creates it; if it was deleted, restore it from a backup "+
		"(recreating it empty gives every file its prints back)", e.Path)
}

func (e *MissingError) Is(target error) bool { return target == ErrMissing }

// CorruptError means the state file exists but is not a state this package
// wrote: truncated, altered or damaged.
type CorruptError struct {
	Path    string
	Problem string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("the print-count state %s is damaged (%s); nothing prints until it is repaired: "+
		"restore it from a backup, or see docs/troubleshooting.md (recreating it empty gives every file its prints back)",
		e.Path, e.Problem)
}

// UsedUpError means a file has no prints left.
type UsedUpError struct {
	FileID    string
	MaxPrints int
}

func (e *UsedUpError) Error() string {
	if e.MaxPrints == 1 {
		return "this file may be printed only once, and it has been printed already"
	}
	return fmt.Sprintf("this file may be printed %d times, and all %d prints have been used on this printer",
		e.MaxPrints, e.MaxPrints)
}

// Store is an open state directory.
type Store struct {
	path string
	dir  *os.File // the directory, for renameat and fsync
	lock *os.File // flocked around every read and commit
}

// Open opens the state directory at path. It does not read the state.
func Open(path string) (*Store, error) {
	dir, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, &MissingError{Path: filepath.Join(path, stateName)}
	}
	if err != nil {
		return nil, fmt.Errorf("cannot open the print-count state directory %s: %w", path, err)
	}
	lfd, err := unix.Openat(int(dir.Fd()), lockName, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		dir.Close()
		return nil, fmt.Errorf("cannot open the lock %s: %w", filepath.Join(path, lockName), err)
	}
	return &Store{path: path, dir: dir, lock: os.NewFile(uintptr(lfd), filepath.Join(path, lockName))}, nil
}

// Close releases the store's descriptors.
func (s *Store) Close() error {
	s.lock.Close()
	return s.dir.Close()
}

// Path is the state file's path, for messages.
func (s *Store) Path() string { return filepath.Join(s.path, stateName) }

// Init writes an empty state. It refuses when a state file already exists,
// damaged or not: only a person may decide to forget counts.
func (s *Store) Init() error {
	if err := s.flock(unix.LOCK_EX); err != nil {
		return err
	}
	defer s.flock(unix.LOCK_UN)
	if _, err := s.read(); !errors.Is(err, ErrMissing) {
		if err == nil {
			return fmt.Errorf("the print-count state %s already exists; it is kept", s.Path())
		}
		return err
	}
	return s.write(&State{Counts: map[string]int{}, Records: []Decryption{}})
}

// Load reads the state under a shared lock.
func (s *Store) Load() (*State, error) {
	if err := s.flock(unix.LOCK_SH); err != nil {
		return nil, err
	}
	defer s.flock(unix.LOCK_UN)
	return s.read()
}

// Commit counts one decryption of d.FileID, limited to d.MaxPrints (0: no
// limit), and appends its record. It returns the record as stored, with
// CountAfter set, once it is on disk. When the file has no prints left it
// returns a *UsedUpError and changes nothing. Two Commits never interleave,
// in this process or across processes.
func (s *Store) Commit(d Decryption) (Decryption, error) {
	if _, err := hex.DecodeString(d.FileID); err != nil || d.FileID == "" {
		return d, fmt.Errorf("cannot record a decryption: file id %q is not hex", d.FileID)
	}
	if err := s.flock(unix.LOCK_EX); err != nil {
		return d, err
	}
	defer s.flock(unix.LOCK_UN)
	st, err := s.read()
	if err != nil {
		return d, err
	}
	used := st.Used(d.FileID)
	if d.MaxPrints > 0 && used >= d.MaxPrints {
		return d, &UsedUpError{FileID: d.FileID, MaxPrints: d.MaxPrints}
	}
	d.CountAfter = used + 1
	st.Counts[d.FileID] = d.CountAfter
	st.Records = append(st.Records, d)
	if err := s.write(st); err != nil {
		return d, err
	}
	return d, nil
}

func (s *Store) flock(how int) error {
	for {
		err := unix.Flock(int(s.lock.Fd()), how)
		if err != unix.EINTR {
			if err != nil {
				return fmt.Errorf("cannot lock %s: %w", s.lock.Name(), err)
			}
			return nil
		}
	}
}

func (s *Store) read() (*State, error) {
	fd, err := unix.Openat(int(s.dir.Fd()), stateName, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, &MissingError{Path: s.Path()}
	}
	if err != nil {
		return nil, fmt.Errorf("cannot open the print-count state %s: %w", s.Path(), err)
	}
	f := os.NewFile(uintptr(fd), s.Path())
	defer f.Close()
	data, err := readAll(f)
	if err != nil {
		return nil, fmt.Errorf("cannot read the print-count state %s: %w", s.Path(), err)
	}
	st, problem := decode(data)
	if problem != "" {
		return nil, &CorruptError{Path: s.Path(), Problem: problem}
	}
	return st, nil
}

func readAll(f *os.File) ([]byte, error) {
	var buf bytes.Buffer
	_, err := buf.ReadFrom(f)
	return buf.Bytes(), err
}

// write replaces the state file: temporary file, fsync, rename, fsync of
// the directory.
func (s *Store) write(st *State) error {
	data, err := encode(st)
	if err != nil {
		return err
	}
	dirfd := int(s.dir.Fd())
	fd, err := unix.Openat(dirfd, tempName, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("cannot write the print-count state in %s: %w", s.path, err)
	}
	tmp := os.NewFile(uintptr(fd), filepath.Join(s.path, tempName))
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("cannot write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("cannot write %s to disk: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("cannot write %s: %w", tmp.Name(), err)
	}
	if err := unix.Renameat(dirfd, tempName, dirfd, stateName); err != nil {
		return fmt.Errorf("cannot replace the print-count state %s: %w", s.Path(), err)
	}
	if err := unix.Fsync(dirfd); err != nil {
		return fmt.Errorf("cannot write the directory %s to disk: %w", s.path, err)
	}
	return nil
}

func encode(st *State) ([]byte, error) {
	body, err := json.Marshal(st)
	if err != nil {
		return nil, fmt.Errorf("cannot encode the print-count state: %w", err)
	}
	body = append(body, '\n')
	sum := sha256.Sum256(body)
	head := magic + hex.EncodeToString(sum[:]) + "\n"
	return append([]byte(head), body...), nil
}

// decode parses a state file, or says what is wrong with it.
func decode(data []byte) (*State, string) {
	head, body, ok := bytes.Cut(data, []byte("\n"))
	if !ok || !strings.HasPrefix(string(head), magic) {
		if len(data) == 0 {
			return nil, "the file is empty"
		}
		return nil, "its first line is not an encprint state header"
	}
	want, err := hex.DecodeString(strings.TrimPrefix(string(head), magic))
	if err != nil || len(want) != sha256.Size {
		return nil, "its header holds no valid checksum"
	}
	if sum := sha256.Sum256(body); !bytes.Equal(sum[:], want) {
		return nil, fmt.Sprintf("its content (%d bytes) does not match its checksum: truncated or altered", len(body))
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var st State
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Sprintf("its content is not a state: %v", err)
	}
	if st.Counts == nil || st.Records == nil {
		return nil, "its counts or records are missing"
	}
	if problem := consistent(&st); problem != "" {
		return nil, problem
	}
	return &st, ""
}

// consistent checks that the counts are what the records add up to.
func consistent(st *State) string {
	seen := map[string]int{}
	for i, r := range st.Records {
		seen[r.FileID]++
		if r.CountAfter != seen[r.FileID] {
			return fmt.Sprintf("record %d of file %s says count %d, the records before it add up to %d",
				i+1, r.FileID, r.CountAfter, seen[r.FileID])
		}
	}
	for id, n := range st.Counts {
		if seen[id] != n {
			return fmt.Sprintf("file %s has count %d but %d records", id, n, seen[id])
		}
	}
	if len(seen) != len(st.Counts) {
		return "some recorded files have no count"
	}
	return ""
}
