package contract

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// The file every language is checked against.
const contractPath = "../../proto/contract.json"

type contractFile struct {
	ProtocolVersion int `json:"protocol_version"`
	Framing         struct {
		LengthPrefixBytes       int  `json:"length_prefix_bytes"`
		MaxRecord               int  `json:"max_record"`
		MaxRecordIncludesPrefix bool `json:"max_record_includes_prefix"`
		MaxMessage              int  `json:"max_message"`
		MaxFDsPerRecord         int  `json:"max_fds_per_record"`
	} `json:"framing"`
	Age struct {
		Magic      string `json:"magic"`
		ArmorBegin string `json:"armor_begin"`
	} `json:"age"`
	Payload struct {
		GzipMagic        string `json:"gzip_magic"`
		SeekgzMagic      string `json:"seekgz_magic"`
		FooterSize       int    `json:"footer_size"`
		FooterVersion    int    `json:"footer_version"`
		DefaultBlockSize int    `json:"default_block_size"`
		MinBlockSize     int    `json:"min_block_size"`
		MaxBlockSize     int    `json:"max_block_size"`
	} `json:"payload"`
	Memfd struct {
		TokenPrefix   string         `json:"token_prefix"`
		TokenRegex    string         `json:"token_regex"`
		FAddSeals     int            `json:"F_ADD_SEALS"`
		FGetSeals     int            `json:"F_GET_SEALS"`
		Seals         map[string]int `json:"seals"`
		RequiredSeals int            `json:"required_seals"`
	} `json:"memfd"`
	PublisherKey struct {
		Prefix string `json:"prefix"`
		Regex  string `json:"regex"`
	} `json:"publisher_key"`
	Ops map[string]struct {
		Required []string `json:"required"`
	} `json:"ops"`
	ErrorCodes       []string `json:"error_codes"`
	ClientErrorCodes []string `json:"client_error_codes"`
}

func load(t *testing.T) *contractFile {
	t.Helper()
	data, err := os.ReadFile(contractPath)
	if err != nil {
		t.Fatal(err)
	}
	var c contractFile
	if err := json.Unmarshal(data, &c); err != nil {
		t.Fatalf("%s: %v", contractPath, err)
	}
	return &c
}

func eq(t *testing.T, name string, got, want interface{}) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s: Go has %#v, contract.json has %#v", name, got, want)
	}
}

func TestGoEqualsContract(t *testing.T) {
	c := load(t)
	eq(t, "protocol_version", ProtocolVersion, c.ProtocolVersion)
	eq(t, "framing.length_prefix_bytes", LengthPrefixBytes, c.Framing.LengthPrefixBytes)
	eq(t, "framing.max_record", MaxRecord, c.Framing.MaxRecord)
	eq(t, "framing.max_record_includes_prefix", MaxRecordIncludesPrefix, c.Framing.MaxRecordIncludesPrefix)
	eq(t, "framing.max_message", MaxMessage, c.Framing.MaxMessage)
	eq(t, "framing.max_fds_per_record", MaxFDsPerRecord, c.Framing.MaxFDsPerRecord)
	eq(t, "age.magic", AgeMagic, c.Age.Magic)
	eq(t, "age.armor_begin", ArmorBegin, c.Age.ArmorBegin)
	eq(t, "payload.gzip_magic", hex.EncodeToString([]byte(GzipMagic)), c.Payload.GzipMagic)
	eq(t, "payload.seekgz_magic", hex.EncodeToString([]byte(SeekgzMagic)), c.Payload.SeekgzMagic)
	eq(t, "payload.footer_size", FooterSize, c.Payload.FooterSize)
	eq(t, "payload.footer_version", FooterVersion, c.Payload.FooterVersion)
	eq(t, "payload.default_block_size", DefaultBlockSize, c.Payload.DefaultBlockSize)
	eq(t, "payload.min_block_size", MinBlockSize, c.Payload.MinBlockSize)
	eq(t, "payload.max_block_size", MaxBlockSize, c.Payload.MaxBlockSize)
	eq(t, "memfd.token_prefix", MemfdTokenPrefix, c.Memfd.TokenPrefix)
	eq(t, "memfd.token_regex", MemfdTokenRegex, c.Memfd.TokenRegex)
	eq(t, "memfd.F_ADD_SEALS", FAddSeals, c.Memfd.FAddSeals)
	eq(t, "memfd.F_GET_SEALS", FGetSeals, c.Memfd.FGetSeals)
	eq(t, "memfd.seals", map[string]int{"F_SEAL_SEAL": SealSeal, "F_SEAL_SHRINK": SealShrink,
		"F_SEAL_GROW": SealGrow, "F_SEAL_WRITE": SealWrite}, c.Memfd.Seals)
	eq(t, "memfd.required_seals", RequiredSeals, c.Memfd.RequiredSeals)
	eq(t, "publisher_key.prefix", PublisherKeyPrefix, c.PublisherKey.Prefix)
	eq(t, "publisher_key.regex", PublisherKeyRegex, c.PublisherKey.Regex)
	ops := map[string][]string{}
	for _, op := range Ops() {
		ops[op] = Required(op)
	}
	want := map[string][]string{}
	for op, o := range c.Ops {
		want[op] = o.Required
	}
	eq(t, "ops.*.required", ops, want)
	eq(t, "error_codes", ErrorCodes(), c.ErrorCodes)
	for _, code := range c.ClientErrorCodes {
		for _, ours := range ErrorCodes() {
			if code == ours {
				t.Errorf("client error code %q is also a helper code", code)
			}
		}
	}
}

// The values must agree with themselves, too.
func TestContractIsConsistent(t *testing.T) {
	if SealSeal|SealShrink|SealGrow|SealWrite != RequiredSeals {
		t.Errorf("required seals %#x are not every seal", RequiredSeals)
	}
	token := regexp.MustCompile(MemfdTokenRegex)
	if !token.MatchString(MemfdTokenPrefix+"0f1e2d3c") || token.MatchString(MemfdTokenPrefix) ||
		token.MatchString(MemfdTokenPrefix+strings.Repeat("a", 33)) || token.MatchString(MemfdTokenPrefix+"A") {
		t.Error("token regex does not match the documented grammar")
	}
	if !strings.HasPrefix(MemfdTokenRegex, "^"+MemfdTokenPrefix) || !strings.HasPrefix(PublisherKeyRegex, "^"+PublisherKeyPrefix) {
		t.Error("a regex does not start with its prefix")
	}
	key := PublisherKeyPrefix + base64.RawStdEncoding.EncodeToString(make([]byte, 32))
	if !regexp.MustCompile(PublisherKeyRegex).MatchString(key) {
		t.Errorf("publisher key %s does not match %s", key, PublisherKeyRegex)
	}
	if !strings.HasSuffix(AgeMagic, "\n") || strings.ContainsAny(ArmorBegin, "\r\n") {
		t.Error("magic must end in a newline, the armor line must not")
	}
}
