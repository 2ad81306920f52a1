//go:build linux

package privsep

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/klipper-encprint/encprint/helper/state"
	"golang.org/x/sys/unix"
)

// Numeric ids for the real-process test: the helper's user and group, and
// an unprivileged printer user. They need no /etc/passwd entries; the
// kernel's checks are the same.
const (
	helperUID, helperGID   = 64531, 64531
	printerUID, printerGID = 64532, 64532
	fileA                  = "00112233445566778899aabbccddeeff"
)

// The test binary doubles as the set-user-ID helper.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "privprobe":
			os.Exit(probe(os.Args[2:]))
		case "privhold":
			os.Exit(hold(os.Args[2:]))
		}
	}
	os.Exit(m.Run())
}

// report is what the probe saw, in the order the helper does things.
type report struct {
	Env            []string
	Start, Dropped Ids
	IdentityRead   string // content read while privileged
	RegainUID      string // error of setresuid back to the helper's user
	RegainGID      string
	ReopenIdentity string // error opening the identity after the drop
	GroupFile      string // CallerFile on a world-readable file of the helper's group
	Dumpable       int
	Commits        []string
	Records        []state.Decryption
}

func probe(args []string) int {
	IdentityPath, PolicyPath, StateDir = args[0], args[1], args[2]
	groupFile := args[3]
	var r report
	p, err := Start()
	if err != nil {
		fmt.Println(err)
		return 1
	}
	r.Env = os.Environ()
	r.Start = p.Ids
	r.IdentityRead = string(p.Identity)
	r.Dropped = Current()
	r.RegainUID = errString(unix.Setresuid(-1, r.Start.EUID, -1))
	r.RegainGID = errString(unix.Setresgid(-1, r.Start.EGID, -1))
	if f, err := os.Open(IdentityPath); err != nil {
		r.ReopenIdentity = err.Error()
	} else {
		f.Close()
	}
	if f, err := os.Open(groupFile); err != nil {
		r.GroupFile = "open: " + err.Error()
	} else {
		r.GroupFile = errString(CallerFile(f, r.Start))
		f.Close()
	}
	r.Dumpable, _ = unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	for i := 0; i < 2; i++ {
		d, err := p.Commit(fileA, "", 1)
		r.Commits = append(r.Commits, fmt.Sprintf("%d %v", d.CountAfter, err))
	}
	r.Records, _ = p.Records()
	p.Close()
	json.NewEncoder(os.Stdout).Encode(&r)
	return 0
}

// hold is the helper after its privileged phase, holding the state's
// descriptors, until its stdin closes; then it commits once.
func hold(args []string) int {
	IdentityPath, PolicyPath, StateDir = args[0], args[1], args[2]
	p, err := Start()
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("dropped")
	io.Copy(io.Discard, os.Stdin)
	d, err := p.Commit(fileA, "", 0)
	fmt.Println(d.CountAfter, err)
	return 0
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func chown(t *testing.T, path string, uid, gid int, mode os.FileMode) {
	t.Helper()
	if err := os.Chown(path, uid, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// setuidHelper installs a copy of the test binary set-user-ID and
// set-group-ID to the helper's ids, as install.sh installs the helper, with
// an identity, a state directory and a world-readable file of the helper's
// group.
func setuidHelper(t *testing.T) (dir string) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to install a set-user-ID helper (CI runs as root)")
	}
	dir = t.TempDir()
	chown(t, filepath.Dir(dir), 0, 0, 0o755) // the printer's user must reach the helper
	chown(t, dir, 0, 0, 0o755)
	self, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "encprint-helper")
	if err := os.WriteFile(exe, self, 0o755); err != nil {
		t.Fatal(err)
	}
	chown(t, exe, helperUID, helperGID, 0o755|os.ModeSetuid|os.ModeSetgid)
	id := filepath.Join(dir, "identity")
	os.WriteFile(id, []byte("AGE-SECRET-KEY-1CANARY\n"), 0o600)
	chown(t, id, helperUID, helperGID, 0o600)
	sd := filepath.Join(dir, "state")
	os.Mkdir(sd, 0o700)
	s, err := state.Open(sd)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Init(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	chownTree(t, sd, helperUID, helperGID)
	pol := filepath.Join(dir, "policy.json")
	os.WriteFile(pol, []byte(`{"require_signature": true}`), 0o644)
	chown(t, pol, 0, 0, 0o644)
	g := filepath.Join(dir, "group.gcode")
	os.WriteFile(g, []byte("G28\n"), 0o644)
	chown(t, g, 0, helperGID, 0o644)
	return dir
}

// chownTree gives a directory and what is in it to uid and gid, as
// install.sh gives the state to the helper's user.
func chownTree(t *testing.T, dir string, uid, gid int) {
	t.Helper()
	err := filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func runAsPrinter(t *testing.T, dir string) report {
	t.Helper()
	out, err := probeAsPrinter(dir)
	if err != nil {
		t.Fatalf("probe as uid %d: %v\n%s", printerUID, err, out)
	}
	var r report
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("probe said %q: %v", out, err)
	}
	return r
}

func probeAsPrinter(dir string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(dir, "encprint-helper"), "privprobe", filepath.Join(dir, "identity"),
		filepath.Join(dir, "policy.json"), filepath.Join(dir, "state"), filepath.Join(dir, "group.gcode"))
	cmd.Env = []string{"ENCPRINT_IDENTITY=/etc/shadow", "LD_PRELOAD=/nonexistent.so", "GOTRACEBACK=crash"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: printerUID, Gid: printerGID, Groups: []uint32{}}}
	cmd.Stderr = os.Stderr
	return cmd.Output()
}

