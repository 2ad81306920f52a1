package identity

import (
	"bytes"
	"strings"
	"testing"
	"unicode/utf8"

	"filippo.io/age"
)

func plainIdentity(t *testing.T) ([]byte, *age.X25519Identity) {
	t.Helper()
	id, err := age.GenerateX25519Identity()
	if err != nil {
		t.Fatal(err)
	}
	return []byte("# created: now\n# public key: " + id.Recipient().String() + "\n" + id.String() + "\n"), id
}

func TestEnvelopeAndPlainParseToTheSameKey(t *testing.T) {
	plain, id := plainIdentity(t)
	env := Envelope(plain)
	for name, data := range map[string][]byte{"plain": plain, "envelope": env} {
		ids, err := Parse(bytes.NewReader(data))
		if err != nil || len(ids) != 1 || ids[0].(*age.X25519Identity).String() != id.String() {
			t.Fatalf("%s: %v, %v", name, ids, err)
		}
	}
	if back, err := Plain(env); err != nil || !bytes.Equal(back, plain) {
		t.Fatalf("Plain of the envelope: %q, %v", back, err)
	}
}

// What the config readers rely on: the first line is not UTF-8 (nor ASCII),
// holds no key and nothing they take for a comment or a section; the key
// is not on it.
func TestEnvelopesFirstLineIsNotTextAndHoldsNoKey(t *testing.T) {
	plain, id := plainIdentity(t)
	env := Envelope(plain)
	first, _, _ := bytes.Cut(env, []byte("\n"))
	if utf8.Valid(first) || first[0] < 0x80 {
		t.Fatalf("first line %q is valid UTF-8 or ASCII-led", first)
	}
	if bytes.ContainsAny(first, "#;[") || strings.Contains(string(first), "AGE-SECRET-KEY") {
		t.Fatalf("first line %q", first)
	}
	if !bytes.Contains(env, []byte(id.String())) || bytes.Index(env, []byte(id.String())) < len(first) {
		t.Fatal("the key is not after the first line")
	}
	if !IsEnvelope(env) || IsEnvelope(plain) {
		t.Fatal("IsEnvelope")
	}
}

func TestUnknownEnvelopeVersionIsRefusedWithoutItsContent(t *testing.T) {
	plain, id := plainIdentity(t)
	data := append([]byte("\xffencprint printer identity v9: later\n"), plain...)
	_, err := Parse(bytes.NewReader(data))
	if err == nil || !strings.Contains(err.Error(), "unknown version") || strings.Contains(err.Error(), id.String()) {
		t.Fatalf("a v9 envelope: %v", err)
	}
}
