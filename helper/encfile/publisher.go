package encfile

import (
	"bufio"
	"crypto/ed25519"
	"encoding/base64"
	"fmt"
	"io"
	"strings"

	"github.com/klipper-encprint/encprint/helper/contract"
)

// Text forms of publisher keys. A public key is one line, shareable:
// "encprint-pub:" + base64 (no padding) of the 32-byte Ed25519 key. A secret
// key file holds "ENCPRINT-PUBLISHER-KEY:" + base64 of the 32-byte seed;
// lines starting with '#' are comments.
const (
	PublicKeyPrefix = contract.PublisherKeyPrefix
	SecretKeyPrefix = "ENCPRINT-PUBLISHER-KEY:"
)

// FormatPublicKey returns the text form of a publisher public key.
func FormatPublicKey(pub []byte) string {
	return PublicKeyPrefix + base64.RawStdEncoding.EncodeToString(pub)
}

// FormatSecretKey returns the file contents for a publisher secret key.
func FormatSecretKey(priv ed25519.PrivateKey) string {
	pub := priv.Public().(ed25519.PublicKey)
	return "# encprint publisher key: keep it secret, it signs files as you\n" +
		"# public key: " + FormatPublicKey(pub) + "\n" +
		SecretKeyPrefix + base64.RawStdEncoding.EncodeToString(priv.Seed()) + "\n"
}

// ParseSecretKey reads a publisher secret key file.
func ParseSecretKey(r io.Reader) (ed25519.PrivateKey, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !strings.HasPrefix(line, SecretKeyPrefix) {
			return nil, fmt.Errorf("not a publisher key file (expected a line starting with %s)", SecretKeyPrefix)
		}
		seed, err := base64.RawStdEncoding.Strict().DecodeString(line[len(SecretKeyPrefix):])
		if err != nil || len(seed) != ed25519.SeedSize {
			return nil, fmt.Errorf("malformed publisher key: the seed is not 32 bytes of base64")
		}
		return ed25519.NewKeyFromSeed(seed), nil
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("no publisher key found in the file")
}
