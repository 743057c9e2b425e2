# The build line is the Dockerfile's build step, so `make build` proves the image builds.
.PHONY: build test vet fmt run clean

build:
	CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o bin/threeds-records .

# Starts a throwaway PostgreSQL unless DATABASE_URL is already set.
test:
	scripts/with-postgres.sh go test -race -count=1 ./...

vet:
	go vet ./...

fmt:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

run:
	scripts/demo.sh

clean:
	scripts/pg.sh stop .demo/pg
	rm -rf bin .demo
