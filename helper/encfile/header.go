// Package encfile implements the encrypted G-code file format: an age v1
// file whose header carries extra stanzas with public metadata, a print
// policy and an optional publisher signature. See docs/format.md.
//
// Reading the public parts needs no key (ParseHeader). Authenticating them
// needs an identity that is a recipient of the file (Open): age's header MAC
// covers every stanza, so an authenticated header proves that whoever
// encrypted the file wrote those stanzas.
package encfile

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/klipper-encprint/encprint/helper/contract"
)

// MaxHeaderSize bounds the header a reader accepts. age itself puts no limit
// on it; thumbnails make ours larger than a plain age header, but never this
// large.
const MaxHeaderSize = 4 << 20

const bodyLineSize = 64

// introLine is the age v1 intro without its newline, for messages.
var introLine = strings.TrimSuffix(contract.AgeMagic, "\n")

// ErrNotEncrypted means the file does not start with the age v1 intro line.
var ErrNotEncrypted = errors.New("not an encrypted G-code file (the first line is not " + introLine + ")")

// ErrArmored means the file is ASCII-armored age, which printers do not read.
var ErrArmored = errors.New("ASCII-armored age file (it starts with " + contract.ArmorBegin +
	"): printers need the binary form; re-encrypt it without -a/--armor")

// HeaderError reports a malformed header, with the 1-based line it found the
// problem on (0 when the problem is not on one line).
type HeaderError struct {
	Line   int
	Reason string
}

func (e *HeaderError) Error() string {
	if e.Line == 0 {
		return "malformed header: " + e.Reason
	}
	return fmt.Sprintf("malformed header at line %d: %s", e.Line, e.Reason)
}

// ReadError reports that reading the encrypted file itself failed (a disk or
// file system error), as opposed to its content being wrong.
type ReadError struct {
	Offset int64
	Err    error
}

func (e *ReadError) Error() string {
	return fmt.Sprintf("reading the file at byte %d failed: %v", e.Offset, e.Err)
}

func (e *ReadError) Unwrap() error { return e.Err }

// Header is the parsed, not yet authenticated, header of an encrypted file.
type Header struct {
	// Raw is the header bytes up to and including the MAC line's newline.
	Raw []byte
	// Stanzas in file order, recipients and encprint stanzas alike.
	Stanzas []Stanza
	// MAC is the decoded header MAC.
	MAC []byte
}

// Stanza is one header stanza: "-> Type Args..." and a binary body.
type Stanza struct {
	Type string
	Args []string
	Body []byte
}

// Size returns the header length in bytes; the payload nonce starts there.
func (h *Header) Size() int64 { return int64(len(h.Raw)) }

// Recipients counts the stanzas that wrap the file key (every stanza that is
// not one of ours).
func (h *Header) Recipients() int {
	n := 0
	for _, s := range h.Stanzas {
		if !strings.HasPrefix(s.Type, stanzaPrefix) {
			n++
		}
	}
	return n
}

var b64 = base64.RawStdEncoding.Strict()

// ParseHeader reads and parses the header at the start of r without any key.
// It enforces the age v1 grammar strictly (canonical base64, full 64-column
// body lines, a final short line) and MaxHeaderSize. A file that starts with
// the armor line is ErrArmored; one that starts with neither that nor the
// age v1 intro is ErrNotEncrypted.
func ParseHeader(r io.Reader) (*Header, error) {
	br := bufio.NewReaderSize(io.LimitReader(r, MaxHeaderSize+1), 64<<10)
	head, err := br.Peek(SniffSize)
	if err != nil && err != io.EOF {
		return nil, err
	}
	switch {
	case bytes.HasPrefix(head, []byte(contract.ArmorBegin)):
		return nil, ErrArmored
	case !bytes.HasPrefix(head, []byte(contract.AgeMagic)):
		return nil, ErrNotEncrypted
	}
	var raw bytes.Buffer
	line := 0
	next := func() (string, error) {
		s, err := br.ReadString('\n')
		raw.WriteString(s)
		if raw.Len() > MaxHeaderSize {
			return "", &HeaderError{line + 1, fmt.Sprintf("header larger than %d bytes", MaxHeaderSize)}
		}
		if err == io.EOF {
			return "", &HeaderError{line + 1, "file ends inside the header (truncated)"}
		}
		if err != nil {
			return "", err
		}
		line++
		return s[:len(s)-1], nil
	}
	if _, err := next(); err != nil { // the intro, checked above
		return nil, err
	}
	h := &Header{}
	s, err := next()
	for {
		if err != nil {
			return nil, err
		}
		if strings.HasPrefix(s, "--- ") {
			mac, derr := b64.DecodeString(s[4:])
			if derr != nil || len(mac) != 32 {
				return nil, &HeaderError{line, "header MAC is not 32 bytes of canonical base64"}
			}
			h.MAC = mac
			break
		}
		if !strings.HasPrefix(s, "-> ") {
			return nil, &HeaderError{line, "expected a stanza (\"-> \") or the MAC line (\"--- \")"}
		}
		args := strings.Split(s[3:], " ")
		for _, a := range args {
			if !validArg(a) {
				return nil, &HeaderError{line, fmt.Sprintf("invalid stanza argument %q", a)}
			}
		}
		st := Stanza{Type: args[0], Args: args[1:]}
		var body []byte
		for {
			bl, berr := next()
			if berr != nil {
				return nil, berr
			}
			if len(bl) > bodyLineSize {
				return nil, &HeaderError{line, "stanza body line longer than 64 columns"}
			}
			chunk, derr := b64.DecodeString(bl)
			if derr != nil {
				return nil, &HeaderError{line, "stanza body is not canonical base64"}
			}
			body = append(body, chunk...)
			if len(bl) < bodyLineSize {
				break
			}
		}
		st.Body = body
		h.Stanzas = append(h.Stanzas, st)
		s, err = next()
	}
	if len(h.Stanzas) == 0 {
		return nil, &HeaderError{line, "header has no stanzas"}
	}
	h.Raw = raw.Bytes()
	return h, nil
}

func validArg(a string) bool {
	if a == "" {
		return false
	}
	for i := 0; i < len(a); i++ {
		if a[i] < 33 || a[i] > 126 {
			return false
		}
	}
	return true
}

// SniffSize is how many leading bytes IsEncrypted needs.
const SniffSize = max(len(contract.AgeMagic), len(contract.ArmorBegin))

// IsEncrypted reports whether prefix (the first SniffSize bytes of a file)
// starts with the age v1 intro line or the armor line. It is the cheap test
// for "is this an encrypted file, never to be streamed as G-code" that the
// helper, the component and the Klipper extra all apply (docs/format.md);
// ParseHeader is the strict one, and refuses armor.
func IsEncrypted(prefix []byte) bool {
	return bytes.HasPrefix(prefix, []byte(contract.AgeMagic)) || bytes.HasPrefix(prefix, []byte(contract.ArmorBegin))
}
