// Command seekgz_encode compresses a file into encprint's seekable gzip, for
// the benchmarks (bench/inflate_stall.py). It is not shipped.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/klipper-encprint/encprint/helper/seekgz"
)

func main() {
	block := flag.Int("block", seekgz.DefaultBlockSize, "cleartext bytes per block")
	level := flag.Int("level", 0, "flate level (0: default)")
	flag.Parse()
	if flag.NArg() != 2 {
		fmt.Fprintln(os.Stderr, "usage: seekgz_encode [-block N] [-level L] IN OUT")
		os.Exit(2)
	}
	if err := run(flag.Arg(0), flag.Arg(1), *block, *level); err != nil {
		fmt.Fprintln(os.Stderr, "seekgz_encode:", err)
		os.Exit(1)
	}
}

func run(in, out string, block, level int) error {
	src, err := os.Open(in)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.Create(out)
	if err != nil {
		return err
	}
	defer dst.Close()
	start := time.Now()
	w, err := seekgz.NewWriter(dst, seekgz.Options{BlockSize: block, Level: level})
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, src); err != nil {
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	fmt.Printf("%.3f\n", time.Since(start).Seconds())
	return dst.Sync()
}
