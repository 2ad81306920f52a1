// Package contract holds the values of proto/contract.json that the Go side
// uses: every name, number and grammar that crosses a process boundary.
// Each is defined here once; contract_test.go fails until they equal the
// JSON file, so a change there fails here until Go follows.
package contract

// ProtocolVersion is the component-helper protocol version (proto/PROTOCOL.md).
const ProtocolVersion = 2

// Framing of proto/PROTOCOL.md: a message is a uint32 big-endian length
// prefix and a msgpack body, sent as SOCK_SEQPACKET records of at most
// MaxRecord bytes, prefix included. helper/ipc is written for
// MaxRecordIncludesPrefix and MaxFDsPerRecord as they are: the test fails if
// contract.json changes them.
const (
	LengthPrefixBytes       = 4
	MaxRecord               = 65536
	MaxRecordIncludesPrefix = true
	MaxMessage              = 16 << 20
	MaxFDsPerRecord         = 1
)

// The first bytes of an age file: the binary v1 intro line (newline
// included), and the ASCII armor's first line (no line ending).
const (
	AgeMagic   = "age-encryption.org/v1\n"
	ArmorBegin = "-----BEGIN AGE ENCRYPTED FILE-----"
)

// The age payload (docs/format.md): G-code, or a seekable gzip of it when
// it starts with GzipMagic. helper/seekgz defines the format; its test
// checks these equal its own.
const (
	GzipMagic        = "\x1f\x8b"
	SeekgzMagic      = "\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x08\x00Eb\x04\x00"
	FooterSize       = 58
	FooterVersion    = 1
	DefaultBlockSize = 64 << 10
	MinBlockSize     = 4 << 10
	MaxBlockSize     = 1 << 20
)

// The memfd's name (token) grammar, and its seals.
const (
	MemfdTokenPrefix = "encprint-"
	MemfdTokenRegex  = `^encprint-[0-9a-z]{1,32}$`

	FAddSeals = 1033
	FGetSeals = 1034

	SealSeal   = 1
	SealShrink = 2
	SealGrow   = 4
	SealWrite  = 8
	// RequiredSeals is every seal a finished memfd carries.
	RequiredSeals = 15
)

// Publisher public keys: PublisherKeyPrefix + 43 characters of unpadded
// base64 (a 32-byte Ed25519 key).
const (
	PublisherKeyPrefix = "encprint-pub:"
	PublisherKeyRegex  = `^encprint-pub:[A-Za-z0-9+/]{43}$`
)

// Operations of a request.
const (
	OpInspect   = "inspect"
	OpDecrypt   = "decrypt"
	OpRecipient = "recipient"
	OpRecords   = "records"
)

// Required returns the keys a request for op must carry (nil for an unknown op).
func Required(op string) []string {
	switch op {
	case OpInspect:
		return []string{"type", "protocol", "op", "path", "root", "identity"}
	case OpDecrypt:
		return []string{"type", "protocol", "op", "path", "root", "identity", "max_bytes", "memfd_name"}
	case OpRecipient:
		return []string{"type", "protocol", "op", "identity"}
	case OpRecords:
		return []string{"type", "protocol", "op"}
	}
	return nil
}

// Ops lists the operations in contract.json's order.
func Ops() []string { return []string{OpInspect, OpDecrypt, OpRecipient, OpRecords} }

// Error codes the helper sends (proto/PROTOCOL.md, "error").
const (
	CodeBadRequest         = "bad_request"
	CodeProtocolMismatch   = "protocol_mismatch"
	CodeOutsideRoot        = "outside_root"
	CodeNotFound           = "not_found"
	CodeNotAFile           = "not_a_file"
	CodeUnreadable         = "unreadable"
	CodeIOError            = "io_error"
	CodeIdentityError      = "identity_error"
	CodeNotEncrypted       = "not_encrypted"
	CodeMalformedHeader    = "malformed_header"
	CodeUnsupportedVersion = "unsupported_version"
	CodeWrongIdentity      = "wrong_identity"
	CodeHeaderAuthFailed   = "header_auth_failed"
	CodePayloadCorrupt     = "payload_corrupt"
	CodeTruncated          = "truncated"
	CodeTooLarge           = "too_large"
	CodeDigestMismatch     = "digest_mismatch"
	CodeNotUTF8            = "not_utf8"
	CodeBadPayload         = "bad_payload"
	CodeNotSeekable        = "not_seekable"
	CodeNotYetValid        = "not_yet_valid"
	CodeExpired            = "expired"
	CodeMemfdUnavailable   = "memfd_unavailable"
	CodeUntrusted          = "untrusted"
	CodeUsedUp             = "used_up"
	CodeStateError         = "state_error"
	CodeInstallError       = "install_error"
	CodeInternal           = "internal"
)

// ErrorCodes lists every code the helper sends, in contract.json's order.
func ErrorCodes() []string {
	return []string{CodeBadRequest, CodeProtocolMismatch, CodeOutsideRoot, CodeNotFound,
		CodeNotAFile, CodeUnreadable, CodeIOError, CodeIdentityError, CodeNotEncrypted,
		CodeMalformedHeader, CodeUnsupportedVersion, CodeWrongIdentity, CodeHeaderAuthFailed,
		CodePayloadCorrupt, CodeTruncated, CodeTooLarge, CodeDigestMismatch, CodeNotUTF8, CodeBadPayload, CodeNotSeekable, CodeNotYetValid,
		CodeExpired, CodeMemfdUnavailable, CodeUntrusted, CodeUsedUp, CodeStateError, CodeInstallError,
		CodeInternal}
}
