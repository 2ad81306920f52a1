//go:build linux

// Command encprint-helper is spawned by the Moonraker component for one
// operation (proto/PROTOCOL.md): it inspects an encrypted G-code file, or
// decrypts it into a sealed memfd that it hands back over the socket. It is
// the only process that reads the printer identity.
//
// Exit status: 0 when it answered (a result or an error) or the component
// closed the socket before a whole request arrived; 1 when the answer could
// not be sent; 2 for a usage error (no --socket-fd, or not a SEQPACKET socket).
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
	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/klipper-encprint/encprint/helper/identity"
	"github.com/klipper-encprint/encprint/helper/ipc"
	"github.com/klipper-encprint/encprint/helper/memfd"
	"github.com/klipper-encprint/encprint/helper/privsep"
	"github.com/klipper-encprint/encprint/helper/version"
	"golang.org/x/sys/unix"
)

func main() {
	t := startTrust() // hardens; privileged only until it returns
	defer t.close()
	sockFD := flag.Int("socket-fd", -1, "descriptor of the SOCK_SEQPACKET socket to the component")
	showVersion := flag.Bool("version", false, "print the version and protocol, then exit")
	initState := flag.Bool("init-state", false, "create the empty print-count state of an installed helper (run as its own user), then exit")
	importFrom := flag.String("import", "", "add the print counts in `FILE` (- for standard input; JSON from install.sh's migration) to the state (run as its own user), then exit")
	flag.Parse()
	if *showVersion {
		fmt.Printf("encprint-helper %s protocol %d\n", version.Version, version.Protocol)
		return
	}
	if *initState {
		if err := initStateDir(t); err != nil {
			fmt.Fprintf(os.Stderr, "encprint-helper: %v\n", err)
			os.Exit(1)
		}
		fmt.Printf("created the print-count state in %s\n", privsep.StateDir)
	}
	if *importFrom != "" {
		if err := importCounts(t, *importFrom, os.Stdout); err != nil {
			fmt.Fprintf(os.Stderr, "encprint-helper: %v\n", err)
			os.Exit(1)
		}
	}
	if *initState || *importFrom != "" {
		return
	}
	if *sockFD < 0 {
		fmt.Fprintln(os.Stderr, "encprint-helper: --socket-fd is required; this program is started by Moonraker's encrypted_print component")
		os.Exit(2)
	}
	conn, err := ipc.NewConn(*sockFD)
	if err != nil {
		fmt.Fprintf(os.Stderr, "encprint-helper: %v\n", err)
		os.Exit(2)
	}
	if err := serve(conn, t); err != nil {
		conn.Close()
		t.close()
		fmt.Fprintf(os.Stderr, "encprint-helper: %v\n", err)
		os.Exit(1)
	}
	conn.Close()
}

// now is the clock the policy's time window is checked against. Only tests
// change it.
var now = time.Now

// serve answers one request. t is the privileged phase's outcome (nil in
// tests of the unprivileged helper).
func serve(conn *ipc.Conn, t *trust) error {
	if err := conn.Send(&ipc.Hello{Type: "hello", Protocol: version.Protocol, Version: version.Version}, -1); err != nil {
		return err
	}
	body, err := conn.RecvBody()
	if errors.Is(err, ipc.ErrClosed) {
		return nil // the component declined (e.g. protocol mismatch)
	}
	if err != nil {
		return conn.Send(fail(contract.CodeBadRequest, "malformed request: %v", err), -1)
	}
	start := time.Now()
	req, e := ipc.DecodeRequest(body)
	if e != nil {
		return conn.Send(e, -1)
	}
	if t != nil && t.err != nil {
		return conn.Send(t.err, -1)
	}
	switch req.Op {
	case contract.OpInspect:
		res, e := inspect(req, t)
		if e != nil {
			return conn.Send(e, -1)
		}
		return conn.Send(res, -1)
	case contract.OpRecipient:
		res, e := recipient(req, t)
		if e != nil {
			return conn.Send(e, -1)
		}
		return conn.Send(res, -1)
	case contract.OpRecords:
		res, e := t.records()
		if e != nil {
			return conn.Send(e, -1)
		}
		return conn.Send(res, -1)
	default: // contract.OpDecrypt: DecodeRequest admits no other op
		f, res, e := decrypt(req, conn, t)
		if e != nil {
			return conn.Send(e, -1)
		}
		defer f.Close()
		res.ElapsedMS = float64(time.Since(start).Microseconds()) / 1000
		return conn.Send(res, int(f.Fd()))
	}
}

