package encfile

import (
	"bufio"
	"bytes"
	"compress/zlib"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	agetest "c2sp.org/CCTV/age"
	"filippo.io/age"
	"github.com/klipper-encprint/encprint/helper/contract"
)

// memFile is an in-memory io.WriterAt, safe for concurrent disjoint writes.
type memFile struct {
	mu  sync.Mutex
	buf []byte
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if need := int(off) + len(p); need > len(m.buf) {
		m.buf = append(m.buf, make([]byte, need-len(m.buf))...)
	}
	copy(m.buf[off:], p)
	return len(p), nil
}

func newID(t testing.TB) *age.X25519Identity {
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func encrypt(t testing.TB, plain []byte, opts EncryptOptions) []byte {
	var out bytes.Buffer
	if err := Encrypt(&out, bytes.NewReader(plain), opts); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func decryptAll(ct []byte, ids ...age.Identity) ([]byte, Result, error) {
	f, err := Open(bytes.NewReader(ct), int64(len(ct)), ids...)
	if err != nil {
		return nil, Result{}, err
	}
	var m memFile
	m.buf = make([]byte, 0, f.PlainSize)
	r, err := f.DecryptTo(&m, 0)
	return m.buf, r, err
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte("G1 X10 Y20\n"[i%11])
	}
	return b
}

func TestRoundTripSizes(t *testing.T) {
	id := newID(t)
	for _, n := range []int{0, 1, chunkSize - 1, chunkSize, chunkSize + 1, segmentSize, segmentSize + 1, 5*segmentSize + 3} {
		plain := pattern(n)
		ct := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}})
		for _, workers := range []int{1, 2, 3} {
			t.Run(fmt.Sprintf("size=%d/workers=%d", n, workers), func(t *testing.T) {
				f, err := Open(bytes.NewReader(ct), int64(len(ct)), id)
				if err != nil {
					t.Fatal(err)
				}
				if f.PlainSize != int64(n) {
					t.Fatalf("PlainSize %d, want %d", f.PlainSize, n)
				}
				var m memFile
				r, err := f.DecryptTo(&m, workers)
				if err != nil {
					t.Fatal(err)
				}
				if r.Size != int64(n) || !bytes.Equal(m.buf, plain) || r.SHA256 != sha256.Sum256(plain) {
					t.Fatal("DecryptTo: round trip mismatch")
				}
				into := make([]byte, f.PlainSize)
				r2, err := f.DecryptInto(into, workers)
				if err != nil || r2 != r || !bytes.Equal(into, plain) {
					t.Fatalf("DecryptInto: round trip mismatch (%v)", err)
				}
			})
		}
	}
}

func TestMetadataPolicySignatureRoundTrip(t *testing.T) {
	id := newID(t)
	_, priv, _ := ed25519.GenerateKey(nil)
	md := &Metadata{Slicer: "PrusaSlicer", SlicerVersion: "2.7.1", EstimatedTime: 754, LayerCount: 20,
		Thumbnails: []Thumbnail{{Width: 32, Height: 32, Format: "png", Data: []byte("\x89PNG...")}}}
	pol := &Policy{MaxPrints: 3, NotAfter: 4102444800}
	plain := pattern(100_000)
	ct := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}, Metadata: md, Policy: pol, Signer: priv})

	h, p, err := ParseFile(bytes.NewReader(ct), int64(len(ct)))
	if err != nil {
		t.Fatal(err)
	}
	if p.Metadata.Slicer != "PrusaSlicer" || p.Metadata.Thumbnails[0].Width != 32 || p.Policy.MaxPrints != 3 || len(p.FileID) != 16 {
		t.Fatalf("public parts not as written: %+v %+v", p.Metadata, p.Policy)
	}
	if h.Recipients() != 1 {
		t.Fatalf("recipients = %d, want 1", h.Recipients())
	}
	if err := p.VerifySignature(); err != nil {
		t.Fatal(err)
	}
	got, _, err := decryptAll(ct, id)
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("decrypt: %v", err)
	}
}

