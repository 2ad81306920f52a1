//go:build linux

package ipc

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"flag"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/vmihailenco/msgpack/v5"
	"golang.org/x/sys/unix"
)

var update = flag.Bool("update", false, "rewrite proto/testdata/messages.json from the values below")

const vectorsPath = "../../proto/testdata/messages.json"

type vector struct {
	Name    string          `json:"name"`
	Kind    string          `json:"kind"`
	Hex     string          `json:"hex"`
	Decoded json.RawMessage `json:"decoded"`
}

func pubKey() *string { s := "encprint-pub:" + strings.Repeat("A", 43); return &s }

func fixedMessages() []struct {
	name, kind string
	msg        interface{}
} {
	id := bytes.Repeat([]byte{0xab}, 16)
	return []struct {
		name, kind string
		msg        interface{}
	}{
		{"hello", "hello", &Hello{"hello", 2, "v0.1.0"}},
		{"request inspect", "request", &Request{"request", 2, "inspect", "/home/pi/printer_data/gcodes/part.enc.gcode",
			"/home/pi/printer_data/gcodes", "/home/pi/.config/encprint/printer.key", 0, ""}},
		{"request decrypt", "request", &Request{"request", 2, "decrypt", "/home/pi/printer_data/gcodes/sub dir/ü.gcode",
			"/home/pi/printer_data/gcodes", "/home/pi/.config/encprint/printer.key", 536870912, "encprint-0f1e2d3c"}},
		{"progress", "progress", &Progress{"progress", 65536, 300000000}},
		{"inspect result, authenticated", "inspect_result", &InspectResult{Type: "result", Op: "inspect", FileID: id, Recipients: 2,
			Metadata: &encfile.Metadata{Values: map[string]any{"slicer": "PrusaSlicer", "slicer_version": "2.7.1", "estimated_time": 754.0, "layer_count": int64(20)},
				Thumbnails: []encfile.Thumbnail{{Width: 32, Height: 32, Format: "png", Data: []byte("\x89PNG\r\n")}}},
			Policy: &encfile.Policy{FileID: id, MaxPrints: 3, NotAfter: 4102444800}, Publisher: pubKey(), SignatureValid: true,
			Authenticated: true, PlaintextSize: 123456}},
		{"inspect result, not a recipient", "inspect_result", &InspectResult{Type: "result", Op: "inspect", FileID: id, Recipients: 1,
			Reason: "part.gcode was encrypted for other printers, not this one", ReasonCode: "wrong_identity"}},
		{"decrypt result", "decrypt_result", &DecryptResult{Type: "result", Op: "decrypt", FileID: id, Size: 123456, GcodeSize: 123456,
			SHA256: bytes.Repeat([]byte{0x5a}, 32), Seals: 47, MemfdName: "encprint-0f1e2d3c", ElapsedMS: 12.5}},
		{"decrypt result, compressed, without sha256", "decrypt_result", &DecryptResult{Type: "result", Op: "decrypt", FileID: id,
			Size: 35214, GcodeSize: 123456, Seals: 47, MemfdName: "encprint-0f1e2d3c", ElapsedMS: 12.5, Publisher: pubKey(), SignatureValid: true}},
		{"recipient result", "recipient_result", &RecipientResult{"result", "recipient",
			"age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p", []string{}}},
		{"records result", "records_result", &RecordsResult{"result", "records", true, []Record{{FileID: strings.Repeat("ab", 16),
			Publisher: *pubKey(), Time: 1767225600, PID: 4242, UID: 1000, MaxPrints: 3, Count: 1}}}},
		{"error", "error", &Error{Type: "error", Code: "too_large", Message: "part.gcode needs 2.0 GiB of memory to print, more than the 512.0 MiB allowed"}},
	}
}

func newOf(kind string) interface{} {
	return map[string]interface{}{"hello": &Hello{}, "request": &Request{}, "progress": &Progress{},
		"inspect_result": &InspectResult{}, "decrypt_result": &DecryptResult{},
		"recipient_result": &RecipientResult{}, "records_result": &RecordsResult{}, "error": &Error{}}[kind]
}

// jsonForm turns a generic msgpack value into the vectors' JSON form.
func jsonForm(v interface{}) interface{} {
	switch v := v.(type) {
	case []byte:
		return map[string]string{"$bin": hex.EncodeToString(v)}
	case map[string]interface{}:
		out := map[string]interface{}{}
		for k, e := range v {
			out[k] = jsonForm(e)
		}
		return out
	case []interface{}:
		for i := range v {
			v[i] = jsonForm(v[i])
		}
		return v
	}
	return v
}

