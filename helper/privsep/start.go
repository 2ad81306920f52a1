//go:build linux

package privsep

import (
	"fmt"
	"io"

	"github.com/klipper-encprint/encprint/helper/policy"
)

// The privileged files, fixed when the helper is built (go build -ldflags
// "-X github.com/klipper-encprint/encprint/helper/privsep.StateDir=..."),
// never taken from a request, an argument or the environment.
var (
	IdentityPath = "/var/lib/encprint/identity"
	PolicyPath   = "/etc/encprint/policy.json"
	StateDir     = "/var/lib/encprint/state"
)

// Privileged is what the helper opened while it was privileged.
type Privileged struct {
	Ids      Ids            // the ids the helper started with
	Identity []byte         // the identity file's content; never sent anywhere
	Policy   *policy.Policy // the root-owned policy
	Keeper   *Keeper        // the state keeper, privileged
}

// Close ends the keeper.
func (p *Privileged) Close() error { return p.Keeper.Close() }

// Start is the helper's privileged phase. It hardens the process, then, if
// the helper runs set-user-ID or set-group-ID, opens the identity, the
// policy and the state directory at their fixed paths, starts the state
// keeper, and drops the privilege for good. It returns nil, nil when the
// helper is not privileged (an install without the privilege step): the
// caller then works as before, with files the caller names. Any error means
// the helper must answer it and stop: nothing of the caller's has been read.
func Start() (*Privileged, error) {
	if err := Harden(); err != nil {
		return nil, err
	}
	ids := Current()
	if !ids.Elevated() {
		return nil, nil
	}
	p, err := open(ids)
	if err != nil {
		return nil, err
	}
	if err := Drop(ids); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

func open(ids Ids) (*Privileged, error) {
	identity, err := readOwned(IdentityPath, Owner{UID: ids.EUID, Forbidden: 0o077})
	if err != nil {
		return nil, fmt.Errorf("cannot read the printer identity: %w", err)
	}
	pf, err := OpenOwned(PolicyPath, Owner{UID: 0, Forbidden: 0o022})
	if err != nil {
		return nil, fmt.Errorf("cannot read the printer policy: %w", err)
	}
	pol, err := policy.Parse(pf, PolicyPath)
	pf.Close()
	if err != nil {
		return nil, err
	}
	sd, err := OpenOwned(StateDir, Owner{UID: ids.EUID, Forbidden: 0o077, Dir: true})
	if err != nil {
		return nil, fmt.Errorf("cannot open the print-count state: %w", err)
	}
	sd.Close()
	k, err := StartKeeper("/proc/self/exe")
	if err != nil {
		return nil, err
	}
	return &Privileged{Ids: ids, Identity: identity, Policy: pol, Keeper: k}, nil
}

func readOwned(path string, want Owner) ([]byte, error) {
	f, err := OpenOwned(path, want)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 1<<20))
}

// RunKeeper is the helper's entry point as a state keeper (os.Args[1] ==
// KeeperArg). It serves only when privileged: an unprivileged keeper could
// not write the state anyway.
func RunKeeper() error {
	if err := Harden(); err != nil {
		return err
	}
	if !Current().Elevated() {
		return fmt.Errorf("%s runs only as part of the installed, set-user-ID helper", KeeperArg)
	}
	return ServeKeeper(StateDir)
}
