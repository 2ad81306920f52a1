package slicer

import (
	"encoding/base64"
	"regexp"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/klipper-encprint/encprint/helper/encfile"
)

// reThumbBegin finds where Moonraker's thumbnail pattern can start:
//
//	(thumbnail(?:_[A-Za-z0-9]+)?) begin([;/\+=\w\s]+?); \1 end
var reThumbBegin = regexp.MustCompile(`(thumbnail(?:_[A-Za-z0-9]+)?) begin`)

var reDigits = regexp.MustCompile(`[0-9]+`)

// inThumbClass is Python's [;/\+=\w\s].
func inThumbClass(r rune) bool {
	return strings.ContainsRune(";/+=_", r) || unicode.IsLetter(r) || unicode.IsNumber(r) ||
		unicode.IsSpace(r) || (r >= 0x1c && r <= 0x1f)
}

// thumbnails returns the images Moonraker would extract from data, in its
// order: every "; thumbnail[_FMT] begin WxH LEN" block whose length matches,
// in a format Moonraker supports (png, jpg, qoi).
func thumbnails(data string) []encfile.Thumbnail {
	var out []encfile.Thumbnail
	for pos := 0; pos < len(data); {
		loc := reThumbBegin.FindStringSubmatchIndex(data[pos:])
		if loc == nil {
			break
		}
		start, tag := pos+loc[0], data[pos+loc[2]:pos+loc[3]]
		body, end, ok := thumbBody(data[pos+loc[1]:], "; "+tag+" end")
		if !ok {
			pos = start + 1
			continue
		}
		pos = pos + loc[1] + end
		if t, ok := decodeThumb(tag, body); ok {
			out = append(out, t)
		}
	}
	return out
}

// thumbBody is the lazy ([class]+?)marker: the shortest non-empty run of
// class characters followed by marker, and the offset after the marker.
func thumbBody(s, marker string) (string, int, bool) {
	for i, r := range s {
		if i > 0 && strings.HasPrefix(s[i:], marker) {
			return s[:i], i + len(marker), true
		}
		if !inThumbClass(r) {
			return "", 0, false
		}
	}
	return "", 0, false
}

func decodeThumb(tag, body string) (encfile.Thumbnail, bool) {
	_, ext, _ := strings.Cut(tag, "_")
	ext = strings.ToLower(ext)
	if ext == "" {
		ext = "png"
	}
	if ext != "png" && ext != "jpg" && ext != "qoi" {
		return encfile.Thumbnail{}, false
	}
	lines := regexp.MustCompile(`\r?\n`).Split(strings.ReplaceAll(body, "; ", ""), -1)
	info := reDigits.FindAllString(lines[0], -1)
	if len(info) != 3 || len(lines) < 2 {
		return encfile.Thumbnail{}, false
	}
	b64 := strings.Join(lines[1:len(lines)-1], "")
	w, _ := strconv.Atoi(info[0])
	h, _ := strconv.Atoi(info[1])
	n, _ := strconv.Atoi(info[2])
	if utf8.RuneCountInString(b64) != n {
		return encfile.Thumbnail{}, false
	}
	img, err := pyB64decode(b64)
	if err != nil || len(img) == 0 || len(img) > encfile.MaxThumbnailSize || w <= 0 || h <= 0 || w > 4096 || h > 4096 {
		return encfile.Thumbnail{}, false
	}
	return encfile.Thumbnail{Width: w, Height: h, Format: ext, Data: img}, true
}

// pyB64decode is Python's base64.b64decode: characters outside the
// alphabet are discarded.
func pyB64decode(s string) ([]byte, error) {
	clean := strings.Map(func(r rune) rune {
		if r < 0x80 && (r == '+' || r == '/' || r == '=' || r >= '0' && r <= '9' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z') {
			return r
		}
		return -1
	}, s)
	return base64.StdEncoding.DecodeString(clean)
}
