package seekgz

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

var updateVectors = flag.Bool("update-vectors", false, "regenerate proto/testdata/seekgz")

const vectorDir = "../../proto/testdata/seekgz"

// vector is one entry of proto/testdata/seekgz/vectors.json. Expect is
// "success", "index_error" (footer or index inconsistent), "block_error" (a
// block does not inflate to its cleartext) or "not_seekable" (gzip, but not
// a seekable gzip).
type vector struct {
	File      string `json:"file"`
	Expect    string `json:"expect"`
	GcodeSize int64  `json:"gcode_size,omitempty"`
	GcodeSHA  string `json:"gcode_sha256,omitempty"`
	BlockSize int64  `json:"block_size,omitempty"`
	Blocks    int    `json:"blocks,omitempty"`
	Note      string `json:"note"`
}

// vectorGcode is the cleartext of the valid vectors: line k is
// "G1 X<k mod 200>.<k mod 1000> Y<k mod 97> ; line k\n" for k = 0, 1, ...,
// cut to n bytes.
func vectorGcode(n int) []byte {
	var b bytes.Buffer
	for k := 0; b.Len() < n; k++ {
		fmt.Fprintf(&b, "G1 X%d.%03d Y%d ; line %d\n", k%200, k%1000, k%97, k)
	}
	return b.Bytes()[:n]
}

