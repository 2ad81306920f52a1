// Package version holds the build's version and the helper protocol version.
package version

import "github.com/klipper-encprint/encprint/helper/contract"

// Version is set at build time with -ldflags "-X ...version.Version=v1.2.3".
var Version = "dev"

// Protocol is the version of the component-helper protocol (proto/PROTOCOL.md)
// this build speaks. The component refuses a helper with another version.
const Protocol = contract.ProtocolVersion
