// Package slicer extracts public metadata from sliced G-code exactly as
// Moonraker's metadata parser does (moonraker 0.11.0,
// components/file_manager/metadata.py), so that an encrypted file shows the
// same fields in Mainsail and Fluidd as the same G-code uploaded in clear.
//
// It ports Moonraker's parsers for PrusaSlicer and its forks (SuperSlicer,
// OrcaSlicer, QIDISlicer, ...), Slic3r, Slic3r PE, Bambu Studio, Cura and
// unknown slicers, field for field. Files of the other slicers Moonraker
// knows (Simplify3D, KISSlicer, IdeaMaker, IceSL, Kiri:Moto) are named but
// get only the fields common to all slicers (byte offsets, thumbnails).
//
// Byte offsets (gcode_start_byte, gcode_end_byte) are those of the
// cleartext, which is what Klipper's virtual_sdcard reports as
// file_position during the print.
package slicer

import (
	"io"
	"strings"
	"unicode/utf8"

	"github.com/klipper-encprint/encprint/helper/encfile"
)

// ScanSize is how much of the start and of the end of a file is read, as
// Moonraker does (READ_SIZE): slicers put their metadata there.
const ScanSize = 1 << 20

// Options choose what Extract publishes.
type Options struct {
	Thumbnails bool
}

// text is what Moonraker's BaseSlicer.from_file reads of a file.
type text struct {
	size   int64
	head   string // the first MiB, decoded: what slicers are identified by
	data   string // all that was read (head and tail)
	header string // the first ScanSize characters of data
	footer string // the last ScanSize characters of data

	layerHeight any // set by the layer_height parser, used by first_layer_height
}

// Extract reads the start and end of the G-code in r (size bytes) and
// returns the metadata Moonraker would write for it.
func Extract(r io.ReaderAt, size int64, opts Options) (*encfile.Metadata, error) {
	head := make([]byte, min(size, ScanSize))
	if _, err := r.ReadAt(head, 0); err != nil && err != io.EOF {
		return nil, err
	}
	var tail []byte
	if size > ScanSize {
		from := int64(ScanSize)
		if size > 2*ScanSize {
			from = size - ScanSize
		}
		tail = make([]byte, size-from)
		if _, err := r.ReadAt(tail, from); err != nil && err != io.EOF {
			return nil, err
		}
	}
	return parse(newText(size, head, tail), opts), nil
}

// Parse extracts metadata from a whole G-code file held in memory.
func Parse(gcode []byte, opts Options) *encfile.Metadata {
	md, _ := Extract(strings.NewReader(string(gcode)), int64(len(gcode)), opts)
	return md
}

// newText decodes as Python's bytes.decode(errors="ignore"): invalid UTF-8
// is dropped.
func newText(size int64, head, tail []byte) *text {
	t := &text{size: size, head: strings.ToValidUTF8(string(head), "")}
	t.data = t.head + strings.ToValidUTF8(string(tail), "")
	t.header = firstChars(t.data, ScanSize)
	t.footer = lastChars(t.data, ScanSize)
	return t
}

func firstChars(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := 0
	for c := 0; c < n && i < len(s); c++ {
		_, w := utf8.DecodeRuneInString(s[i:])
		i += w
	}
	return s[:i]
}

func lastChars(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := len(s)
	for c := 0; c < n && i > 0; c++ {
		_, w := utf8.DecodeLastRuneInString(s[:i])
		i -= w
	}
	return s[i:]
}

func parse(t *text, opts Options) *encfile.Metadata {
	md := &encfile.Metadata{}
	s := identify(t.head)
	md.Set("slicer", s.name)
	md.Set("slicer_version", s.version)
	for _, field := range parseOrder {
		if p, ok := s.parsers[field]; ok {
			if v := p(t); v != nil {
				md.Set(field, v)
			}
		}
	}
	if opts.Thumbnails && s.thumbnails {
		md.Thumbnails = thumbnails(t.data)
	}
	return md
}

// parseOrder is the order of BaseSlicer's parse_* methods, in which
// Moonraker runs them (layer_height before first_layer_height matters).
var parseOrder = []string{
	"gcode_start_byte", "gcode_end_byte", "layer_count", "object_height",
	"estimated_time", "nozzle_diameter", "layer_height", "first_layer_height",
	"first_layer_extr_temp", "first_layer_bed_temp", "chamber_temp",
	"filament_name", "filament_type", "filament_colors", "filament_change_count",
	"extruder_colors", "filament_temps", "referenced_tools", "mmu_print",
	"filament_total", "filament_weight_total", "filament_weights",
	"printer_vendor", "printer_model", "printer_variant", "profile_version",
}

// A parser returns a field's value, or nil when Moonraker's returns None.
type parser func(t *text) any

type slicerDef struct {
	name, version string
	parsers       map[string]parser
	thumbnails    bool
}

// identify tries Moonraker's slicers in its order (subclasses first).
func identify(head string) slicerDef {
	for _, s := range known {
		if name, version, ok := s.identify(head); ok {
			return slicerDef{name, version, s.parsers, s.thumbnails}
		}
	}
	return slicerDef{"Unknown", "?", unknownParsers, true}
}

type knownSlicer struct {
	identify   func(head string) (name, version string, ok bool)
	parsers    map[string]parser
	thumbnails bool
}

func header(t *text) string { return t.header }
func footer(t *text) string { return t.footer }

// extend copies base and applies the overrides.
func extend(base map[string]parser, over map[string]parser) map[string]parser {
	out := map[string]parser{}
	for k, v := range base {
		out[k] = v
	}
	for k, v := range over {
		out[k] = v
	}
	return out
}

var baseParsers = map[string]parser{
	"gcode_start_byte": gcodeStartByte,
	"gcode_end_byte":   gcodeEndByte,
}

var (
	reStart = pyre(`\n[MG]\d+\s.*\n`)
	reEnd   = pyre(`\n.*\s\d+[MG]\n`)
)

// gcodeStartByte is the offset of the line before the first G or M command.
func gcodeStartByte(t *text) any {
	loc := reStart.FindStringIndex(t.header)
	if loc == nil {
		return nil
	}
	return int64(loc[0])
}

// gcodeEndByte is the offset after the last G or M command's line; Moonraker
// finds it by searching the reversed footer.
func gcodeEndByte(t *text) any {
	rev := reverse(t.footer)
	loc := reEnd.FindStringIndex(rev)
	if loc == nil {
		return nil
	}
	return t.size - int64(loc[0])
}

func reverse(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	for i := len(s); i > 0; {
		r, w := utf8.DecodeLastRuneInString(s[:i])
		b.WriteRune(r)
		i -= w
	}
	return b.String()
}

var unknownParsers = extend(baseParsers, map[string]parser{
	"first_layer_height":    minFloat(`G1\sZ(%F)\s`, header),
	"object_height":         maxFloat(`G1\sZ(%F)\s`, footer),
	"first_layer_extr_temp": float(`M109 S(%F)`, header),
	"first_layer_bed_temp":  float(`M190 S(%F)`, header),
	"chamber_temp":          float(`M191 S(%F)`, header),
})
