package encfile

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"filippo.io/age"
	"github.com/vmihailenco/msgpack/v5"
)

// EncryptOptions says whom a file is for and what travels in its header.
type EncryptOptions struct {
	// Recipients are the printers' age recipients (at least one).
	Recipients []age.Recipient
	// Metadata is published in the header; nil publishes none.
	Metadata *Metadata
	// Policy is published in the header. A nil Policy, or one without a
	// FileID, gets a fresh random FileID.
	Policy *Policy
	// Signer, if set, signs the file as its publisher.
	Signer ed25519.PrivateKey
}

// ErrNoRecipients means EncryptOptions names no recipient.
var ErrNoRecipients = errors.New("no recipients: a file must be encrypted for at least one printer")

// Encrypt reads the whole G-code from src and writes the encrypted file to
// dst. With a Signer, src is read twice (once to hash the plaintext for the
// signature, which sits in the header), so it must be at offset 0.
func Encrypt(dst io.Writer, src io.ReadSeeker, opts EncryptOptions) error {
	if len(opts.Recipients) == 0 {
		return ErrNoRecipients
	}
	pol := Policy{}
	if opts.Policy != nil {
		pol = *opts.Policy
	}
	if len(pol.FileID) == 0 {
		pol.FileID = make([]byte, 16)
		if _, err := rand.Read(pol.FileID); err != nil {
			return err
		}
	}
	var stanzas []*age.Stanza
	var metaBody []byte
	if opts.Metadata != nil {
		if err := opts.Metadata.validate(); err != nil {
			return fmt.Errorf("metadata: %w", err)
		}
		b, err := msgpack.Marshal(opts.Metadata)
		if err != nil {
			return err
		}
		metaBody = b
		stanzas = append(stanzas, &age.Stanza{Type: MetaStanza, Args: []string{StanzaVersion}, Body: b})
	}
	policyBody, err := msgpack.Marshal(&pol)
	if err != nil {
		return err
	}
	stanzas = append(stanzas, &age.Stanza{Type: PolicyStanza, Args: []string{StanzaVersion}, Body: policyBody})
	if opts.Signer != nil {
		h := sha256.New()
		n, err := io.Copy(h, src)
		if err != nil {
			return fmt.Errorf("reading input to sign it: %w", err)
		}
		if _, err := src.Seek(0, io.SeekStart); err != nil {
			return fmt.Errorf("signing needs a seekable input: %w", err)
		}
		sum := h.Sum(nil)
		sig := Signature{Alg: "ed25519", PublicKey: opts.Signer.Public().(ed25519.PublicKey),
			Size: uint64(n), SHA256: sum}
		sig.Sig = ed25519.Sign(opts.Signer, SignedMessage(metaBody, policyBody, sig.Size, sum))
		b, err := msgpack.Marshal(&sig)
		if err != nil {
			return err
		}
		stanzas = append(stanzas, &age.Stanza{Type: SigStanza, Args: []string{StanzaVersion}, Body: b})
	}
	recips := append([]age.Recipient{&stanzaRecipient{stanzas, opts.Recipients}}, opts.Recipients...)
	w, err := age.Encrypt(dst, recips...)
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, src); err != nil {
		return err
	}
	return w.Close()
}

// stanzaRecipient adds our public stanzas to the header. It wraps no key;
// age's header MAC authenticates its stanzas like every other.
type stanzaRecipient struct {
	stanzas []*age.Stanza
	others  []age.Recipient
}

func (r *stanzaRecipient) Wrap(fileKey []byte) ([]*age.Stanza, error) {
	return r.stanzas, nil
}

// WrapWithLabels returns the labels of the real recipients, so that files for
// post-quantum recipients (which carry the "postquantum" label) still encrypt.
func (r *stanzaRecipient) WrapWithLabels(fileKey []byte) ([]*age.Stanza, []string, error) {
	for _, o := range r.others {
		if lr, ok := o.(age.RecipientWithLabels); ok {
			_, labels, err := lr.WrapWithLabels(make([]byte, len(fileKey)))
			return r.stanzas, labels, err
		}
	}
	return r.stanzas, nil, nil
}
