//go:build linux

// Package privsep is the helper's privilege boundary, in the manner of
// OpenSSH's ssh-keysign (docs/adr/007-privilege-boundary.md).
//
// The helper is installed root-owned and setuid/setgid to a dedicated system
// user (encprint). It starts with the caller's real ids and encprint's
// effective ids. While privileged it opens only fixed, compiled-in paths: the
// identity, the root-owned policy, the state. Then Drop sets every id, real,
// effective and saved, in every thread, back to the caller's, and checks that
// the privilege cannot come back, before the helper reads anything its caller
// chose. From then on the kernel judges every caller-supplied path by the
// caller's own rights, and CallerFile refuses files that belong to the
// helper's user or group, so the helper cannot be used to read them (no
// confused deputy). The process is non-dumpable throughout, so the caller
// cannot ptrace it or read its memory, and it ignores its environment.
package privsep

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Ids are a process's real, effective and saved user and group ids.
type Ids struct {
	RUID, EUID, SUID int
	RGID, EGID, SGID int
}

// Current returns this process's ids.
func Current() Ids {
	var i Ids
	i.RUID, i.EUID, i.SUID = unix.Getresuid()
	i.RGID, i.EGID, i.SGID = unix.Getresgid()
	return i
}

// Elevated reports whether the ids carry a privilege the caller does not
// have: the set-user-ID or set-group-ID bit of the helper took effect.
func (i Ids) Elevated() bool {
	return i.EUID != i.RUID || i.SUID != i.RUID || i.EGID != i.RGID || i.SGID != i.RGID
}

// Harden makes the process non-dumpable (no ptrace, no /proc/<pid>/mem, no
// core dump) with no core size, forgets its environment, and creates files
// private to its user. It is the first thing the helper does.
func Harden() error {
	os.Clearenv()
	unix.Umask(0o077)
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		return fmt.Errorf("cannot disable core dumps: %w", err)
	}
	return nondumpable()
}

func nondumpable() error {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("cannot make the helper non-dumpable: %w", err)
	}
	if d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); err != nil || d != 0 {
		return fmt.Errorf("the helper is still dumpable (%d, %v)", d, err)
	}
	return nil
}

// Drop permanently gives up the privilege in priv (the ids the helper
// started with): every uid and gid of every thread becomes the caller's real
// one. It then checks that neither the user nor the group can be regained
// and that the process is still non-dumpable (a change of credentials makes
// Linux reset dumpability from fs.suid_dumpable). Any failure is fatal to
// the request: the helper must not touch caller input while privileged.
func Drop(priv Ids) error {
	if err := unix.Setresgid(priv.RGID, priv.RGID, priv.RGID); err != nil {
		return fmt.Errorf("cannot give up the helper's group: %w", err)
	}
	if err := unix.Setresuid(priv.RUID, priv.RUID, priv.RUID); err != nil {
		return fmt.Errorf("cannot give up the helper's user: %w", err)
	}
	return verifyDropped(priv)
}

func verifyDropped(priv Ids) error {
	now := Current()
	want := Ids{priv.RUID, priv.RUID, priv.RUID, priv.RGID, priv.RGID, priv.RGID}
	if now != want {
		return fmt.Errorf("privilege not fully given up: ids are %+v, want %+v", now, want)
	}
	if priv.EUID != priv.RUID {
		if err := unix.Setresuid(-1, priv.EUID, -1); err == nil {
			return fmt.Errorf("privilege not given up: uid %d can be regained", priv.EUID)
		}
		if err := unix.Setreuid(-1, priv.EUID); err == nil {
			return fmt.Errorf("privilege not given up: uid %d can be regained", priv.EUID)
		}
	}
	if priv.EGID != priv.RGID {
		if err := unix.Setresgid(-1, priv.EGID, -1); err == nil {
			return fmt.Errorf("privilege not given up: gid %d can be regained", priv.EGID)
		}
		if err := unix.Setregid(-1, priv.EGID); err == nil {
			return fmt.Errorf("privilege not given up: gid %d can be regained", priv.EGID)
		}
	}
	return nondumpable()
}

// Owner says who must own a privileged file and which permission bits it
// must not have.
type Owner struct {
	UID       int         // required owner
	Forbidden fs.FileMode // permission bits that must be clear
	Dir       bool        // a directory, not a regular file
}

// OpenOwned opens a fixed path while privileged, without following a final
// symlink, and checks its owner, type and mode: a private file that someone
// else could have written is refused, with a message saying how to fix it.
func OpenOwned(path string, want Owner) (*os.File, error) {
	flags := os.O_RDONLY | syscall.O_NOFOLLOW | syscall.O_CLOEXEC
	if want.Dir {
		flags |= syscall.O_DIRECTORY
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, fmt.Errorf("%s is a symbolic link; the helper opens only the file itself", path)
		}
		return nil, err
	}
	if err := checkOwned(f, path, want); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func checkOwned(f *os.File, path string, want Owner) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	isDir := st.Mode&unix.S_IFMT == unix.S_IFDIR
	switch {
	case want.Dir && !isDir:
		return fmt.Errorf("%s is not a directory", path)
	case !want.Dir && st.Mode&unix.S_IFMT != unix.S_IFREG:
		return fmt.Errorf("%s is not a regular file", path)
	case int(st.Uid) != want.UID:
		return fmt.Errorf("%s belongs to uid %d, not %d; run install.sh of the klipper-encprint checkout again (as the printer's user; it uses sudo)", path, st.Uid, want.UID)
	}
	if bad := fs.FileMode(st.Mode) & want.Forbidden & fs.ModePerm; bad != 0 {
		return fmt.Errorf("%s has mode %04o, which lets others in (%04o); run install.sh of the klipper-encprint checkout again (as the printer's user; it uses sudo)",
			path, st.Mode&0o7777, uint32(bad))
	}
	return nil
}

// ErrPrivateFile means a caller named a file of the helper's own user or
// group.
var ErrPrivateFile = errors.New("belongs to the encrypted-print helper")

// CallerFile refuses a file the caller opened through the helper when it
// belongs to the helper's user or group (priv, the ids the helper started
// with). After Drop the kernel already refuses what the caller cannot read;
// this also refuses it when the caller can (a member of the group), so the
// helper never processes its own files on anyone's behalf.
func CallerFile(f *os.File, priv Ids) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	if priv.EUID != priv.RUID && int(st.Uid) == priv.EUID {
		return ErrPrivateFile
	}
	if priv.EGID != priv.RGID && int(st.Gid) == priv.EGID {
		return ErrPrivateFile
	}
	return nil
}
