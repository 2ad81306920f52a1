//go:build linux

package state

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const fileA = "00112233445566778899aabbccddeeff"

// The test binary doubles as the process that commits: with
// ENCPRINT_STATE_CHILD set it runs child() instead of the tests.
func TestMain(m *testing.M) {
	if os.Getenv("ENCPRINT_STATE_CHILD") != "" {
		os.Exit(child(os.Args[len(os.Args)-4:]))
	}
	os.Exit(m.Run())
}

// child waits for a byte on stdin (so that many children start at once),
// commits one decryption and prints "ok <count>" or "used_up"; with mode
// "hold" it then blocks as the helper would while it sends the descriptor,
// with mode "loop" it commits until killed.
func child(args []string) int {
	dir, id, mode := args[0], args[1], args[3]
	limit, _ := strconv.Atoi(args[2])
	s, err := Open(dir)
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	os.Stdin.Read(make([]byte, 1))
	for {
		d, err := s.Commit(Decryption{FileID: id, PID: os.Getpid(), UID: os.Getuid(), MaxPrints: limit})
		var used *UsedUpError
		switch {
		case errors.As(err, &used):
			fmt.Println("used_up")
		case err != nil:
			fmt.Println("error", err)
			return 1
		default:
			fmt.Println("ok", d.CountAfter)
		}
		switch mode {
		case "hold":
			time.Sleep(time.Hour)
		case "loop":
			continue
		}
		return 0
	}
}

type proc struct {
	cmd   *exec.Cmd
	start *os.File
	out   *bufio.Reader
}

func spawn(t *testing.T, dir, id string, limit int, mode string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$", dir, id, strconv.Itoa(limit), mode)
	cmd.Env = append(os.Environ(), "ENCPRINT_STATE_CHILD=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return &proc{cmd: cmd, start: stdin.(*os.File), out: bufio.NewReader(stdout)}
}

func (p *proc) line(t *testing.T) string {
	t.Helper()
	l, err := p.out.ReadString('\n')
	if err != nil {
		t.Fatalf("child %d: %v", p.cmd.Process.Pid, err)
	}
	return strings.TrimSpace(l)
}

func newStore(t *testing.T) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.Init(); err != nil {
		t.Fatal(err)
	}
	return s, dir
}

func TestCommitCountsAndRecordsEachDecryption(t *testing.T) {
	s, _ := newStore(t)
	for want := 1; want <= 3; want++ {
		d, err := s.Commit(Decryption{FileID: fileA, Publisher: "p", Time: 7, PID: 42, UID: 1000, MaxPrints: 3})
		if err != nil || d.CountAfter != want {
			t.Fatalf("commit %d: count %d, %v", want, d.CountAfter, err)
		}
	}
	_, err := s.Commit(Decryption{FileID: fileA, MaxPrints: 3})
	var used *UsedUpError
	if !errors.As(err, &used) || !strings.Contains(err.Error(), "all 3 prints have been used") {
		t.Fatalf("fourth print of a 3-print file: %v", err)
	}
	st, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if st.Used(fileA) != 3 || len(st.Records) != 3 {
		t.Fatalf("after 3 prints and a refusal: count %d, %d records", st.Used(fileA), len(st.Records))
	}
	if r := st.Records[2]; r != (Decryption{FileID: fileA, Publisher: "p", Time: 7, PID: 42, UID: 1000, MaxPrints: 3, CountAfter: 3}) {
		t.Fatalf("third record: %+v", r)
	}
}

func TestUnlimitedFileCountsWithoutLimit(t *testing.T) {
	s, _ := newStore(t)
	for i := 0; i < 5; i++ {
		if _, err := s.Commit(Decryption{FileID: fileA}); err != nil {
			t.Fatal(err)
		}
	}
	if st, _ := s.Load(); st.Used(fileA) != 5 {
		t.Fatalf("count %d, want 5", st.Used(fileA))
	}
}

