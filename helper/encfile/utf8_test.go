package encfile

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
	"unicode/utf8"

	"filippo.io/age"
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

// Cut into blocks checked in reverse order, a text gets the verdict of the
// whole: characters cut by a boundary are accepted, and the first invalid
// byte is found wherever it is, in a block or across a boundary.
func TestUTF8BlocksAgreeWithTheWholeText(t *testing.T) {
	texts := []string{
		"G1 X1 ; Teil-ü-部品 ✓ 😀 end\n",
		"; caf\xe9 and more text here\n",
		"abcd\xe2\x82 cut in the middle\n",
		"abc\xf0\x9f\x98\x80\x80 one continuation too many",
		"\x80 leading continuation",
		"ok 部品 then \xff",
		"部部部部部部部部部部部部",
		"ab\xc3",
	}
	for _, text := range texts {
		want := CheckUTF8([]byte(text))
		for bs := utf8.UTFMax; bs <= 11; bs++ { // blocks hold a whole character at least
			n := (len(text) + bs - 1) / bs
			u := NewUTF8Blocks(int64(bs), n)
			failed, var1 := -1, error(nil)
			for i := n - 1; i >= 0; i-- {
				end := min((i+1)*bs, len(text))
				if err := u.Block(i, []byte(text[i*bs:end])); err != nil {
					failed, var1 = i, err
				}
			}
			got := u.First(failed, var1)
			if (got == nil) != (want == nil) || (got != nil && got.(*UTF8Error).Offset != want.(*UTF8Error).Offset) {
				t.Errorf("%q in blocks of %d: got %v, want %v", text, bs, got, want)
			}
		}
	}
}

// DecryptTo with CheckUTF8 finds the same first bad byte as CheckUTF8 of
// the whole plaintext, wherever it lies relative to the workers' segments,
// and reports nil for UTF-8.
func TestDecryptChecksUTF8AsItGoes(t *testing.T) {
	id := newID(t)
	const n = 3*segmentSize + 10
	bads := map[string][]int{
		"valid":                   nil,
		"first byte":              {0},
		"last byte":               {n - 1},
		"cut at a segment edge":   {segmentSize - 1},
		"lead byte at a segment":  {2*segmentSize - 2, 2*segmentSize - 1},
		"two segments, later one": {2*segmentSize + 5, segmentSize + 7},
	}
	for name, at := range bads {
		plain := pattern(n)
		for _, i := range at {
			plain[i] = 0xe2 // a lead byte without its continuation bytes
		}
		if name == "lead byte at a segment" {
			plain[2*segmentSize-2], plain[2*segmentSize-1], plain[2*segmentSize] = 0xe2, 0x82, 0xac // "€" across the edge: valid
		}
		ct := encrypt(t, plain, EncryptOptions{Recipients: []age.Recipient{id.Recipient()}})
		for _, workers := range []int{1, 3} {
			t.Run(fmt.Sprintf("%s/workers=%d", name, workers), func(t *testing.T) {
				f, err := Open(bytes.NewReader(ct), int64(len(ct)), id)
				if err != nil {
					t.Fatal(err)
				}
				f.CheckUTF8 = true
				var m memFile
				r, err := f.DecryptTo(&m, workers)
				if err != nil {
					t.Fatal(err)
				}
				if want := CheckUTF8(plain); fmt.Sprint(r.UTF8) != fmt.Sprint(want) {
					t.Fatalf("UTF8 = %v, want %v", r.UTF8, want)
				}
			})
		}
	}
}
