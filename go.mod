module github.com/klipper-encprint/encprint

go 1.24.0

require (
	c2sp.org/CCTV/age v0.0.0-20251208015420-e9274a7bdbfd
	filippo.io/age v1.3.1
	github.com/klauspost/compress v1.18.0
	github.com/vmihailenco/msgpack/v5 v5.4.1
	golang.org/x/sys v0.38.0
)

require (
	filippo.io/hpke v0.4.0 // indirect
	github.com/vmihailenco/tagparser/v2 v2.0.0 // indirect
	golang.org/x/crypto v0.45.0 // indirect
)
