// Command encprint creates printer identities and encrypted G-code files.
//
// It is the designer's and printer owner's tool: it runs on Linux, macOS and
// Windows, and never writes cleartext G-code to a file.
package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"filippo.io/age"
	"github.com/klipper-encprint/encprint/helper/encfile"
	"github.com/klipper-encprint/encprint/helper/identity"
	"github.com/klipper-encprint/encprint/helper/seekgz"
	"github.com/klipper-encprint/encprint/helper/slicer"
	"github.com/klipper-encprint/encprint/helper/version"
)

const usage = `Usage:
    encprint keygen [-pq] [-plain] -o FILE
                                       create a printer identity, print its recipient
                                       (-pq: post-quantum hybrid, ML-KEM-768 + X25519;
                                       -plain: a stock age identity file instead of
                                       the envelope that config files cannot show)
    encprint recipient FILE            print the recipient of an identity
    encprint identity [-plain] -o OUT FILE
                                       copy an identity into the envelope, or with
                                       -plain out of it (for age -d -i; OUT '-': stdout)
    encprint encrypt -r RECIPIENT... [-R FILE] [options] [-o OUT] IN
    encprint encrypt --in-place [options] FILE   (slicer post-processing script)
    encprint inspect [--json] FILE     show what anyone can see without a key
    encprint verify -i IDENTITY FILE   authenticate the whole file (and check its compressed
                                       G-code as the printer does), print the G-code's
                                       size and SHA-256
    encprint sign-keygen -o FILE       create a publisher signing key
    encprint version

Encrypt options:
    -r RECIPIENT       a printer's recipient (age1...); repeatable
    -R FILE            a file of recipients, one per line; repeatable
    --max-prints N     allow at most N prints (per printer)
    --not-before T     not printable before T (2026-12-01 or RFC 3339)
    --not-after T      not printable after T
    --sign KEYFILE     sign as the publisher whose key is in KEYFILE
    --metadata M       all (default), basic (no thumbnails) or none
    --no-compress      keep the G-code as it is inside the encryption; by default
                       it is a seekable gzip (docs/format.md): 3-9x smaller uploads
                       and printer memory; 'age -d FILE | gunzip' reads it
    -o OUT             output file ('-' for stdout); default IN with .enc.gcode
    --in-place         replace IN by its encrypted form (slicer post-processing)

IN may be '-' for standard input. Recipients for --in-place can also come from
ENCPRINT_RECIPIENTS (space separated) or ENCPRINT_RECIPIENTS_FILE.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	args := os.Args[2:]
	switch os.Args[1] {
	case "keygen":
		err = keygen(args)
	case "recipient":
		err = recipient(args)
	case "identity":
		err = convertIdentity(args)
	case "encrypt":
		err = encrypt(args)
	case "inspect":
		err = inspect(args)
	case "verify":
		err = verify(args)
	case "sign-keygen":
		err = signKeygen(args)
	case "version", "--version":
		fmt.Printf("encprint %s (protocol %d)\n", version.Version, version.Protocol)
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		err = fmt.Errorf("unknown command %q (see encprint --help)", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "encprint: %v\n", err)
		os.Exit(1)
	}
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func newFlags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, usage) }
	return fs
}

// writeNewFile creates path with mode 0600, refusing to overwrite.
func writeNewFile(path, content string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s already exists; refusing to overwrite a key", path)
		}
		return err
	}
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func keygen(args []string) error {
	fs := newFlags("keygen")
	out := fs.String("o", "", "output file")
	pq := fs.Bool("pq", false, "post-quantum hybrid identity")
	plain := fs.Bool("plain", false, "write a stock age identity file, not the envelope")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" {
		return errors.New("keygen: -o FILE is required (the identity is secret and goes in a file)")
	}
	kind, id, recipient, err := newIdentity(*pq)
	if err != nil {
		return err
	}
	content := []byte(fmt.Sprintf("# encprint printer identity%s, created %s\n# public key: %s\n%s\n",
		kind, time.Now().UTC().Format(time.RFC3339), recipient, id))
	if !*plain {
		content = identity.Envelope(content)
	}
	if err := writeNewFile(*out, string(content)); err != nil {
		return err
	}
	fmt.Println(recipient)
	return nil
}

// convertIdentity copies an identity file into the envelope, or out of it.
func convertIdentity(args []string) error {
	fs := newFlags("identity")
	out := fs.String("o", "", "output file, '-' for stdout")
	plain := fs.Bool("plain", false, "write the stock age identity file (for age -d -i)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" || fs.NArg() != 1 {
		return errors.New("identity: give -o OUT and exactly one identity file")
	}
	data, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		return err
	}
	if _, err := identity.Parse(bytes.NewReader(data)); err != nil {
		return fmt.Errorf("%s is not an identity file: %v", fs.Arg(0), err)
	}
	content, err := identity.Plain(data)
	if err != nil {
		return fmt.Errorf("%s: %v", fs.Arg(0), err)
	}
	if !*plain {
		content = identity.Envelope(content)
	}
	if *out == "-" {
		_, err := os.Stdout.Write(content)
		return err
	}
	return writeNewFile(*out, string(content))
}

// newIdentity makes an X25519 identity, or with pq a hybrid ML-KEM-768 +
// X25519 one (age1pq1... recipients, as age-keygen -pq).
func newIdentity(pq bool) (kind string, identity, recipient fmt.Stringer, err error) {
	if pq {
		id, err := age.GenerateHybridIdentity()
		if err != nil {
			return "", nil, nil, err
		}
		return " (post-quantum hybrid ML-KEM-768 + X25519)", id, id.Recipient(), nil
	}
	id, err := age.GenerateX25519Identity()
	if err != nil {
		return "", nil, nil, err
	}
	return "", id, id.Recipient(), nil
}

func loadIdentities(path string) ([]age.Identity, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ids, err := identity.Parse(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return ids, nil
}

func recipient(args []string) error {
	if len(args) != 1 {
		return errors.New("recipient: give exactly one identity file")
	}
	ids, err := loadIdentities(args[0])
	if err != nil {
		return err
	}
	for _, id := range ids {
		switch id := id.(type) {
		case *age.X25519Identity:
			fmt.Println(id.Recipient())
		case *age.HybridIdentity:
			fmt.Println(id.Recipient())
		}
	}
	return nil
}

func signKeygen(args []string) error {
	fs := newFlags("sign-keygen")
	out := fs.String("o", "", "output file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *out == "" {
		return errors.New("sign-keygen: -o FILE is required")
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	if err := writeNewFile(*out, encfile.FormatSecretKey(priv)); err != nil {
		return err
	}
	fmt.Println(encfile.FormatPublicKey(priv.Public().(ed25519.PublicKey)))
	return nil
}

func parseTime(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	for _, layout := range []string{time.RFC3339, "2006-01-02T15:04", "2006-01-02"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t.Unix(), nil
		}
	}
	return 0, fmt.Errorf("cannot read time %q: use 2026-12-31 or RFC 3339 (2026-12-31T18:00:00Z)", s)
}

func parseRecipients(rs, files multi) ([]age.Recipient, error) {
	var out []age.Recipient
	for _, r := range rs {
		rec, err := age.ParseRecipients(strings.NewReader(r))
		if err != nil {
			return nil, fmt.Errorf("malformed recipient %q: %v", r, err)
		}
		out = append(out, rec...)
	}
	for _, path := range files {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		rec, err := age.ParseRecipients(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		out = append(out, rec...)
	}
	return out, nil
}

func encrypt(args []string) error {
	fs := newFlags("encrypt")
	var rs, rfiles multi
	fs.Var(&rs, "r", "recipient")
	fs.Var(&rfiles, "R", "recipients file")
	maxPrints := fs.Uint("max-prints", 0, "")
	notBefore := fs.String("not-before", "", "")
	notAfter := fs.String("not-after", "", "")
	signKey := fs.String("sign", "", "")
	metaMode := fs.String("metadata", "all", "")
	out := fs.String("o", "", "")
	inPlace := fs.Bool("in-place", false, "")
	noCompress := fs.Bool("no-compress", false, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("encrypt: give exactly one input file (or - for stdin)")
	}
	in := fs.Arg(0)
	if *inPlace {
		if v := os.Getenv("ENCPRINT_RECIPIENTS"); v != "" && len(rs) == 0 && len(rfiles) == 0 {
			rs = strings.Fields(v)
		}
		if v := os.Getenv("ENCPRINT_RECIPIENTS_FILE"); v != "" && len(rfiles) == 0 {
			rfiles = append(rfiles, v)
		}
	}
	recips, err := parseRecipients(rs, rfiles)
	if err != nil {
		return err
	}
	if len(recips) == 0 {
		return errors.New("no recipients: name at least one printer with -r or -R")
	}
	if err := encfile.CheckRecipients(recips); err != nil {
		return err
	}
	opts := encfile.EncryptOptions{Recipients: recips, Policy: &encfile.Policy{MaxPrints: uint32(*maxPrints)},
		SignatureVersion: encfile.SigVersion2}
	if opts.Policy.NotBefore, err = parseTime(*notBefore); err != nil {
		return err
	}
	if opts.Policy.NotAfter, err = parseTime(*notAfter); err != nil {
		return err
	}
	if opts.Policy.NotAfter != 0 && opts.Policy.NotAfter <= opts.Policy.NotBefore {
		return errors.New("--not-after must be later than --not-before")
	}
	if *signKey != "" {
		f, err := os.Open(*signKey)
		if err != nil {
			return err
		}
		opts.Signer, err = encfile.ParseSecretKey(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("%s: %v", *signKey, err)
		}
	}

	// The input is read up to three times (metadata, signature, encryption),
	// so stdin is held in memory: cleartext never goes to a temporary file.
	var src io.ReadSeeker
	var size int64
	var readerAt io.ReaderAt
	outMode := os.FileMode(0o644) // ciphertext is meant to be shared
	if in == "-" {
		b, err := io.ReadAll(os.Stdin)
		if err != nil {
			return err
		}
		r := bytes.NewReader(b)
		src, readerAt, size = r, r, int64(len(b))
	} else {
		f, err := os.Open(in)
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("%s is not a regular file", in)
		}
		if *inPlace {
			outMode = st.Mode().Perm()
		}
		head := make([]byte, encfile.SniffSize)
		n, _ := f.ReadAt(head, 0)
		if encfile.IsEncrypted(head[:n]) {
			return fmt.Errorf("%s is already encrypted", in)
		}
		src, readerAt, size = f, f, st.Size()
	}
	switch *metaMode {
	case "all", "basic":
		md, err := slicer.Extract(readerAt, size, slicer.Options{Thumbnails: *metaMode == "all"})
		if err != nil {
			return fmt.Errorf("%s: reading slicer metadata: %v", in, err)
		}
		opts.Metadata = md
	case "none":
	default:
		return fmt.Errorf("--metadata must be all, basic or none, not %q", *metaMode)
	}

	if !*noCompress && size > 0 { // an empty G-code stays an empty payload
		opts.Compress = &seekgz.Options{} // 64 KiB blocks, level 6, every CPU
	}

	outPath := *out
	if *inPlace {
		if in == "-" || outPath != "" {
			return errors.New("--in-place takes a file and no -o")
		}
		outPath = in
	} else if outPath == "" {
		if in == "-" {
			outPath = "-"
		} else {
			outPath = strings.TrimSuffix(strings.TrimSuffix(in, ".gcode"), ".enc") + ".enc.gcode"
		}
	}
	var prog *progress
	if outPath == "-" {
		return encfile.Encrypt(os.Stdout, withProgress(src, size, &prog), opts)
	}
	// Write beside the target and rename: a crash leaves no half file, and
	// --in-place never leaves the cleartext under the output name.
	tmp, err := os.CreateTemp(filepath.Dir(outPath), "."+filepath.Base(outPath)+".*.tmp")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := encfile.Encrypt(tmp, withProgress(src, size, &prog), opts); err != nil {
		tmp.Close()
		return fmt.Errorf("%s: %v", in, err)
	}
	prog.done()
	if err := tmp.Chmod(outMode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), outPath); err != nil {
		return err
	}
	if *inPlace {
		announceOutputName(in)
	} else {
		fmt.Fprintf(os.Stderr, "encprint: wrote %s for %d printer(s)\n", outPath, len(recips))
	}
	return nil
}

// announceOutputName tells PrusaSlicer, SuperSlicer and OrcaSlicer to name
// the exported file *.enc.gcode: they read "<file>.output_name" after the
// post-processing script ran, and set SLIC3R_PP_OUTPUT_NAME beforehand.
func announceOutputName(in string) {
	name := os.Getenv("SLIC3R_PP_OUTPUT_NAME")
	if name == "" || strings.HasSuffix(name, ".enc.gcode") {
		return
	}
	name = strings.TrimSuffix(name, ".gcode") + ".enc.gcode"
	os.WriteFile(in+".output_name", []byte(name), 0o644)
}

type inspection struct {
	File       string            `json:"file"`
	Encrypted  bool              `json:"encrypted"`
	Recipients int               `json:"recipients"`
	FileID     string            `json:"file_id"`
	Policy     *encfile.Policy   `json:"policy,omitempty"`
	Metadata   *encfile.Metadata `json:"metadata,omitempty"`
	Signed     bool              `json:"signed"`
	Publisher  string            `json:"publisher,omitempty"`
	SigValid   bool              `json:"signature_valid"`
	HeaderSize int64             `json:"header_size"`
}

func inspect(args []string) error {
	fs := newFlags("inspect")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("inspect: give exactly one file")
	}
	path := fs.Arg(0)
	f, size, err := openSized(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h, p, err := encfile.ParseFile(f, size)
	if err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	in := inspection{File: path, Encrypted: true, Recipients: p.Recipients, FileID: hex.EncodeToString(p.FileID),
		Policy: p.Policy, Metadata: p.Metadata, Signed: p.Signature != nil, HeaderSize: h.Size()}
	if p.Signature != nil {
		in.Publisher = encfile.FormatPublicKey(p.Signature.PublicKey)
		in.SigValid = p.VerifySignature() == nil
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(in)
	}
	fmt.Printf("file:        %s\n", path)
	fmt.Printf("recipients:  %d (anonymous: age does not say which printers)\n", in.Recipients)
	fmt.Printf("file id:     %s\n", in.FileID)
	fmt.Printf("policy:      %s\n", describePolicy(p.Policy))
	switch {
	case !in.Signed:
		fmt.Println("signed:      no")
	case in.SigValid:
		fmt.Printf("signed:      yes, by %s (valid; the printer checks the plaintext digest on decrypt)\n", in.Publisher)
	default:
		fmt.Printf("signed:      INVALID signature claiming %s\n", in.Publisher)
	}
	if md := p.Metadata; md != nil {
		fmt.Printf("slicer:      %s %s\n", md.String("slicer"), md.String("slicer_version"))
		if t := md.Float("estimated_time"); t > 0 {
			fmt.Printf("estimated:   %s\n", time.Duration(t*float64(time.Second)).Round(time.Second))
		}
		if f := md.Float("filament_total"); f > 0 {
			fmt.Printf("filament:    %.1f mm, %.2f g %s %s\n", f, md.Float("filament_weight_total"),
				md.String("filament_type"), md.String("filament_name"))
		}
		if n, lh := md.Float("layer_count"), md.Float("layer_height"); n > 0 || lh > 0 {
			fmt.Printf("layers:      %.0f x %.2f mm, object %.2f mm high\n", n, lh, md.Float("object_height"))
		}
		if md.Values["gcode_start_byte"] != nil {
			fmt.Printf("g-code:      bytes %.0f to %.0f of the cleartext\n", md.Float("gcode_start_byte"), md.Float("gcode_end_byte"))
		}
		for _, t := range md.Thumbnails {
			fmt.Printf("thumbnail:   %dx%d %s, %d bytes\n", t.Width, t.Height, t.Format, len(t.Data))
		}
	} else {
		fmt.Println("metadata:    none published")
	}
	return nil
}

func describePolicy(p *encfile.Policy) string {
	if p == nil {
		return "none"
	}
	var parts []string
	if p.MaxPrints > 0 {
		parts = append(parts, fmt.Sprintf("at most %d print(s)", p.MaxPrints))
	}
	if p.NotBefore != 0 {
		parts = append(parts, "from "+time.Unix(p.NotBefore, 0).UTC().Format(time.RFC3339))
	}
	if p.NotAfter != 0 {
		parts = append(parts, "until "+time.Unix(p.NotAfter, 0).UTC().Format(time.RFC3339))
	}
	if len(parts) == 0 {
		return "no limits"
	}
	if err := p.CheckWindow(time.Now()); err != nil {
		parts = append(parts, "NOT PRINTABLE NOW: "+err.Error())
	}
	return strings.Join(parts, ", ")
}

// openSized opens a file for reading and returns its size.
func openSized(path string) (*os.File, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, st.Size(), nil
}

type discard struct{}

func (discard) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }

func verify(args []string) error {
	fs := newFlags("verify")
	idPath := fs.String("i", "", "identity file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 || *idPath == "" {
		return errors.New("verify: usage: encprint verify -i IDENTITY FILE")
	}
	ids, err := loadIdentities(*idPath)
	if err != nil {
		return err
	}
	path := fs.Arg(0)
	f, size, err := openSized(path)
	if err != nil {
		return err
	}
	defer f.Close()
	ef, err := encfile.Open(f, size, ids...)
	if err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	head, err := ef.Head(2)
	if err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	if !seekgz.IsGzip(head) {
		res, err := ef.DecryptTo(discard{}, 0)
		if err != nil {
			return fmt.Errorf("%s: %v", path, err)
		}
		fmt.Printf("%s: authentic, %d bytes of G-code, sha256 %x\n", path, res.Size, res.SHA256)
		return nil
	}
	// A compressed payload is checked as the printer checks it, in memory
	// (its compressed size), then inflated once more to hash the G-code.
	ef.SkipSHA256 = true
	payload := make([]byte, ef.PlainSize)
	if _, err := ef.DecryptInto(payload, 0); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	n, err := encfile.CheckPayload(payload, 0)
	if err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	src := bytes.NewReader(payload)
	ix, err := seekgz.ReadIndex(src, int64(len(payload)), seekgz.Limits{})
	if err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(seekgz.NewReader(src, ix), 0, n)); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	fmt.Printf("%s: authentic, %d bytes of G-code (compressed to %d), sha256 %x\n", path, n, len(payload), h.Sum(nil))
	return nil
}