// Real processes race for the last print: exactly one gets it.
func TestConcurrentCommitsOfAOnePrintFileHandOutOne(t *testing.T) {
	_, dir := newStore(t)
	var procs []*proc
	for i := 0; i < 8; i++ {
		procs = append(procs, spawn(t, dir, fileA, 1, "once"))
	}
	for _, p := range procs {
		p.start.Close() // EOF on stdin: all start at once
	}
	ok := 0
	for _, p := range procs {
		switch l := p.line(t); l {
		case "ok 1":
			ok++
		case "used_up":
		default:
			t.Fatalf("child said %q", l)
		}
	}
	if ok != 1 {
		t.Fatalf("%d of 8 racing processes were given the one print", ok)
	}
	s, _ := Open(dir)
	defer s.Close()
	if st, err := s.Load(); err != nil || st.Used(fileA) != 1 || len(st.Records) != 1 {
		t.Fatalf("after the race: %+v, %v", st, err)
	}
}

// A helper killed after it recorded the decryption, before it sent the
// descriptor: the print is used up, nothing gives it back.
func TestKilledAfterRecordingStaysCounted(t *testing.T) {
	s, dir := newStore(t)
	p := spawn(t, dir, fileA, 1, "hold")
	p.start.Close()
	if l := p.line(t); l != "ok 1" {
		t.Fatalf("child said %q", l)
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
	if st, err := s.Load(); err != nil || st.Used(fileA) != 1 {
		t.Fatalf("after SIGKILL: %+v, %v", st, err)
	}
	if _, err := s.Commit(Decryption{FileID: fileA, MaxPrints: 1}); err == nil {
		t.Fatal("a one-print file printed again after its helper was killed")
	}
}

// Processes killed at arbitrary points while committing as fast as they can
// always leave a whole state whose counts match its records.
func TestKilledMidWriteLeavesOldOrNewState(t *testing.T) {
	s, dir := newStore(t)
	last := 0
	for round := 0; round < 10; round++ {
		p := spawn(t, dir, fileA, 0, "loop")
		p.start.Close()
		p.line(t)
		time.Sleep(time.Duration(round) * 3 * time.Millisecond)
		p.cmd.Process.Signal(syscall.SIGKILL)
		p.cmd.Wait()
		st, err := s.Load()
		if err != nil {
			t.Fatalf("round %d: state after SIGKILL mid-commit: %v", round, err)
		}
		if n := st.Used(fileA); n < last+1 || n != len(st.Records) {
			t.Fatalf("round %d: count %d (was %d), %d records", round, n, last, len(st.Records))
		}
		last = st.Used(fileA)
	}
}

// A temporary file left by a crash before the rename is ignored and replaced.
func TestLeftoverTemporaryFileIsIgnored(t *testing.T) {
	s, dir := newStore(t)
	if _, err := s.Commit(Decryption{FileID: fileA}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, tempName), []byte("encprint-state v1 sha256=half"), 0o600); err != nil {
		t.Fatal(err)
	}
	if st, err := s.Load(); err != nil || st.Used(fileA) != 1 {
		t.Fatalf("with a leftover state.tmp: %+v, %v", st, err)
	}
	if d, err := s.Commit(Decryption{FileID: fileA}); err != nil || d.CountAfter != 2 {
		t.Fatalf("commit with a leftover state.tmp: %+v, %v", d, err)
	}
}