func TestSeveralRecipientsEachDecrypt(t *testing.T) {
	a, b, c := newID(t), newID(t), newID(t)
	ct := encrypt(t, pattern(1000), EncryptOptions{Recipients: []age.Recipient{a.Recipient(), b.Recipient()}})
	for _, id := range []*age.X25519Identity{a, b} {
		if _, _, err := decryptAll(ct, id); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := decryptAll(ct, c); !errors.Is(err, ErrWrongIdentity) {
		t.Fatalf("non-recipient: got %v, want ErrWrongIdentity", err)
	}
}

// Every tampering class must be rejected, each with its own error.
func TestTamperingIsRejected(t *testing.T) {
	id := newID(t)
	_, priv, _ := ed25519.GenerateKey(nil)
	plain := pattern(3*chunkSize + 100)
	ct := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()},
		Metadata: &Metadata{Slicer: "PrusaSlicer"}, Signer: priv})
	h, _ := ParseHeader(bytes.NewReader(ct))
	hs := int(h.Size())
	payload := hs + nonceSize
	chunk := func(i int) int { return payload + i*(chunkSize+chunkOverlay) }
	flip := func(off int) []byte { c := bytes.Clone(ct); c[off] ^= 0x01; return c }
	// Replace a base64 character by another valid one, so the header still
	// parses and only the MAC can catch the change.
	edit := func(off int) []byte {
		c := bytes.Clone(ct)
		if c[off] == 'A' {
			c[off] = 'B'
		} else {
			c[off] = 'A'
		}
		return c
	}
	replaceHeader := func(old, new string) []byte {
		return bytes.Replace(bytes.Clone(ct), []byte(old), []byte(new), 1)
	}
	metaLine := bytes.Index(ct, []byte("-> "+MetaStanza))
	metaStanza := ct[metaLine : metaLine+1+bytes.Index(ct[metaLine+1:], []byte("-> "))]
	duplicated := bytes.Replace(bytes.Clone(ct), metaStanza, append(bytes.Clone(metaStanza), metaStanza...), 1)
	swapped := bytes.Clone(ct)
	copy(swapped[chunk(0):chunk(1)], ct[chunk(1):chunk(2)])
	copy(swapped[chunk(1):chunk(2)], ct[chunk(0):chunk(1)])

	other := []age.Identity{newID(t)}
	cases := []struct {
		name string
		ct   []byte
		ids  []age.Identity // nil: the file's recipient
		want string         // the one error class (errorClass) expected
	}{
		{"intro line", replaceHeader(introLine, "age-encryption.org/v2"), nil, contract.CodeNotEncrypted},
		{"metadata stanza edited", edit(metaLine + len("-> "+MetaStanza+" v1\n") + 16) /* inside the slicer name */, nil, contract.CodeHeaderAuthFailed},
		{"stanza version", replaceHeader(MetaStanza+" v1", MetaStanza+" v9"), nil, contract.CodeUnsupportedVersion},
		{"duplicate stanza", duplicated, nil, contract.CodeMalformedHeader},
		{"mac", replaceHeader("--- ", "--- A"), nil, contract.CodeMalformedHeader},
		{"payload nonce", flip(hs + 3), nil, contract.CodeTruncated}, // age checks the final chunk first
		{"first chunk", flip(chunk(0) + 10), nil, contract.CodePayloadCorrupt},
		{"second chunk", flip(chunk(1) + 10), nil, contract.CodePayloadCorrupt},
		{"final chunk", flip(len(ct) - 5), nil, contract.CodeTruncated},
		{"truncated at chunk boundary", ct[:chunk(2)], nil, contract.CodeTruncated},
		{"truncated mid chunk", ct[:chunk(1)+100], nil, contract.CodeTruncated},
		{"truncated in header", ct[:hs-5], nil, contract.CodeMalformedHeader},
		{"truncated before the nonce", ct[:hs+5], nil, contract.CodeTruncated},
		{"appended bytes", append(bytes.Clone(ct), 'x'), nil, contract.CodeTruncated},
		{"chunks swapped", swapped, nil, contract.CodePayloadCorrupt},
		{"armored", []byte(contract.ArmorBegin + "\n" + base64.StdEncoding.EncodeToString(ct[:48]) + "\n"), nil, contract.CodeMalformedHeader},
		{"wrong identity", ct, other, contract.CodeWrongIdentity},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ids := tc.ids
			if ids == nil {
				ids = []age.Identity{id}
			}
			_, _, err := decryptAll(tc.ct, ids...)
			if got := errorClass(err); got != tc.want {
				t.Fatalf("got %s (%v), want %s", got, err, tc.want)
			}
		})
	}
}