func recipient(req *ipc.Request, t *trust) (*ipc.RecipientResult, *ipc.Error) {
	ids, e := t.identities(req)
	if e != nil {
		return nil, e
	}
	res := &ipc.RecipientResult{Type: "result", Op: contract.OpRecipient, Others: []string{}}
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
		return nil, fail(contract.CodeIdentityError, "the printer identity %s holds no X25519 key", t.identityName(req))
	}
	return res, nil
}

func fail(code, format string, args ...interface{}) *ipc.Error {
	return &ipc.Error{Type: "error", Code: code, Message: fmt.Sprintf(format, args...)}
}

// openInRoot opens req.Path after checking that it resolves inside req.Root.
func openInRoot(req *ipc.Request) (*os.File, int64, *ipc.Error) {
	name := filepath.Base(req.Path)
	if !filepath.IsAbs(req.Path) || !filepath.IsAbs(req.Root) {
		return nil, 0, fail(contract.CodeBadRequest, "path and root must be absolute")
	}
	root, err := filepath.EvalSymlinks(req.Root)
	if err != nil {
		return nil, 0, fail(contract.CodeNotFound, "gcodes folder %s: %v", req.Root, err)
	}
	real, err := filepath.EvalSymlinks(req.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, fail(contract.CodeNotFound, "%s does not exist (deleted or renamed since the upload?)", name)
	}
	if err != nil {
		return nil, 0, fail(contract.CodeUnreadable, "%s: %v", name, err)
	}
	if rel, err := filepath.Rel(root, real); err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return nil, 0, fail(contract.CodeOutsideRoot, "%s resolves outside the gcodes folder; only files under %s are printed", req.Path, req.Root)
	}
	// O_NONBLOCK: opening a FIFO must not wait for a writer. The type is
	// checked on the descriptor itself, then O_NONBLOCK is cleared.
	fd, err := unix.Open(real, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY|unix.O_NOFOLLOW, 0)
	switch {
	case errors.Is(err, unix.ENXIO): // a socket, or a device without a driver
		return nil, 0, fail(contract.CodeNotAFile, "%s is not a regular file (a socket or device); only G-code files are printed", name)
	case errors.Is(err, unix.ENOENT):
		return nil, 0, fail(contract.CodeNotFound, "%s does not exist (deleted or renamed since the upload?)", name)
	case err != nil:
		return nil, 0, fail(contract.CodeUnreadable, "cannot open %s: %v", name, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, 0, fail(contract.CodeIOError, "%s: %v", name, err)
	}
	if kind := fileKind(st.Mode); kind != "" {
		unix.Close(fd)
		return nil, 0, fail(contract.CodeNotAFile, "%s is not a regular file (a %s); only G-code files are printed", name, kind)
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err == nil {
		_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags&^unix.O_NONBLOCK)
	}
	if err != nil {
		unix.Close(fd)
		return nil, 0, fail(contract.CodeInternal, "%s: clearing O_NONBLOCK: %v", name, err)
	}
	return os.NewFile(uintptr(fd), real), st.Size, nil
}

// fileKind names a mode that is not a regular file, or returns "".
func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return ""
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFIFO:
		return "FIFO"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFBLK:
		return "block device"
	}
	return "special file"
}

func loadIdentity(path string) ([]age.Identity, *ipc.Error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fail(contract.CodeIdentityError, "cannot read the printer identity %s: %v (create one with `encprint keygen -o %s`)", path, err, path)
	}
	defer f.Close()
	ids, err := identity.Parse(f)
	if err != nil {
		return nil, fail(contract.CodeIdentityError, "the printer identity %s is malformed: %v", path, err)
	}
	return ids, nil
}

