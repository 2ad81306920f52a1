//go:build linux

package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"filippo.io/age"
	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/klipper-encprint/encprint/helper/ipc"
	"github.com/klipper-encprint/encprint/helper/seekgz"
	"golang.org/x/sys/unix"
)

var updatePayloadVectors = flag.Bool("update-payload-vectors", false, "regenerate proto/testdata/vectors/payload-*")

const (
	payloadCasesPath = "../../../proto/testdata/vectors/payload.json"
	seekgzVectorDir  = "../../../proto/testdata/seekgz"
	// The fixed keys of helper/encfile's vectors.
	vectorIdentity = "AGE-SECRET-KEY-1CYK0Z28VGLXWCG6GJD9MVSTCJ6XL5260R59MW9S9UNLJ2K36GTWQNTKLU3"
	vectorSeed     = "encprint test vector publisher seed"
)

// payloadCase is one entry of proto/testdata/vectors/payload.json: an
// encrypted file whose payload is, or claims to be, a seekable gzip.
type payloadCase struct {
	File          string   `json:"file"`
	Expect        string   `json:"expect"` // "success" or the error code
	Words         []string `json:"words,omitempty"`
	PayloadSize   int64    `json:"payload_size"`
	PayloadSHA256 string   `json:"payload_sha256"`
	GcodeSize     int64    `json:"gcode_size,omitempty"`
	GcodeSHA256   string   `json:"gcode_sha256,omitempty"`
	// SHA256 is the decrypt result's sha256 (a v1 signature's), "" if none.
	SHA256 string `json:"sha256,omitempty"`
	Note   string `json:"note"`
}

// payloadGcode is G-code of a little over three 64 KiB blocks in which a
// two-byte character straddles the first block boundary.
func payloadGcode() []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < 3*seekgz.DefaultBlockSize+5000; i++ {
		if b.Len() > seekgz.DefaultBlockSize-200 && b.Len() < seekgz.DefaultBlockSize {
			b.WriteString(strings.Repeat(";", seekgz.DefaultBlockSize-1-b.Len()))
			b.WriteString("ü Teil\n") // 0xc3 is the block's last byte, 0xbc the next one's first
			continue
		}
		fmt.Fprintf(&b, "G1 X%d.%03d Y%d E%d.25 ; payload vector line %d\n", i%200, i%1000, i%97, i%7, i)
	}
	return b.Bytes()
}

func stockEncrypt(t *testing.T, id *age.X25519Identity, payload []byte) []byte {
	var b bytes.Buffer
	w, err := age.Encrypt(&b, id.Recipient())
	if err != nil {
		t.Fatal(err)
	}
	w.Write(payload)
	w.Close()
	return b.Bytes()
}

// hugeFooter is a payload of a footer alone, claiming 5 GiB of G-code.
func hugeFooter() []byte {
	b := []byte{0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 36, 0, 'E', 'f', 32, 0}
	b = binary.LittleEndian.AppendUint32(b, 1)
	b = binary.LittleEndian.AppendUint32(b, seekgz.DefaultBlockSize)
	b = binary.LittleEndian.AppendUint64(b, 5<<30)
	b = binary.LittleEndian.AppendUint64(b, 0)
	b = binary.LittleEndian.AppendUint32(b, 5<<30/seekgz.DefaultBlockSize)
	b = binary.LittleEndian.AppendUint32(b, 0)
	return append(b, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0)
}

