// Package identity reads and writes a printer's identity file: an age
// identity file, either plain (as age-keygen writes it) or in the encprint
// envelope (docs/format.md, "The identity file"; docs/adr/010).
//
// The envelope is the plain file after one line that is not UTF-8 and says
// what the file is. Klipper and Moonraker read configuration files as
// UTF-8 text, so an envelope named in an [include] fails there with an error
// naming only the byte; a reader that decodes it anyway (Klipper under a
// Latin-1 locale) stops at that first line, which holds no key.
package identity

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"filippo.io/age"
)

// Header is the envelope's first line, newline included. Its first byte
// (0xFF) is never valid in UTF-8; the line has no '#', ';' or '[', so no
// config reader takes it for a comment or a section.
const Header = "\xffencprint printer identity v1: the secret key of this printer, not a config file. " +
	"Do not include it in printer.cfg or moonraker.conf, do not share it\n"

// headerPrefix identifies an envelope of any version.
const headerPrefix = "\xffencprint printer identity v"

// Envelope returns the envelope of a plain age identity file.
func Envelope(plain []byte) []byte {
	return append([]byte(Header), plain...)
}

// IsEnvelope reports whether data is in the envelope.
func IsEnvelope(data []byte) bool {
	return bytes.HasPrefix(data, []byte(headerPrefix))
}

// Plain returns the plain age identity file that data holds, enveloped or
// not. Nothing in its errors comes from the file's content.
func Plain(data []byte) ([]byte, error) {
	if !IsEnvelope(data) {
		return data, nil
	}
	head, rest, _ := bytes.Cut(data, []byte("\n"))
	if string(head)+"\n" != Header {
		return nil, errors.New("its envelope is of an unknown version (written by a newer encprint?)")
	}
	return rest, nil
}

// Parse parses an identity file, enveloped or plain.
func Parse(r io.Reader) ([]age.Identity, error) {
	data, err := io.ReadAll(io.LimitReader(r, 1<<20))
	if err != nil {
		return nil, err
	}
	plain, err := Plain(data)
	if err != nil {
		return nil, err
	}
	ids, err := age.ParseIdentities(bytes.NewReader(plain))
	if err != nil && IsEnvelope(data) {
		return nil, fmt.Errorf("in the envelope, after its first line: %v", err)
	}
	return ids, err
}
