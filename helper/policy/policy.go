// Package policy is the printer's trust policy: whether a file must carry a
// publisher signature, and whose. It is read from a root-owned file
// (docs/adr/007-privilege-boundary.md); a request from Moonraker may tighten
// it, never loosen it.
package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"slices"
)

// publisherKey is the form of a trusted publisher key (proto/contract.json
// publisher_key.regex).
var publisherKey = regexp.MustCompile(`^encprint-pub:[A-Za-z0-9+/]{43}$`)

// maxSize bounds the policy file.
const maxSize = 1 << 20

// Policy is what a file must satisfy to print.
type Policy struct {
	// RequireSignature refuses files without a valid publisher signature.
	RequireSignature bool `json:"require_signature"`
	// TrustedPublishers, when not empty, is the only publishers whose
	// signed files print. Empty means any publisher (and unsigned files,
	// unless RequireSignature).
	TrustedPublishers []string `json:"trusted_publishers"`
}

// Parse reads a policy file. name is its path, for messages. Unknown keys,
// malformed publisher keys and trailing content are errors: a typo must not
// silently weaken a printer's policy.
func Parse(r io.Reader, name string) (*Policy, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxSize+1))
	if err != nil {
		return nil, fmt.Errorf("cannot read the printer policy %s: %w", name, err)
	}
	if len(data) > maxSize {
		return nil, fmt.Errorf("the printer policy %s is larger than %d bytes", name, maxSize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	p := &Policy{}
	if err := dec.Decode(p); err != nil {
		return nil, fmt.Errorf("the printer policy %s is not valid: %v (expected {\"require_signature\": false, \"trusted_publishers\": []})", name, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("the printer policy %s has content after its JSON object", name)
	}
	for _, k := range p.TrustedPublishers {
		if !publisherKey.MatchString(k) {
			return nil, fmt.Errorf("the printer policy %s: trusted_publishers: %q is not a publisher key (encprint-pub:..., as printed by `encprint sign-keygen`)", name, k)
		}
	}
	return p, nil
}

// Tighten returns the policy that applies to one request: the printer's
// policy p, plus requireSignature if the request asks for it, restricted to
// trusted if the request names publishers. A request naming a publisher that
// p does not trust is an error, not a wider policy.
func (p *Policy) Tighten(requireSignature bool, trusted []string) (*Policy, error) {
	out := &Policy{RequireSignature: p.RequireSignature || requireSignature,
		TrustedPublishers: slices.Clone(p.TrustedPublishers)}
	if len(trusted) == 0 {
		return out, nil
	}
	for _, k := range trusted {
		if !publisherKey.MatchString(k) {
			return nil, fmt.Errorf("trusted_publishers: %q is not a publisher key (encprint-pub:...)", k)
		}
		if len(p.TrustedPublishers) > 0 && !slices.Contains(p.TrustedPublishers, k) {
			return nil, fmt.Errorf("trusted_publishers in moonraker.conf names %s, which the printer's policy does not trust; "+
				"moonraker.conf can only narrow that policy, which only root can change (docs/install.md)", k)
		}
	}
	out.TrustedPublishers = slices.Clone(trusted)
	return out, nil
}

// Signature is what the helper knows about a file's publisher signature.
type Signature struct {
	Publisher string // encprint-pub:..., "" when the file is unsigned
	Valid     bool   // the signature verified
}

// Refusal says why a file named name with signature sig may not print under
// p, or "" when it may.
func (p *Policy) Refusal(name string, sig Signature) string {
	switch {
	case sig.Publisher != "" && !sig.Valid:
		return fmt.Sprintf("%s carries an invalid publisher signature: it was altered", name)
	case sig.Publisher == "" && p.RequireSignature:
		return fmt.Sprintf("%s is not signed, and this printer only prints files signed by a trusted publisher", name)
	case sig.Publisher != "" && len(p.TrustedPublishers) > 0 && !slices.Contains(p.TrustedPublishers, sig.Publisher):
		return fmt.Sprintf("%s is signed by %s, which is not among this printer's trusted publishers", name, sig.Publisher)
	}
	return ""
}