// classify maps a format error to a protocol error code and sentence.
func classify(name string, err error) *ipc.Error {
	var re *encfile.ReadError
	var he *encfile.HeaderError
	var se *encfile.StanzaError
	var ce *encfile.ChunkError
	var we *encfile.WindowError
	var ue *encfile.UTF8Error
	if e := classifyPayload(name, err); e != nil {
		return e
	}
	switch {
	case errors.As(err, &re):
		return fail(contract.CodeIOError, "%s: %v; the storage may be failing (see dmesg): try again, or copy the file anew", name, err)
	case errors.Is(err, encfile.ErrNotEncrypted):
		return fail(contract.CodeNotEncrypted, "%s is not an encrypted G-code file", name)
	case errors.As(err, &se) && se.Unsupported:
		return fail(contract.CodeUnsupportedVersion, "%s: %v", name, err)
	case errors.Is(err, encfile.ErrArmored), errors.As(err, &he), errors.As(err, &se):
		return fail(contract.CodeMalformedHeader, "%s: %v", name, err)
	case errors.Is(err, encfile.ErrWrongIdentity):
		return fail(contract.CodeWrongIdentity, "%s was encrypted for other printers, not this one: ask its sender to encrypt it for this printer's recipient", name)
	case errors.Is(err, encfile.ErrHeaderAuth):
		return fail(contract.CodeHeaderAuthFailed, "%s: its header or metadata was altered after encryption, or the file is damaged; get a fresh copy from the sender", name)
	case errors.As(err, &ce):
		return fail(contract.CodePayloadCorrupt, "%s: %v; get a fresh copy from the sender", name, err)
	case errors.Is(err, encfile.ErrPayloadEnd):
		return fail(contract.CodeTruncated, "%s is incomplete or has extra bytes at its end (interrupted upload?); upload it again", name)
	case errors.Is(err, encfile.ErrSizeMismatch), errors.Is(err, encfile.ErrDigest):
		return fail(contract.CodeDigestMismatch, "%s: %v", name, err)
	case errors.As(err, &ue):
		return fail(contract.CodeNotUTF8, "%s: %v", name, err)
	case errors.As(err, &we) && we.Expired:
		return fail(contract.CodeExpired, "%s expired on %s (the not_after of its policy) and may no longer be printed: ask its sender for a new copy (or, if this printer's clock is wrong, set it)",
			name, we.Bound.Format("2006-01-02 15:04:05 UTC"))
	case errors.As(err, &we):
		return fail(contract.CodeNotYetValid, "%s may not be printed before %s (the not_before of its policy): wait until then, or ask its sender for a copy without that date (or, if this printer's clock is wrong, set it)",
			name, we.Bound.Format("2006-01-02 15:04:05 UTC"))
	}
	return fail(contract.CodeInternal, "%s: %v", name, err)
}

func publisher(p *encfile.Public) (*string, bool) {
	if p.Signature == nil {
		return nil, false
	}
	s := encfile.FormatPublicKey(p.Signature.PublicKey)
	return &s, p.VerifySignature() == nil
}

func inspect(req *ipc.Request, t *trust) (*ipc.InspectResult, *ipc.Error) {
	f, size, e := openInRoot(req)
	if e != nil {
		return nil, e
	}
	defer f.Close()
	name := filepath.Base(req.Path)
	if e := t.callerFile(f, name); e != nil {
		return nil, e
	}
	_, pub, err := encfile.ParseFile(f, size)
	if err != nil {
		return nil, classify(name, err)
	}
	res := &ipc.InspectResult{Type: "result", Op: contract.OpInspect, FileID: pub.FileID, Recipients: pub.Recipients,
		Metadata: pub.Metadata, Policy: pub.Policy}
	res.Publisher, res.SignatureValid = publisher(pub)
	ids, e := t.identities(req)
	if e != nil {
		res.Reason, res.ReasonCode = e.Message, e.Code
		return res, nil
	}
	ef, err := encfile.Open(f, size, ids...)
	var re *encfile.ReadError
	if errors.As(err, &re) {
		return nil, classify(name, err) // the file is unreadable: no listing
	}
	if err != nil {
		e := classify(name, err)
		res.Reason, res.ReasonCode = e.Message, e.Code
		return res, nil
	}
	res.Authenticated = true
	res.PlaintextSize = ef.PlainSize
	if err := ef.Public.Policy.CheckWindow(now()); err != nil {
		e := classify(name, err)
		res.Reason, res.ReasonCode = e.Message, e.Code
	} else if e := t.refusal(name, ef.Public); e != nil {
		res.Reason, res.ReasonCode = e.Message, e.Code
	}
	return res, nil
}