func TestChunkErrorNamesTheChunk(t *testing.T) {
	id := newID(t)
	ct := encrypt(t, pattern(40*chunkSize), EncryptOptions{Recipients: []age.Recipient{id.Recipient()}})
	h, _ := ParseHeader(bytes.NewReader(ct))
	off := int(h.Size()) + nonceSize + 21*(chunkSize+chunkOverlay) + 7
	ct[off] ^= 0xff
	_, _, err := decryptAll(ct, id)
	var ce *ChunkError
	if !errors.As(err, &ce) || ce.Index != 21 {
		t.Fatalf("got %v, want chunk 21", err)
	}
}

func TestSignatureChecks(t *testing.T) {
	id := newID(t)
	_, priv, _ := ed25519.GenerateKey(nil)
	ct := encrypt(t, pattern(5000), EncryptOptions{Recipients: []age.Recipient{id.Recipient()}})
	_, p, _ := ParseFile(bytes.NewReader(ct), int64(len(ct)))
	if err := p.VerifySignature(); !errors.Is(err, ErrUnsigned) {
		t.Fatalf("unsigned: %v", err)
	}
	// A signature over a different plaintext (a publisher's key reused on a
	// swapped payload) is caught when the digest is checked.
	signed := encrypt(t, pattern(5000), EncryptOptions{Recipients: []age.Recipient{id.Recipient()}, Signer: priv})
	_, ps, _ := ParseFile(bytes.NewReader(signed), int64(len(signed)))
	if err := ps.VerifySignature(); err != nil {
		t.Fatal(err)
	}
	ps.Signature.Sig[0] ^= 1
	if err := ps.VerifySignature(); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("forged: %v", err)
	}
}

func TestNotEncryptedAndArmored(t *testing.T) {
	for _, c := range []struct {
		in        string
		want      error
		encrypted bool // IsEncrypted: never to be streamed as G-code
	}{
		{"G28\nG1 X0\n", ErrNotEncrypted, false},
		{"", ErrNotEncrypted, false},
		{"age-encryption.org/v1", ErrNotEncrypted, false}, // no newline: not the intro line
		{"age-encryption.org/v10\n", ErrNotEncrypted, false},
		{" -----BEGIN AGE ENCRYPTED FILE-----\n", ErrNotEncrypted, false},
		{contract.ArmorBegin + "\nYWdl\n", ErrArmored, true},
		{contract.ArmorBegin + "\r\nYWdl\r\n", ErrArmored, true},
		{contract.ArmorBegin, ErrArmored, true},
	} {
		if _, err := ParseHeader(strings.NewReader(c.in)); !errors.Is(err, c.want) {
			t.Errorf("%q: got %v, want %v", c.in, err, c.want)
		}
		if got := IsEncrypted([]byte(c.in)); got != c.encrypted {
			t.Errorf("%q: IsEncrypted = %v, want %v", c.in, got, c.encrypted)
		}
	}
	if !IsEncrypted([]byte(contract.AgeMagic + "-> X25519")) {
		t.Error("IsEncrypted refuses an age file")
	}
	if !strings.Contains(ErrArmored.Error(), "without -a/--armor") {
		t.Errorf("armor message %q does not say what to do", ErrArmored)
	}
}

// failingReader fails every read that touches [from, to) with EIO, as a
// disk with a bad sector does.
type failingReader struct {
	data     []byte
	from, to int64
}

func (r *failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off < r.to && off+int64(len(p)) > r.from {
		return 0, syscall.EIO
	}
	return bytes.NewReader(r.data).ReadAt(p, off)
}

