//go:build linux

// Command encprint-helper is spawned by the Moonraker component for one
// operation (proto/PROTOCOL.md): it inspects an encrypted G-code file, or
// decrypts it into a sealed memfd that it hands back over the socket. It is
// the only process that reads the printer identity.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"filippo.io/age"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/klipper-encprint/encprint/helper/ipc"
	"github.com/klipper-encprint/encprint/helper/memfd"
	"github.com/klipper-encprint/encprint/helper/version"
	"golang.org/x/sys/unix"
)

func main() {
	sockFD := flag.Int("socket-fd", -1, "descriptor of the SOCK_SEQPACKET socket to the component")
	showVersion := flag.Bool("version", false, "print the version and protocol, then exit")
	flag.Parse()
	if *showVersion {
		fmt.Printf("encprint-helper %s protocol %d\n", version.Version, version.Protocol)
		return
	}
	harden()
	if *sockFD < 0 {
		fmt.Fprintln(os.Stderr, "encprint-helper: --socket-fd is required; this program is started by Moonraker's encrypted_print component")
		os.Exit(2)
	}
	conn, err := ipc.NewConn(*sockFD)
	if err != nil {
		fmt.Fprintf(os.Stderr, "encprint-helper: %v\n", err)
		os.Exit(2)
	}
	defer conn.Close()
	if err := serve(conn); err != nil {
		fmt.Fprintf(os.Stderr, "encprint-helper: %v\n", err)
		os.Exit(1)
	}
}

// harden keeps the identity and cleartext out of core dumps and makes
// /proc/<helper>/fd and /proc/<helper>/mem unavailable to other processes.
func harden() {
	unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
	unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0})
}

func serve(conn *ipc.Conn) error {
	if err := conn.Send(&ipc.Hello{Type: "hello", Protocol: version.Protocol, Version: version.Version}, -1); err != nil {
		return err
	}
	var req ipc.Request
	if err := conn.Recv(&req); err != nil {
		if errors.Is(err, ipc.ErrClosed) {
			return nil // the component declined (e.g. protocol mismatch)
		}
		return conn.Send(fail("bad_request", "malformed request: %v", err), -1)
	}
	start := time.Now()
	if req.Type != "request" {
		return conn.Send(fail("bad_request", "expected a request message, got %q", req.Type), -1)
	}
	if req.Protocol != version.Protocol {
		return conn.Send(fail("protocol_mismatch", "the component speaks protocol %d, this helper (%s) speaks %d: rebuild the helper so both come from the same version",
			req.Protocol, version.Version, version.Protocol), -1)
	}
	switch req.Op {
	case "inspect":
		res, e := inspect(&req)
		if e != nil {
			return conn.Send(e, -1)
		}
		return conn.Send(res, -1)
	case "recipient":
		ids, e := loadIdentity(req.Identity)
		if e != nil {
			return conn.Send(e, -1)
		}
		res := &ipc.RecipientResult{Type: "result", Op: "recipient", Others: []string{}}
		for _, id := range ids {
			var r string
			switch id := id.(type) {
			case *age.X25519Identity:
				r = id.Recipient().String()
			case *age.HybridIdentity:
				r = id.Recipient().String()
			default:
				continue
			}
			if res.Recipient == "" {
				res.Recipient = r
			} else {
				res.Others = append(res.Others, r)
			}
		}
		if res.Recipient == "" {
			return conn.Send(fail("identity_error", "the printer identity %s holds no X25519 key", req.Identity), -1)
		}
		return conn.Send(res, -1)
	case "decrypt":
		f, res, e := decrypt(&req, conn)
		if e != nil {
			return conn.Send(e, -1)
		}
		defer f.Close()
		res.ElapsedMS = float64(time.Since(start).Microseconds()) / 1000
		return conn.Send(res, int(f.Fd()))
	default:
		return conn.Send(fail("bad_request", "unknown operation %q (this helper knows inspect, decrypt and recipient)", req.Op), -1)
	}
}

func fail(code, format string, args ...interface{}) *ipc.Error {
	return &ipc.Error{Type: "error", Code: code, Message: fmt.Sprintf(format, args...)}
}

