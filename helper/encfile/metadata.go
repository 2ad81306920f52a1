package encfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"

	"github.com/vmihailenco/msgpack/v5"
)

// MaxThumbnailSize bounds one thumbnail image.
const MaxThumbnailSize = 1 << 20

// Limits on the other metadata values; Moonraker's own values are far smaller.
const (
	maxFieldString = 4096
	maxFieldList   = 256
)

// Kind is the type of a metadata field, as Moonraker's parser writes it.
type Kind int

const (
	String  Kind = iota // string
	Int                 // int64
	Number              // int64 or float64, kept as the parser wrote it
	Strings             // []string
	Ints                // []int64
	Floats              // []float64
)

// Field is one key of the metadata stanza.
type Field struct {
	Name string
	Kind Kind
}

// Fields are the metadata keys this format carries: every field Moonraker's
// metadata parser writes for G-code (besides thumbnails, which are images
// here, and the file's own size, time and uuid). They are written in this
// order.
var Fields = []Field{
	{"slicer", String}, {"slicer_version", String},
	{"estimated_time", Number}, {"filament_total", Number}, {"filament_weight_total", Number},
	{"filament_type", String}, {"filament_name", String},
	{"layer_height", Number}, {"first_layer_height", Number}, {"object_height", Number},
	{"nozzle_diameter", Number}, {"layer_count", Int},
	{"gcode_start_byte", Int}, {"gcode_end_byte", Int},
	{"first_layer_extr_temp", Number}, {"first_layer_bed_temp", Number}, {"chamber_temp", Number},
	{"filament_colors", Strings}, {"extruder_colors", Strings},
	{"filament_temps", Ints}, {"referenced_tools", Ints},
	{"mmu_print", Int}, {"filament_change_count", Int}, {"filament_weights", Floats},
	{"printer_vendor", String}, {"printer_model", String}, {"printer_variant", String},
	{"profile_version", String},
}

var fieldKind = func() map[string]Kind {
	m := map[string]Kind{}
	for _, f := range Fields {
		m[f.Name] = f.Kind
	}
	return m
}()

// Metadata is the public description of the print: Moonraker's metadata
// fields by name, and the slicer's thumbnails. The encryptor chooses what
// to include; every field is optional. Readers ignore keys they do not know.
type Metadata struct {
	// Values holds string, int64, float64, []string, []int64 or []float64
	// values as Fields says; a key that is absent was not published.
	Values     map[string]any
	Thumbnails []Thumbnail
}

// Thumbnail is a preview image as the slicer embedded it.
type Thumbnail struct {
	Width  int    `msgpack:"width" json:"width"`
	Height int    `msgpack:"height" json:"height"`
	Format string `msgpack:"format" json:"format"` // "png", "jpg" or "qoi"
	Data   []byte `msgpack:"data" json:"-"`
}

// Set records a field's value; v must be of the field's kind.
func (m *Metadata) Set(name string, v any) {
	if m.Values == nil {
		m.Values = map[string]any{}
	}
	m.Values[name] = v
}

// String returns a string field, or "".
func (m *Metadata) String(name string) string {
	s, _ := m.Values[name].(string)
	return s
}

// Float returns a numeric field as a float64, or 0.
func (m *Metadata) Float(name string) float64 {
	switch v := m.Values[name].(type) {
	case int64:
		return float64(v)
	case float64:
		return v
	}
	return 0
}

// MarshalJSON writes the fields and the thumbnails (without their data) as
// one object.
func (m *Metadata) MarshalJSON() ([]byte, error) {
	out := map[string]any{}
	for k, v := range m.Values {
		out[k] = v
	}
	if len(m.Thumbnails) > 0 {
		out["thumbnails"] = m.Thumbnails
	}
	return json.Marshal(out)
}

// UnmarshalJSON reads what MarshalJSON writes; numbers become float64 and
// lists []any (for tools reading `encprint inspect --json`).
func (m *Metadata) UnmarshalJSON(b []byte) error {
	var v map[string]json.RawMessage
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*m = Metadata{}
	for k, raw := range v {
		if k == "thumbnails" {
			if err := json.Unmarshal(raw, &m.Thumbnails); err != nil {
				return err
			}
			continue
		}
		var x any
		if err := json.Unmarshal(raw, &x); err != nil {
			return err
		}
		m.Set(k, x)
	}
	return nil
}

// EncodeMsgpack writes one map, fields in the order of Fields, then
// "thumbnails".
func (m *Metadata) EncodeMsgpack(enc *msgpack.Encoder) error {
	if err := m.validate(); err != nil {
		return err
	}
	n := len(m.Values)
	if len(m.Thumbnails) > 0 {
		n++
	}
	if err := enc.EncodeMapLen(n); err != nil {
		return err
	}
	for _, f := range Fields {
		v, ok := m.Values[f.Name]
		if !ok {
			continue
		}
		if err := enc.EncodeString(f.Name); err != nil {
			return err
		}
		if err := enc.Encode(v); err != nil {
			return err
		}
	}
	if len(m.Thumbnails) > 0 {
		if err := enc.EncodeString("thumbnails"); err != nil {
			return err
		}
		return enc.Encode(m.Thumbnails)
	}
	return nil
}

