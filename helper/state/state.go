//go:build linux

// Package state keeps the printer's print counts and the record of every
// decryption, in a directory that only the helper's own user can write
// (docs/adr/007-privilege-boundary.md).
//
// The state lives in two slot files, state.a and state.b, each a whole state
// with a sequence number and a checksum. Every decryption is one Commit:
// under an exclusive flock both slots are read and the newest whole one is
// the state; the file's count is checked against its limit, a record is
// appended, and the new state, one sequence number higher, is written in
// place over the other slot and flushed to disk (fdatasync). Power loss or
// SIGKILL mid-write can only damage the slot being written; the other still
// holds the previous state, whole. A Commit that returned has reached the
// disk, and a caller hands out the decrypted file only after Commit
// returned, so a decryption that was handed out is never uncounted.
//
// Because a Commit writes only through descriptors, the helper opens the
// store while it is privileged and keeps committing after it dropped the
// privilege: no file is created or renamed then. Files are created only by
// Init and by the one-time migration of the single-file state of earlier
// versions, both run with the helper user's rights.
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
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// File names inside the state directory.
const (
	tempName     = "state.tmp" // the first slot while Init writes it
	lockName     = "lock"
	legacyName   = "state"    // the single-file state of helpers before the slots
	migratedName = "state.v1" // where that file is kept once migrated
)

var slotNames = [2]string{"state.a", "state.b"}

// The first line of a slot is magic, the sequence number, and the SHA-256
// of everything else: "encprint-state v2 seq=N" and a newline, then the
// JSON body. The single-file state of earlier helpers had magicV1 and the
// SHA-256 of its body.
const (
	magic   = "encprint-state v2 seq="
	magicV1 = "encprint-state v1 sha256="
)

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

// State is the content of a slot.
type State struct {
	Counts  map[string]int `json:"counts"`
	Records []Decryption   `json:"records"`
}

// Used is how many decryptions of fileID were handed out.
func (s *State) Used(fileID string) int { return s.Counts[fileID] }

// ErrMissing means the state directory or its state does not exist. It is
// never replaced by an empty state: that would give every file its prints
// back.
var ErrMissing = errors.New("missing")

// MissingError says which state is missing and how it is created.
type MissingError struct{ Path string }

func (e *MissingError) Error() string {
	return fmt.Sprintf("the print-count state in %s does not exist; nothing prints until it does. "+
		"On a new printer install.sh (run as the printer's user; it uses sudo) creates it; if it was deleted, restore it from a backup "+
		"(recreating it empty gives every file its prints back)", e.Path)
}

func (e *MissingError) Is(target error) bool { return target == ErrMissing }

// CorruptError means the state exists but is not a state this package
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

// Store is an open state directory. It is not safe for use by several
// goroutines at once; several processes are fine.
type Store struct {
	path  string
	dir   *os.File    // the directory, for creating the slots
	lock  *os.File    // flocked around every read and commit
	slots [2]*os.File // read-write; nil until the state exists
	old   *os.File    // an earlier helper's single-file state, not migrated; or nil

	// What read found, valid until the lock is released: the slot that
	// holds the state, and its sequence number.
	known  bool
	newest int
	seq    uint64
}

// Open opens the state directory at path and, when they exist, its slots
// for reading and writing. It does not read the state, except to migrate a
// single-file state of an earlier helper into the slots (which needs the
// right to create files in path; without it, or when that file is
// damaged, the old state stays as it is and is read as it is).
func Open(path string) (*Store, error) {
	dir, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, &MissingError{Path: path}
	}
	if err != nil {
		return nil, fmt.Errorf("cannot open the print-count state directory %s: %w", path, err)
	}
	s := &Store{path: path, dir: dir}
	lfd, err := unix.Openat(int(dir.Fd()), lockName, unix.O_RDWR|unix.O_CREAT|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		dir.Close()
		return nil, fmt.Errorf("cannot open the lock %s: %w", filepath.Join(path, lockName), err)
	}
	s.lock = os.NewFile(uintptr(lfd), filepath.Join(path, lockName))
	if err := s.openSlots(); err != nil {
		s.Close()
		return nil, err
	}
	if s.slots[0] == nil {
		if err := s.openLegacy(); err != nil {
			s.Close()
			return nil, err
		}
		s.migrate() // on failure the old file stays, and read says what is wrong with it
	}
	return s, nil
}

// openLegacy opens the single-file state of an earlier helper, if there
// is one, so that it can be read without the right to open it later.
func (s *Store) openLegacy() error {
	fd, err := unix.Openat(int(s.dir.Fd()), legacyName, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cannot open the print-count state %s: %w", filepath.Join(s.path, legacyName), err)
	}
	s.old = os.NewFile(uintptr(fd), filepath.Join(s.path, legacyName))
	return nil
}

func (s *Store) openSlots() error {
	for i, name := range slotNames {
		fd, err := unix.Openat(int(s.dir.Fd()), name, unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return fmt.Errorf("cannot open the print-count state %s: %w", s.slotPath(i), err)
		}
		s.slots[i] = os.NewFile(uintptr(fd), s.slotPath(i))
	}
	return nil
}

