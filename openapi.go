package main

import (
	_ "embed"
	"net/http"
	"strconv"
)

// openAPIDoc is the OpenAPI 3.1 description of every route newServer
// registers; openapi_test.go checks real responses against it, so the two
// cannot drift apart unnoticed.
//
//go:embed openapi.json
var openAPIDoc []byte

// handleOpenAPI serves the embedded document byte for byte. It sets the same
// headers writeJSON does but skips its json.Marshal, which would re-encode
// the document (and HTML-escape its patterns) on every request.
func handleOpenAPI(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Server-Timing", serverTiming(requestInfoFrom(r.Context())))
	h.Set("Content-Length", strconv.Itoa(len(openAPIDoc)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(openAPIDoc)
}
