package encfile

import (
	"bytes"
	"compress/gzip"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"filippo.io/age"
	"github.com/klipper-encprint/encprint/helper/seekgz"
	"github.com/vmihailenco/msgpack/v5"
)

// treeOf computes TreeDigest the obvious, serial way.
func treeOf(p []byte) [32]byte {
	var leaves [][32]byte
	for off := 0; off < len(p); off += DigestSegment {
		leaves = append(leaves, sha256.Sum256(p[off:min(off+DigestSegment, len(p))]))
	}
	return TreeDigest(int64(len(p)), leaves)
}

func gcodeText(n int) []byte {
	line := []byte("G1 X10.123 Y20.456 E0.0123\n")
	return bytes.Repeat(line, n/len(line)+1)[:n]
}

func decryptWith(t *testing.T, ct []byte, id age.Identity, skip bool, workers int) (*File, []byte, Result, error) {
	t.Helper()
	f, err := Open(bytes.NewReader(ct), int64(len(ct)), id)
	if err != nil {
		t.Fatal(err)
	}
	f.SkipSHA256 = skip
	dst := make([]byte, f.PlainSize)
	res, err := f.DecryptInto(dst, workers)
	return f, dst, res, err
}

func TestTreeDigestIsParallelAndStreamingAlike(t *testing.T) {
	for _, n := range []int{0, 1, DigestSegment - 1, DigestSegment, DigestSegment + 1, 3*DigestSegment + 5} {
		p := gcodeText(n)
		th := newTreeHasher()
		for q := p; len(q) > 0; {
			k := min(len(q), 100_003)
			th.Write(q[:k])
			q = q[k:]
		}
		if th.Sum() != treeOf(p) {
			t.Fatalf("%d bytes: streaming tree digest differs", n)
		}
	}
	if treeOf([]byte("a")) == treeOf([]byte("b")) || treeOf(nil) == treeOf([]byte{0}) {
		t.Fatal("tree digest does not depend on the content")
	}
}

func TestSignatureV2(t *testing.T) {
	id := newID(t)
	_, signer, _ := ed25519.GenerateKey(nil)
	plain := gcodeText(3*DigestSegment + 777)
	ct := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}, Signer: signer,
		SignatureVersion: SigVersion2})
	for _, workers := range []int{1, 2, 3} {
		f, got, res, err := decryptWith(t, ct, id, true, workers)
		if err != nil || !bytes.Equal(got, plain) {
			t.Fatalf("workers %d: %v", workers, err)
		}
		if f.Public.Signature.Version != SigVersion2 || f.Public.VerifySignature() != nil {
			t.Fatal("v2 signature does not verify")
		}
		if res.Tree != treeOf(plain) || res.SHA256 != ([32]byte{}) {
			t.Fatalf("workers %d: tree %x, sha %x: want the tree digest and no SHA-256", workers, res.Tree, res.SHA256)
		}
	}
	// Without SkipSHA256 the SHA-256 is there too, as the protocol has it now.
	_, _, res, err := decryptWith(t, ct, id, false, 2)
	if err != nil || res.SHA256 != sha256.Sum256(plain) {
		t.Fatalf("sha256 %x, %v", res.SHA256, err)
	}
}

// TestSkipSHA256 covers unsigned files (no digest at all) and old v1 files,
// which still verify their SHA-256 when it is skipped.
func TestSkipSHA256(t *testing.T) {
	id := newID(t)
	plain := gcodeText(2*DigestSegment + 1)
	ct := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}})
	_, got, res, err := decryptWith(t, ct, id, true, 2)
	if err != nil || !bytes.Equal(got, plain) || res.SHA256 != ([32]byte{}) || res.Tree != ([32]byte{}) {
		t.Fatalf("unsigned: %v, sha %x", err, res.SHA256)
	}
	_, signer, _ := ed25519.GenerateKey(nil)
	ct = encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}, Signer: signer})
	f, _, res, err := decryptWith(t, ct, id, true, 2)
	if err != nil || f.Public.Signature.Version != StanzaVersion || res.SHA256 != sha256.Sum256(plain) {
		t.Fatalf("v1 with SkipSHA256: %v", err)
	}
}

// forged re-encrypts other plaintext under the stanzas of a signed file:
// what anyone holding the printer's recipient can do.
func forged(t *testing.T, signed []byte, id *age.X25519Identity, other []byte) []byte {
	h, err := ParseHeader(bytes.NewReader(signed))
	if err != nil {
		t.Fatal(err)
	}
	var stanzas []*age.Stanza
	for _, s := range h.Stanzas {
		if len(s.Type) > len(stanzaPrefix) && s.Type[:len(stanzaPrefix)] == stanzaPrefix {
			stanzas = append(stanzas, &age.Stanza{Type: s.Type, Args: s.Args, Body: s.Body})
		}
	}
	recips := []age.Recipient{id.Recipient()}
	var out bytes.Buffer
	w, err := age.Encrypt(&out, append([]age.Recipient{&stanzaRecipient{stanzas, recips}}, recips...)...)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(other)
	w.Close()
	return out.Bytes()
}

