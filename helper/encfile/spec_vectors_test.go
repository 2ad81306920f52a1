package encfile

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

var updateSpecVectors = flag.Bool("update-spec-vectors", false, "regenerate the sig_v2 part of proto/testdata/format-vectors.json")

const specVectorsPath = "../../proto/testdata/format-vectors.json"

// sigV2Vector is docs/format.md's example of an encprint/sig v2 stanza.
type sigV2Vector struct {
	Comment      string   `json:"_comment"`
	PayloadLine  string   `json:"payload_line"`
	PayloadSize  int64    `json:"payload_size"`
	MetaBody     string   `json:"meta_body_hex"`
	PolicyBody   string   `json:"policy_body_hex"`
	Leaves       []string `json:"leaves"`
	Digest       string   `json:"digest"`
	SignedMsg    string   `json:"signed_message_hex"`
	PublicKey    string   `json:"public_key"`
	StanzaBody   string   `json:"stanza_body_hex"`
	SignatureHex string   `json:"sig"`
}

// specPayload is the vector's payload: payload_line repeated, cut to size.
func specPayload(v *sigV2Vector) []byte {
	return []byte(strings.Repeat(v.PayloadLine, int(v.PayloadSize)/len(v.PayloadLine)+1)[:v.PayloadSize])
}

func readSpecVectors(t *testing.T) map[string]json.RawMessage {
	raw, err := os.ReadFile(specVectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

func generateSigV2Vector(t *testing.T) {
	doc := readSpecVectors(t)
	_, signer := vectorKeys(t)
	v := sigV2Vector{Comment: "docs/format.md, encprint/sig v2: the payload is payload_line repeated and cut to payload_size bytes (three 1 MiB segments, the last short); the publisher key is that of proto/testdata/vectors",
		PayloadLine: "G1 X12.5 Y7.25 E0.0421 ; encprint digest vector\n", PayloadSize: 2*DigestSegment + 12345}
	payload := specPayload(&v)
	meta, _ := msgpack.Marshal(map[string]any{"slicer": "PrusaSlicer"})
	policy, _ := msgpack.Marshal(&Policy{FileID: bytes.Repeat([]byte{0x47}, 16)})
	t2 := newTreeHasher()
	t2.Write(payload)
	for _, l := range t2.leaves {
		v.Leaves = append(v.Leaves, hex.EncodeToString(l[:]))
	}
	d := t2.Sum()
	for _, l := range t2.leaves[len(v.Leaves):] { // the last, short leaf Sum added
		v.Leaves = append(v.Leaves, hex.EncodeToString(l[:]))
	}
	msg := SignedMessageV2(meta, policy, uint64(len(payload)), d[:])
	sig := Signature{Alg: "ed25519", PublicKey: signer.Public().(ed25519.PublicKey), Size: uint64(len(payload)), Digest: d[:],
		Sig: ed25519.Sign(signer, msg)}
	body, _ := msgpack.Marshal(&sig)
	v.MetaBody, v.PolicyBody = hex.EncodeToString(meta), hex.EncodeToString(policy)
	v.Digest, v.SignedMsg = hex.EncodeToString(d[:]), hex.EncodeToString(msg)
	v.PublicKey = FormatPublicKey(sig.PublicKey)
	v.StanzaBody, v.SignatureHex = hex.EncodeToString(body), hex.EncodeToString(sig.Sig)
	doc["sig_v2"], _ = json.Marshal(v)
	out, _ := json.MarshalIndent(doc, "", "  ")
	os.WriteFile(specVectorsPath, append(out, '\n'), 0o644)
}

// The sig v2 example of docs/format.md: leaves, tree digest, signed message
// and stanza body are what the specification says, and the signature
// verifies through the stanza parser.
func TestSigV2SpecVector(t *testing.T) {
	if *updateSpecVectors {
		generateSigV2Vector(t)
	}
	var v sigV2Vector
	if err := json.Unmarshal(readSpecVectors(t)["sig_v2"], &v); err != nil {
		t.Fatal(err)
	}
	payload := specPayload(&v)
	var leaves [][32]byte
	for i := int64(0); i < v.PayloadSize; i += 1 << 20 {
		l := sha256.Sum256(payload[i:min(i+1<<20, v.PayloadSize)])
		if hex.EncodeToString(l[:]) != v.Leaves[len(leaves)] {
			t.Fatalf("leaf %d differs", len(leaves))
		}
		leaves = append(leaves, l)
	}
	if len(leaves) != len(v.Leaves) || len(leaves) != 3 {
		t.Fatalf("%d leaves, the vector has %d", len(leaves), len(v.Leaves))
	}
	// The digest, by the specification's own words.
	h := sha256.New()
	h.Write([]byte("encprint/digest v1\n"))
	h.Write([]byte{0, 0, 0, 0, 0, byte(v.PayloadSize >> 16), byte(v.PayloadSize >> 8), byte(v.PayloadSize)})
	for _, l := range leaves {
		h.Write(l[:])
	}
	d := h.Sum(nil)
	if hex.EncodeToString(d) != v.Digest {
		t.Fatal("tree digest differs from the vector")
	}
	if td := TreeDigest(v.PayloadSize, leaves); !bytes.Equal(td[:], d) {
		t.Fatal("TreeDigest differs from the specification")
	}
	meta, _ := hex.DecodeString(v.MetaBody)
	policy, _ := hex.DecodeString(v.PolicyBody)
	m1, m2 := sha256.Sum256(meta), sha256.Sum256(policy)
	want := append(append(append([]byte("encprint/sig v2\n"), m1[:]...), m2[:]...), 0, 0, 0, 0, 0, byte(v.PayloadSize>>16), byte(v.PayloadSize>>8), byte(v.PayloadSize))
	want = append(want, d...)
	if hex.EncodeToString(want) != v.SignedMsg || !bytes.Equal(SignedMessageV2(meta, policy, uint64(v.PayloadSize), d), want) {
		t.Fatal("signed message differs from the specification")
	}
	body, _ := hex.DecodeString(v.StanzaBody)
	var sig Signature
	sig.Version = SigVersion2
	if err := decodeStrict(body, &sig); err != nil || sig.validate() != nil {
		t.Fatalf("stanza body: %v", err)
	}
	p := &Public{Signature: &sig, metaBody: meta, policyBody: policy}
	if err := p.VerifySignature(); err != nil || FormatPublicKey(sig.PublicKey) != v.PublicKey || hex.EncodeToString(sig.Sig) != v.SignatureHex {
		t.Fatalf("signature: %v", err)
	}
	wrong := *p
	wrong.metaBody = []byte("other")
	if wrong.VerifySignature() == nil {
		t.Fatal("a signature over other metadata verifies")
	}
}