func TestMissingStateRefusesAndIsNotCreated(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "absent")); !errors.Is(err, ErrMissing) {
		t.Fatalf("missing directory: %v", err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = s.Commit(Decryption{FileID: fileA, MaxPrints: 1})
	if !errors.Is(err, ErrMissing) || !strings.Contains(err.Error(), dir) ||
		!strings.Contains(err.Error(), "install.sh") {
		t.Fatalf("commit without a state: %v", err)
	}
	for _, name := range []string{"state.a", "state.b", "state"} {
		if _, err := os.Stat(filepath.Join(dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a refused commit created %s: %v", name, err)
		}
	}
}

// slots returns the content of both slot files.
func slots(t *testing.T, dir string) [2][]byte {
	t.Helper()
	var out [2][]byte
	for i, name := range slotNames {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		out[i] = data
	}
	return out
}

func setSlots(t *testing.T, dir string, data [2][]byte) {
	t.Helper()
	for i, name := range slotNames {
		if err := os.WriteFile(filepath.Join(dir, name), data[i], 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func TestInitKeepsAnExistingState(t *testing.T) {
	s, dir := newStore(t)
	s.Commit(Decryption{FileID: fileA})
	before := slots(t, dir)
	if err := s.Init(); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("init over a state: %v", err)
	}
	setSlots(t, dir, [2][]byte{[]byte("junk"), []byte("junk")})
	if err := s.Init(); err == nil {
		t.Fatal("init replaced a damaged state")
	}
	if after := slots(t, dir); string(after[0]) != "junk" || string(after[1]) != "junk" {
		t.Fatal("a refused init changed the damaged state")
	}
	setSlots(t, dir, before)
	if st, err := s.Load(); err != nil || st.Used(fileA) != 1 {
		t.Fatalf("%+v, %v", st, err)
	}
}

// A slot whose write was cut short (power loss, SIGKILL) is always the one
// written last: the other slot, one state older, is the state, and the next
// commit writes over the damaged slot.
func TestTornNewestSlotFallsBackToThePreviousState(t *testing.T) {
	s, dir := newStore(t)
	for i := 0; i < 3; i++ {
		if _, err := s.Commit(Decryption{FileID: fileA}); err != nil {
			t.Fatal(err)
		}
	}
	// Init wrote state 1 to state.a; the commits states 2 (b), 3 (a), 4 (b).
	sl := slots(t, dir)
	for name, torn := range map[string][]byte{
		"truncated": sl[1][:len(sl[1])-7],
		"half":      sl[1][:len(sl[1])/2],
		"header":    sl[1][:10],
		"bit flip":  append(bytes.Clone(sl[1][:len(sl[1])-3]), sl[1][len(sl[1])-3]^1, sl[1][len(sl[1])-2], '\n'),
	} {
		setSlots(t, dir, [2][]byte{sl[0], torn})
		st, err := s.Load()
		if err != nil || st.Used(fileA) != 2 || len(st.Records) != 2 {
			t.Fatalf("%s newest slot: %+v, %v; want the previous state (count 2)", name, st, err)
		}
	}
	if d, err := s.Commit(Decryption{FileID: fileA}); err != nil || d.CountAfter != 3 {
		t.Fatalf("commit after a torn write: %+v, %v", d, err)
	}
	if after := slots(t, dir); !bytes.Equal(after[0], sl[0]) {
		t.Fatal("the commit after a torn write overwrote the whole slot instead of the torn one")
	}
}

// encodeV1 writes the single-file state of helpers before the slots.
func encodeV1(t *testing.T, st *State) []byte {
	t.Helper()
	body, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	body = append(body, '\n')
	sum := sha256.Sum256(body)
	return append([]byte(magicV1+hex.EncodeToString(sum[:])+"\n"), body...)
}

// A state written by an earlier helper (one file, state) is migrated into
// the slots when the store is opened with the helper user's rights: counts
// and records kept, the old file kept as state.v1, never read again.
func TestSingleFileStateIsMigrated(t *testing.T) {
	dir := t.TempDir()
	old := &State{Counts: map[string]int{fileA: 2}, Records: []Decryption{
		{FileID: fileA, UID: 1000, PID: 7, MaxPrints: 2, CountAfter: 1},
		{FileID: fileA, UID: 1000, PID: 8, MaxPrints: 2, CountAfter: 2}}}
	v1 := encodeV1(t, old)
	os.WriteFile(filepath.Join(dir, "state"), v1, 0o600)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Commit(Decryption{FileID: fileA, MaxPrints: 2}); !errors.As(err, new(*UsedUpError)) {
		t.Fatalf("a file whose 2 prints were used before the migration: %v", err)
	}
	st, err := s.Load()
	if err != nil || len(st.Records) != 2 || st.Records[1] != old.Records[1] {
		t.Fatalf("after the migration: %+v, %v", st, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the old state file is still where it would be read: %v", err)
	}
	if kept, _ := os.ReadFile(filepath.Join(dir, "state.v1")); !bytes.Equal(kept, v1) {
		t.Fatal("the old state was not kept as state.v1")
	}
	if err := s.Init(); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("init after a migration: %v", err)
	}
}

// A damaged state of an earlier helper is not migrated: it refuses, and it
// stays as it was.
func TestDamagedSingleFileStateRefusesAndStays(t *testing.T) {
	dir := t.TempDir()
	v1 := encodeV1(t, &State{Counts: map[string]int{fileA: 1}, Records: []Decryption{{FileID: fileA, CountAfter: 1}}})
	v1 = v1[:len(v1)-4]
	path := filepath.Join(dir, "state")
	os.WriteFile(path, v1, 0o600)
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = s.Commit(Decryption{FileID: fileA, MaxPrints: 1})
	var ce *CorruptError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "does not match its checksum") {
		t.Fatalf("commit on a damaged old state: %v", err)
	}
	if err := s.Init(); !errors.As(err, &ce) {
		t.Fatalf("init over a damaged old state: %v", err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, v1) {
		t.Fatal("the damaged old state was changed")
	}
	if _, err := os.Stat(filepath.Join(dir, "state.a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a damaged old state was migrated: %v", err)
	}
}

func TestDamagedStateRefusesWithoutChangingIt(t *testing.T) {
	good, err := encode(&State{Counts: map[string]int{fileA: 1},
		Records: []Decryption{{FileID: fileA, CountAfter: 1, MaxPrints: 1}}}, 2)
	if err != nil {
		t.Fatal(err)
	}
	prev, _ := encode(&State{Counts: map[string]int{}, Records: []Decryption{}}, 1)
	forged, _ := encode(&State{Counts: map[string]int{fileA: 0}, Records: []Decryption{{FileID: fileA, CountAfter: 1}}}, 2)
	old, _ := encode(&State{Counts: map[string]int{}, Records: []Decryption{}}, 7)
	flipped := bytes.Clone(good)
	flipped[len(flipped)-5] ^= 1
	cases := map[string]struct {
		data    [2][]byte
		problem string
	}{
		"both empty":            {[2][]byte{nil, nil}, "both of its slots are empty"},
		"garbage":               {[2][]byte{[]byte("\x00\x01 not a state\n"), nil}, "not an encprint state header"},
		"both truncated":        {[2][]byte{prev[:len(prev)-3], good[:len(good)-10]}, "does not match its checksum"},
		"bit flip, other empty": {[2][]byte{nil, flipped}, "does not match its checksum"},
		"no header":             {[2][]byte{good[bytes.IndexByte(good, '\n')+1:], nil}, "not an encprint state header"},
		"forged newest":         {[2][]byte{prev, forged}, "count 0 but 1 records"},
		"out of sequence":       {[2][]byte{old, good}, "states 7 and 2, which do not follow each other"},
		"same sequence":         {[2][]byte{good, good}, "states 2 and 2"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			s, dir := newStore(t)
			setSlots(t, dir, c.data)
			_, err := s.Commit(Decryption{FileID: fileA, MaxPrints: 5})
			var ce *CorruptError
			if !errors.As(err, &ce) || !strings.Contains(err.Error(), c.problem) || !strings.Contains(err.Error(), dir) {
				t.Fatalf("commit on a %s state: %v", name, err)
			}
			if _, err := s.Load(); !errors.As(err, &ce) {
				t.Fatalf("load of a %s state: %v", name, err)
			}
			if after := slots(t, dir); !bytes.Equal(after[0], c.data[0]) || !bytes.Equal(after[1], c.data[1]) {
				t.Fatalf("the %s state was rewritten", name)
			}
		})
	}
	t.Run("slot b deleted", func(t *testing.T) {
		s, dir := newStore(t)
		os.Remove(filepath.Join(dir, "state.b"))
		s2, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		defer s2.Close()
		if _, err := s2.Commit(Decryption{FileID: fileA}); !errors.As(err, new(*CorruptError)) ||
			!strings.Contains(err.Error(), "state.b is damaged (it is missing") {
			t.Fatalf("commit without state.b: %v", err)
		}
		_ = s
	})
}

func TestCommitRefusesAnIDThatIsNotHex(t *testing.T) {
	s, _ := newStore(t)
	if _, err := s.Commit(Decryption{FileID: "../x"}); err == nil {
		t.Fatal("recorded a non-hex file id")
	}
}

// One Commit on a state of at most 100 records: lock, read both slots,
// write one in place, fdatasync. (The state grows by a record per commit;
// a fresh one every 100 keeps the figure that of a printer's usual state.)
func BenchmarkCommit(b *testing.B) {
	var s *Store
	for i := 0; i < b.N; i++ {
		if i%100 == 0 {
			b.StopTimer()
			if s != nil {
				s.Close()
			}
			dir := b.TempDir()
			s, _ = Open(dir)
			s.Init()
			b.StartTimer()
		}
		if _, err := s.Commit(Decryption{FileID: fileA}); err != nil {
			b.Fatal(err)
		}
	}
	s.Close()
}