// A read error is reported as one, wherever it happens, never as tampering.
func TestReadErrorsAreNotTampering(t *testing.T) {
	id := newID(t)
	ct := encrypt(t, pattern(40*chunkSize), EncryptOptions{Recipients: []age.Recipient{id.Recipient()}})
	h, _ := ParseHeader(bytes.NewReader(ct))
	payload := h.Size() + nonceSize
	for _, c := range []struct {
		name     string
		from, to int64
	}{
		{"first byte", 0, 1},
		{"in the header", 30, 31},
		{"the nonce", h.Size(), h.Size() + 1},
		{"the final chunk", int64(len(ct)) - 10, int64(len(ct)) - 9},
		{"chunk 21", payload + 21*(chunkSize+chunkOverlay) + 5, payload + 21*(chunkSize+chunkOverlay) + 6},
	} {
		t.Run(c.name, func(t *testing.T) {
			src := &failingReader{ct, c.from, c.to}
			f, err := Open(src, int64(len(ct)), id)
			if err == nil {
				var m memFile
				_, err = f.DecryptTo(&m, 3)
			}
			var re *ReadError
			if !errors.As(err, &re) || !errors.Is(err, syscall.EIO) {
				t.Fatalf("got %s (%v), want a ReadError wrapping EIO", errorClass(err), err)
			}
			if got := errorClass(err); got != contract.CodeIOError {
				t.Fatalf("classified as %s", got)
			}
		})
	}
}

func TestPolicyWindow(t *testing.T) {
	p := &Policy{NotBefore: 1000, NotAfter: 2000}
	for _, c := range []struct {
		at      int64
		expired bool
		ok      bool
	}{{999, false, false}, {1000, false, true}, {2000, false, true}, {2001, true, false}} {
		err := p.CheckWindow(time.Unix(c.at, 0))
		var we *WindowError
		switch {
		case c.ok && err != nil, !c.ok && !errors.As(err, &we):
			t.Errorf("at %d: %v", c.at, err)
		case !c.ok && we.Expired != c.expired:
			t.Errorf("at %d: expired = %v", c.at, we.Expired)
		}
	}
	if err := (*Policy)(nil).CheckWindow(time.Now()); err != nil {
		t.Error("a file without a policy has a window")
	}
	if err := (&Policy{}).CheckWindow(time.Unix(1<<40, 0)); err != nil {
		t.Error("zero bounds are bounds")
	}
}

func TestPublisherKeyFormatMatchesTheContract(t *testing.T) {
	re := regexp.MustCompile(contract.PublisherKeyRegex)
	for i := 0; i < 20; i++ {
		pub, _, _ := ed25519.GenerateKey(nil)
		if k := FormatPublicKey(pub); !re.MatchString(k) {
			t.Fatalf("%s does not match %s", k, contract.PublisherKeyRegex)
		}
	}
}

func TestEncryptWithoutRecipients(t *testing.T) {
	err := Encrypt(io.Discard, bytes.NewReader([]byte("G1\n")), EncryptOptions{})
	if !errors.Is(err, ErrNoRecipients) || strings.Contains(err.Error(), "-r") {
		t.Fatalf("got %v, want ErrNoRecipients without CLI flags", err)
	}
}

// cctvClass is the error class a CCTV vector's "expect" maps to. The CCTV
// classes are coarser than ours; the vectors named below get the finer class
// this format gives them, each for the reason stated.
func cctvClass(name, expect string) string {
	finer := map[string]string{
		// The first line is not the v1 intro line.
		"header_crlf": contract.CodeNotEncrypted, "version_unsupported": contract.CodeNotEncrypted,
		// The file ends before the payload nonce: a truncated file.
		"stream_no_nonce": contract.CodeTruncated, "stream_short_nonce": contract.CodeTruncated,
		// No stanza is of a type the identity opens.
		"hybrid_x25519_arg": contract.CodeWrongIdentity, "scrypt_and_x25519": contract.CodeWrongIdentity,
		// A chunk before the final one fails (the final chunk authenticates).
		"stream_two_final_chunks": contract.CodePayloadCorrupt, "stream_two_final_chunks_full": contract.CodePayloadCorrupt,
		"stream_two_final_chunks_second": contract.CodePayloadCorrupt,
	}
	if c, ok := finer[name]; ok {
		return c
	}
	return map[string]string{
		"success":         "success",
		"no match":        contract.CodeWrongIdentity,
		"HMAC failure":    contract.CodeHeaderAuthFailed,
		"header failure":  contract.CodeMalformedHeader,
		"payload failure": contract.CodeTruncated, // age authenticates the final chunk first
	}[expect]
}

