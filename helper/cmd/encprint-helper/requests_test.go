//go:build linux

package main

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	ageidentity "github.com/klipper-encprint/encprint/helper/identity"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/klipper-encprint/encprint/helper/ipc"
	"github.com/vmihailenco/msgpack/v5"
	"golang.org/x/sys/unix"
)

const (
	requestsPath = "../../../proto/testdata/requests.json"
	vectorDir    = "../../../proto/testdata/vectors"
)

// requestCase is one case of proto/testdata/requests.json.
type requestCase struct {
	Name  string `json:"name"`
	Files []struct {
		Name   string `json:"name"`
		Vector string `json:"vector"`
		Kind   string `json:"kind"`
	} `json:"files"`
	Request json.RawMessage `json:"request"`
	Framing struct {
		SplitAt        []int    `json:"split_at"`
		AfterBody      string   `json:"after_body"`
		BodySuffix     string   `json:"body_suffix"`
		RecordSize     int      `json:"record_size"`
		Pad            int      `json:"pad"`
		DeclaredLength *int     `json:"declared_length"`
		RawRecords     []string `json:"raw_records"`
		EmptyRecord    bool     `json:"empty_record"`
	} `json:"framing"`
	Expect struct {
		Type   string                 `json:"type"`
		Code   string                 `json:"code"`
		Key    string                 `json:"key"`
		Words  []string               `json:"words"`
		Op     string                 `json:"op"`
		Fields map[string]interface{} `json:"fields"`
	} `json:"expect"`
}

