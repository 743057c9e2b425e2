# Build: docker build -t threeds-records .
FROM golang:1.26 AS build
WORKDIR /src
# Dependencies first: this layer is reused until go.mod/go.sum change.
COPY go.mod go.sum ./
RUN go mod download && go mod verify
COPY . .
# Same build line as `make build` (static binary, no cgo, no local paths).
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/threeds-records .

# distroless/static carries CA certificates (JWKS_URL over https) and tzdata, nothing else.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/threeds-records /threeds-records
USER nonroot:nonroot
EXPOSE 8080
ENTRYPOINT ["/threeds-records"]