func TestTamperedPayloadRefusedBothVersions(t *testing.T) {
	id := newID(t)
	_, signer, _ := ed25519.GenerateKey(nil)
	plain := gcodeText(2*DigestSegment + 99)
	other := bytes.Clone(plain)
	other[DigestSegment+5] ^= 1 // one byte, in the second segment
	for _, v := range []string{StanzaVersion, SigVersion2} {
		ct := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}, Signer: signer,
			SignatureVersion: v})
		for _, skip := range []bool{true, false} {
			if _, _, _, err := decryptWith(t, forged(t, ct, id, other), id, skip, 2); !errors.Is(err, ErrDigest) {
				t.Fatalf("%s, skip %v: err %v, want ErrDigest", v, skip, err)
			}
		}
	}
}

func TestSignatureStanzaVersions(t *testing.T) {
	id := newID(t)
	_, signer, _ := ed25519.GenerateKey(nil)
	ct := encrypt(t, gcodeText(1000), EncryptOptions{Recipients: []age.Recipient{id.Recipient()}, Signer: signer,
		SignatureVersion: SigVersion2})
	h, _ := ParseHeader(bytes.NewReader(ct))
	for i := range h.Stanzas {
		if h.Stanzas[i].Type == SigStanza {
			h.Stanzas[i].Args = []string{"v3"}
		}
	}
	var se *StanzaError
	if _, err := ParsePublic(h); !errors.As(err, &se) || !se.Unsupported {
		t.Fatalf("sig v3: %v, want unsupported", err)
	}
	// A v2 stanza carrying a v1 digest field is malformed.
	for i := range h.Stanzas {
		if s := &h.Stanzas[i]; s.Type == SigStanza {
			s.Args = []string{SigVersion2}
			sig := Signature{Alg: "ed25519", PublicKey: signer.Public().(ed25519.PublicKey), Size: 1000,
				SHA256: make([]byte, 32), Sig: make([]byte, 64)}
			s.Body, _ = msgpack.Marshal(&sig)
		}
	}
	if _, err := ParsePublic(h); err == nil {
		t.Fatal("v2 stanza with a v1 sha256 field accepted")
	}
	if err := Encrypt(io.Discard, bytes.NewReader(nil), EncryptOptions{Recipients: []age.Recipient{id.Recipient()},
		Signer: signer, SignatureVersion: "v9"}); err == nil {
		t.Fatal("unknown signature version accepted by Encrypt")
	}
}

// TestCompressedPayload: the payload is a seekable gzip that validates,
// gunzips to the G-code, and can be signed (v2 signs the compressed bytes).
func TestCompressedPayload(t *testing.T) {
	id := newID(t)
	_, signer, _ := ed25519.GenerateKey(nil)
	plain := gcodeText(5*seekgz.DefaultBlockSize + 1234)
	ct := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}, Signer: signer,
		SignatureVersion: SigVersion2, Compress: &seekgz.Options{}})
	if len(ct) > len(plain)/4 {
		t.Fatalf("compressed file %d bytes for %d of G-code", len(ct), len(plain))
	}
	_, payload, _, err := decryptWith(t, ct, id, true, 2)
	if err != nil {
		t.Fatal(err)
	}
	ix, err := seekgz.ReadIndex(bytes.NewReader(payload), int64(len(payload)), seekgz.Limits{})
	if err != nil || ix.Validate(bytes.NewReader(payload), 2) != nil || ix.ClearSize != int64(len(plain)) {
		t.Fatalf("payload is not a valid seekable gzip: %v", err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(payload))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(zr); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("gunzip: %v", err)
	}
}

// TestCompressedInteropWithStockTools: `age -d | gunzip` of a compressed,
// v2-signed file gives the G-code byte for byte; a stock `age -r` of a
// seekable gzip is a compressed file this reader opens.
func TestCompressedInteropWithStockTools(t *testing.T) {
	for _, tool := range []string{"age", "gzip"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("the %s command is missing", tool)
			}
			t.Skipf("%s command not installed", tool)
		}
	}
	dir := t.TempDir()
	id := newID(t)
	keyFile := filepath.Join(dir, "key.txt")
	os.WriteFile(keyFile, []byte(id.String()+"\n"), 0o600)
	_, signer, _ := ed25519.GenerateKey(nil)
	plain := gcodeText(3*seekgz.DefaultBlockSize + 5)
	ours := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}, Signer: signer,
		SignatureVersion: SigVersion2, Compress: &seekgz.Options{}})
	cmd := exec.Command("sh", "-c", `age -d -i "$1" | gzip -dc`, "sh", keyFile)
	cmd.Stdin = bytes.NewReader(ours)
	out, err := cmd.Output()
	if err != nil || !bytes.Equal(out, plain) {
		t.Fatalf("age -d | gzip -dc: %d bytes, %v", len(out), err)
	}

	var payload bytes.Buffer
	w, _ := seekgz.NewWriter(&payload, seekgz.Options{})
	w.Write(plain)
	w.Close()
	cmd = exec.Command("age", "-r", id.Recipient().String())
	cmd.Stdin = bytes.NewReader(payload.Bytes())
	stock, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	_, got, _, err := decryptWith(t, stock, id, true, 2)
	if err != nil || !seekgz.IsGzip(got) {
		t.Fatalf("stock age of a seekable gzip: %v", err)
	}
	ix, err := seekgz.ReadIndex(bytes.NewReader(got), int64(len(got)), seekgz.Limits{})
	if err != nil || ix.Validate(bytes.NewReader(got), 0) != nil || ix.ClearSize != int64(len(plain)) {
		t.Fatalf("stock age of a seekable gzip does not validate: %v", err)
	}
}
