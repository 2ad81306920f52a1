package encfile

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/vmihailenco/msgpack/v5"
)

// Stanza types this format adds to the age header. Each carries its format
// version as its only argument.
const (
	stanzaPrefix  = "encprint/"
	MetaStanza    = "encprint/meta"
	PolicyStanza  = "encprint/policy"
	SigStanza     = "encprint/sig"
	StanzaVersion = "v1"
)

// MaxThumbnailSize bounds one thumbnail image.
const MaxThumbnailSize = 1 << 20

// Metadata is the public description of the print, in Moonraker's metadata
// field names. The encryptor chooses what to include; every field is
// optional. Readers ignore keys they do not know.
type Metadata struct {
	Slicer              string      `msgpack:"slicer,omitempty" json:"slicer,omitempty"`
	SlicerVersion       string      `msgpack:"slicer_version,omitempty" json:"slicer_version,omitempty"`
	EstimatedTime       float64     `msgpack:"estimated_time,omitempty" json:"estimated_time,omitempty"`
	FilamentTotal       float64     `msgpack:"filament_total,omitempty" json:"filament_total,omitempty"`
	FilamentWeightTotal float64     `msgpack:"filament_weight_total,omitempty" json:"filament_weight_total,omitempty"`
	FilamentType        string      `msgpack:"filament_type,omitempty" json:"filament_type,omitempty"`
	FilamentName        string      `msgpack:"filament_name,omitempty" json:"filament_name,omitempty"`
	LayerHeight         float64     `msgpack:"layer_height,omitempty" json:"layer_height,omitempty"`
	FirstLayerHeight    float64     `msgpack:"first_layer_height,omitempty" json:"first_layer_height,omitempty"`
	ObjectHeight        float64     `msgpack:"object_height,omitempty" json:"object_height,omitempty"`
	NozzleDiameter      float64     `msgpack:"nozzle_diameter,omitempty" json:"nozzle_diameter,omitempty"`
	LayerCount          int         `msgpack:"layer_count,omitempty" json:"layer_count,omitempty"`
	Thumbnails          []Thumbnail `msgpack:"thumbnails,omitempty" json:"thumbnails,omitempty"`
}

// Thumbnail is a preview image as the slicer embedded it.
type Thumbnail struct {
	Width  int    `msgpack:"width" json:"width"`
	Height int    `msgpack:"height" json:"height"`
	Format string `msgpack:"format" json:"format"` // "png", "jpg" or "qoi"
	Data   []byte `msgpack:"data" json:"-"`
}

// Policy is what the encryptor allows the printer to do with the file. The
// printer enforces it (see docs/threat-model.md for how far that goes).
type Policy struct {
	// FileID identifies the file for print counting; 16 random bytes.
	FileID []byte `msgpack:"file_id" json:"file_id"`
	// MaxPrints is the number of prints allowed; 0 means no limit.
	MaxPrints uint32 `msgpack:"max_prints,omitempty" json:"max_prints,omitempty"`
	// NotBefore and NotAfter are Unix seconds; 0 means no bound.
	NotBefore int64 `msgpack:"not_before,omitempty" json:"not_before,omitempty"`
	NotAfter  int64 `msgpack:"not_after,omitempty" json:"not_after,omitempty"`
}

// Signature is a publisher's Ed25519 signature over the file's identity,
// public stanzas and plaintext (see SignedMessage).
type Signature struct {
	Alg       string `msgpack:"alg"`
	PublicKey []byte `msgpack:"key"`
	Size      uint64 `msgpack:"size"`
	SHA256    []byte `msgpack:"sha256"`
	Sig       []byte `msgpack:"sig"`
}

// Public is everything in the header a reader can see without a key.
type Public struct {
	Metadata   *Metadata // nil when the file has no metadata stanza
	Policy     *Policy   // nil when the file has no policy stanza
	Signature  *Signature
	Recipients int
	// FileID is the policy's file id, or for files without a policy (e.g.
	// made by stock age) the SHA-256 of the header, so that every file has one.
	FileID []byte

	metaBody, policyBody []byte
}

// StanzaError reports an encprint stanza that a reader must reject.
type StanzaError struct {
	Type   string
	Reason string
	// Unsupported is set when the stanza is of a type or version this
	// reader does not know (a newer encprint made the file).
	Unsupported bool
}

func (e *StanzaError) Error() string {
	return fmt.Sprintf("header stanza %s: %s", e.Type, e.Reason)
}