func TestGoldenVectors(t *testing.T) {
	if *update {
		var out []vector
		for _, m := range fixedMessages() {
			b, err := Marshal(m.msg)
			if err != nil {
				t.Fatal(err)
			}
			var generic interface{}
			msgpack.Unmarshal(b, &generic)
			dj, _ := json.Marshal(jsonForm(generic))
			out = append(out, vector{m.name, m.kind, hex.EncodeToString(b), dj})
		}
		data, _ := json.MarshalIndent(out, "", "  ")
		os.WriteFile(vectorsPath, append(data, '\n'), 0o644)
	}
	data, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	var vectors []vector
	if err := json.Unmarshal(data, &vectors); err != nil {
		t.Fatal(err)
	}
	fixed := fixedMessages()
	if len(vectors) != len(fixed) {
		t.Fatalf("%d vectors, want %d", len(vectors), len(fixed))
	}
	for i, v := range vectors {
		raw, _ := hex.DecodeString(v.Hex)
		msg := newOf(v.Kind)
		if err := msgpack.Unmarshal(raw, msg); err != nil {
			t.Fatalf("%s: decode: %v", v.Name, err)
		}
		if !reflect.DeepEqual(msg, fixed[i].msg) {
			t.Errorf("%s: decoded %+v, want %+v", v.Name, msg, fixed[i].msg)
		}
		again, _ := Marshal(msg)
		if !bytes.Equal(again, raw) {
			t.Errorf("%s: re-encoding differs:\n got %x\nwant %x", v.Name, again, raw)
		}
		var generic interface{}
		msgpack.Unmarshal(raw, &generic)
		var want, got interface{}
		json.Unmarshal(v.Decoded, &want)
		gj, _ := json.Marshal(jsonForm(generic))
		json.Unmarshal(gj, &got)
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: decoded form differs:\n got %s\nwant %s", v.Name, gj, v.Decoded)
		}
	}
}

func pair(t *testing.T) (*Conn, *Conn) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := NewConn(fds[0])
	b, _ := NewConn(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func TestLargeMessageSpansRecords(t *testing.T) {
	a, b := pair(t)
	big := &InspectResult{Type: "result", Op: "inspect", Metadata: &encfile.Metadata{
		Thumbnails: []encfile.Thumbnail{{Width: 400, Height: 300, Format: "png", Data: bytes.Repeat([]byte{7}, 300_000)}}}}
	go a.Send(big, -1)
	body, err := b.RecvBody()
	if err != nil {
		t.Fatal(err)
	}
	var got InspectResult
	if err := msgpack.Unmarshal(body, &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Metadata.Thumbnails[0].Data) != 300_000 {
		t.Fatal("thumbnail lost in framing")
	}
}

func TestRecvRefusesDescriptorsAndClosesThem(t *testing.T) {
	a, b := pair(t)
	f, _ := os.Open("/dev/null")
	defer f.Close()
	before := openFDs(t)
	if err := a.Send(&Request{Type: "request"}, int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	if _, err := b.RecvBody(); err == nil || !strings.Contains(err.Error(), "unexpected file descriptor") {
		t.Fatalf("got %v, want a refusal", err)
	}
	if after := openFDs(t); after != before {
		t.Fatalf("open descriptors went from %d to %d: the received one leaked", before, after)
	}
}

func TestRecvRejectsOversizedAndClosedPeer(t *testing.T) {
	a, b := pair(t)
	unix.Sendmsg(a.fd, []byte{0xff, 0xff, 0xff, 0xff}, nil, nil, 0)
	if _, err := b.RecvBody(); err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Fatalf("got %v", err)
	}
	a.Close()
	if _, err := b.RecvBody(); err != ErrClosed {
		t.Fatalf("got %v, want ErrClosed", err)
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// FuzzMessage feeds arbitrary records to the reassembly and the strict
// decoding of a request (DecodeRequest): errors are fine, panics and hangs
// are not, and a body is only returned when it has exactly the announced
// length.
func FuzzMessage(f *testing.F) {
	for _, m := range fixedMessages() {
		b, _ := Marshal(m.msg)
		f.Add(append([]byte{0, 0, byte(len(b) >> 8), byte(len(b))}, b...), uint8(7))
	}
	f.Add([]byte{0xff, 0xff, 0xff, 0xff}, uint8(1))
	f.Add([]byte{0, 0, 0, 3, 0x81}, uint8(2))
	f.Fuzz(func(t *testing.T, data []byte, split uint8) {
		var a assembler
		step := int(split%64) + 1
		for i := 0; i < len(data); i += step {
			body, err := a.add(data[i:min(i+step, len(data))])
			if err != nil {
				return
			}
			if body != nil {
				if len(body) != a.want {
					t.Fatalf("body of %d bytes, announced %d", len(body), a.want)
				}
				DecodeRequest(body) // must not panic, whatever the bytes
				return
			}
		}
	})
}
