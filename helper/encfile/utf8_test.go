package encfile

import (
	"errors"
	"testing"
)

func TestCheckUTF8(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64 // -1: valid
	}{
		{"", -1},
		{"G1 X1 ; Teil-ü-部品 ✓\n", -1},
		{"; caf\xe9\n", 5},
		{"G1\n\xff", 3},
		{"; \xed\xa0\x80 surrogate\n", 2},
		{"; \xc0\xaf overlong\n", 2},
		{"; \xe2\x82 cut\n", 2},
		{"ok \xf0\x9f\x98", 3},
	} {
		err := CheckUTF8([]byte(tc.in))
		var ue *UTF8Error
		switch {
		case tc.want < 0 && err != nil:
			t.Errorf("%q: %v", tc.in, err)
		case tc.want >= 0 && !errors.As(err, &ue):
			t.Errorf("%q: got %v, want an error at byte %d", tc.in, err, tc.want)
		case tc.want >= 0 && ue.Offset != tc.want:
			t.Errorf("%q: offset %d, want %d", tc.in, ue.Offset, tc.want)
		}
	}
}
