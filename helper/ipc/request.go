//go:build linux

package ipc

import (
	"bytes"
	"fmt"
	"math"

	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/version"
	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// requestKeys are the msgpack types of the request keys (proto/PROTOCOL.md).
// A key present with another type is refused even where it is optional.
var requestKeys = map[string]string{
	"type": "str", "protocol": "int", "op": "str", "path": "str", "root": "str",
	"identity": "str", "max_bytes": "int", "memfd_name": "str",
}

// DecodeRequest decodes a request body strictly, before anything uses it: a
// msgpack map with str keys and nothing after it; type "request"; protocol
// an int equal to this helper's (else protocol_mismatch); op one of
// contract.Ops; every key contract.Required(op) lists present; every key of
// requestKeys that is present of its type; max_bytes not negative. Other
// keys are ignored. A failure is an *Error whose Key names the key.
func DecodeRequest(body []byte) (*Request, *Error) {
	m, err := decodeMap(body)
	if err != nil {
		return nil, badRequest("", "malformed request: %v", err)
	}
	if e := check(m, "type"); e != nil {
		return nil, e
	}
	if m["type"].str != "request" {
		return nil, badRequest("type", "request key type is %q; the component sends a \"request\" here", m["type"].str)
	}
	if e := check(m, "protocol"); e != nil {
		return nil, e
	}
	if p := m["protocol"].num; p != contract.ProtocolVersion {
		return nil, &Error{Type: "error", Code: contract.CodeProtocolMismatch, Key: "protocol", Message: fmt.Sprintf(
			"the component speaks protocol %d, this helper (%s) speaks %d: rebuild the helper so both come from the same version",
			p, version.Version, contract.ProtocolVersion)}
	}
	if e := check(m, "op"); e != nil {
		return nil, e
	}
	op := m["op"].str
	required := contract.Required(op)
	if required == nil {
		return nil, badRequest("op", "unknown operation %q (this helper knows inspect, decrypt, recipient and records)", op)
	}
	for _, k := range required {
		if e := check(m, k); e != nil {
			return nil, e
		}
	}
	for k := range requestKeys {
		if _, ok := m[k]; ok {
			if e := check(m, k); e != nil {
				return nil, e
			}
		}
	}
	if mb, ok := m["max_bytes"]; ok && (mb.num < 0 || mb.big) {
		return nil, badRequest("max_bytes", "request key max_bytes is %s; it must be from 0 (no configured limit) to %d", mb.text(), int64(math.MaxInt64))
	}
	return &Request{Type: m["type"].str, Protocol: int(m["protocol"].num), Op: op, Path: m["path"].str,
		Root: m["root"].str, Identity: m["identity"].str, MaxBytes: m["max_bytes"].num, MemfdName: m["memfd_name"].str}, nil
}

func badRequest(key, format string, args ...interface{}) *Error {
	return &Error{Type: "error", Code: contract.CodeBadRequest, Key: key, Message: fmt.Sprintf(format, args...)}
}

// check reports a missing key or one of the wrong type.
func check(m map[string]value, key string) *Error {
	v, ok := m[key]
	if !ok {
		op := "a request"
		if o, ok := m["op"]; ok && o.kind == "str" {
			op = o.str
		}
		return badRequest(key, "the request has no %s key, which %s requires", key, op)
	}
	if want := requestKeys[key]; v.kind != want {
		return badRequest(key, "request key %s is msgpack %s; it must be %s", key, v.kind, want)
	}
	return nil
}

// value is one decoded request value with its msgpack type.
type value struct {
	kind string // str, bin, int, float, bool, nil, array, map or ext
	str  string
	num  int64
	big  bool // an int above MaxInt64
}

func (v value) text() string {
	if v.big {
		return "over 2^63"
	}
	return fmt.Sprint(v.num)
}

// decodeMap decodes a msgpack map of str keys, keeping each value's type.
func decodeMap(body []byte) (map[string]value, error) {
	r := bytes.NewReader(body)
	d := msgpack.NewDecoder(r)
	n, err := d.DecodeMapLen()
	if err != nil {
		return nil, fmt.Errorf("not a msgpack map: %v", err)
	}
	if n < 0 {
		return nil, fmt.Errorf("a nil, not a msgpack map")
	}
	m := make(map[string]value, n)
	for i := 0; i < n; i++ {
		c, err := d.PeekCode()
		if err != nil {
			return nil, err
		}
		if !msgpcode.IsString(c) {
			return nil, fmt.Errorf("map key %d is not a msgpack str", i)
		}
		k, err := d.DecodeString()
		if err != nil {
			return nil, err
		}
		if _, dup := m[k]; dup {
			return nil, fmt.Errorf("key %s appears twice", k)
		}
		if m[k], err = decodeValue(d); err != nil {
			return nil, fmt.Errorf("key %s: %v", k, err)
		}
	}
	if r.Len() != 0 {
		return nil, fmt.Errorf("%d bytes after the msgpack map", r.Len())
	}
	return m, nil
}

func decodeValue(d *msgpack.Decoder) (value, error) {
	c, err := d.PeekCode()
	if err != nil {
		return value{}, err
	}
	switch {
	case msgpcode.IsString(c):
		s, err := d.DecodeString()
		return value{kind: "str", str: s}, err
	case msgpcode.IsBin(c):
		return value{kind: "bin"}, d.Skip()
	case msgpcode.IsFixedNum(c), c == msgpcode.Int8, c == msgpcode.Int16, c == msgpcode.Int32, c == msgpcode.Int64,
		c == msgpcode.Uint8, c == msgpcode.Uint16, c == msgpcode.Uint32:
		n, err := d.DecodeInt64()
		return value{kind: "int", num: n}, err
	case c == msgpcode.Uint64:
		u, err := d.DecodeUint64()
		return value{kind: "int", num: int64(u), big: u > math.MaxInt64}, err
	case c == msgpcode.Float, c == msgpcode.Double:
		return value{kind: "float"}, d.Skip()
	case c == msgpcode.True, c == msgpcode.False:
		return value{kind: "bool"}, d.Skip()
	case c == msgpcode.Nil:
		return value{kind: "nil"}, d.Skip()
	case msgpcode.IsFixedArray(c), c == msgpcode.Array16, c == msgpcode.Array32:
		return value{kind: "array"}, d.Skip()
	case msgpcode.IsFixedMap(c), c == msgpcode.Map16, c == msgpcode.Map32:
		return value{kind: "map"}, d.Skip()
	case msgpcode.IsExt(c):
		return value{kind: "ext"}, d.Skip()
	}
	return value{}, fmt.Errorf("unknown msgpack code %#x", c)
}