// openInRoot opens req.Path after checking that it resolves inside req.Root.
func openInRoot(req *ipc.Request) (*os.File, int64, *ipc.Error) {
	name := filepath.Base(req.Path)
	if !filepath.IsAbs(req.Path) || !filepath.IsAbs(req.Root) {
		return nil, 0, fail("bad_request", "path and root must be absolute")
	}
	root, err := filepath.EvalSymlinks(req.Root)
	if err != nil {
		return nil, 0, fail("not_found", "gcodes folder %s: %v", req.Root, err)
	}
	real, err := filepath.EvalSymlinks(req.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, fail("not_found", "%s does not exist (deleted or renamed since the upload?)", name)
	}
	if err != nil {
		return nil, 0, fail("unreadable", "%s: %v", name, err)
	}
	if rel, err := filepath.Rel(root, real); err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return nil, 0, fail("outside_root", "%s resolves outside the gcodes folder; only files under %s are printed", req.Path, req.Root)
	}
	f, err := os.Open(real)
	if err != nil {
		return nil, 0, fail("unreadable", "cannot open %s: %v", name, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fail("unreadable", "%s: %v", name, err)
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, 0, fail("not_a_file", "%s is not a regular file", name)
	}
	return f, st.Size(), nil
}

func loadIdentity(path string) ([]age.Identity, *ipc.Error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fail("identity_error", "cannot read the printer identity %s: %v (create one with `encprint keygen -o %s`)", path, err, path)
	}
	defer f.Close()
	ids, err := age.ParseIdentities(f)
	if err != nil {
		return nil, fail("identity_error", "the printer identity %s is malformed: %v", path, err)
	}
	return ids, nil
}

// classify maps a format error to a protocol error code and sentence.
func classify(name string, err error) *ipc.Error {
	var he *encfile.HeaderError
	var se *encfile.StanzaError
	var ce *encfile.ChunkError
	var ue *encfile.UTF8Error
	switch {
	case errors.Is(err, encfile.ErrNotEncrypted):
		return fail("not_encrypted", "%s is not an encrypted G-code file", name)
	case errors.As(err, &se) && se.Unsupported:
		return fail("unsupported_version", "%s: %v", name, err)
	case errors.Is(err, encfile.ErrArmored), errors.As(err, &he), errors.As(err, &se):
		return fail("malformed_header", "%s: %v", name, err)
	case errors.Is(err, encfile.ErrWrongIdentity):
		return fail("wrong_identity", "%s was encrypted for other printers, not this one: ask its sender to encrypt it for this printer's recipient", name)
	case errors.Is(err, encfile.ErrHeaderAuth):
		return fail("header_auth_failed", "%s: its header or metadata was altered after encryption, or the file is damaged; get a fresh copy from the sender", name)
	case errors.As(err, &ce):
		return fail("payload_corrupt", "%s: %v; get a fresh copy from the sender", name, err)
	case errors.Is(err, encfile.ErrPayloadEnd):
		return fail("truncated", "%s is incomplete or has extra bytes at its end (interrupted upload?); upload it again", name)
	case errors.Is(err, encfile.ErrSizeMismatch), errors.Is(err, encfile.ErrDigest):
		return fail("digest_mismatch", "%s: %v", name, err)
	case errors.As(err, &ue):
		return fail("not_utf8", "%s: %v", name, err)
	}
	return fail("internal", "%s: %v", name, err)
}

func publisher(p *encfile.Public) (*string, bool) {
	if p.Signature == nil {
		return nil, false
	}
	s := encfile.FormatPublicKey(p.Signature.PublicKey)
	return &s, p.VerifySignature() == nil
}

func inspect(req *ipc.Request) (*ipc.InspectResult, *ipc.Error) {
	f, size, e := openInRoot(req)
	if e != nil {
		return nil, e
	}
	defer f.Close()
	name := filepath.Base(req.Path)
	_, pub, err := encfile.ParseFile(f, size)
	if err != nil {
		return nil, classify(name, err)
	}
	res := &ipc.InspectResult{Type: "result", Op: "inspect", FileID: pub.FileID, Recipients: pub.Recipients,
		Metadata: pub.Metadata, Policy: pub.Policy}
	res.Publisher, res.SignatureValid = publisher(pub)
	ids, e := loadIdentity(req.Identity)
	if e != nil {
		res.Reason, res.ReasonCode = e.Message, e.Code
		return res, nil
	}
	ef, err := encfile.Open(f, size, ids...)
	if err != nil {
		e := classify(name, err)
		res.Reason, res.ReasonCode = e.Message, e.Code
		return res, nil
	}
	res.Authenticated = true
	res.PlaintextSize = ef.PlainSize
	return res, nil
}

