package policy

import (
	"strings"
	"testing"
)

const (
	keyA = "encprint-pub:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
	keyB = "encprint-pub:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
	keyC = "encprint-pub:CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC"
)

func parse(t *testing.T, text string) *Policy {
	t.Helper()
	p, err := Parse(strings.NewReader(text), "/etc/encprint/policy.json")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestParseReadsBothSettings(t *testing.T) {
	p := parse(t, `{"require_signature": true, "trusted_publishers": ["`+keyA+`"]}`)
	if !p.RequireSignature || len(p.TrustedPublishers) != 1 || p.TrustedPublishers[0] != keyA {
		t.Fatalf("%+v", p)
	}
	if p := parse(t, `{}`); p.RequireSignature || len(p.TrustedPublishers) != 0 {
		t.Fatalf("empty policy: %+v", p)
	}
}

func TestParseRefusesWhatCouldWeakenThePolicySilently(t *testing.T) {
	for text, want := range map[string]string{
		`{"require_signatures": true}`:                   "unknown field",
		`{"trusted_publishers": ["encprint-pub:short"]}`: "is not a publisher key",
		`{"require_signature": "yes"}`:                   "not valid",
		`{"require_signature": true} {}`:                 "content after",
		``:                                               "not valid",
		strings.Repeat(" ", maxSize+1):                   "larger than",
	} {
		_, err := Parse(strings.NewReader(text), "/etc/encprint/policy.json")
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "/etc/encprint/policy.json") {
			t.Errorf("%.40q: %v (want %q)", text, err, want)
		}
	}
}

func TestTightenAddsButNeverRemovesRequireSignature(t *testing.T) {
	open := parse(t, `{}`)
	if p, _ := open.Tighten(true, nil); !p.RequireSignature {
		t.Fatal("a request could not add require_signature")
	}
	strict := parse(t, `{"require_signature": true}`)
	if p, _ := strict.Tighten(false, nil); !p.RequireSignature {
		t.Fatal("require_signature: false in a request loosened the printer policy")
	}
}

func TestTightenNarrowsTrustedPublishersToASubset(t *testing.T) {
	p := parse(t, `{"trusted_publishers": ["`+keyA+`", "`+keyB+`"]}`)
	got, err := p.Tighten(false, []string{keyB})
	if err != nil || len(got.TrustedPublishers) != 1 || got.TrustedPublishers[0] != keyB {
		t.Fatalf("narrowing to B: %+v, %v", got, err)
	}
	if r := got.Refusal("part.gcode", Signature{Publisher: keyA, Valid: true}); r == "" {
		t.Fatal("A still trusted after narrowing to B")
	}
	if got, _ := p.Tighten(false, nil); len(got.TrustedPublishers) != 2 {
		t.Fatalf("no request list: %+v", got)
	}
	any := parse(t, `{}`)
	if got, err := any.Tighten(false, []string{keyC}); err != nil || got.Refusal("x", Signature{Publisher: keyA, Valid: true}) == "" {
		t.Fatalf("narrowing 'any publisher' to C: %+v, %v", got, err)
	}
}

// The attack of issue 13 (4): the operator's own key added in moonraker.conf.
func TestTightenRefusesAPublisherThePolicyDoesNotTrust(t *testing.T) {
	p := parse(t, `{"trusted_publishers": ["`+keyA+`"]}`)
	_, err := p.Tighten(false, []string{keyA, keyC})
	if err == nil || !strings.Contains(err.Error(), keyC) || !strings.Contains(err.Error(), "only narrow") {
		t.Fatalf("adding C to a policy trusting A: %v", err)
	}
	if _, err := p.Tighten(false, []string{"nonsense"}); err == nil {
		t.Fatal("a malformed key in a request was accepted")
	}
}

func TestRefusal(t *testing.T) {
	p := parse(t, `{"require_signature": true, "trusted_publishers": ["`+keyA+`"]}`)
	for _, c := range []struct {
		sig  Signature
		want string
	}{
		{Signature{}, "is not signed"},
		{Signature{Publisher: keyA, Valid: false}, "invalid publisher signature"},
		{Signature{Publisher: keyB, Valid: true}, "not among this printer's trusted publishers"},
		{Signature{Publisher: keyA, Valid: true}, ""},
	} {
		got := p.Refusal("part.gcode", c.sig)
		if (c.want == "") != (got == "") || !strings.Contains(got, c.want) {
			t.Errorf("%+v: %q, want %q", c.sig, got, c.want)
		}
	}
	if r := parse(t, `{}`).Refusal("x", Signature{}); r != "" {
		t.Fatalf("open policy refused an unsigned file: %s", r)
	}
	if r := parse(t, `{}`).Refusal("x", Signature{Publisher: keyB, Valid: false}); r == "" {
		t.Fatal("an open policy printed a file with an invalid signature")
	}
}
