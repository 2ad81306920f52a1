//go:build linux

package privsep

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/klipper-encprint/encprint/helper/state"
	"golang.org/x/sys/unix"
)

// The state keeper. Writing the state safely means creating and renaming
// files in the state directory, which only the helper's user may do, and the
// helper has given that user up (Drop) before it reads the caller's file. So
// while still privileged the helper starts a keeper: itself again (its
// set-user-ID bit makes the keeper privileged too), connected by a socket.
// The keeper never reads anything the caller chose except these requests:
// how many prints a file id has used, record one decryption, list the
// records. It takes the caller's uid from its own real uid and the caller's
// pid from the process tree, not from the request, and it can only add to
// the state.

// KeeperArg is the argument that starts the helper as a state keeper.
const KeeperArg = "--state-keeper"

// keeperFD is the keeper's end of the socket.
const keeperFD = 3

type keeperRequest struct {
	Op        string `json:"op"` // used, commit, records
	FileID    string `json:"file_id"`
	Publisher string `json:"publisher"`
	MaxPrints int    `json:"max_prints"`
}

type keeperReply struct {
	Count   int                `json:"count"`
	UsedUp  bool               `json:"used_up"`
	Error   string             `json:"error"`
	Missing bool               `json:"missing"`
	Records []state.Decryption `json:"records"`
}

// Keeper is the helper's connection to its state keeper.
type Keeper struct {
	conn *os.File
	enc  *json.Encoder
	dec  *json.Decoder
	cmd  *exec.Cmd
}

// StartKeeper starts exe with KeeperArg, then args, and the keeper's end of
// a new socket as descriptor 3, with an empty environment. The helper calls
// it while privileged, with exe "/proc/self/exe" and no args: the keeper's
// state directory is compiled in, never chosen by a caller.
func StartKeeper(exe string, args ...string) (*Keeper, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("cannot start the state keeper: %w", err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "keeper"), os.NewFile(uintptr(fds[1]), "keeper-peer")
	defer theirs.Close()
	cmd := &exec.Cmd{Path: exe, Args: append([]string{exe, KeeperArg}, args...), Env: []string{},
		ExtraFiles: []*os.File{theirs}, Stderr: os.Stderr}
	if err := cmd.Start(); err != nil {
		mine.Close()
		return nil, fmt.Errorf("cannot start the state keeper %s: %w", exe, err)
	}
	return &Keeper{conn: mine, enc: json.NewEncoder(mine), dec: json.NewDecoder(mine), cmd: cmd}, nil
}

// Close ends the keeper and waits for it.
func (k *Keeper) Close() error {
	k.conn.Close()
	return k.cmd.Wait()
}

func (k *Keeper) call(req keeperRequest) (*keeperReply, error) {
	if err := k.enc.Encode(req); err != nil {
		return nil, fmt.Errorf("the state keeper is gone: %w", err)
	}
	var rep keeperReply
	if err := k.dec.Decode(&rep); err != nil {
		return nil, fmt.Errorf("the state keeper did not answer: %w", err)
	}
	if rep.Missing {
		return nil, fmt.Errorf("%s: %w", rep.Error, state.ErrMissing)
	}
	if rep.Error != "" {
		return nil, errors.New(rep.Error)
	}
	return &rep, nil
}

// Used is how many decryptions of fileID (hex) were handed out.
func (k *Keeper) Used(fileID string) (int, error) {
	rep, err := k.call(keeperRequest{Op: "used", FileID: fileID})
	if err != nil {
		return 0, err
	}
	return rep.Count, nil
}

// Commit records one decryption of fileID, refused with a *state.UsedUpError
// when it has no prints left; the returned record is on disk.
func (k *Keeper) Commit(fileID, publisher string, maxPrints int) (state.Decryption, error) {
	rep, err := k.call(keeperRequest{Op: "commit", FileID: fileID, Publisher: publisher, MaxPrints: maxPrints})
	if err != nil {
		return state.Decryption{}, err
	}
	if rep.UsedUp {
		return state.Decryption{}, &state.UsedUpError{FileID: fileID, MaxPrints: maxPrints}
	}
	return rep.Records[0], nil
}

// Records is every recorded decryption, oldest first.
func (k *Keeper) Records() ([]state.Decryption, error) {
	rep, err := k.call(keeperRequest{Op: "records"})
	if err != nil {
		return nil, err
	}
	return rep.Records, nil
}

// ServeKeeper is the keeper's main loop: it opens the state directory
// stateDir (while privileged), then answers requests on descriptor 3 until
// the helper closes it.
func ServeKeeper(stateDir string) error {
	conn := os.NewFile(keeperFD, "keeper")
	if conn == nil {
		return errors.New("no socket on descriptor 3; the state keeper is started by the helper")
	}
	defer conn.Close()
	caller := Current().RUID
	pid := callerPID()
	enc, dec := json.NewEncoder(conn), json.NewDecoder(conn)
	store, openErr := state.Open(stateDir)
	if openErr == nil {
		defer store.Close()
	}
	for {
		var req keeperRequest
		if err := dec.Decode(&req); err != nil {
			return nil // the helper is done
		}
		rep := keeperReply{Records: []state.Decryption{}}
		if openErr != nil {
			rep.Error, rep.Missing = openErr.Error(), errors.Is(openErr, state.ErrMissing)
		} else {
			answer(store, &req, &rep, pid, caller)
		}
		if err := enc.Encode(&rep); err != nil {
			return err
		}
	}
}

func answer(store *state.Store, req *keeperRequest, rep *keeperReply, pid, uid int) {
	var err error
	switch req.Op {
	case "used":
		var st *state.State
		if st, err = store.Load(); err == nil {
			rep.Count = st.Used(req.FileID)
		}
	case "records":
		var st *state.State
		if st, err = store.Load(); err == nil {
			rep.Records = st.Records
		}
	case "commit":
		var d state.Decryption
		d, err = store.Commit(state.Decryption{FileID: req.FileID, Publisher: req.Publisher,
			Time: time.Now().Unix(), PID: pid, UID: uid, MaxPrints: req.MaxPrints})
		var used *state.UsedUpError
		if errors.As(err, &used) {
			rep.UsedUp, err = true, nil
		} else if err == nil {
			rep.Count, rep.Records = d.CountAfter, []state.Decryption{d}
		}
	default:
		err = fmt.Errorf("the state keeper has no operation %q", req.Op)
	}
	if err != nil {
		rep.Error, rep.Missing = err.Error(), errors.Is(err, state.ErrMissing)
	}
}

// callerPID is the helper's parent: the keeper's parent is the helper.
func callerPID() int {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(os.Getppid()) + "/stat")
	if err != nil {
		return 0
	}
	// pid (comm) state ppid ...; comm may hold spaces and parentheses.
	rest := string(data)
	if i := strings.LastIndexByte(rest, ')'); i >= 0 {
		rest = rest[i+1:]
	}
	f := strings.Fields(rest)
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.Atoi(f[1])
	return n
}
