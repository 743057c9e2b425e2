# The build line is the Dockerfile's build step, so `make build` proves the image builds.
.PHONY: build test vet fmt run clean

build:
	CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o bin/threeds-records .

# Starts a throwaway PostgreSQL unless DATABASE_URL is already set.
test:
	scripts/with-postgres.sh go test -race -count=1 ./...

# Throwaway PostgreSQL + seeded data + the real binary under load; prints the
# tables: the service beside ../shared/floor, then the event-stream scenario
# and its production cases on 5 M rows of history (about 10 minutes).
# BENCH_ARGS passes flags to the bench tool, e.g. BENCH_ARGS='-only stream',
# '-only pages' or '-only stream -stream-parts production -source wal'.
.PHONY: bench
bench:
	bench/run.sh

# What each STREAM_SOURCE costs the writer on a durable cluster, side by side
# with no source (about 5 minutes); see bench/writer-cost.sh.
.PHONY: bench-writer
bench-writer:
	bench/writer-cost.sh

# Faults and hostile clients against the real binary under load (about 3
# minutes, not part of test); fails when a value that must be 0 is not.
# SOAK_ARGS passes flags to the soak program, e.g. SOAK_ARGS='-scale 0.2'.
.PHONY: soak
soak:
	scripts/soak.sh $(SOAK_ARGS)

vet:
	go vet ./...

fmt:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

run:
	scripts/demo.sh

clean:
	scripts/pg.sh stop .demo/pg
	rm -rf bin .demo
