package main

import (
	"fmt"
	"io"
	"os"
)

// progress draws a bar on stderr while a large file is read, only when
// stderr is a terminal.
type progress struct {
	src   io.ReadSeeker
	size  int64
	read  int64
	shown int
}

func withProgress(src io.ReadSeeker, size int64, p **progress) io.ReadSeeker {
	st, err := os.Stderr.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice == 0 || size < 32<<20 {
		return src
	}
	*p = &progress{src: src, size: size}
	return *p
}

func (p *progress) Read(b []byte) (int, error) {
	n, err := p.src.Read(b)
	p.read += int64(n)
	if pct := int(p.read * 100 / p.size); pct != p.shown && pct <= 100 {
		p.shown = pct
		fmt.Fprintf(os.Stderr, "\rencrypting [%-40s] %3d%%", bar(pct), pct)
	}
	return n, err
}

func (p *progress) Seek(off int64, whence int) (int64, error) {
	p.read = 0 // signing reads the input once before encrypting it
	return p.src.Seek(off, whence)
}

func (p *progress) done() {
	if p != nil {
		fmt.Fprintln(os.Stderr)
	}
}

func bar(pct int) string {
	b := make([]byte, 40)
	for i := range b {
		if i < pct*40/100 {
			b[i] = '#'
		} else {
			b[i] = ' '
		}
	}
	return string(b)
}
