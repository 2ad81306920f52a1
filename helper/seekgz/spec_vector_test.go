package seekgz

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"flag"
	"io"
	"os"
	"strings"
	"testing"
)

var updateSpecVector = flag.Bool("update-spec-vector", false, "regenerate the seekgz_example of proto/testdata/format-vectors.json")

const specVectorsPath = "../../proto/testdata/format-vectors.json"

// specExample is docs/format.md's example of a seekable gzip payload.
type specExample struct {
	Comment   string `json:"_comment"`
	Cleartext string `json:"cleartext"`
	BlockSize int    `json:"block_size"`
	Payload   string `json:"payload_hex"`
}

func readSpec(t *testing.T) map[string]json.RawMessage {
	raw, err := os.ReadFile(specVectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

// The example of docs/format.md is read here by the specification's words
// alone (member headers, subfields, footer fields), then by gunzip's rules
// (concatenated members) and by ReadIndex, Validate and Reader.
func TestSpecExample(t *testing.T) {
	doc := readSpec(t)
	if *updateSpecVector {
		var b strings.Builder
		for i := 0; b.Len() < 6000; i++ {
			b.WriteString("G1 X" + strings.Repeat("1", i%5+1) + ".5 Y2 E0.03 ; ü\n")
		}
		clear := b.String()[:6000]
		var p bytes.Buffer
		w, _ := NewWriter(&p, Options{BlockSize: MinBlockSize})
		w.Write([]byte(clear))
		w.Close()
		doc["seekgz_example"], _ = json.Marshal(specExample{Comment: "docs/format.md, Payload: 6000 bytes of G-code in blocks of 4096 (two block members, one index member, the footer)",
			Cleartext: clear, BlockSize: MinBlockSize, Payload: hex.EncodeToString(p.Bytes())})
		out, _ := json.MarshalIndent(doc, "", "  ")
		os.WriteFile(specVectorsPath, append(out, '\n'), 0o644)
	}
	var ex specExample
	if err := json.Unmarshal(doc["seekgz_example"], &ex); err != nil {
		t.Fatal(err)
	}
	p, _ := hex.DecodeString(ex.Payload)
	le := binary.LittleEndian
	head := []byte{0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff}
	// Footer: the last 58 bytes.
	f := p[len(p)-58:]
	if !bytes.Equal(f[:10], head) || le.Uint16(f[10:]) != 36 || string(f[12:14]) != "Ef" || le.Uint16(f[14:]) != 32 ||
		!bytes.Equal(f[48:], []byte{3, 0, 0, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatal("footer member is not as specified")
	}
	version, bs, clear, indexOff, blocks, indexLen := le.Uint32(f[16:]), le.Uint32(f[20:]), le.Uint64(f[24:]), le.Uint64(f[32:]), le.Uint32(f[40:]), le.Uint32(f[44:])
	n := (len(ex.Cleartext) + ex.BlockSize - 1) / ex.BlockSize
	if version != 1 || int(bs) != ex.BlockSize || clear != uint64(len(ex.Cleartext)) || int(blocks) != n ||
		indexOff+uint64(indexLen)+58 != uint64(len(p)) {
		t.Fatalf("footer fields %d %d %d %d %d %d", version, bs, clear, indexOff, blocks, indexLen)
	}
	// Index member: subfield Ei of 4*n bytes, an empty deflate stream, CRC 0, ISIZE 0.
	ix := p[indexOff : indexOff+uint64(indexLen)]
	if !bytes.Equal(ix[:10], head) || le.Uint16(ix[10:]) != uint16(4+4*n) || string(ix[12:14]) != "Ei" ||
		le.Uint16(ix[14:]) != uint16(4*n) || int(indexLen) != 16+4*n+10 {
		t.Fatal("index member is not as specified")
	}
	var off uint64
	for i := 0; i < n; i++ {
		size := le.Uint32(ix[16+4*i:])
		m := p[off : off+uint64(size)]
		if !bytes.Equal(m[:10], head) || le.Uint16(m[10:]) != 8 || string(m[12:14]) != "Eb" || le.Uint16(m[14:]) != 4 || le.Uint32(m[16:]) != size {
			t.Fatalf("block member %d is not as specified", i)
		}
		off += uint64(size)
	}
	if off != indexOff {
		t.Fatal("the block members do not end where the index starts")
	}
	// gunzip's reading: one stream of concatenated members.
	zr, err := gzip.NewReader(bytes.NewReader(p))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(zr)
	if err != nil || string(got) != ex.Cleartext {
		t.Fatalf("gzip reads %d bytes (%v), want the cleartext", len(got), err)
	}
	rix, err := ReadIndex(bytes.NewReader(p), int64(len(p)), Limits{})
	if err != nil || rix.Validate(bytes.NewReader(p), 0) != nil {
		t.Fatalf("ReadIndex/Validate: %v", err)
	}
	buf := make([]byte, len(ex.Cleartext))
	if _, err := NewReader(bytes.NewReader(p), rix).ReadAt(buf, 0); err != nil || string(buf) != ex.Cleartext {
		t.Fatal("Reader differs")
	}
}
