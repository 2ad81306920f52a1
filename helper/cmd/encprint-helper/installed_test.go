//go:build linux

package main

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	ageidentity "github.com/klipper-encprint/encprint/helper/identity"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/state"
	"golang.org/x/sys/unix"
)

// The installed helper (ADR-007): the real binary, built with its
// privileged paths in a test directory, set-user-ID and set-group-ID to a
// helper uid, run by an unprivileged printer uid over a real socket. The ids
// need no passwd entries; CI runs as root, which this setup needs.
const (
	helperID  = 64541
	printerID = 64542
	fullID    = "42424242424242424242424242424242" // full.enc.gcode: max_prints 3, signed
)

var (
	buildOnce sync.Once
	built     string // directory with the installed helper
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if built != "" {
		os.RemoveAll(built)
	}
	os.Exit(code)
}

type installed struct {
	dir, helper, identity, policy, stateDir, gcodes, decoy string
}

// install builds the helper once, then lays out fresh privileged files with
// the given policy and the test vectors in a gcodes folder of the printer's.
func install(t testing.TB, policyJSON string) *installed {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to install a set-user-ID helper (CI runs as root)")
	}
	buildOnce.Do(func() {
		built, buildErr = os.MkdirTemp("", "encprint-installed-")
		if buildErr != nil {
			return
		}
		os.Chmod(built, 0o755)
		pkg := "github.com/klipper-encprint/encprint/helper/privsep"
		// As the Makefile builds it, plus the test's privileged paths.
		ld := fmt.Sprintf("-s -w -X %s.IdentityPath=%s -X %s.PolicyPath=%s -X %s.StateDir=%s", pkg,
			filepath.Join(built, "identity"), pkg, filepath.Join(built, "policy.json"), pkg, filepath.Join(built, "state"))
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags", ld, "-o", filepath.Join(built, "encprint-helper"), ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	in := &installed{dir: built, helper: filepath.Join(built, "encprint-helper"),
		identity: filepath.Join(built, "identity"), policy: filepath.Join(built, "policy.json"),
		stateDir: filepath.Join(built, "state"), gcodes: filepath.Join(built, "gcodes"),
		decoy: filepath.Join(built, "gcodes", "decoy.key")}
	for _, p := range []string{in.stateDir, in.gcodes} {
		os.RemoveAll(p)
	}
	must(t, os.Chown(in.helper, helperID, helperID))
	must(t, os.Chmod(in.helper, 0o755|os.ModeSetuid|os.ModeSetgid))
	key, err := os.ReadFile(filepath.Join(vectorDir, "printer.key"))
	must(t, err)
	// As encprint keygen writes it: in the envelope (ADR-010).
	must(t, os.WriteFile(in.identity, ageidentity.Envelope(key), 0o600))
	must(t, os.Chown(in.identity, helperID, helperID))
	must(t, os.Chmod(in.identity, 0o600))
	must(t, os.WriteFile(in.policy, []byte(policyJSON), 0o644))
	must(t, os.Chown(in.policy, 0, 0))
	must(t, os.Chmod(in.policy, 0o644))
	must(t, os.Mkdir(in.stateDir, 0o700))
	s, err := state.Open(in.stateDir)
	must(t, err)
	must(t, s.Init())
	s.Close()
	chownState(t, in.stateDir)
	must(t, os.Mkdir(in.gcodes, 0o755))
	for _, v := range []string{"full.enc.gcode", "stock-age.gcode", "bad-signature.enc.gcode"} {
		data, err := os.ReadFile(filepath.Join(vectorDir, v))
		must(t, err)
		must(t, os.WriteFile(filepath.Join(in.gcodes, v), data, 0o644))
		must(t, os.Chown(filepath.Join(in.gcodes, v), printerID, printerID))
	}
	// A key of the printer's user that the request names: the installed
	// helper must ignore it (it is not this printer's key).
	must(t, os.WriteFile(in.decoy, []byte("AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQGYZ6JJ\n"), 0o600))
	must(t, os.Chown(in.decoy, printerID, printerID))
	return in
}