func makeVectors(t *testing.T) map[string][]byte {
	files := map[string][]byte{}
	files["three-blocks.gz"] = encode(t, vectorGcode(3*MinBlockSize-100), Options{BlockSize: MinBlockSize})
	files["exact-blocks.gz"] = encode(t, vectorGcode(2*MinBlockSize), Options{BlockSize: MinBlockSize})
	files["empty.gz"] = encode(t, nil, Options{BlockSize: MinBlockSize})
	files["default-blocks.gz"] = encode(t, vectorGcode(DefaultBlockSize+1), Options{})
	base := files["three-blocks.gz"]
	ix, err := ReadIndex(bytes.NewReader(base), int64(len(base)), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Clone(base)
	o := int(ix.Offsets[3]) + 16 // first index entry
	binary.LittleEndian.PutUint32(p[o:], binary.LittleEndian.Uint32(p[o:])+1)
	files["lying-index.gz"] = p
	p = bytes.Clone(base)
	p[len(p)-FooterSize+16+24]++ // block count
	files["lying-footer.gz"] = p
	p = bytes.Clone(base)
	p[ix.Offsets[1]+blockHeaderSize+20] ^= 0x01
	files["tampered-block.gz"] = p
	p = bytes.Clone(base)
	p[ix.Offsets[2]-8] ^= 0x01 // CRC-32 of block 1
	files["bad-crc.gz"] = p
	files["bomb.gz"] = bomb(t)
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write(vectorGcode(5000))
	zw.Close()
	files["plain-gzip.gz"] = z.Bytes()
	return files
}

// bomb is one block member whose deflate data inflates to 4 MiB for a
// 4 KiB block, with a consistent index and footer.
func bomb(t *testing.T) []byte {
	var z bytes.Buffer
	fw, _ := flate.NewWriter(&z, flate.BestCompression)
	fw.Write(make([]byte, 4<<20))
	fw.Close()
	m := append(bytes.Clone(Magic), 0, 0, 0, 0)
	m = append(m, z.Bytes()...)
	m = binary.LittleEndian.AppendUint32(m, 0)
	m = binary.LittleEndian.AppendUint32(m, MinBlockSize)
	binary.LittleEndian.PutUint32(m[16:], uint32(len(m)))
	p := appendIndex(bytes.Clone(m), []uint32{uint32(len(m))})
	return appendFooter(p, footer{version: Version, blockSize: MinBlockSize, clearSize: MinBlockSize,
		indexOffset: uint64(len(m)), blocks: 1, indexLen: uint32(indexLen(1))})
}

func TestVectors(t *testing.T) {
	if *updateVectors {
		writeVectors(t)
	}
	data, err := os.ReadFile(filepath.Join(vectorDir, "vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(data, &vs); err != nil {
		t.Fatal(err)
	}
	if len(vs) < 10 {
		t.Fatalf("only %d vectors", len(vs))
	}
	for _, v := range vs {
		t.Run(v.File, func(t *testing.T) {
			p, err := os.ReadFile(filepath.Join(vectorDir, v.File))
			if err != nil {
				t.Fatal(err)
			}
			ix, err := ReadIndex(bytes.NewReader(p), int64(len(p)), Limits{})
			if err == nil {
				err = ix.Validate(bytes.NewReader(p), 2)
			}
			var ie *IndexError
			var be *BlockError
			got := "success"
			switch {
			case errors.Is(err, ErrNotSeekable):
				got = "not_seekable"
			case errors.As(err, &ie):
				got = "index_error"
			case errors.As(err, &be):
				got = "block_error"
			case err != nil:
				t.Fatalf("unexpected error %v", err)
			}
			if got != v.Expect {
				t.Fatalf("got %s (%v), want %s", got, err, v.Expect)
			}
			if got != "success" {
				return
			}
			clear := make([]byte, ix.ClearSize)
			if _, err := NewReader(bytes.NewReader(p), ix).ReadAt(clear, 0); err != nil && ix.ClearSize > 0 {
				t.Fatal(err)
			}
			sum := sha256.Sum256(clear)
			if ix.ClearSize != v.GcodeSize || hex.EncodeToString(sum[:]) != v.GcodeSHA ||
				ix.BlockSize != v.BlockSize || ix.Blocks() != v.Blocks {
				t.Fatalf("decoded %d bytes sha256 %x in %d blocks of %d; vector says %+v",
					ix.ClearSize, sum, ix.Blocks(), ix.BlockSize, v)
			}
		})
	}
}

func writeVectors(t *testing.T) {
	files := makeVectors(t)
	notes := map[string][2]string{
		"three-blocks.gz":   {"success", "three 4 KiB blocks, the last 100 bytes short"},
		"exact-blocks.gz":   {"success", "two full 4 KiB blocks"},
		"empty.gz":          {"success", "no G-code: the footer alone"},
		"default-blocks.gz": {"success", "the default 64 KiB blocks, one byte into the second"},
		"lying-index.gz":    {"index_error", "three-blocks.gz with the first index entry one byte too large"},
		"lying-footer.gz":   {"index_error", "three-blocks.gz with the block count one too large"},
		"tampered-block.gz": {"block_error", "three-blocks.gz with one bit flipped in block 1's deflate data"},
		"bad-crc.gz":        {"block_error", "three-blocks.gz with block 1's CRC-32 altered"},
		"bomb.gz":           {"block_error", "one 4 KiB block whose deflate data (within the size allowed for a block) inflates to 4 MiB"},
		"plain-gzip.gz":     {"not_seekable", "gzip as another tool writes it: no footer"},
	}
	var vs []vector
	for _, name := range []string{"three-blocks.gz", "exact-blocks.gz", "empty.gz", "default-blocks.gz",
		"lying-index.gz", "lying-footer.gz", "tampered-block.gz", "bad-crc.gz", "bomb.gz", "plain-gzip.gz"} {
		p := files[name]
		if err := os.WriteFile(filepath.Join(vectorDir, name), p, 0o644); err != nil {
			t.Fatal(err)
		}
		v := vector{File: name, Expect: notes[name][0], Note: notes[name][1]}
		if v.Expect == "success" {
			ix, err := ReadIndex(bytes.NewReader(p), int64(len(p)), Limits{})
			if err != nil {
				t.Fatal(err)
			}
			clear := make([]byte, ix.ClearSize)
			NewReader(bytes.NewReader(p), ix).ReadAt(clear, 0)
			sum := sha256.Sum256(clear)
			v.GcodeSize, v.GcodeSHA, v.BlockSize, v.Blocks = ix.ClearSize, hex.EncodeToString(sum[:]), ix.BlockSize, ix.Blocks()
		}
		vs = append(vs, v)
	}
	out, _ := json.MarshalIndent(vs, "", "  ")
	if err := os.WriteFile(filepath.Join(vectorDir, "vectors.json"), append(out, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}
