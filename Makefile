# The two commands a new user needs are `make demo` and `make test`.
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# SYSTEM_ROOT=DIR (install.sh --system-root, for tests and unusual layouts)
# moves the installed helper's privileged files (helper/privsep) under DIR;
# release binaries and a plain `make` keep privsep's defaults. install.sh
# lays the files out at the same places.
SYSTEM_ROOT ?=
PRIVSEP := github.com/klipper-encprint/encprint/helper/privsep
LDFLAGS := -s -w -X github.com/klipper-encprint/encprint/helper/version.Version=$(VERSION) \
	$(if $(SYSTEM_ROOT),-X $(PRIVSEP).IdentityPath=$(SYSTEM_ROOT)/var/lib/encprint/identity \
	-X $(PRIVSEP).PolicyPath=$(SYSTEM_ROOT)/etc/encprint/policy.json \
	-X $(PRIVSEP).StateDir=$(SYSTEM_ROOT)/var/lib/encprint/state)
PY      := .venv/bin/python
GOFILES := $(shell find helper -name '*.go' 2>/dev/null) go.mod go.sum

.PHONY: all build setup test test-go test-py lint demo bench dist clean

all: build

setup:
	@./scripts/bootstrap.sh

bin/encprint: $(GOFILES)
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./helper/cmd/encprint

bin/encprint-helper: $(GOFILES)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./helper/cmd/encprint-helper

build: bin/encprint bin/encprint-helper

# The helper with SYSTEM_ROOT's paths, always rebuilt (the paths are not a
# file make could compare); install.sh installs it only if it changed.
bin/encprint-helper-sysroot: FORCE
	@test -n "$(SYSTEM_ROOT)" || { echo "$@ needs SYSTEM_ROOT=DIR"; exit 1; }
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./helper/cmd/encprint-helper
FORCE:

## test: every test: Go unit tests, then the Python suite on the real stack.
test: setup build lint test-go dist test-py

test-go:
	$(GO) vet ./...
	$(GO) test -count=1 ./...
	$(GO) test -run '^$$' -fuzz FuzzParseHeader -fuzztime 10s ./helper/encfile
	$(GO) test -run '^$$' -fuzz FuzzMessage -fuzztime 10s ./helper/ipc
	$(GO) test -run '^$$' -fuzz FuzzReadIndex -fuzztime 10s ./helper/seekgz

test-py:
	$(PY) -m pytest tests

lint:
	@test -z "$$(gofmt -l helper)" || { gofmt -l helper; echo "gofmt: files above need formatting"; exit 1; }
	.venv/bin/ruff check moonraker-component klippy-extras tests bench scripts
	shellcheck -x install.sh uninstall.sh scripts/bootstrap.sh scripts/system_layout.sh .ci/run

## demo: a local printer stack prints an encrypted part end to end.
demo: setup build
	$(PY) tests/demo.py $(if $(KEEP),--keep,)

## bench: decrypt benchmarks (helper vs age -d vs cat), JSON in bench/results/.
bench: setup build
	$(PY) bench/decrypt.py $(if $(SIZES),--sizes $(SIZES),)
	$(PY) bench/decrypt.py --payloads
	$(PY) bench/start_latency.py
	if [ "$$(id -u)" = 0 ]; then $(PY) bench/privsep.py; else echo "bench/privsep.py needs root (it installs a set-user-ID helper copy)"; fi
	$(GO) test -run '^$$' -bench Decrypt256MiB -benchmem -count 3 ./helper/encfile

## dist: release binaries for every supported platform, with SHA256SUMS.
# The helper is Linux-only (printers); encprint also runs on macOS and Windows.
# mipsle is for Creality K1-class hosts (MIPS32 little-endian, no FPU:
# GOMIPS=softfloat, which the other architectures ignore).
DIST_LINUX := amd64:amd64: arm64:arm64: armv7:arm:7 armv6:arm:6 mipsle:mipsle:
dist:
	rm -rf dist && mkdir -p dist
	set -e; for t in $(DIST_LINUX); do \
	    name=$${t%%:*}; rest=$${t#*:}; arch=$${rest%%:*}; arm=$${rest#*:}; \
	    for cmd in encprint encprint-helper; do \
	        CGO_ENABLED=0 GOOS=linux GOARCH=$$arch GOARM=$$arm GOMIPS=softfloat $(GO) build -trimpath \
	            -ldflags '$(LDFLAGS)' -o dist/$$cmd-linux-$$name ./helper/cmd/$$cmd; \
	    done; \
	done
	set -e; for t in darwin:amd64 darwin:arm64 windows:amd64; do \
	    os=$${t%%:*}; arch=$${t#*:}; ext=; [ $$os = windows ] && ext=.exe; \
	    CGO_ENABLED=0 GOOS=$$os GOARCH=$$arch $(GO) build -trimpath -ldflags '$(LDFLAGS)' \
	        -o dist/encprint-$$os-$$arch$$ext ./helper/cmd/encprint; \
	done
	cd dist && sha256sum * > SHA256SUMS

clean:
	rm -rf bin dist