var memfdName = regexp.MustCompile(contract.MemfdTokenRegex)

func decrypt(req *ipc.Request, conn *ipc.Conn, t *trust) (*os.File, *ipc.DecryptResult, *ipc.Error) {
	if !memfdName.MatchString(req.MemfdName) {
		e := fail(contract.CodeBadRequest, "memfd_name %q must match %s", req.MemfdName, contract.MemfdTokenRegex)
		e.Key = "memfd_name"
		return nil, nil, e
	}
	ids, e := t.identities(req)
	if e != nil {
		return nil, nil, e
	}
	f, size, e := openInRoot(req)
	if e != nil {
		return nil, nil, e
	}
	defer f.Close()
	name := filepath.Base(req.Path)
	if e := t.callerFile(f, name); e != nil {
		return nil, nil, e
	}
	ef, err := encfile.Open(f, size, ids...)
	if err != nil {
		return nil, nil, classify(name, err)
	}
	if err := ef.Public.Policy.CheckWindow(now()); err != nil {
		return nil, nil, classify(name, err)
	}
	if e := t.refusal(name, ef.Public); e != nil {
		return nil, nil, e
	}
	if budget, why := memoryBudget(req.MaxBytes); ef.PlainSize > budget {
		return nil, nil, fail(contract.CodeTooLarge, "%s needs %s of memory to print, more than the %s allowed (%s)",
			name, human(ef.PlainSize), human(budget), why)
	}
	mf, err := memfd.Create(req.MemfdName, ef.PlainSize)
	if err != nil {
		if errors.Is(err, memfd.ErrUnavailable) {
			return nil, nil, fail(contract.CodeMemfdUnavailable, "%v", err)
		}
		return nil, nil, fail(contract.CodeInternal, "%v", err)
	}
	lastSent := time.Now()
	ef.Progress = func(done int64) {
		if time.Since(lastSent) > 100*time.Millisecond {
			lastSent = time.Now()
			conn.Send(&ipc.Progress{Type: "progress", Done: done, Total: ef.PlainSize}, -1)
		}
	}
	ef.SkipSHA256 = true // age authenticates every chunk; a v1 signature still gets its SHA-256
	// pwrite(2) from each worker's buffers, not stores through a shared
	// mapping: the kernel allocates the memfd's pages in the write path,
	// 1.3-1.7x faster than one page fault per 4 KiB (docs/benchmarks.md).
	ef.CheckUTF8 = true // while each segment is in the workers' cache
	res, err := ef.DecryptTo(mf, 0)
	var gcodeSize int64
	if err == nil {
		// Before the print is counted: Klipper stops at a byte it cannot
		// read, and must never meet a compressed block that does not inflate.
		gcodeSize, err = checkMemfd(mf, res)
	}
	if err != nil {
		mf.Close()
		return nil, nil, classify(name, err)
	}
	seals, err := memfd.Seal(mf)
	if err != nil {
		mf.Close()
		return nil, nil, fail(contract.CodeInternal, "%v", err)
	}
	// Every chunk authenticated and the memfd is sealed: count it, on disk,
	// before the descriptor leaves.
	if e := t.commit(name, ef.Public); e != nil {
		mf.Close()
		return nil, nil, e
	}
	out := &ipc.DecryptResult{Type: "result", Op: contract.OpDecrypt, FileID: ef.Public.FileID, Size: res.Size,
		GcodeSize: gcodeSize, Seals: seals, MemfdName: req.MemfdName}
	if res.SHA256 != ([32]byte{}) {
		out.SHA256 = res.SHA256[:]
	}
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