var memfdName = regexp.MustCompile(`^encprint-[0-9a-z]{1,32}$`)

func decrypt(req *ipc.Request, conn *ipc.Conn) (*os.File, *ipc.DecryptResult, *ipc.Error) {
	if !memfdName.MatchString(req.MemfdName) {
		return nil, nil, fail("bad_request", "memfd_name %q must be encprint- followed by 1-32 of [0-9a-z]", req.MemfdName)
	}
	ids, e := loadIdentity(req.Identity)
	if e != nil {
		return nil, nil, e
	}
	f, size, e := openInRoot(req)
	if e != nil {
		return nil, nil, e
	}
	defer f.Close()
	name := filepath.Base(req.Path)
	ef, err := encfile.Open(f, size, ids...)
	if err != nil {
		return nil, nil, classify(name, err)
	}
	if budget, why := memoryBudget(req.MaxBytes); ef.PlainSize > budget {
		return nil, nil, fail("too_large", "%s needs %s of memory to print, more than the %s allowed (%s)",
			name, human(ef.PlainSize), human(budget), why)
	}
	mf, err := memfd.Create(req.MemfdName, ef.PlainSize)
	if err != nil {
		if errors.Is(err, memfd.ErrUnavailable) {
			return nil, nil, fail("memfd_unavailable", "%v", err)
		}
		return nil, nil, fail("internal", "%v", err)
	}
	lastSent := time.Now()
	ef.Progress = func(done int64) {
		if time.Since(lastSent) > 100*time.Millisecond {
			lastSent = time.Now()
			conn.Send(&ipc.Progress{Type: "progress", Done: done, Total: ef.PlainSize}, -1)
		}
	}
	mapping, err := memfd.Map(mf, ef.PlainSize)
	if err != nil {
		mf.Close()
		return nil, nil, fail("internal", "%v", err)
	}
	res, err := ef.DecryptInto(mapping, 0)
	if err == nil {
		// Before the print is counted: Klipper stops at a byte it cannot read.
		err = encfile.CheckUTF8(mapping[:res.Size])
	}
	if uerr := memfd.Unmap(mapping); uerr != nil && err == nil {
		err = uerr
	}
	if err != nil {
		mf.Close()
		return nil, nil, classify(name, err)
	}
	seals, err := memfd.Seal(mf)
	if err != nil {
		mf.Close()
		return nil, nil, fail("internal", "%v", err)
	}
	out := &ipc.DecryptResult{Type: "result", Op: "decrypt", FileID: ef.Public.FileID, Size: res.Size,
		SHA256: res.SHA256[:], Seals: seals, MemfdName: req.MemfdName}
	out.Publisher, out.SignatureValid = publisher(ef.Public)
	return mf, out, nil
}

// memoryBudget is the largest plaintext this decrypt may allocate, and what
// set that limit.
func memoryBudget(maxBytes int64) (int64, string) {
	budget, why := int64(1)<<62, ""
	if maxBytes > 0 {
		budget, why = maxBytes, "max_memory in [encrypted_print]"
	}
	if avail := memAvailable(); avail > 0 && avail/2 < budget {
		budget, why = avail/2, "half of the memory available now"
	}
	if room := cgroupRoom(); room >= 0 && room < budget {
		budget, why = room, "the memory left in Moonraker's cgroup"
	}
	return budget, why
}

func memAvailable() int64 {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemAvailable:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024
		}
	}
	return -1
}

// cgroupRoom is memory.max - memory.current of our cgroup v2, or -1.
func cgroupRoom() int64 {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if !strings.HasPrefix(line, "0::") {
			continue
		}
		dir := filepath.Join("/sys/fs/cgroup", strings.TrimPrefix(line, "0::"))
		maxb, err1 := os.ReadFile(filepath.Join(dir, "memory.max"))
		cur, err2 := os.ReadFile(filepath.Join(dir, "memory.current"))
		if err1 != nil || err2 != nil || strings.TrimSpace(string(maxb)) == "max" {
			return -1
		}
		m, _ := strconv.ParseInt(strings.TrimSpace(string(maxb)), 10, 64)
		c, _ := strconv.ParseInt(strings.TrimSpace(string(cur)), 10, 64)
		return max(m-c, 0)
	}
	return -1
}

func human(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%d KiB", (n+1023)/1024)
	}
}
