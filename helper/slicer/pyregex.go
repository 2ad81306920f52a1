package slicer

import (
	"regexp"
	"strconv"
	"strings"
	"unicode"
)

// Moonraker's regex helpers, with Python's semantics. Patterns are written
// as in metadata.py: (%F) a float, (%D) an integer, (%S) the rest of the line.

// pySpace is Python's \s for str patterns.
const pySpace = `[\t\n\v\f\r \x{1c}-\x{1f}\x{85}\p{Z}]`

func pyre(pattern string) *regexp.Regexp {
	p := strings.NewReplacer(`(%F)`, `([0-9]*\.?[0-9]+)`, `(%D)`, `([0-9]+)`, `(%S)`, `(.*)`,
		`\s`, pySpace).Replace(pattern)
	return regexp.MustCompile(p)
}

type loc func(t *text) string

// pyStrip is Python's str.strip().
func pyStrip(s string) string {
	return strings.TrimFunc(s, func(r rune) bool { return unicode.IsSpace(r) || (r >= 0x1c && r <= 0x1f) })
}

func group1(re *regexp.Regexp, s string) (string, bool) {
	m := re.FindStringSubmatch(s)
	if m == nil {
		return "", false
	}
	return m[1], true
}

// findFloat is regex_find_float.
func findFloat(re *regexp.Regexp, s string) any {
	g, ok := group1(re, s)
	if !ok {
		return nil
	}
	v, err := strconv.ParseFloat(g, 64)
	if err != nil {
		return nil
	}
	return v
}

// findFloats is regex_find_floats.
func findFloats(re *regexp.Regexp, s string) []float64 {
	var out []float64
	for _, m := range re.FindAllStringSubmatch(s, -1) {
		v, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			return nil
		}
		out = append(out, v)
	}
	return out
}

var reAnyFloat = pyre(`(%F)`)

func float(pattern string, where loc) parser {
	re := pyre(pattern)
	return func(t *text) any { return findFloat(re, where(t)) }
}

func minFloat(pattern string, where loc) parser {
	re := pyre(pattern)
	return func(t *text) any {
		vs := findFloats(re, where(t))
		if len(vs) == 0 {
			return nil
		}
		m := vs[0]
		for _, v := range vs[1:] {
			if v < m {
				m = v
			}
		}
		return m
	}
}

func maxFloat(pattern string, where loc) parser {
	re := pyre(pattern)
	return func(t *text) any { return maxOf(findFloats(re, where(t))) }
}

func maxOf(vs []float64) any {
	if len(vs) == 0 {
		return nil
	}
	m := vs[0]
	for _, v := range vs[1:] {
		if v > m {
			m = v
		}
	}
	return m
}

// integer is regex_find_int.
func integer(pattern string, where loc) parser {
	re := pyre(pattern)
	return func(t *text) any {
		g, ok := group1(re, where(t))
		if !ok {
			return nil
		}
		v, err := strconv.ParseInt(g, 10, 64)
		if err != nil {
			return nil
		}
		return v
	}
}

// str is regex_find_string: the match with surrounding quotes removed.
func str(pattern string, where loc) parser {
	re := pyre(pattern)
	return func(t *text) any {
		g, ok := group1(re, where(t))
		if !ok {
			return nil
		}
		return strings.Trim(g, `"`)
	}
}

// findStrings is regex_find_strings: the match split at the separators,
// double-quoted items kept whole.
func findStrings(re *regexp.Regexp, separators, s string) []string {
	out := []string{}
	g, ok := group1(re, s)
	if !ok || g == "" {
		return out
	}
	item := regexp.MustCompile(pySpace + `*(")(?:\\"|[^"])*"` + pySpace + `*|[^` + regexp.QuoteMeta(separators) + `]+`)
	for _, m := range item.FindAllStringSubmatch(g, -1) {
		v := pyStrip(m[0])
		if m[1] != "" {
			v = pyStrip(strings.ReplaceAll(v[1:len(v)-1], `\"`, `"`))
		}
		if v != "" {
			out = append(out, v)
		}
	}
	return out
}

func strs(pattern string, where loc) parser {
	re := pyre(pattern)
	return func(t *text) any { return findStrings(re, ",;", where(t)) }
}

// ints is a list of strings converted as Python's int(), or nil if one is
// not an integer.
func ints(pattern string, where loc) parser {
	re := pyre(pattern)
	return func(t *text) any {
		var out = []int64{}
		for _, s := range findStrings(re, ",;", where(t)) {
			v, err := strconv.ParseInt(s, 10, 64)
			if err != nil {
				return nil
			}
			out = append(out, v)
		}
		return out
	}
}

// oneOrJSON is a string list as Moonraker writes filament_type and
// filament_name: its only item, or json.dumps of the list.
func oneOrJSON(pattern string, where loc) parser {
	re := pyre(pattern)
	return func(t *text) any {
		vs := findStrings(re, ",;", where(t))
		switch len(vs) {
		case 0:
			return nil
		case 1:
			return vs[0]
		}
		return pyJSONList(vs)
	}
}

var pyShortEscapes = map[rune]string{'\n': `\n`, '\r': `\r`, '\t': `\t`, '\b': `\b`, '\f': `\f`}

// pyJSONList is Python's json.dumps of a list of strings.
func pyJSONList(vs []string) string {
	parts := make([]string, len(vs))
	for i, v := range vs {
		var b strings.Builder
		b.WriteByte('"')
		for _, r := range v {
			switch {
			case r == '"' || r == '\\':
				b.WriteByte('\\')
				b.WriteRune(r)
			case r < 0x20 || r > 0x7e:
				if r > 0xffff {
					r -= 0x10000
					b.WriteString(`\u` + hex4(0xd800+(r>>10)) + `\u` + hex4(0xdc00+(r&0x3ff)))
					continue
				}
				if short, ok := pyShortEscapes[r]; ok {
					b.WriteString(short)
				} else {
					b.WriteString(`\u` + hex4(r))
				}
			default:
				b.WriteRune(r)
			}
		}
		b.WriteByte('"')
		parts[i] = b.String()
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

func hex4(r rune) string {
	s := strconv.FormatInt(int64(r), 16)
	return strings.Repeat("0", 4-len(s)) + s
}

// pyRound is Python's round(x, n) for floats (correctly rounded).
func pyRound(x float64, n int) float64 {
	v, _ := strconv.ParseFloat(strconv.FormatFloat(x, 'f', n, 64), 64)
	return v
}