func generatePayloadVectors(t *testing.T) {
	id, _ := age.ParseX25519Identity(vectorIdentity)
	seed := sha256.Sum256([]byte(vectorSeed))
	signer := ed25519.NewKeyFromSeed(seed[:])
	gcode := payloadGcode()
	var cases []payloadCase
	add := func(file, expect string, words []string, payload, data, gcode []byte, note string) {
		if data == nil {
			data = stockEncrypt(t, id, payload)
		}
		if err := os.WriteFile(filepath.Join(vectorDir, file), data, 0o644); err != nil {
			t.Fatal(err)
		}
		ps := sha256.Sum256(payload)
		c := payloadCase{File: file, Expect: expect, Words: words, PayloadSize: int64(len(payload)),
			PayloadSHA256: hex.EncodeToString(ps[:]), Note: note}
		if gcode != nil {
			gs := sha256.Sum256(gcode)
			c.GcodeSize, c.GcodeSHA256 = int64(len(gcode)), hex.EncodeToString(gs[:])
		}
		cases = append(cases, c)
	}
	var payload bytes.Buffer
	zw, _ := seekgz.NewWriter(&payload, seekgz.Options{})
	zw.Write(gcode)
	zw.Close()
	for _, v := range []string{encfile.SigVersion2, encfile.StanzaVersion} {
		var enc bytes.Buffer
		pol := &encfile.Policy{FileID: bytes.Repeat([]byte{0x46}, 16)}
		if err := encfile.Encrypt(&enc, bytes.NewReader(gcode), encfile.EncryptOptions{Recipients: []age.Recipient{id.Recipient()},
			Policy: pol, Signer: signer, SignatureVersion: v, Compress: &seekgz.Options{}}); err != nil {
			t.Fatal(err)
		}
		if v == encfile.SigVersion2 {
			add("payload-compressed.enc.gcode", "success", nil, payload.Bytes(), enc.Bytes(), gcode,
				"encprint encrypt's default: a seekable gzip of 64 KiB blocks, signed v2; a 2-byte character straddles the first block boundary")
		} else {
			add("payload-compressed-v1.enc.gcode", "success", nil, payload.Bytes(), enc.Bytes(), gcode,
				"the same compressed payload signed v1: the result carries the payload's SHA-256")
			sum := sha256.Sum256(payload.Bytes())
			cases[len(cases)-1].SHA256 = hex.EncodeToString(sum[:])
		}
	}
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(seekgzVectorDir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	bad := []string{"damaged or was not made by encprint", "ask its sender to encrypt the G-code again"}
	add("payload-lying-index.enc.gcode", contract.CodeBadPayload, append([]string{"index"}, bad...), read("lying-index.gz"), nil, nil,
		"seekgz/lying-index.gz, stock-age encrypted: an index entry one byte too large")
	add("payload-lying-footer.enc.gcode", contract.CodeBadPayload, append([]string{"index"}, bad...), read("lying-footer.gz"), nil, nil,
		"seekgz/lying-footer.gz: a block count one too large")
	add("payload-bad-block.enc.gcode", contract.CodeBadPayload, append([]string{"compressed block 1"}, bad...), read("tampered-block.gz"), nil, nil,
		"seekgz/tampered-block.gz: a bit flipped in block 1's deflate data, inside an authentic encryption")
	add("payload-bad-crc.enc.gcode", contract.CodeBadPayload, append([]string{"compressed block 1", "CRC-32"}, bad...), read("bad-crc.gz"), nil, nil,
		"seekgz/bad-crc.gz: block 1's CRC-32 altered")
	add("payload-bomb.enc.gcode", contract.CodeBadPayload, append([]string{"compressed block 0", "decompression bomb"}, bad...), read("bomb.gz"), nil, nil,
		"seekgz/bomb.gz: a 4 KiB block whose deflate data inflates to 4 MiB: inflating stops at 4 KiB + 1")
	add("payload-huge.enc.gcode", contract.CodeTooLarge, []string{"5.0 GiB", "4.0 GiB", "nothing was inflated"}, hugeFooter(), nil, nil,
		"a footer alone claiming 5 GiB of G-code: refused from the footer before anything is inflated")
	add("payload-plain-gzip.enc.gcode", contract.CodeNotSeekable, []string{"gzip but not an encprint seekable gzip", "encrypt the plain G-code with encprint"},
		read("plain-gzip.gz"), nil, nil, "seekgz/plain-gzip.gz: gzip's own output")
	text := []byte(strings.Repeat("G1 X1 Y2 ; teil-ü\n", 1000))
	text[10000] = 0xff
	var nu bytes.Buffer
	zw, _ = seekgz.NewWriter(&nu, seekgz.Options{BlockSize: seekgz.MinBlockSize})
	zw.Write(text)
	zw.Close()
	add("payload-not-utf8.enc.gcode", contract.CodeNotUTF8, []string{"not valid UTF-8 at byte 10000"}, nu.Bytes(), nil, nil,
		"a valid seekable gzip of 4 KiB blocks whose G-code has 0xff at byte 10000, in block 2: the offset is the G-code's")
	data, _ := json.MarshalIndent(cases, "", "  ")
	os.WriteFile(payloadCasesPath, append(data, '\n'), 0o644)
}

func loadPayloadCases(t *testing.T) []payloadCase {
	if *updatePayloadVectors {
		generatePayloadVectors(t)
	}
	raw, err := os.ReadFile(payloadCasesPath)
	if err != nil {
		t.Fatal(err)
	}
	var cases []payloadCase
	if err := json.Unmarshal(raw, &cases); err != nil {
		t.Fatal(err)
	}
	return cases
}

// decryptVector asks serve() to decrypt a vector over a real socketpair and
// returns its answer and the descriptors that came with it.
func decryptVector(t *testing.T, vector string) (map[string]interface{}, []int) {
	data, err := os.ReadFile(filepath.Join(vectorDir, vector))
	if err != nil {
		t.Fatal(err)
	}
	return decryptFile(t, data)
}

// decryptFile has serve decrypt data, encrypted to vectorIdentity, as
// part.gcode and returns its answer and the descriptors that came with it.
func decryptFile(t *testing.T, data []byte) (map[string]interface{}, []int) {
	dir := t.TempDir()
	root := filepath.Join(dir, "gcodes")
	os.Mkdir(root, 0o755)
	os.WriteFile(filepath.Join(root, "part.gcode"), data, 0o644)
	identity := filepath.Join(dir, "printer.key")
	os.WriteFile(identity, []byte(vectorIdentity+"\n"), 0o600)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	tv := unix.NsecToTimeval((20 * time.Second).Nanoseconds())
	unix.SetsockoptTimeval(fds[0], unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	conn, err := ipc.NewConn(fds[1])
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { err := serve(conn, nil); conn.Close(); done <- err }()
	body := encodeBody(t, map[string]interface{}{"type": "request", "protocol": contract.ProtocolVersion, "op": "decrypt",
		"path": filepath.Join(root, "part.gcode"), "root": root, "identity": identity, "max_bytes": 0, "memfd_name": "encprint-payload"})
	if err := unix.Sendmsg(fds[0], append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...), nil, nil, 0); err != nil {
		t.Fatal(err)
	}
	if hello, _ := recvMessage(t, fds[0]); hello["type"] != "hello" {
		t.Fatalf("first message %v", hello)
	}
	msg, got := recvMessageFDs(t, fds[0])
	for msg != nil && msg["type"] == "progress" {
		if len(got) > 0 {
			t.Fatal("a descriptor came with a progress message")
		}
		msg, got = recvMessageFDs(t, fds[0])
	}
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
	return msg, got
}

// A compressed file decrypts into a sealed memfd holding its payload
// verbatim (the seekable gzip, which the Klipper extra reads), with the
// G-code's size beside the memfd's; a lying index, a bad or tampered block,
// a decompression bomb, plain gzip and non-UTF-8 G-code inside a block are
// refused, each with its code and words, before any descriptor leaves.
func TestCompressedPayloads(t *testing.T) {
	cases := loadPayloadCases(t)
	if len(cases) < 10 {
		t.Fatalf("only %d payload cases", len(cases))
	}
	for _, c := range cases {
		t.Run(c.File, func(t *testing.T) {
			msg, fds := decryptVector(t, c.File)
			defer func() {
				for _, fd := range fds {
					unix.Close(fd)
				}
			}()
			if c.Expect != "success" {
				if msg["type"] != "error" || msg["code"] != c.Expect || len(fds) != 0 {
					t.Fatalf("got %v with %d descriptors, want a %s error and none", msg, len(fds), c.Expect)
				}
				for _, w := range c.Words {
					if !strings.Contains(msg["message"].(string), w) {
						t.Errorf("message %q lacks %q", msg["message"], w)
					}
				}
				if !strings.HasPrefix(msg["message"].(string), "part.gcode") {
					t.Errorf("message %q does not name the file", msg["message"])
				}
				return
			}
			if msg["type"] != "result" || len(fds) != 1 {
				t.Fatalf("got %v with %d descriptors", msg, len(fds))
			}
			if fmt.Sprint(msg["size"]) != fmt.Sprint(c.PayloadSize) || fmt.Sprint(msg["gcode_size"]) != fmt.Sprint(c.GcodeSize) {
				t.Fatalf("size %v gcode_size %v, want %d and %d", msg["size"], msg["gcode_size"], c.PayloadSize, c.GcodeSize)
			}
			if sum, _ := msg["sha256"].([]byte); hex.EncodeToString(sum) != c.SHA256 {
				t.Fatalf("sha256 %x, want %q", sum, c.SHA256)
			}
			seals, err := unix.FcntlInt(uintptr(fds[0]), unix.F_GET_SEALS, 0)
			if err != nil || seals&contract.RequiredSeals != contract.RequiredSeals {
				t.Fatalf("seals %#x (%v)", seals, err)
			}
			var st unix.Stat_t
			unix.Fstat(fds[0], &st)
			got := make([]byte, st.Size)
			if n, _ := unix.Pread(fds[0], got, 0); int64(n) != c.PayloadSize {
				t.Fatalf("memfd holds %d bytes, want %d", n, c.PayloadSize)
			}
			if sum := sha256.Sum256(got); hex.EncodeToString(sum[:]) != c.PayloadSHA256 || !bytes.HasPrefix(got, []byte(contract.SeekgzMagic)) {
				t.Fatal("the memfd does not hold the seekable gzip payload verbatim")
			}
			ix, err := seekgz.ReadIndex(bytes.NewReader(got), st.Size, seekgz.Limits{})
			if err != nil {
				t.Fatal(err)
			}
			clear := make([]byte, ix.ClearSize)
			seekgz.NewReader(bytes.NewReader(got), ix).ReadAt(clear, 0)
			if sum := sha256.Sum256(clear); hex.EncodeToString(sum[:]) != c.GcodeSHA256 {
				t.Fatal("the memfd's payload does not inflate to the G-code")
			}
		})
	}
}

// A plain payload is checked as UTF-8 by the decrypting workers, segment by
// segment: a lead byte that ends the first 1 MiB segment without its
// continuation is found at its G-code offset, and no descriptor is handed
// out.
func TestPlainPayloadNotUTF8(t *testing.T) {
	id, err := age.ParseX25519Identity(vectorIdentity)
	if err != nil {
		t.Fatal(err)
	}
	text := []byte(strings.Repeat("G1 X1 Y2 ; teil-ü\n", 3<<20/19))
	const bad = 1 << 20
	text[bad-1], text[bad] = 0xc3, 'G' // a lead byte whose continuation is missing
	var ct bytes.Buffer
	if err := encfile.Encrypt(&ct, bytes.NewReader(text), encfile.EncryptOptions{Recipients: []age.Recipient{id.Recipient()}}); err != nil {
		t.Fatal(err)
	}
	msg, fds := decryptFile(t, ct.Bytes())
	for _, fd := range fds {
		unix.Close(fd)
	}
	want := fmt.Sprintf("not valid UTF-8 at byte %d", bad-1)
	if msg["type"] != "error" || msg["code"] != contract.CodeNotUTF8 || len(fds) != 0 || !strings.Contains(fmt.Sprint(msg["message"]), want) {
		t.Fatalf("got %v with %d descriptors, want a not_utf8 error naming byte %d and none", msg, len(fds), bad-1)
	}
}