// Close releases the store's descriptors.
func (s *Store) Close() error {
	for _, f := range append(s.slots[:], s.old) {
		if f != nil {
			f.Close()
		}
	}
	s.lock.Close()
	return s.dir.Close()
}

// Path is the state directory, for messages.
func (s *Store) Path() string { return s.path }

func (s *Store) slotPath(i int) string { return filepath.Join(s.path, slotNames[i]) }

// Init writes an empty state. It refuses when a state already exists,
// damaged or not: only a person may decide to forget counts.
func (s *Store) Init() error {
	if err := s.flock(unix.LOCK_EX); err != nil {
		return err
	}
	defer s.flock(unix.LOCK_UN)
	if _, err := s.read(); !errors.Is(err, ErrMissing) {
		if err == nil {
			return fmt.Errorf("the print-count state in %s already exists; it is kept", s.Path())
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
	s.known = false
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

// read returns the state: the newest whole slot, or, before the slots
// exist, the single-file state of an earlier helper.
func (s *Store) read() (*State, error) {
	if s.slots[0] == nil {
		return s.readLegacy()
	}
	if s.slots[1] == nil {
		return nil, &CorruptError{Path: s.slotPath(1), Problem: "it is missing, while " + slotNames[0] + " exists"}
	}
	var got [2]slot
	for i, f := range s.slots {
		data, err := readAll(f)
		if err != nil {
			return nil, fmt.Errorf("cannot read the print-count state %s: %w", s.slotPath(i), err)
		}
		got[i] = parseSlot(data)
	}
	i, problem := pick(got)
	if problem != "" {
		return nil, &CorruptError{Path: s.path, Problem: problem}
	}
	st, problem := decodeBody(got[i].body)
	if problem != "" {
		return nil, &CorruptError{Path: s.slotPath(i), Problem: problem}
	}
	s.known, s.newest, s.seq = true, i, got[i].seq
	return st, nil
}

func readAll(f *os.File) ([]byte, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, err
	}
	buf := make([]byte, st.Size)
	n, err := f.ReadAt(buf, 0)
	if err != nil && n != len(buf) {
		return nil, err
	}
	return buf, nil
}

// slot is one slot file as found on disk.
type slot struct {
	seq   uint64
	body  []byte
	empty bool   // never written (Init writes state.a only)
	torn  string // why it is not a whole slot, "" when it is
}

func (s slot) whole() bool { return !s.empty && s.torn == "" }

func parseSlot(data []byte) slot {
	if len(data) == 0 {
		return slot{empty: true}
	}
	head, body, ok := bytes.Cut(data, []byte("\n"))
	if !ok || !bytes.HasPrefix(head, []byte(magic)) {
		return slot{torn: "its first line is not an encprint state header"}
	}
	seqText, sumText, ok := strings.Cut(strings.TrimPrefix(string(head), magic), " sha256=")
	seq, err := strconv.ParseUint(seqText, 10, 64)
	want, herr := hex.DecodeString(sumText)
	if !ok || err != nil || herr != nil || len(want) != sha256.Size {
		return slot{torn: "its header holds no valid sequence number and checksum"}
	}
	if !bytes.Equal(checksum(seq, body), want) {
		return slot{torn: fmt.Sprintf("its content (%d bytes) does not match its checksum: truncated or altered", len(body))}
	}
	return slot{seq: seq, body: body}
}

// pick chooses the slot that holds the state. A slot that is not whole is
// one whose write did not finish (it is always the one written last), so
// the other one holds the state. Two whole slots are consecutive states.
func pick(got [2]slot) (int, string) {
	a, b := got[0], got[1]
	switch {
	case a.whole() && b.whole():
		if a.seq == b.seq+1 {
			return 0, ""
		}
		if b.seq == a.seq+1 {
			return 1, ""
		}
		return 0, fmt.Sprintf("its slots hold states %d and %d, which do not follow each other", a.seq, b.seq)
	case a.whole():
		return 0, ""
	case b.whole():
		return 1, ""
	case a.empty && b.empty:
		return 0, "both of its slots are empty"
	}
	return 0, fmt.Sprintf("neither slot holds a whole state: %s: %s; %s: %s",
		slotNames[0], why(a), slotNames[1], why(b))
}

func why(s slot) string {
	if s.empty {
		return "empty"
	}
	return s.torn
}

// readLegacy reads the single-file state of an earlier helper.
func (s *Store) readLegacy() (*State, error) {
	if s.old == nil {
		return nil, &MissingError{Path: s.path}
	}
	data, err := readAll(s.old)
	if err != nil {
		return nil, fmt.Errorf("cannot read the print-count state %s: %w", s.old.Name(), err)
	}
	st, problem := decodeV1(data)
	if problem != "" {
		return nil, &CorruptError{Path: s.old.Name(), Problem: problem}
	}
	return st, nil
}

// migrate moves a whole single-file state of an earlier helper into the
// slots, then keeps the old file as state.v1. A damaged one is left alone.
func (s *Store) migrate() error {
	if err := s.flock(unix.LOCK_EX); err != nil {
		return err
	}
	defer s.flock(unix.LOCK_UN)
	if err := s.openSlots(); err != nil || s.slots[0] != nil {
		return err // another process migrated it meanwhile
	}
	st, err := s.readLegacy()
	if err != nil {
		return err
	}
	if err := s.create(st); err != nil {
		return err
	}
	dirfd := int(s.dir.Fd())
	if err := unix.Renameat(dirfd, legacyName, dirfd, migratedName); err != nil {
		return err
	}
	s.old.Close()
	s.old = nil
	return unix.Fsync(dirfd)
}

// write stores st as the next state, over the slot that does not hold the
// current one. It must follow read under the same exclusive lock.
func (s *Store) write(st *State) error {
	if s.slots[0] == nil {
		return s.create(st)
	}
	if !s.known {
		return errors.New("internal error: the print-count state was written without being read under its lock")
	}
	i, seq := 1-s.newest, s.seq+1
	data, err := encode(st, seq)
	if err != nil {
		return err
	}
	f := s.slots[i]
	if _, err := f.WriteAt(data, 0); err != nil {
		return fmt.Errorf("cannot write %s: %w", f.Name(), err)
	}
	if err := f.Truncate(int64(len(data))); err != nil {
		return fmt.Errorf("cannot write %s: %w", f.Name(), err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("cannot write %s to disk: %w", f.Name(), err)
	}
	s.newest, s.seq = i, seq
	return nil
}

// create makes the two slots of a new state: state.b empty, then st as
// state 1 in state.a (written as state.tmp, flushed, renamed).
func (s *Store) create(st *State) error {
	data, err := encode(st, 1)
	if err != nil {
		return err
	}
	dirfd := int(s.dir.Fd())
	flags := unix.O_RDWR | unix.O_CREAT | unix.O_TRUNC | unix.O_NOFOLLOW | unix.O_CLOEXEC
	bfd, err := unix.Openat(dirfd, slotNames[1], flags, 0o600)
	if err != nil {
		return fmt.Errorf("cannot create the print-count state %s: %w", s.slotPath(1), err)
	}
	b := os.NewFile(uintptr(bfd), s.slotPath(1))
	if err := unix.Fsync(dirfd); err != nil {
		b.Close()
		return fmt.Errorf("cannot write the directory %s to disk: %w", s.path, err)
	}
	afd, err := unix.Openat(dirfd, tempName, flags, 0o600)
	if err != nil {
		b.Close()
		return fmt.Errorf("cannot create the print-count state in %s: %w", s.path, err)
	}
	a := os.NewFile(uintptr(afd), s.slotPath(0))
	err = writeSynced(a, data)
	if err == nil {
		err = unix.Renameat(dirfd, tempName, dirfd, slotNames[0])
	}
	if err == nil {
		err = unix.Fsync(dirfd)
	}
	if err != nil {
		a.Close()
		b.Close()
		return fmt.Errorf("cannot create the print-count state %s: %w", s.slotPath(0), err)
	}
	s.slots = [2]*os.File{a, b}
	s.known, s.newest, s.seq = true, 0, 1
	return nil
}

func writeSynced(f *os.File, data []byte) error {
	if _, err := f.Write(data); err != nil {
		return err
	}
	return unix.Fdatasync(int(f.Fd()))
}

func checksum(seq uint64, body []byte) []byte {
	h := sha256.New()
	fmt.Fprintf(h, "%s%d\n", magic, seq)
	h.Write(body)
	return h.Sum(nil)
}

func encode(st *State, seq uint64) ([]byte, error) {
	body, err := json.Marshal(st)
	if err != nil {
		return nil, fmt.Errorf("cannot encode the print-count state: %w", err)
	}
	body = append(body, '\n')
	head := fmt.Sprintf("%s%d sha256=%s\n", magic, seq, hex.EncodeToString(checksum(seq, body)))
	return append([]byte(head), body...), nil
}

// decodeV1 parses the single-file state of an earlier helper, or says what
// is wrong with it.
func decodeV1(data []byte) (*State, string) {
	head, body, ok := bytes.Cut(data, []byte("\n"))
	if !ok || !strings.HasPrefix(string(head), magicV1) {
		if len(data) == 0 {
			return nil, "the file is empty"
		}
		return nil, "its first line is not an encprint state header"
	}
	want, err := hex.DecodeString(strings.TrimPrefix(string(head), magicV1))
	if err != nil || len(want) != sha256.Size {
		return nil, "its header holds no valid checksum"
	}
	if sum := sha256.Sum256(body); !bytes.Equal(sum[:], want) {
		return nil, fmt.Sprintf("its content (%d bytes) does not match its checksum: truncated or altered", len(body))
	}
	return decodeBody(body)
}

// decodeBody parses the JSON of a state whose checksum matched. A problem
// here is not a write cut short but a state this package did not write.
func decodeBody(body []byte) (*State, string) {
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