// The helper run by the printer's user: privileged for the fixed files,
// then the caller's ids and nothing else, for good.
func TestSetuidHelperDropsPrivilegeForGood(t *testing.T) {
	r := runAsPrinter(t, setuidHelper(t))
	if want := (Ids{printerUID, helperUID, helperUID, printerGID, helperGID, helperGID}); r.Start != want {
		t.Fatalf("ids at start %+v, want %+v (set-user-ID not in effect?)", r.Start, want)
	}
	if r.IdentityRead != "AGE-SECRET-KEY-1CANARY\n" {
		t.Fatalf("the privileged open of the identity: %q", r.IdentityRead)
	}
	if want := (Ids{printerUID, printerUID, printerUID, printerGID, printerGID, printerGID}); r.Dropped != want {
		t.Fatalf("ids after Drop %+v, want %+v", r.Dropped, want)
	}
	if !strings.Contains(r.RegainUID, "not permitted") || !strings.Contains(r.RegainGID, "not permitted") {
		t.Fatalf("after Drop, regaining the helper's ids: uid %q, gid %q", r.RegainUID, r.RegainGID)
	}
	if r.Dumpable != 0 {
		t.Fatalf("dumpable %d after the drop", r.Dumpable)
	}
	if len(r.Env) != 0 {
		t.Fatalf("the helper kept its environment: %q", r.Env)
	}
}

// No confused deputy: after the drop the helper cannot open its own
// identity for a caller, and refuses a file of its group that the caller
// could read.
func TestSetuidHelperRefusesItsOwnFilesAsCallerInput(t *testing.T) {
	r := runAsPrinter(t, setuidHelper(t))
	if !strings.Contains(r.ReopenIdentity, "permission denied") {
		t.Fatalf("the identity opened as a caller-supplied path after the drop: %q", r.ReopenIdentity)
	}
	if !strings.Contains(r.GroupFile, ErrPrivateFile.Error()) {
		t.Fatalf("a world-readable file of the helper's group as caller input: %q", r.GroupFile)
	}
}

// After the drop the helper still records, through the descriptors it
// opened while privileged: one print of a one-print file, with the caller's
// uid and pid from the kernel.
func TestDroppedHelperRecordsThroughItsPrivilegedDescriptors(t *testing.T) {
	dir := setuidHelper(t)
	r := runAsPrinter(t, dir)
	if r.Commits[0] != "1 <nil>" || !strings.Contains(r.Commits[1], "only once") {
		t.Fatalf("two commits of a one-print file: %q", r.Commits)
	}
	if len(r.Records) != 1 || r.Records[0].UID != printerUID || r.Records[0].PID != os.Getpid() {
		t.Fatalf("records %+v, want one by uid %d pid %d", r.Records, printerUID, os.Getpid())
	}
	var st unix.Stat_t
	for _, name := range []string{"state.a", "state.b"} {
		unix.Stat(filepath.Join(dir, "state", name), &st)
		if st.Uid != helperUID || st.Mode&0o077 != 0 {
			t.Fatalf("%s is uid %d mode %o, want the helper's, private", name, st.Uid, st.Mode&0o777)
		}
	}
	// The printer's user cannot write the state itself.
	cmd := exec.Command("/bin/sh", "-c", "echo x > "+filepath.Join(dir, "state", "state.b"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: printerUID, Gid: printerGID, Groups: []uint32{}}}
	if err := cmd.Run(); err == nil {
		t.Fatal("the printer's user overwrote the state")
	}
}

func TestDropWithoutPrivilegeChangesNothing(t *testing.T) {
	before := Current()
	if before.Elevated() {
		t.Skip("the test binary runs set-user-ID")
	}
	if err := Harden(); err != nil {
		t.Fatal(err)
	}
	if err := Drop(before); err != nil {
		t.Fatal(err)
	}
	if Current() != before {
		t.Fatalf("ids changed: %+v -> %+v", before, Current())
	}
}

func TestOpenOwnedRefusesFilesOthersCouldHaveWritten(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "identity")
	os.WriteFile(good, []byte("k"), 0o600)
	me := Owner{UID: os.Getuid(), Forbidden: 0o077}
	if f, err := OpenOwned(good, me); err != nil {
		t.Fatal(err)
	} else {
		f.Close()
	}
	loose := filepath.Join(dir, "loose")
	os.WriteFile(loose, []byte("k"), 0o644)
	os.Chmod(loose, 0o644)
	link := filepath.Join(dir, "link")
	os.Symlink(good, link)
	for path, c := range map[string]struct {
		want Owner
		msg  string
	}{
		loose:                        {me, "has mode 0644"},
		link:                         {me, "symbolic link"},
		good:                         {Owner{UID: os.Getuid() + 1}, "belongs to uid"},
		dir:                          {me, "not a regular file"},
		filepath.Join(dir, "absent"): {me, "no such file"},
		good + "/":                   {Owner{UID: os.Getuid(), Dir: true}, "not a directory"},
	} {
		f, err := OpenOwned(path, c.want)
		if err == nil {
			f.Close()
			t.Errorf("%s opened", path)
			continue
		}
		if !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: %v, want %q", path, err, c.msg)
		}
	}
}

