//go:build linux

package main

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"

	"filippo.io/age"
	"github.com/klipper-encprint/encprint/helper/contract"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/klipper-encprint/encprint/helper/identity"
	"github.com/klipper-encprint/encprint/helper/ipc"
	"github.com/klipper-encprint/encprint/helper/policy"
	"github.com/klipper-encprint/encprint/helper/privsep"
	"github.com/klipper-encprint/encprint/helper/state"
)

// The helper as the policy decision point (docs/adr/007-privilege-boundary.md).
// Installed set-user-ID, it has opened its own identity, policy and state
// (privsep.Start) and given up the privilege before serving; then it ignores
// the request's identity path, applies the root-owned policy, and counts and
// records every decryption before the descriptor leaves. Not installed that
// way (priv is nil), it works as before: the identity the request names,
// policy and counts in the component.

// trust is the privileged phase's outcome: what it opened, or why it failed.
type trust struct {
	priv *privsep.Privileged
	err  *ipc.Error
}

func startTrust() *trust {
	p, err := privsep.Start()
	if err != nil {
		return &trust{err: fail(contract.CodeInstallError, "the encrypted-print helper is not installed correctly: %v", err)}
	}
	return &trust{priv: p}
}

func (t *trust) close() {
	if t != nil && t.priv != nil {
		t.priv.Close()
	}
}

// privileged reports whether the helper runs as the decision point.
func (t *trust) privileged() bool { return t != nil && t.priv != nil }

// identities are the printer identities a request may use.
func (t *trust) identities(req *ipc.Request) ([]age.Identity, *ipc.Error) {
	if !t.privileged() {
		return loadIdentity(req.Identity)
	}
	ids, err := identity.Parse(bytes.NewReader(t.priv.Identity))
	if err != nil {
		return nil, fail(contract.CodeIdentityError, "the printer identity %s is malformed: %v", privsep.IdentityPath, err)
	}
	return ids, nil
}

// identityName names the identity in messages.
func (t *trust) identityName(req *ipc.Request) string {
	if t.privileged() {
		return privsep.IdentityPath
	}
	return req.Identity
}

// callerFile refuses a caller's file that belongs to the helper.
func (t *trust) callerFile(f *os.File, name string) *ipc.Error {
	if !t.privileged() {
		return nil
	}
	if err := privsep.CallerFile(f, t.priv.Ids); err != nil {
		return fail(contract.CodeUnreadable, "%s %v; only G-code files of the printer's user are printed", name, err)
	}
	return nil
}

// refusal is why an authenticated file may not print under the root
// policy or its count, checked before decrypting; nil when it may.
func (t *trust) refusal(name string, pub *encfile.Public) *ipc.Error {
	if !t.privileged() {
		return nil
	}
	sig := policy.Signature{}
	if p, valid := publisher(pub); p != nil {
		sig = policy.Signature{Publisher: *p, Valid: valid}
	}
	if why := t.priv.Policy.Refusal(name, sig); why != "" {
		return fail(contract.CodeUntrusted, "%s (%s)", why, privsep.PolicyPath)
	}
	used, err := t.priv.Used(hex.EncodeToString(pub.FileID))
	if err != nil {
		return stateError(err)
	}
	if limit := maxPrints(pub); limit > 0 && used >= limit {
		return usedUp(name, limit)
	}
	return nil
}

// commit counts and records one decryption of the authenticated file; the
// descriptor may leave only when it returns nil.
func (t *trust) commit(name string, pub *encfile.Public) *ipc.Error {
	if !t.privileged() {
		return nil
	}
	p, _ := publisher(pub)
	pubKey := ""
	if p != nil {
		pubKey = *p
	}
	limit := maxPrints(pub)
	_, err := t.priv.Commit(hex.EncodeToString(pub.FileID), pubKey, limit)
	var used *state.UsedUpError
	if errors.As(err, &used) {
		return usedUp(name, limit)
	}
	if err != nil {
		return stateError(err)
	}
	return nil
}

func maxPrints(pub *encfile.Public) int {
	if pub.Policy == nil {
		return 0
	}
	return int(pub.Policy.MaxPrints)
}

func usedUp(name string, limit int) *ipc.Error {
	if limit == 1 {
		return fail(contract.CodeUsedUp, "%s may be printed only once, and it has been printed already", name)
	}
	return fail(contract.CodeUsedUp, "%s may be printed %d times, and all %d prints have been used on this printer", name, limit, limit)
}

func stateError(err error) *ipc.Error {
	return fail(contract.CodeStateError, "%v", err)
}

// initStateDir creates the empty state of a new install. Only the helper's
// own user (or root acting as it) may: run set-user-ID by anyone else it
// refuses, so that nobody else can give a deleted state's prints back.
func initStateDir(t *trust) error {
	if t.privileged() || t.err != nil { // it started set-user-ID
		t.close()
		return errors.New("--init-state runs only as the helper's own user (sudo -u encprint encprint-helper --init-state)")
	}
	s, err := state.Open(privsep.StateDir)
	if err != nil {
		return err
	}
	defer s.Close()
	return s.Init()
}

// records is the installed helper's record of every decryption.
func (t *trust) records() (*ipc.RecordsResult, *ipc.Error) {
	res := &ipc.RecordsResult{Type: "result", Op: contract.OpRecords, Records: []ipc.Record{}}
	if !t.privileged() {
		return res, nil
	}
	recs, err := t.priv.Records()
	if err != nil {
		return nil, stateError(err)
	}
	res.Installed = true
	for _, r := range recs {
		res.Records = append(res.Records, ipc.Record{FileID: r.FileID, Publisher: r.Publisher, Time: r.Time,
			PID: r.PID, UID: r.UID, MaxPrints: r.MaxPrints, Count: r.CountAfter})
	}
	return res, nil
}