// chownState gives the state directory and its files to the helper's
// user, as install.sh does.
func chownState(t testing.TB, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	must(t, err)
	must(t, os.Chown(dir, helperID, helperID))
	for _, e := range entries {
		must(t, os.Chown(filepath.Join(dir, e.Name()), helperID, helperID))
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// answer is the helper's reply to one request.
type answer struct {
	msg map[string]interface{}
	fds int
}

func (a answer) code() string {
	if a.msg["type"] == "error" {
		return fmt.Sprint(a.msg["code"])
	}
	return ""
}

// call runs the installed helper as the printer's user for one request.
func (in *installed) call(t testing.TB, op, path, root string) answer {
	return in.run(t, in.helper, op, path, root, in.decoy)
}

// run runs helper as the printer's user for one request naming identity.
func (in *installed) run(t testing.TB, helper, op, path, root, identity string) answer {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	must(t, err)
	client, theirs := fds[0], os.NewFile(uintptr(fds[1]), "helper-socket")
	defer unix.Close(client)
	tv := unix.NsecToTimeval((20 * time.Second).Nanoseconds())
	unix.SetsockoptTimeval(client, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	cmd := exec.Command(helper, "--socket-fd", "3")
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: printerID, Gid: printerID, Groups: []uint32{}}}
	cmd.Stderr = os.Stderr
	must(t, cmd.Start())
	theirs.Close()
	defer cmd.Wait()
	req := map[string]interface{}{"type": "request", "protocol": contract.ProtocolVersion, "op": op, "identity": identity}
	if op != "recipient" {
		req["path"], req["root"] = path, root
	}
	if op == "decrypt" {
		req["max_bytes"], req["memfd_name"] = 0, "encprint-installed"
	}
	body := encodeBody(t, req)
	rec := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	must(t, unix.Sendmsg(client, append(rec, body...), nil, nil, unix.MSG_NOSIGNAL))
	if hello, _ := recvMessage(t, client); hello["type"] != "hello" {
		t.Fatalf("first message %v, want a hello", hello)
	}
	msg, n := recvMessage(t, client)
	for msg != nil && msg["type"] == "progress" {
		msg, n = recvMessage(t, client)
	}
	return answer{msg, n}
}

func (in *installed) decrypt(t testing.TB, name string) answer {
	return in.call(t, "decrypt", filepath.Join(in.gcodes, name), in.gcodes)
}

func (in *installed) records(t *testing.T) *state.State {
	t.Helper()
	s, err := state.Open(in.stateDir)
	must(t, err)
	defer s.Close()
	st, err := s.Load()
	must(t, err)
	return st
}

// The printer's user running the helper itself (what injected code does)
// spends a counted, recorded decryption, as a print does.
func TestInstalledHelperCountsEveryDecryptionAndRecordsWho(t *testing.T) {
	in := install(t, `{}`)
	for i := 1; i <= 3; i++ {
		if a := in.decrypt(t, "full.enc.gcode"); a.code() != "" || a.fds != 1 {
			t.Fatalf("decrypt %d of a 3-print file: %v, %d fds", i, a.msg, a.fds)
		}
	}
	a := in.decrypt(t, "full.enc.gcode")
	if a.code() != "used_up" || a.fds != 0 || !strings.Contains(fmt.Sprint(a.msg["message"]), "all 3 prints have been used") {
		t.Fatalf("fourth decrypt: %v, %d fds", a.msg, a.fds)
	}
	ins := in.call(t, "inspect", filepath.Join(in.gcodes, "full.enc.gcode"), in.gcodes)
	if ins.msg["reason_code"] != "used_up" {
		t.Fatalf("inspect of a used-up file: %v", ins.msg)
	}
	rec := in.call(t, "records", "", "")
	if rec.msg["installed"] != true || len(rec.msg["records"].([]interface{})) != 3 {
		t.Fatalf("records op: %v", rec.msg)
	}
	st := in.records(t)
	if st.Used(fullID) != 3 || len(st.Records) != 3 {
		t.Fatalf("state after 3 prints: %+v", st)
	}
	r := st.Records[2]
	if r.UID != printerID || r.PID != os.Getpid() || r.CountAfter != 3 || r.MaxPrints != 3 ||
		!strings.HasPrefix(r.Publisher, "encprint-pub:") || time.Since(time.Unix(r.Time, 0)) > time.Minute {
		t.Fatalf("record %+v: want uid %d, pid %d (the caller), count 3", r, printerID, os.Getpid())
	}
}

// The recipient comes from the helper's own identity, not the one named.
func TestInstalledHelperIgnoresTheRequestsIdentity(t *testing.T) {
	in := install(t, `{}`)
	a := in.call(t, "recipient", "", "")
	if a.code() != "" || !strings.HasPrefix(fmt.Sprint(a.msg["recipient"]), "age1") {
		t.Fatalf("recipient: %v", a.msg)
	}
	want, _ := exec.Command("go", "run", "../encprint", "recipient", filepath.Join(vectorDir, "printer.key")).Output()
	if got := fmt.Sprint(a.msg["recipient"]); got != strings.TrimSpace(string(want)) {
		t.Fatalf("recipient %s, the installed identity's is %s", got, want)
	}
}

// Six printer-user processes race for a 3-print file: exactly 3 descriptors.
func TestInstalledHelperRacesHandOutExactlyTheLimit(t *testing.T) {
	in := install(t, `{}`)
	var wg sync.WaitGroup
	answers := make([]answer, 6)
	for i := range answers {
		wg.Add(1)
		go func() { defer wg.Done(); answers[i] = in.decrypt(t, "full.enc.gcode") }()
	}
	wg.Wait()
	fds, usedUp := 0, 0
	for _, a := range answers {
		fds += a.fds
		if a.code() == "used_up" {
			usedUp++
		}
	}
	if fds != 3 || usedUp != 3 {
		t.Fatalf("6 racing decrypts of a 3-print file: %d fds, %d used_up", fds, usedUp)
	}
	if st := in.records(t); st.Used(fullID) != 3 {
		t.Fatalf("count %d after the race", st.Used(fullID))
	}
}

func TestInstalledHelperRefusesOnADamagedOrMissingState(t *testing.T) {
	in := install(t, `{}`)
	garbage := []byte("encprint-state v2 seq=9 sha256=00\n{}")
	for _, name := range []string{"state.a", "state.b"} {
		must(t, os.WriteFile(filepath.Join(in.stateDir, name), garbage, 0o600))
	}
	a := in.decrypt(t, "full.enc.gcode")
	if a.code() != "state_error" || a.fds != 0 || !strings.Contains(fmt.Sprint(a.msg["message"]), in.stateDir+" is damaged") {
		t.Fatalf("decrypt on a damaged state: %v, %d fds", a.msg, a.fds)
	}
	for _, name := range []string{"state.a", "state.b"} {
		if after, _ := os.ReadFile(filepath.Join(in.stateDir, name)); string(after) != string(garbage) {
			t.Fatalf("the damaged %s was rewritten", name)
		}
		os.Remove(filepath.Join(in.stateDir, name))
	}
	if a := in.decrypt(t, "full.enc.gcode"); a.code() != "state_error" || a.fds != 0 ||
		!strings.Contains(fmt.Sprint(a.msg["message"]), "does not exist") {
		t.Fatalf("decrypt without a state: %v", a.msg)
	}
	if entries, _ := os.ReadDir(in.stateDir); len(entries) != 1 || entries[0].Name() != "lock" {
		t.Fatalf("a missing state was recreated: %v", entries)
	}
}

// A printer updated from a helper that kept its state in one file: the
// installed helper migrates it on its first run, with the counts.
func TestInstalledHelperKeepsTheCountsOfTheSingleFileState(t *testing.T) {
	in := install(t, `{}`)
	recs := ""
	for i := 1; i <= 3; i++ {
		recs += fmt.Sprintf(`%s{"file_id":"%s","publisher":"","time":1,"pid":1,"uid":%d,"max_prints":3,"count":%d}`,
			map[bool]string{true: "", false: ","}[i == 1], fullID, printerID, i)
	}
	body := fmt.Sprintf(`{"counts":{"%s":3},"records":[%s]}`+"\n", fullID, recs)
	sum := sha256.Sum256([]byte(body))
	entries, err := os.ReadDir(in.stateDir)
	must(t, err)
	for _, e := range entries {
		must(t, os.Remove(filepath.Join(in.stateDir, e.Name())))
	}
	must(t, os.WriteFile(filepath.Join(in.stateDir, "state"),
		[]byte("encprint-state v1 sha256="+hex.EncodeToString(sum[:])+"\n"+body), 0o600))
	chownState(t, in.stateDir)
	a := in.decrypt(t, "full.enc.gcode")
	if a.code() != "used_up" || a.fds != 0 {
		t.Fatalf("decrypt of a file whose 3 prints the old state counted: %v, %d fds", a.msg, a.fds)
	}
	if st := in.records(t); st.Used(fullID) != 3 || len(st.Records) != 3 {
		t.Fatalf("state after the migration: %+v", st)
	}
	if _, err := os.Stat(filepath.Join(in.stateDir, "state.a")); err != nil {
		t.Fatalf("the old state was not migrated: %v", err)
	}
}

// moonraker.conf cannot loosen this: the policy is the root-owned file.
func TestInstalledHelperAppliesTheRootPolicy(t *testing.T) {
	in := install(t, `{"require_signature": true}`)
	for name, want := range map[string]string{"stock-age.gcode": "is not signed",
		"bad-signature.enc.gcode": "invalid publisher signature"} {
		a := in.decrypt(t, name)
		if a.code() != "untrusted" || a.fds != 0 || !strings.Contains(fmt.Sprint(a.msg["message"]), want) {
			t.Fatalf("%s under require_signature: %v", name, a.msg)
		}
	}
	if a := in.decrypt(t, "full.enc.gcode"); a.code() != "" || a.fds != 1 {
		t.Fatalf("a validly signed file: %v", a.msg)
	}
	other := `{"trusted_publishers": ["encprint-pub:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]}`
	in = install(t, other)
	if a := in.decrypt(t, "full.enc.gcode"); a.code() != "untrusted" {
		t.Fatalf("a publisher the policy does not trust: %v", a.msg)
	}
	if len(in.records(t).Records) != 0 {
		t.Fatal("a refused file was counted")
	}
}

// No confused deputy: the caller names the helper's own identity.
func TestInstalledHelperWillNotReadItsOwnFilesForTheCaller(t *testing.T) {
	in := install(t, `{}`)
	for _, op := range []string{"inspect", "decrypt"} {
		a := in.call(t, op, in.identity, in.dir)
		msg := fmt.Sprint(a.msg)
		if a.code() != "unreadable" || a.fds != 0 || strings.Contains(msg, "AGE-SECRET-KEY") {
			t.Fatalf("%s of the helper's identity: %v", op, a.msg)
		}
	}
}

func TestInstalledHelperReportsAWrongInstall(t *testing.T) {
	in := install(t, `{}`)
	must(t, os.Chown(in.policy, printerID, printerID))
	a := in.decrypt(t, "full.enc.gcode")
	if a.code() != "install_error" || a.fds != 0 || !strings.Contains(fmt.Sprint(a.msg["message"]), "policy.json belongs to uid") {
		t.Fatalf("policy owned by the printer's user: %v", a.msg)
	}
}

// The cost of the privilege step (ADR-007: at most 5 ms): the same binary,
// the same file, the same caller, once installed set-user-ID (privileged
// open, keeper, drop, count) and once as a plain copy naming its identity.
func benchHelper(b *testing.B, op string, privileged bool) {
	in := install(b, `{}`)
	helper, identity := in.helper, in.decoy
	if !privileged {
		helper = filepath.Join(in.gcodes, "plain-helper")
		data, err := os.ReadFile(in.helper)
		must(b, err)
		must(b, os.WriteFile(helper, data, 0o755))
		key, err := os.ReadFile(filepath.Join(vectorDir, "printer.key"))
		must(b, err)
		identity = filepath.Join(in.gcodes, "printer.key")
		must(b, os.WriteFile(identity, key, 0o600))
		must(b, os.Chown(identity, printerID, printerID))
	}
	file := filepath.Join(in.gcodes, "stock-age.gcode") // no print limit
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if a := in.run(b, helper, op, file, in.gcodes, identity); a.code() != "" {
			b.Fatalf("%s: %v", op, a.msg)
		}
	}
}