// The community test vectors (the ones age itself tests against) through our
// parser and our parallel decrypt path, each failing with the class it expects.
func TestCCTVVectors(t *testing.T) {
	n := 0
	fs.WalkDir(agetest.Vectors, ".", func(path string, d fs.DirEntry, err error) error {
		if d.IsDir() {
			return nil
		}
		data, _ := fs.ReadFile(agetest.Vectors, path)
		hdr, body, _ := bytes.Cut(data, []byte("\n\n"))
		fields := map[string]string{}
		for _, line := range strings.Split(string(hdr), "\n") {
			k, v, _ := strings.Cut(line, ": ")
			fields[k] = v
		}
		if fields["armored"] == "yes" || fields["identity"] == "" {
			return nil // armor and passphrase vectors: not used by printers
		}
		if fields["compressed"] == "zlib" {
			r, err := zlib.NewReader(bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			body, _ = io.ReadAll(r)
		}
		ids, err := age.ParseIdentities(strings.NewReader(fields["identity"]))
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		n++
		name := filepath.Base(path)
		t.Run(name, func(t *testing.T) {
			got, res, err := decryptAll(body, ids...)
			want := cctvClass(name, fields["expect"])
			if class := errorClass(err); class != want {
				t.Fatalf("vector expects %q: got %s (%v), want %s", fields["expect"], class, err, want)
			}
			if want == "success" && (hex.EncodeToString(res.SHA256[:]) != fields["payload"] || int64(len(got)) != res.Size) {
				t.Fatal("payload digest mismatch")
			}
		})
		return nil
	})
	if n < 50 {
		t.Fatalf("only %d vectors ran", n)
	}
}

// Interoperability with the age command (Debian's package): files from stock
// `age -r` decrypt with ours, and ours decrypt with `age -d`.
func TestInteropWithAgeCommand(t *testing.T) {
	if _, err := exec.LookPath("age"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("the age command is missing (scripts/bootstrap.sh installs it)")
		}
		t.Skip("age command not installed")
	}
	dir := t.TempDir()
	id := newID(t)
	keyFile := filepath.Join(dir, "key.txt")
	os.WriteFile(keyFile, []byte(id.String()+"\n"), 0o600)
	plain := pattern(3*chunkSize + 17)

	cmd := exec.Command("age", "-r", id.Recipient().String())
	cmd.Stdin = bytes.NewReader(plain)
	stock, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := decryptAll(stock, id)
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("stock age file: %v", err)
	}

	ours := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()},
		Metadata: &Metadata{Slicer: "x", Thumbnails: []Thumbnail{{Width: 1, Height: 1, Format: "png", Data: []byte{1}}}}})
	cmd = exec.Command("age", "-d", "-i", keyFile)
	cmd.Stdin = bytes.NewReader(ours)
	out, err := cmd.Output()
	if err != nil || !bytes.Equal(out, plain) {
		t.Fatalf("age -d on our file: %v", err)
	}
}

func FuzzParseHeader(f *testing.F) {
	id, _ := age.GenerateX25519Identity()
	var b bytes.Buffer
	Encrypt(&b, bytes.NewReader([]byte("G1 X1\n")), EncryptOptions{Recipients: []age.Recipient{id.Recipient()},
		Metadata: &Metadata{Slicer: "PrusaSlicer", LayerCount: 3}})
	f.Add(b.Bytes())
	f.Add([]byte(contract.AgeMagic + "-> X25519 abc\n\n--- AAAA\n"))
	f.Add([]byte("G28\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseHeader(bufio.NewReader(bytes.NewReader(data)))
		if err != nil {
			return
		}
		if !bytes.HasPrefix(data, h.Raw) {
			t.Fatal("Raw is not a prefix of the input")
		}
		ParsePublic(h)
	})
}