func loadRequestCases(t *testing.T) []requestCase {
	data, err := os.ReadFile(requestsPath)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Cases []requestCase `json:"cases"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	return doc.Cases
}

// fromJSON turns the cases' JSON form into msgpack values: {"$bin": hex} is
// bin, integers are integers, other numbers float64; {root} and {identity}
// in strings are replaced.
func fromJSON(v interface{}, repl *strings.Replacer) interface{} {
	switch v := v.(type) {
	case map[string]interface{}:
		if h, ok := v["$bin"].(string); ok && len(v) == 1 {
			b, _ := hex.DecodeString(h)
			return b
		}
		out := map[string]interface{}{}
		for k, e := range v {
			out[k] = fromJSON(e, repl)
		}
		return out
	case []interface{}:
		for i := range v {
			v[i] = fromJSON(v[i], repl)
		}
		return v
	case string:
		return repl.Replace(v)
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return i
		}
		var u uint64
		if _, err := fmt.Sscan(v.String(), &u); err == nil && !strings.ContainsAny(v.String(), ".eE") {
			return u
		}
		f, _ := v.Float64()
		return f
	}
	return v
}

func encodeBody(t testing.TB, req map[string]interface{}) []byte {
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	enc.UseCompactInts(true)
	if err := enc.Encode(req); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// records frames a case's request as its "framing" says.
func (c *requestCase) records(t *testing.T, req map[string]interface{}) [][]byte {
	f := c.Framing
	if f.EmptyRecord {
		return [][]byte{{}}
	}
	if f.RawRecords != nil {
		var out [][]byte
		for _, h := range f.RawRecords {
			b, _ := hex.DecodeString(h)
			out = append(out, b)
		}
		return out
	}
	if f.Pad > 0 {
		req["pad"] = strings.Repeat("x", f.Pad)
	}
	if f.RecordSize > 0 { // pad so that prefix + body is exactly RecordSize
		req["pad"] = ""
		for n := 0; ; {
			got := contract.LengthPrefixBytes + len(encodeBody(t, req))
			if got == f.RecordSize {
				break
			}
			n += f.RecordSize - got
			req["pad"] = strings.Repeat("x", n)
		}
	}
	body := encodeBody(t, req)
	suffix, _ := hex.DecodeString(f.BodySuffix)
	body = append(body, suffix...)
	n := len(body)
	if f.DeclaredLength != nil {
		n = *f.DeclaredLength
	}
	msg := binary.BigEndian.AppendUint32(nil, uint32(n))
	msg = append(msg, body...)
	after, _ := hex.DecodeString(f.AfterBody)
	msg = append(msg, after...)
	var out [][]byte
	switch {
	case f.RecordSize > 0:
		out = [][]byte{msg}
	case f.SplitAt != nil:
		last := 0
		for _, at := range f.SplitAt {
			out = append(out, msg[last:at])
			last = at
		}
		out = append(out, msg[last:])
	default:
		for len(msg) > 0 {
			k := min(len(msg), contract.MaxRecord)
			out = append(out, msg[:k])
			msg = msg[k:]
		}
	}
	return out
}

// makeFiles creates the case's files in root.
func (c *requestCase) makeFiles(t *testing.T, root string) {
	for _, f := range c.Files {
		p := filepath.Join(root, f.Name)
		var err error
		switch {
		case f.Vector != "":
			var data []byte
			if data, err = os.ReadFile(filepath.Join(vectorDir, f.Vector)); err == nil {
				err = os.WriteFile(p, data, 0o644)
			}
		case f.Kind == "fifo":
			err = unix.Mkfifo(p, 0o644)
		case f.Kind == "directory":
			err = os.Mkdir(p, 0o755)
		case f.Kind == "socket":
			var l net.Listener
			if l, err = net.Listen("unix", p); err == nil {
				t.Cleanup(func() { l.Close() })
			}
		default:
			err = fmt.Errorf("unknown file %+v", f)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// recvMessage reads one message, treating ECONNRESET as the peer having
// ended (the records it sent before are still queued: read on). It closes
// every descriptor and returns how many arrived. A nil message is the end
// of the connection.
func recvMessage(t testing.TB, fd int) (map[string]interface{}, int) {
	m, fds := recvMessageFDs(t, fd)
	for _, r := range fds {
		unix.Close(r)
	}
	return m, len(fds)
}

// recvMessageFDs is recvMessage that returns the descriptors, open.
func recvMessageFDs(t testing.TB, fd int) (map[string]interface{}, []int) {
	buf := make([]byte, contract.MaxRecord)
	oob := make([]byte, unix.CmsgSpace(4))
	var body []byte
	want, fds := -1, []int(nil)
	for {
		n, oobn, flags, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatalf("receiving: %v", err)
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			t.Fatal("the helper sent a record over the limit")
		}
		if oobn > 0 {
			msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				rights, _ := unix.ParseUnixRights(&m)
				fds = append(fds, rights...)
			}
		}
		if n == 0 {
			if want >= 0 {
				t.Fatal("connection ended inside a message")
			}
			return nil, fds
		}
		rec := buf[:n]
		if want < 0 {
			want = int(binary.BigEndian.Uint32(rec))
			rec = rec[contract.LengthPrefixBytes:]
		}
		body = append(body, rec...)
		if len(body) == want {
			var m map[string]interface{}
			if err := msgpack.Unmarshal(body, &m); err != nil {
				t.Fatalf("the helper sent garbage: %v", err)
			}
			return m, fds
		}
	}
}

// runCase serves the case with serve() over a real socketpair; with
// envelope, the printer's identity file is in the encprint envelope.
func runCase(t *testing.T, c *requestCase, envelope bool) {
	dir := t.TempDir()
	root := filepath.Join(dir, "gcodes")
	os.Mkdir(root, 0o755)
	identity := filepath.Join(dir, "printer.key")
	key, err := os.ReadFile(filepath.Join(vectorDir, "printer.key"))
	if err != nil {
		t.Fatal(err)
	}
	if envelope {
		key = ageidentity.Envelope(key)
	}
	os.WriteFile(identity, key, 0o600)
	c.makeFiles(t, root)
	dec := json.NewDecoder(bytes.NewReader(c.Request))
	dec.UseNumber()
	var raw interface{}
	if err := dec.Decode(&raw); err != nil {
		t.Fatal(err)
	}
	req := fromJSON(raw, strings.NewReplacer("{root}", root, "{identity}", identity)).(map[string]interface{})

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	client := fds[0]
	defer unix.Close(client)
	tv := unix.NsecToTimeval((10 * time.Second).Nanoseconds())
	unix.SetsockoptTimeval(client, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	conn, err := ipc.NewConn(fds[1])
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { err := serve(conn, nil); conn.Close(); done <- err }()

	// Every record is queued before the hello is read, so a helper that
	// answers early leaves the rest unread (and the client sees ECONNRESET).
	for _, r := range c.records(t, req) {
		if err := unix.Sendmsg(client, r, nil, nil, unix.MSG_NOSIGNAL); err != nil {
			t.Fatalf("sending a record of %d bytes: %v", len(r), err)
		}
	}
	if hello, _ := recvMessage(t, client); hello["type"] != "hello" {
		t.Fatalf("first message %v, want a hello", hello)
	}
	msg, nfds := recvMessage(t, client)
	for msg != nil && msg["type"] == "progress" {
		msg, nfds = recvMessage(t, client)
	}
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, syscall.EPIPE) {
			t.Errorf("serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the helper did not finish")
	}
	checkAnswer(t, c, msg, nfds)
}

func checkAnswer(t *testing.T, c *requestCase, msg map[string]interface{}, nfds int) {
	e := c.Expect
	if e.Type == "none" {
		if msg != nil {
			t.Fatalf("got %v, want no answer", msg)
		}
		return
	}
	if msg == nil {
		t.Fatal("no answer")
	}
	if msg["type"] != e.Type {
		t.Fatalf("got %v, want a %s", msg, e.Type)
	}
	wantFDs := 0
	if e.Type == "result" && e.Op == contract.OpDecrypt {
		wantFDs = 1
	}
	if nfds != wantFDs {
		t.Errorf("%d descriptors arrived, want %d", nfds, wantFDs)
	}
	if e.Type == "error" {
		key, _ := msg["key"].(string)
		message, _ := msg["message"].(string)
		if msg["code"] != e.Code || key != e.Key {
			t.Fatalf("got code %v key %q (%s), want code %s key %q", msg["code"], key, message, e.Code, e.Key)
		}
		for _, w := range e.Words {
			if !strings.Contains(message, w) {
				t.Errorf("message %q lacks %q", message, w)
			}
		}
		return
	}
	if msg["op"] != e.Op {
		t.Fatalf("result of %v, want %s", msg["op"], e.Op)
	}
	for k, want := range e.Fields {
		got := msg[k]
		if n, ok := want.(float64); ok { // JSON numbers; msgpack ints
			got = toFloat(got)
			want = n
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s = %v, want %v (reason: %v)", k, got, want, msg["reason"])
		}
	}
}

func toFloat(v interface{}) interface{} {
	switch v := v.(type) {
	case int8, int16, int32, int64, uint8, uint16, uint32, uint64:
		var f float64
		fmt.Sscan(fmt.Sprint(v), &f)
		return f
	}
	return v
}

// Every case of proto/testdata/requests.json, against serve() over a real
// SOCK_SEQPACKET socketpair (tests/test_protocol.py runs them against the
// built binary).
func TestRequestCases(t *testing.T) {
	cases := loadRequestCases(t)
	if len(cases) < 40 {
		t.Fatalf("only %d cases", len(cases))
	}
	for i := range cases {
		t.Run(cases[i].Name, func(t *testing.T) { runCase(t, &cases[i], false) })
	}
}

// The same cases with the identity in the envelope (ADR-010): the helper
// reads both forms alike.
func TestRequestCasesWithAnEnvelopedIdentity(t *testing.T) {
	cases := loadRequestCases(t)
	for i := range cases {
		t.Run(cases[i].Name, func(t *testing.T) { runCase(t, &cases[i], true) })
	}
}

// The cases cover every key contract.json requires, for every op.
func TestRequestCasesCoverEveryRequiredKey(t *testing.T) {
	cases := loadRequestCases(t)
	for _, op := range contract.Ops() {
		for _, k := range contract.Required(op) {
			found := false
			for _, c := range cases {
				var req map[string]interface{}
				json.Unmarshal(c.Request, &req)
				_, has := req[k]
				if !has && c.Expect.Code == contract.CodeBadRequest && c.Expect.Key == k && (k == "op" || req["op"] == op) {
					found = true
				}
			}
			if !found {
				t.Errorf("no case of %s without %s", op, k)
			}
		}
	}
}

// The time window is the helper's own decision, against its clock.
func TestTimeWindowUsesTheHelpersClock(t *testing.T) {
	defer func(old func() time.Time) { now = old }(now)
	cases := loadRequestCases(t)
	var insp, dec requestCase
	for _, c := range cases {
		switch c.Name {
		case "inspect of an expired file":
			insp = c
		case "decrypt of an expired file":
			dec = c
		}
	}
	now = func() time.Time { return time.Date(2019, 12, 31, 23, 59, 59, 0, time.UTC) }
	insp.Expect.Fields = map[string]interface{}{"authenticated": true, "reason_code": ""}
	t.Run("inspect before not_after", func(t *testing.T) { runCase(t, &insp, false) })
	dec.Expect.Type, dec.Expect.Op, dec.Expect.Fields = "result", contract.OpDecrypt, nil
	t.Run("decrypt before not_after", func(t *testing.T) { runCase(t, &dec, false) })
	now = func() time.Time { return time.Date(2020, 1, 1, 0, 0, 1, 0, time.UTC) }
	dec.Expect.Type, dec.Expect.Code = "error", contract.CodeExpired
	t.Run("decrypt a second after not_after", func(t *testing.T) { runCase(t, &dec, false) })
}

// A read error is io_error, named as such, never a tampering code (a disk
// that fails cannot be provoked here: encfile's tests use a failing reader).
func TestReadErrorIsIOError(t *testing.T) {
	err := fmt.Errorf("failed to read chunk: %w", &encfile.ReadError{Offset: 4096, Err: syscall.EIO})
	e := classify("part.gcode", err)
	if e.Code != contract.CodeIOError || !strings.Contains(e.Message, "part.gcode") || !strings.Contains(e.Message, "input/output error") {
		t.Fatalf("got %s: %s", e.Code, e.Message)
	}
}
