//go:build linux

package privsep

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/klipper-encprint/encprint/helper/policy"
	"github.com/klipper-encprint/encprint/helper/state"
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

	// The print-count state, opened read-write while privileged: after
	// the drop the helper counts and records through these descriptors,
	// which the caller cannot reach (the process is non-dumpable). When it
	// could not be opened, stateErr says why, and every count answers it.
	store    *state.Store
	stateErr error
}

// Close releases the state's descriptors.
func (p *Privileged) Close() error {
	if p.store == nil {
		return nil
	}
	return p.store.Close()
}

// Start is the helper's privileged phase. It hardens the process, then, if
// the helper runs set-user-ID or set-group-ID, opens the identity, the
// policy and the state at their fixed paths and drops the privilege for
// good. It returns nil, nil when the helper is not privileged (an install
// without the privilege step): the caller then works as before, with files
// the caller names. Any error means the helper must answer it and stop:
// nothing of the caller's has been read.
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
	p := &Privileged{Ids: ids, Identity: identity, Policy: pol}
	p.store, p.stateErr = state.Open(StateDir)
	return p, nil
}

func readOwned(path string, want Owner) ([]byte, error) {
	f, err := OpenOwned(path, want)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 1<<20))
}

// Used is how many decryptions of fileID (hex) were handed out.
func (p *Privileged) Used(fileID string) (int, error) {
	if p.stateErr != nil {
		return 0, p.stateErr
	}
	st, err := p.store.Load()
	if err != nil {
		return 0, err
	}
	return st.Used(fileID), nil
}

// Commit records one decryption of fileID for the caller, refused with a
// *state.UsedUpError when it has no prints left; the returned record is on
// disk. The caller is the helper's real uid and its parent process, as the
// kernel gave them, never what a request says.
func (p *Privileged) Commit(fileID, publisher string, maxPrints int) (state.Decryption, error) {
	if p.stateErr != nil {
		return state.Decryption{}, p.stateErr
	}
	return p.store.Commit(state.Decryption{FileID: fileID, Publisher: publisher, Time: time.Now().Unix(),
		PID: os.Getppid(), UID: p.Ids.RUID, MaxPrints: maxPrints})
}

// Records is every recorded decryption, oldest first.
func (p *Privileged) Records() ([]state.Decryption, error) {
	if p.stateErr != nil {
		return nil, p.stateErr
	}
	st, err := p.store.Load()
	if err != nil {
		return nil, err
	}
	return st.Records, nil
}