func BenchmarkInspectPlain(b *testing.B)     { benchHelper(b, "inspect", false) }
func BenchmarkInspectInstalled(b *testing.B) { benchHelper(b, "inspect", true) }
func BenchmarkDecryptPlain(b *testing.B)     { benchHelper(b, "decrypt", false) }
func BenchmarkDecryptInstalled(b *testing.B) { benchHelper(b, "decrypt", true) }

// The empty state is created by the helper's own user only; never over an
// existing one; never by the printer's user through the set-user-ID bit.
func TestInitStateOnlyByTheHelpersUser(t *testing.T) {
	in := install(t, `{}`)
	as := func(uid int) (string, error) {
		cmd := exec.Command(in.helper, "--init-state")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := as(helperID); err == nil || !strings.Contains(out, "already exists") {
		t.Fatalf("init over an existing state: %v %s", err, out)
	}
	os.Remove(filepath.Join(in.stateDir, "state.a"))
	os.Remove(filepath.Join(in.stateDir, "state.b"))
	if out, err := as(printerID); err == nil || !strings.Contains(out, "runs only as the helper's own user") {
		t.Fatalf("init by the printer's user: %v %s", err, out)
	}
	if _, err := os.Stat(filepath.Join(in.stateDir, "state.a")); err == nil {
		t.Fatal("the printer's user created a state")
	}
	if out, err := as(helperID); err != nil {
		t.Fatalf("init by the helper's user: %v %s", err, out)
	}
	if a := in.decrypt(t, "full.enc.gcode"); a.fds != 1 {
		t.Fatalf("decrypt after init: %v", a.msg)
	}
}

// SIGKILL after the helper recorded a decryption and before the descriptor
// left: the count stays used and no descriptor arrives. The helper is held
// in that window by filling its socket's send buffer (through a duplicate of
// its end) after its hello, so its final send blocks.
func TestInstalledHelperKilledBeforeSendingStaysCounted(t *testing.T) {
	in := install(t, `{}`)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	must(t, err)
	client, theirs := fds[0], os.NewFile(uintptr(fds[1]), "helper-socket")
	defer unix.Close(client)
	defer theirs.Close()
	cmd := exec.Command(in.helper, "--socket-fd", "3")
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: printerID, Gid: printerID, Groups: []uint32{}}}
	must(t, cmd.Start())
	defer cmd.Wait()
	defer cmd.Process.Kill() // a helper blocked in its send does not end by itself
	if hello, _ := recvMessage(t, client); hello["type"] != "hello" {
		t.Fatalf("first message %v", hello)
	}
	junk := make([]byte, 4096)
	for n := 0; ; n++ {
		if err := unix.Sendmsg(int(theirs.Fd()), junk, nil, nil, unix.MSG_DONTWAIT); err != nil {
			if n == 0 || !errors.Is(err, unix.EAGAIN) {
				t.Fatalf("filling the helper's send buffer after %d records: %v", n, err)
			}
			break
		}
	}
	body := encodeBody(t, map[string]interface{}{"type": "request", "protocol": contract.ProtocolVersion, "op": "decrypt",
		"path": filepath.Join(in.gcodes, "full.enc.gcode"), "root": in.gcodes, "identity": in.decoy,
		"max_bytes": 0, "memfd_name": "encprint-killed"})
	must(t, unix.Sendmsg(client, append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...), nil, nil, 0))
	deadline := time.Now().Add(20 * time.Second)
	for in.records(t).Used(fullID) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the helper never recorded the decryption")
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("the helper exited instead of blocking in its send: %v", err)
	}
	must(t, cmd.Process.Signal(syscall.SIGKILL))
	cmd.Wait()
	// Everything queued for the client is the junk; no descriptor.
	buf, oob := make([]byte, 65536), make([]byte, unix.CmsgSpace(4))
	for {
		n, oobn, _, _, err := unix.Recvmsg(client, buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
		if err != nil || n == 0 {
			break
		}
		if oobn > 0 || n != len(junk) {
			t.Fatalf("the killed helper sent a %d-byte record with %d bytes of control data", n, oobn)
		}
	}
	if st := in.records(t); st.Used(fullID) != 1 || len(st.Records) != 1 {
		t.Fatalf("after SIGKILL: %+v", st)
	}
	if a := in.decrypt(t, "full.enc.gcode"); a.fds != 1 || in.records(t).Used(fullID) != 2 {
		t.Fatalf("the next decrypt: %v", a.msg)
	}
}