// DecodeMsgpack reads the map EncodeMsgpack writes. Unknown keys are
// skipped; a known key with a value of the wrong type is an error.
func (m *Metadata) DecodeMsgpack(dec *msgpack.Decoder) error {
	n, err := dec.DecodeMapLen()
	if err != nil {
		return err
	}
	*m = Metadata{}
	seen := map[string]bool{}
	for i := 0; i < n; i++ {
		key, err := dec.DecodeString()
		if err != nil {
			return fmt.Errorf("metadata key: %v", err)
		}
		if seen[key] {
			return fmt.Errorf("metadata key %q appears twice", key)
		}
		seen[key] = true
		if key == "thumbnails" {
			if err := dec.Decode(&m.Thumbnails); err != nil {
				return fmt.Errorf("metadata thumbnails: %v", err)
			}
			continue
		}
		kind, known := fieldKind[key]
		if !known {
			if err := dec.Skip(); err != nil {
				return err
			}
			continue
		}
		v, err := decodeValue(dec, kind)
		if err != nil {
			return fmt.Errorf("metadata %s: %v", key, err)
		}
		m.Set(key, v)
	}
	return m.validate()
}

func decodeValue(dec *msgpack.Decoder, kind Kind) (any, error) {
	switch kind {
	case String:
		return dec.DecodeString()
	case Int:
		return decodeInt(dec)
	case Number:
		return decodeNumber(dec)
	}
	n, err := dec.DecodeArrayLen()
	if err != nil {
		return nil, err
	}
	if n < 0 || n > maxFieldList {
		return nil, fmt.Errorf("list of %d items (at most %d)", n, maxFieldList)
	}
	switch kind {
	case Strings:
		out := make([]string, n)
		for i := range out {
			if out[i], err = dec.DecodeString(); err != nil {
				return nil, err
			}
		}
		return out, nil
	case Ints:
		out := make([]int64, n)
		for i := range out {
			if out[i], err = decodeInt(dec); err != nil {
				return nil, err
			}
		}
		return out, nil
	default:
		out := make([]float64, n)
		for i := range out {
			v, err := decodeNumber(dec)
			if err != nil {
				return nil, err
			}
			if f, ok := v.(float64); ok {
				out[i] = f
			} else {
				out[i] = float64(v.(int64))
			}
		}
		return out, nil
	}
}

func decodeInt(dec *msgpack.Decoder) (int64, error) {
	v, err := decodeNumber(dec)
	if err != nil {
		return 0, err
	}
	i, ok := v.(int64)
	if !ok {
		return 0, errors.New("not an integer")
	}
	return i, nil
}

func decodeNumber(dec *msgpack.Decoder) (any, error) {
	v, err := dec.DecodeInterfaceLoose()
	if err != nil {
		return nil, err
	}
	switch v := v.(type) {
	case int64, float64:
		return v, nil
	case uint64:
		if v > math.MaxInt64 {
			return nil, errors.New("integer out of range")
		}
		return int64(v), nil
	}
	return nil, fmt.Errorf("not a number (%T)", v)
}

func (m *Metadata) validate() error {
	for name, v := range m.Values {
		kind, ok := fieldKind[name]
		if !ok {
			return fmt.Errorf("unknown metadata field %q", name)
		}
		if err := checkValue(kind, v); err != nil {
			return fmt.Errorf("metadata %s: %v", name, err)
		}
	}
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

func checkValue(kind Kind, v any) error {
	finite := func(f float64) error {
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return errors.New("not a finite number")
		}
		return nil
	}
	switch v := v.(type) {
	case string:
		if kind == String {
			if len(v) > maxFieldString {
				return fmt.Errorf("string of %d bytes (at most %d)", len(v), maxFieldString)
			}
			return nil
		}
	case int64:
		if kind == Int || kind == Number {
			return nil
		}
	case float64:
		if kind == Number {
			return finite(v)
		}
	case []string:
		if kind == Strings && len(v) <= maxFieldList {
			for _, s := range v {
				if len(s) > maxFieldString {
					return fmt.Errorf("string of %d bytes (at most %d)", len(s), maxFieldString)
				}
			}
			return nil
		}
	case []int64:
		if kind == Ints && len(v) <= maxFieldList {
			return nil
		}
	case []float64:
		if kind == Floats && len(v) <= maxFieldList {
			for _, f := range v {
				if err := finite(f); err != nil {
					return err
				}
			}
			return nil
		}
	}
	return fmt.Errorf("value %v (%T) is not of this field's type, or too long", v, v)
}
