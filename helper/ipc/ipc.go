//go:build linux

// Package ipc implements the component-helper protocol of proto/PROTOCOL.md:
// msgpack messages framed over a SOCK_SEQPACKET Unix socket, with the memfd
// attached to the decrypt result as SCM_RIGHTS.
package ipc

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/vmihailenco/msgpack/v5"
	"golang.org/x/sys/unix"
)

// Limits of the framing: a record is at most MaxRecord bytes, its length
// prefix included (the first record starts with the 4-byte prefix); a
// message body at most MaxMessage bytes.
const (
	MaxRecord  = contract.MaxRecord
	MaxMessage = contract.MaxMessage
	prefixSize = contract.LengthPrefixBytes
)

// Hello is the helper's first message.
type Hello struct {
	Type     string `msgpack:"type"`
	Protocol int    `msgpack:"protocol"`
	Version  string `msgpack:"version"`
}

// Request is the component's one request. Decode it with DecodeRequest,
// which checks every key's presence and type.
type Request struct {
	Type      string `msgpack:"type"`
	Protocol  int    `msgpack:"protocol"`
	Op        string `msgpack:"op"`
	Path      string `msgpack:"path"`
	Root      string `msgpack:"root"`
	Identity  string `msgpack:"identity"`
	MaxBytes  int64  `msgpack:"max_bytes"`
	MemfdName string `msgpack:"memfd_name"`
}

// Progress reports decryption progress.
type Progress struct {
	Type  string `msgpack:"type"`
	Done  int64  `msgpack:"done"`
	Total int64  `msgpack:"total"`
}

// InspectResult is the result of an inspect request.
type InspectResult struct {
	Type           string            `msgpack:"type"`
	Op             string            `msgpack:"op"`
	FileID         []byte            `msgpack:"file_id"`
	Recipients     int               `msgpack:"recipients"`
	Metadata       *encfile.Metadata `msgpack:"metadata"`
	Policy         *encfile.Policy   `msgpack:"policy"`
	Publisher      *string           `msgpack:"publisher"`
	SignatureValid bool              `msgpack:"signature_valid"`
	Authenticated  bool              `msgpack:"authenticated"`
	Reason         string            `msgpack:"reason"`
	ReasonCode     string            `msgpack:"reason_code"`
	PlaintextSize  int64             `msgpack:"plaintext_size"`
}

// DecryptResult is the result of a decrypt request; the memfd travels with it.
type DecryptResult struct {
	Type           string  `msgpack:"type"`
	Op             string  `msgpack:"op"`
	FileID         []byte  `msgpack:"file_id"`
	Size           int64   `msgpack:"size"`       // the memfd's, i.e. the payload's
	GcodeSize      int64   `msgpack:"gcode_size"` // the G-code's (inflated) size
	SHA256         []byte  `msgpack:"sha256,omitempty"`
	Seals          int     `msgpack:"seals"`
	MemfdName      string  `msgpack:"memfd_name"`
	ElapsedMS      float64 `msgpack:"elapsed_ms"`
	Publisher      *string `msgpack:"publisher"`
	SignatureValid bool    `msgpack:"signature_valid"`
}

// RecipientResult answers a recipient request: the printer's public
// recipient, so that Moonraker can show it without reading the identity.
type RecipientResult struct {
	Type      string   `msgpack:"type"`
	Op        string   `msgpack:"op"`
	Recipient string   `msgpack:"recipient"`
	Others    []string `msgpack:"others"`
}

// RecordsResult answers a records request: every decryption the installed
// helper handed out, oldest first. A helper that is not installed
// set-user-ID keeps no record (Installed false, no records).
type RecordsResult struct {
	Type      string   `msgpack:"type"`
	Op        string   `msgpack:"op"`
	Installed bool     `msgpack:"installed"`
	Records   []Record `msgpack:"records"`
}

// Record is one decryption in the installed helper's state.
type Record struct {
	FileID    string `msgpack:"file_id"` // hex
	Publisher string `msgpack:"publisher"`
	Time      int64  `msgpack:"time"` // Unix seconds
	PID       int    `msgpack:"pid"`
	UID       int    `msgpack:"uid"`
	MaxPrints int    `msgpack:"max_prints"`
	Count     int    `msgpack:"count"` // prints of this file id, this one included
}

