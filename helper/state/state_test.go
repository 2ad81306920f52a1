//go:build linux

package state

import (
	"bufio"
	"bytes"
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
	if !errors.Is(err, ErrMissing) || !strings.Contains(err.Error(), filepath.Join(dir, "state")) ||
		!strings.Contains(err.Error(), "install.sh") {
		t.Fatalf("commit without a state: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused commit created a state: %v", err)
	}
}

func TestInitKeepsAnExistingState(t *testing.T) {
	s, dir := newStore(t)
	s.Commit(Decryption{FileID: fileA})
	before, _ := os.ReadFile(filepath.Join(dir, "state"))
	if err := s.Init(); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("init over a state: %v", err)
	}
	os.WriteFile(filepath.Join(dir, "state"), []byte("junk"), 0o600)
	if err := s.Init(); err == nil {
		t.Fatal("init replaced a damaged state")
	}
	os.WriteFile(filepath.Join(dir, "state"), before, 0o600)
	if st, err := s.Load(); err != nil || st.Used(fileA) != 1 {
		t.Fatalf("%+v, %v", st, err)
	}
}

func TestDamagedStateRefusesWithoutChangingIt(t *testing.T) {
	good, err := encode(&State{Counts: map[string]int{fileA: 1},
		Records: []Decryption{{FileID: fileA, CountAfter: 1, MaxPrints: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	forged, _ := encode(&State{Counts: map[string]int{fileA: 0}, Records: []Decryption{{FileID: fileA, CountAfter: 1}}})
	flipped := bytes.Clone(good)
	flipped[len(flipped)-5] ^= 1
	cases := map[string]struct {
		data    []byte
		problem string
	}{
		"empty":     {nil, "empty"},
		"garbage":   {[]byte("\x00\x01 not a state\n"), "not an encprint state header"},
		"truncated": {good[:len(good)-10], "does not match its checksum"},
		"bit flip":  {flipped, "does not match its checksum"},
		"no header": {good[bytes.IndexByte(good, '\n')+1:], "not an encprint state header"},
		"forged":    {forged, "count 0 but 1 records"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			s, dir := newStore(t)
			path := filepath.Join(dir, "state")
			os.WriteFile(path, c.data, 0o600)
			_, err := s.Commit(Decryption{FileID: fileA, MaxPrints: 5})
			var ce *CorruptError
			if !errors.As(err, &ce) || !strings.Contains(err.Error(), c.problem) || !strings.Contains(err.Error(), path) {
				t.Fatalf("commit on a %s state: %v", name, err)
			}
			if _, err := s.Load(); !errors.As(err, &ce) {
				t.Fatalf("load of a %s state: %v", name, err)
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(after, c.data) {
				t.Fatalf("the %s state was rewritten", name)
			}
		})
	}
}

func TestCommitRefusesAnIDThatIsNotHex(t *testing.T) {
	s, _ := newStore(t)
	if _, err := s.Commit(Decryption{FileID: "../x"}); err == nil {
		t.Fatal("recorded a non-hex file id")
	}
}

// One Commit: lock, read, write, two fsyncs, rename.
func BenchmarkCommit(b *testing.B) {
	dir := b.TempDir()
	s, _ := Open(dir)
	defer s.Close()
	s.Init()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Commit(Decryption{FileID: fileA}); err != nil {
			b.Fatal(err)
		}
	}
}
