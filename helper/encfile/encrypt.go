package encfile

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"filippo.io/age"
	"github.com/klipper-encprint/encprint/helper/seekgz"
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
	// SignatureVersion is StanzaVersion (v1, the default for now: the
	// plaintext's SHA-256) or SigVersion2 (its TreeDigest, which printers
	// verify on every core).
	SignatureVersion string
	// Compress, if set, makes the payload a seekable gzip of the G-code
	// (package seekgz) instead of the G-code itself.
	Compress *seekgz.Options
}

// writePayload writes the payload made from src to w: the G-code, or its
// seekable gzip.
func writePayload(w io.Writer, src io.Reader, opts EncryptOptions) (int64, error) {
	cw := &countingWriter{w: w}
	if opts.Compress == nil {
		_, err := io.Copy(cw, src)
		return cw.n, err
	}
	zw, err := seekgz.NewWriter(cw, *opts.Compress)
	if err != nil {
		return 0, err
	}
	if _, err := io.Copy(zw, src); err != nil {
		return 0, err
	}
	err = zw.Close()
	return cw.n, err
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
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
	if err := CheckRecipients(opts.Recipients); err != nil {
		return err
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
		s, err := sign(src, metaBody, policyBody, opts)
		if err != nil {
			return err
		}
		stanzas = append(stanzas, s)
	}
	recips := append([]age.Recipient{&stanzaRecipient{stanzas, opts.Recipients}}, opts.Recipients...)
	w, err := age.Encrypt(dst, recips...)
	if err != nil {
		return err
	}
	if _, err := writePayload(w, src, opts); err != nil {
		return err
	}
	return w.Close()
}

// CheckRecipients refuses post-quantum and classic recipients in one
// file, as age does: the classic stanza would let a quantum computer recover
// the file key that the post-quantum one protects.
func CheckRecipients(rs []age.Recipient) error {
	pq, classic := -1, -1
	for i, r := range rs {
		if _, ok := r.(*age.HybridRecipient); ok {
			pq = i
		} else {
			classic = i
		}
		if pq >= 0 && classic >= 0 {
			return fmt.Errorf("recipient %d is post-quantum (age1pq1...) and recipient %d is not: "+
				"they cannot share a file, or a quantum computer could decrypt it through the classic one; "+
				"encrypt one file per kind, or give every printer a post-quantum identity (encprint keygen -pq)",
				pq+1, classic+1)
		}
	}
	return nil
}

// sign makes the signature stanza: it reads src once to digest the payload
// (the seekable gzip is deterministic, so the second pass writes the same
// bytes), then rewinds it.
func sign(src io.ReadSeeker, metaBody, policyBody []byte, opts EncryptOptions) (*age.Stanza, error) {
	sig := Signature{Version: opts.SignatureVersion, Alg: "ed25519", PublicKey: opts.Signer.Public().(ed25519.PublicKey)}
	var n int64
	var err error
	switch sig.Version {
	case "", StanzaVersion:
		sig.Version = StanzaVersion
		h := sha256.New()
		n, err = writePayload(h, src, opts)
		sig.SHA256 = h.Sum(nil)
	case SigVersion2:
		t := newTreeHasher()
		n, err = writePayload(t, src, opts)
		sum := t.Sum()
		sig.Digest = sum[:]
	default:
		return nil, fmt.Errorf("unknown signature version %q", opts.SignatureVersion)
	}
	if err != nil {
		return nil, fmt.Errorf("reading input to sign it: %w", err)
	}
	if _, err := src.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("signing needs a seekable input: %w", err)
	}
	sig.Size = uint64(n)
	if sig.Version == SigVersion2 {
		sig.Sig = ed25519.Sign(opts.Signer, SignedMessageV2(metaBody, policyBody, sig.Size, sig.Digest))
	} else {
		sig.Sig = ed25519.Sign(opts.Signer, SignedMessage(metaBody, policyBody, sig.Size, sig.SHA256))
	}
	b, err := msgpack.Marshal(&sig)
	if err != nil {
		return nil, err
	}
	return &age.Stanza{Type: SigStanza, Args: []string{sig.Version}, Body: b}, nil
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