// ParsePublic decodes the encprint stanzas of h. Unknown stanza types of
// other software are ignored, as age requires; an encprint stanza with an
// unknown version, a duplicate, or an undecodable body is an error.
func ParsePublic(h *Header) (*Public, error) {
	p := &Public{Recipients: h.Recipients()}
	seen := map[string]bool{}
	for _, s := range h.Stanzas {
		switch s.Type {
		case MetaStanza, PolicyStanza, SigStanza:
		default:
			if len(s.Type) > len(stanzaPrefix) && s.Type[:len(stanzaPrefix)] == stanzaPrefix {
				return nil, &StanzaError{s.Type, "unknown encprint stanza type; this file needs a newer encprint", true}
			}
			continue
		}
		if seen[s.Type] {
			return nil, &StanzaError{Type: s.Type, Reason: "appears more than once"}
		}
		seen[s.Type] = true
		if len(s.Args) != 1 || s.Args[0] != StanzaVersion {
			return nil, &StanzaError{s.Type, fmt.Sprintf("unsupported version %q (this reader knows %s); update encprint", s.Args, StanzaVersion), true}
		}
		var err error
		switch s.Type {
		case MetaStanza:
			p.Metadata = new(Metadata)
			p.metaBody = s.Body
			err = decodeStrict(s.Body, p.Metadata)
			if err == nil {
				err = p.Metadata.validate()
			}
		case PolicyStanza:
			p.Policy = new(Policy)
			p.policyBody = s.Body
			err = decodeStrict(s.Body, p.Policy)
			if err == nil && len(p.Policy.FileID) != 16 {
				err = errors.New("file_id must be 16 bytes")
			}
		case SigStanza:
			p.Signature = new(Signature)
			err = decodeStrict(s.Body, p.Signature)
			if err == nil {
				err = p.Signature.validate()
			}
		}
		if err != nil {
			return nil, &StanzaError{Type: s.Type, Reason: err.Error()}
		}
	}
	if p.Policy != nil {
		p.FileID = p.Policy.FileID
	} else {
		sum := sha256.Sum256(h.Raw)
		p.FileID = sum[:16]
	}
	return p, nil
}

func decodeStrict(body []byte, v interface{}) error {
	r := bytes.NewReader(body)
	if err := msgpack.NewDecoder(r).Decode(v); err != nil {
		return fmt.Errorf("body is not valid msgpack for this stanza: %v", err)
	}
	if r.Len() != 0 {
		return errors.New("trailing bytes after the msgpack body")
	}
	return nil
}

func (m *Metadata) validate() error {
	for i, t := range m.Thumbnails {
		switch t.Format {
		case "png", "jpg", "qoi":
		default:
			return fmt.Errorf("thumbnail %d has unknown format %q", i, t.Format)
		}
		if t.Width <= 0 || t.Height <= 0 || t.Width > 4096 || t.Height > 4096 {
			return fmt.Errorf("thumbnail %d has invalid size %dx%d", i, t.Width, t.Height)
		}
		if len(t.Data) == 0 || len(t.Data) > MaxThumbnailSize {
			return fmt.Errorf("thumbnail %d data is empty or over %d bytes", i, MaxThumbnailSize)
		}
	}
	return nil
}

func (s *Signature) validate() error {
	if s.Alg != "ed25519" {
		return fmt.Errorf("unknown signature algorithm %q", s.Alg)
	}
	if len(s.PublicKey) != ed25519.PublicKeySize || len(s.Sig) != ed25519.SignatureSize || len(s.SHA256) != sha256.Size {
		return errors.New("wrong key, signature or digest length")
	}
	return nil
}

// SignedMessage is the exact byte string a publisher signs:
//
//	"encprint/sig v1\n" || SHA-256(meta body) || SHA-256(policy body) ||
//	uint64be(plaintext size) || SHA-256(plaintext)
//
// An absent stanza hashes as the empty string.
func SignedMessage(metaBody, policyBody []byte, size uint64, plainSHA []byte) []byte {
	m := []byte(SigStanza + " " + StanzaVersion + "\n")
	h1 := sha256.Sum256(metaBody)
	h2 := sha256.Sum256(policyBody)
	m = append(m, h1[:]...)
	m = append(m, h2[:]...)
	m = binary.BigEndian.AppendUint64(m, size)
	return append(m, plainSHA...)
}

// VerifySignature checks the signature over the file's stanzas and the
// plaintext size and digest it claims. It does not check that the plaintext
// matches the claim: Open checks the size and DecryptTo/DecryptInto the
// digest.
func (p *Public) VerifySignature() error {
	if p.Signature == nil {
		return ErrUnsigned
	}
	msg := SignedMessage(p.metaBody, p.policyBody, p.Signature.Size, p.Signature.SHA256)
	if !ed25519.Verify(p.Signature.PublicKey, msg, p.Signature.Sig) {
		return ErrBadSignature
	}
	return nil
}

// Errors about signatures and policies.
var (
	ErrUnsigned     = errors.New("file is not signed by a publisher")
	ErrBadSignature = errors.New("publisher signature does not verify: the file was altered after signing")
)

// WindowError means a policy's time window does not include the time
// checked: the file is not printable yet, or no longer.
type WindowError struct {
	Expired bool      // past not_after; otherwise before not_before
	Bound   time.Time // the not_after or not_before crossed, in UTC
}

func (e *WindowError) Error() string {
	if e.Expired {
		return "expired at " + e.Bound.Format(time.RFC3339)
	}
	return "not valid before " + e.Bound.Format(time.RFC3339)
}

// CheckWindow returns a *WindowError unless t is inside the policy's time
// window: not_before <= t <= not_after in Unix seconds, a bound of 0 being
// no bound. A nil policy has no window.
func (p *Policy) CheckWindow(t time.Time) error {
	if p == nil {
		return nil
	}
	if p.NotBefore != 0 && t.Unix() < p.NotBefore {
		return &WindowError{Bound: time.Unix(p.NotBefore, 0).UTC()}
	}
	if p.NotAfter != 0 && t.Unix() > p.NotAfter {
		return &WindowError{Expired: true, Bound: time.Unix(p.NotAfter, 0).UTC()}
	}
	return nil
}
