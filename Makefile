# The two commands a new user needs are `make demo` and `make test`.
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/klipper-encprint/encprint/helper/version.Version=$(VERSION)
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

## test: every test: Go unit tests, then the Python suite on the real stack.
test: setup build lint test-go test-py

test-go:
	$(GO) vet ./...
	$(GO) test -count=1 ./...
	$(GO) test -run '^$$' -fuzz FuzzParseHeader -fuzztime 10s ./helper/encfile

test-py:
	$(PY) -m pytest tests

lint:
	@test -z "$$(gofmt -l helper)" || { gofmt -l helper; echo "gofmt: files above need formatting"; exit 1; }
	.venv/bin/ruff check moonraker-component klippy-extras tests bench

## demo: a local printer stack prints an encrypted part end to end.
demo: setup build
	$(PY) tests/demo.py $(if $(KEEP),--keep,)

## bench: decrypt benchmarks (helper vs age -d vs cat), JSON in bench/results/.
bench: setup build
	$(PY) bench/decrypt.py $(if $(SIZES),--sizes $(SIZES),)

clean:
	rm -rf bin dist
