# prism-cdc build and test targets.

GO       ?= go
BIN      ?= bin/prism-cdc
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# Fuzz budgets are execution counts: Go 1.26's fuzz coordinator can report a
# spurious "context deadline exceeded" at the end of a duration budget
# (golang/go#75804, fixed in Go 1.27).
FUZZTIME ?= 100000x

.PHONY: build demo vet test test-pg16 pg16 plugin fuzz-short clean

## build: compile the prism-cdc binary into bin/
build:
	$(GO) build -ldflags '-X main.version=$(VERSION)' -o $(BIN) ./cmd/prism-cdc

## demo: run the local multi-region demo (throwaway clusters, failures played live)
demo:
	scripts/demo.sh

## vet: run go vet on every package and check that gofmt has nothing to change
vet:
	$(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt would change these files (run gofmt -w):"; echo "$$unformatted"; exit 1; fi

## test: vet, run every test with the race detector (starts throwaway PostgreSQL clusters), then fuzz-short
test: pg16 plugin
	$(MAKE) vet
	$(GO) test -race -count=1 -timeout 15m ./...
	$(MAKE) fuzz-short

## test-pg16: run the suite with PostgreSQL 16's server binaries first on PATH
## (every package but internal/bootstrap, whose schema copy needs a pg_dump of
## the server's version and the fetched binaries have none)
test-pg16: pg16
	PATH=$${PRISM_PG16_BIN:-/var/tmp/prism-cdc-pg16/bin}:$$PATH $(GO) test -race -count=1 -timeout 20m \
		$$($(GO) list ./... | grep -v /internal/bootstrap)

## pg16: fetch the PostgreSQL 16 server binaries some tests also run on (into /var/tmp/prism-cdc-pg16)
pg16:
	scripts/fetch-pg16.sh

## plugin: build contrib/prism_pgoutput for the machine's PostgreSQL, for the tests and prism-bench (into /var/tmp/prism-cdc-plugin/<major>)
plugin:
	scripts/build-prism-pgoutput.sh

## fuzz-short: run each fuzz target for a bounded number of executions
fuzz-short:
	$(GO) test -run='^$$' -fuzz='^FuzzParseSize$$' -fuzztime=$(FUZZTIME) ./internal/config
	$(GO) test -run='^$$' -fuzz='^FuzzParse$$' -fuzztime=$(FUZZTIME) ./internal/config
	$(GO) test -run='^$$' -fuzz='^FuzzAssembler$$' -fuzztime=$(FUZZTIME) ./pkg/decode
	$(GO) test -run='^$$' -fuzz='^FuzzDecodeFrame$$' -fuzztime=$(FUZZTIME) ./pkg/peers
	$(GO) test -run='^$$' -fuzz='^FuzzCodec$$' -fuzztime=$(FUZZTIME) ./pkg/decode
	$(GO) test -run='^$$' -fuzz='^FuzzFilter$$' -fuzztime=$(FUZZTIME) ./internal/scope

## clean: remove build output
clean:
	rm -rf bin