// An empty state directory (the state deleted): the helper starts, and
// every count refuses, saying what is missing.
func TestDroppedHelperSaysWhenTheStateIsMissing(t *testing.T) {
	dir := setuidHelper(t)
	for _, name := range []string{"state.a", "state.b"} {
		must(t, os.Remove(filepath.Join(dir, "state", name)))
	}
	r := runAsPrinter(t, dir)
	if !strings.Contains(r.Commits[0], "does not exist; nothing prints") || len(r.Records) != 0 {
		t.Fatalf("commits without a state: %q", r.Commits)
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "state.a")); err == nil {
		t.Fatal("the dropped helper recreated the state")
	}
}

// The descriptors the dropped helper holds on its state are out of the
// printer user's reach, though the helper now runs as that user: it is
// non-dumpable, so /proc/<pid>/fd is closed to it.
func TestPrinterUserCannotReachTheHeldStateDescriptors(t *testing.T) {
	dir := setuidHelper(t)
	cmd := exec.Command(filepath.Join(dir, "encprint-helper"), "privhold", filepath.Join(dir, "identity"),
		filepath.Join(dir, "policy.json"), filepath.Join(dir, "state"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: printerUID, Gid: printerGID, Groups: []uint32{}}}
	in, err := cmd.StdinPipe()
	must(t, err)
	out, err := cmd.StdoutPipe()
	must(t, err)
	cmd.Stderr = os.Stderr
	must(t, cmd.Start())
	defer cmd.Wait()
	defer cmd.Process.Kill()
	lines := bufio.NewReader(out)
	if l, _ := lines.ReadString('\n'); l != "dropped\n" {
		t.Fatalf("helper said %q", l)
	}
	pid := strconv.Itoa(cmd.Process.Pid)
	attack := exec.Command("/bin/sh", "-c", "ls /proc/"+pid+"/fd; for n in $(seq 0 31); do "+
		"echo forged 2>/dev/null >> /proc/"+pid+"/fd/$n && echo wrote $n; done; "+
		"cat /proc/"+pid+"/mem > /dev/null && echo read mem")
	attack.SysProcAttr = cmd.SysProcAttr
	said, err := attack.CombinedOutput()
	if strings.Contains(string(said), "wrote") || strings.Contains(string(said), "read mem") ||
		!strings.Contains(string(said), "Permission denied") {
		t.Fatalf("the printer's user reached the helper's descriptors (%v): %s", err, said)
	}
	in.Close()
	if l, _ := lines.ReadString('\n'); l != "1 <nil>\n" {
		t.Fatalf("the helper's commit after the attempt: %q", l)
	}
	s, err := state.Open(filepath.Join(dir, "state"))
	must(t, err)
	defer s.Close()
	if st, err := s.Load(); err != nil || st.Used(fileA) != 1 {
		t.Fatalf("state after the attempt: %+v, %v", st, err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// The privileged files must be what install.sh made them; anything that
// someone else could have written stops the helper before the drop.
func TestStartRefusesPrivilegedFilesOthersCouldChange(t *testing.T) {
	for name, c := range map[string]struct {
		change func(dir string)
		want   string
	}{
		"policy writable by the printer's user": {func(dir string) {
			os.Chown(filepath.Join(dir, "policy.json"), printerUID, printerGID)
		}, "policy.json belongs to uid 64532, not 0"},
		"policy group-writable": {func(dir string) {
			os.Chmod(filepath.Join(dir, "policy.json"), 0o664)
		}, "policy.json has mode 0664"},
		"policy loosened with a typo": {func(dir string) {
			os.WriteFile(filepath.Join(dir, "policy.json"), []byte(`{"require_signatur": false}`), 0o644)
		}, "unknown field"},
		"identity readable by others": {func(dir string) {
			os.Chmod(filepath.Join(dir, "identity"), 0o644)
		}, "identity has mode 0644"},
		"state directory missing": {func(dir string) {
			os.RemoveAll(filepath.Join(dir, "state"))
		}, "cannot open the print-count state"},
	} {
		t.Run(name, func(t *testing.T) {
			dir := setuidHelper(t)
			c.change(dir)
			out, err := probeAsPrinter(dir)
			if err == nil || !strings.Contains(string(out), c.want) {
				t.Fatalf("helper with %s: %v, said %q (want %q)", name, err, out, c.want)
			}
			if strings.Contains(string(out), "CANARY") {
				t.Fatalf("the refusal shows the identity: %q", out)
			}
		})
	}
}
