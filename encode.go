package main

import (
	"encoding/json"
	"math"
	"strconv"
	"unicode/utf8"
)

// marshalBody is json.Marshal with a hand-written path for the one body
// that is hot: a page of records. It produces the same bytes encoding/json
// would (field order, HTML escaping of <>&, \ufffd for invalid UTF-8,
// \u2028/\u2029), which encode_test.go checks against json.Marshal, and
// leaves room for the newline writeJSON appends, so the page is built in one
// allocation without reflection.
func marshalBody(body any) ([]byte, error) {
	if sb, ok := body.(successBody); ok {
		if page, ok := sb.Data.(recordsPage); ok {
			return appendSuccessPage(make([]byte, 0, pageSizeHint(sb.Status, page)), sb.Status, page), nil
		}
	}
	return json.Marshal(body)
}

// pageSizeHint is the encoded length when nothing needs escaping, plus one
// byte for writeJSON's newline and a little room for a few escapes (a
// merchant called "M&S" costs 5 more bytes).
func pageSizeHint(status string, p recordsPage) int {
	n := len(`{"status":"","data":{"page":,"page_size":,"total":,"total_pages":,"records":[]}}`) + len(status) + 1 + 64 +
		intLen(int64(p.Page)) + intLen(int64(p.PageSize)) + intLen(p.Total) + intLen(p.TotalPages)
	for i := range p.Records {
		r := &p.Records[i]
		n += len(`{"id":,"passcode":"","amount":"","currency":"","merchant_name":"","expires_after":,"received_at":""},`) +
			intLen(r.ID) + intLen(r.ExpiresAfter) +
			len(r.Passcode) + len(r.Amount) + len(r.Currency) + len(r.MerchantName) + len(r.ReceivedAt)
	}
	return n
}

// intLen is the length of n in decimal, sign included.
func intLen(n int64) int {
	l := 1
	if n < 0 {
		l++
		if n == math.MinInt64 {
			return 20
		}
		n = -n
	}
	for n >= 10 {
		n /= 10
		l++
	}
	return l
}

func appendSuccessPage(b []byte, status string, p recordsPage) []byte {
	b = append(b, `{"status":`...)
	b = appendJSONString(b, status)
	b = append(b, `,"data":{"page":`...)
	b = strconv.AppendInt(b, int64(p.Page), 10)
	b = append(b, `,"page_size":`...)
	b = strconv.AppendInt(b, int64(p.PageSize), 10)
	b = append(b, `,"total":`...)
	b = strconv.AppendInt(b, p.Total, 10)
	b = append(b, `,"total_pages":`...)
	b = strconv.AppendInt(b, p.TotalPages, 10)
	b = append(b, `,"records":`...)
	if p.Records == nil {
		// What encoding/json writes for a nil slice; the store never
		// returns one, but the bytes must not depend on that.
		b = append(b, "null"...)
	} else {
		b = append(b, '[')
		for i := range p.Records {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendRecord(b, &p.Records[i])
		}
		b = append(b, ']')
	}
	return append(b, "}}"...)
}

// appendRecord follows Record's field order and json tags.
func appendRecord(b []byte, r *Record) []byte {
	b = append(b, `{"id":`...)
	b = strconv.AppendInt(b, r.ID, 10)
	b = append(b, `,"passcode":`...)
	b = appendJSONString(b, r.Passcode)
	b = append(b, `,"amount":`...)
	b = appendJSONString(b, r.Amount)
	b = append(b, `,"currency":`...)
	b = appendJSONString(b, r.Currency)
	b = append(b, `,"merchant_name":`...)
	b = appendJSONString(b, r.MerchantName)
	b = append(b, `,"expires_after":`...)
	b = strconv.AppendInt(b, r.ExpiresAfter, 10)
	b = append(b, `,"received_at":`...)
	b = appendJSONString(b, r.ReceivedAt)
	return append(b, '}')
}

const hexDigits = "0123456789abcdef"

// appendJSONString is encoding/json's string encoding with HTML escaping on,
// the json.Marshal default: <, > and & become \u003c, \u003e and \u0026 so a
// merchant name can never close a <script> in a page that embeds the body.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		// Valid JSON as is, but not valid JavaScript (JSONP): encoding/json
		// escapes them unconditionally.
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