// Error is the helper's answer when an operation fails. Key names the
// request key a bad_request is about, when it is about one.
type Error struct {
	Type    string `msgpack:"type"`
	Code    string `msgpack:"code"`
	Message string `msgpack:"message"`
	Key     string `msgpack:"key,omitempty"`
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

// Marshal encodes a message body the way the golden vectors do (smallest
// integer encodings, keys in struct order).
func Marshal(v interface{}) ([]byte, error) {
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	enc.UseCompactInts(true)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Conn is one end of the protocol's socket.
type Conn struct{ fd int }

// NewConn wraps a connected SOCK_SEQPACKET socket descriptor.
func NewConn(fd int) (*Conn, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return nil, fmt.Errorf("descriptor %d is not a socket: %v", fd, err)
	}
	if typ != unix.SOCK_SEQPACKET {
		return nil, fmt.Errorf("descriptor %d is not a SOCK_SEQPACKET socket", fd)
	}
	unix.CloseOnExec(fd)
	return &Conn{fd: fd}, nil
}

// Close closes the socket.
func (c *Conn) Close() error { return unix.Close(c.fd) }

// Send encodes v and sends it, with fd (if >= 0) on the first record.
func (c *Conn) Send(v interface{}, fd int) error {
	body, err := Marshal(v)
	if err != nil {
		return err
	}
	if len(body) > MaxMessage {
		return fmt.Errorf("message of %d bytes exceeds the protocol's %d", len(body), MaxMessage)
	}
	msg := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	msg = append(msg, body...)
	for first := true; len(msg) > 0; first = false {
		n := min(len(msg), MaxRecord)
		var oob []byte
		if first && fd >= 0 {
			oob = unix.UnixRights(fd)
		}
		if err := unix.Sendmsg(c.fd, msg[:n], oob, nil, 0); err != nil {
			return fmt.Errorf("sending message: %w", err)
		}
		msg = msg[n:]
	}
	return nil
}

// ErrClosed means the peer closed the socket.
var ErrClosed = errors.New("peer closed the connection")

// RecvBody receives one message and returns its msgpack body. A 0-byte
// record, like the peer's close, is ErrClosed. Any descriptor that arrives is
// closed and refused: the helper never expects one.
func (c *Conn) RecvBody() ([]byte, error) {
	buf := make([]byte, MaxRecord)
	oob := make([]byte, unix.CmsgSpace(4))
	var a assembler
	for {
		n, oobn, flags, _, err := unix.Recvmsg(c.fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("receiving message: %w", err)
		}
		if oobn > 0 {
			closeRights(oob[:oobn])
			return nil, errors.New("unexpected file descriptor from the component")
		}
		if flags&unix.MSG_TRUNC != 0 {
			return nil, fmt.Errorf("a record of more than %d bytes (the limit includes the %d-byte length prefix)", MaxRecord, prefixSize)
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return nil, errors.New("truncated ancillary data")
		}
		if n == 0 {
			return nil, ErrClosed
		}
		body, err := a.add(buf[:n])
		if err != nil {
			return nil, err
		}
		if body != nil {
			return body, nil
		}
	}
}

// assembler rebuilds a message from its records.
type assembler struct {
	want int // -1 until the length prefix arrived
	body []byte
	seen bool
}

// add takes the next record and returns the whole body once it is complete.
func (a *assembler) add(rec []byte) ([]byte, error) {
	if !a.seen {
		a.seen = true
		if len(rec) < prefixSize {
			return nil, fmt.Errorf("the first record has %d bytes; it must hold the whole %d-byte length prefix", len(rec), prefixSize)
		}
		a.want = int(binary.BigEndian.Uint32(rec))
		if a.want > MaxMessage {
			return nil, fmt.Errorf("message of %d bytes exceeds the protocol's %d", a.want, MaxMessage)
		}
		rec = rec[prefixSize:]
	}
	a.body = append(a.body, rec...)
	if len(a.body) > a.want {
		return nil, fmt.Errorf("%d bytes beyond the declared message length of %d", len(a.body)-a.want, a.want)
	}
	if len(a.body) == a.want {
		if a.body == nil {
			a.body = []byte{}
		}
		return a.body, nil
	}
	return nil, nil
}

func closeRights(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
}
