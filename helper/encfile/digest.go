package encfile

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"
)

// DigestSegment is the payload span each leaf of a tree digest covers: the
// segment the parallel decryptor hands one worker.
const DigestSegment = segmentSize

const digestLabel = "encprint/digest v1\n"

// TreeDigest is the digest a v2 signature signs: the SHA-256 of
//
//	"encprint/digest v1\n" || uint64be(size) || leaf_0 || ... || leaf_{m-1}
//
// where leaf_i = SHA-256(payload[i*DigestSegment : (i+1)*DigestSegment])
// (the last segment may be shorter; an empty payload has no leaf). The
// leaves are independent, so they are hashed on every core; only m*32 bytes
// are hashed in order.
func TreeDigest(size int64, leaves [][32]byte) [32]byte {
	h := sha256.New()
	h.Write([]byte(digestLabel))
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(size)))
	for _, l := range leaves {
		h.Write(l[:])
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// treeHasher computes TreeDigest of a payload written in order, for
// encryption (which streams).
type treeHasher struct {
	seg    hash.Hash
	n      int64 // bytes in the current segment
	size   int64
	leaves [][32]byte
}

func newTreeHasher() *treeHasher { return &treeHasher{seg: sha256.New()} }

func (t *treeHasher) Write(p []byte) (int, error) {
	w := len(p)
	for len(p) > 0 {
		k := min(int64(len(p)), DigestSegment-t.n)
		t.seg.Write(p[:k])
		t.n += k
		t.size += k
		p = p[k:]
		if t.n == DigestSegment {
			t.leaf()
		}
	}
	return w, nil
}

func (t *treeHasher) leaf() {
	var l [32]byte
	t.seg.Sum(l[:0])
	t.leaves = append(t.leaves, l)
	t.seg.Reset()
	t.n = 0
}

func (t *treeHasher) Sum() [32]byte {
	if t.n > 0 {
		t.leaf()
	}
	return TreeDigest(t.size, t.leaves)
}
