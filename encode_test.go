package main

import (
	"bytes"
	"encoding/json"
	"math"
	"math/rand/v2"
	"strconv"
	"testing"
)

// assertSameAsEncodingJSON is the encoder's whole contract: for any page,
// the bytes json.Marshal would have produced.
func assertSameAsEncodingJSON(t *testing.T, body successBody) {
	t.Helper()
	want, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	got, err := marshalBody(body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("marshalBody differs from json.Marshal\n got: %q\nwant: %q", got, want)
	}
}

func pageWithMerchants(names ...string) successBody {
	p := benchPage()
	p.Records = p.Records[:0]
	for i, n := range names {
		p.Records = append(p.Records, Record{ID: int64(i + 1), Passcode: "012345", Amount: "1.00", Currency: "USD",
			MerchantName: n, ExpiresAfter: 300, ReceivedAt: "2026-01-20T10:30:00Z"})
	}
	return successBody{Status: "success", Data: p}
}

func TestMarshalBodyMatchesEncodingJSON(t *testing.T) {
	var allASCII []byte
	for c := range 128 {
		allASCII = append(allASCII, byte(c))
	}
	cases := map[string]successBody{
		"full page": {Status: "success", Data: benchPage()},
		"past the end": {Status: "success", Data: recordsPage{Page: 9, PageSize: 20, Total: 50, TotalPages: 3,
			Records: []Record{}}},
		"nil records": {Status: "success", Data: recordsPage{Page: 1, PageSize: 20}},
		"extreme numbers": {Status: "success", Data: recordsPage{Page: math.MaxInt32, PageSize: 100, Total: math.MaxInt64,
			TotalPages: math.MinInt64, Records: []Record{{ID: math.MinInt64, ExpiresAfter: math.MaxInt64}}}},
		"html":             pageWithMerchants("M&S <Food>", "</script><script>alert(1)</script>", "a&&b>>c<<"),
		"invalid utf-8":    pageWithMerchants("\xff", "caf\xc3", "\xe2\x82", "ok\xe2\x82\xacok", "\xed\xa0\x80", "\xf4\x90\x80\x80"),
		"line separators":  pageWithMerchants("a\u2028b\u2029c", "\u2027\u202a"),
		"unicode":          pageWithMerchants("Café", "中文商户", "🛒 Shop", "\u007f"),
		"controls, quotes": pageWithMerchants("\x00\x01\b\f\n\r\t\x1f", `"quoted" \back\slash/`),
		"every ascii byte": pageWithMerchants(string(allASCII)),
		"empty strings":    {Status: "", Data: recordsPage{Records: []Record{{}}}},
	}
	for name, body := range cases {
		t.Run(name, func(t *testing.T) { assertSameAsEncodingJSON(t, body) })
	}
}

func TestMarshalBodyMatchesEncodingJSONOnRandomBytes(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	// Bytes weighted towards the interesting ones: ASCII specials, UTF-8
	// lead and continuation bytes, and the pieces of U+2028.
	alphabet := []byte("aZ09 <>&\"\\/\x00\x1f\x7f\x80\xbf\xc0\xc3\xa9\xe2\x80\xa8\xa9\xed\xf0\x9f\xf4\xff")
	for range 3000 {
		names := make([]string, 1+rng.IntN(3))
		for i := range names {
			b := make([]byte, rng.IntN(12))
			for j := range b {
				if rng.IntN(4) == 0 {
					b[j] = byte(rng.IntN(256))
				} else {
					b[j] = alphabet[rng.IntN(len(alphabet))]
				}
			}
			names[i] = string(b)
		}
		assertSameAsEncodingJSON(t, pageWithMerchants(names...))
	}
}

func FuzzMarshalBody(f *testing.F) {
	f.Add("M&S <Food>", "0123", "\xff\u2028")
	f.Fuzz(func(t *testing.T, merchant, passcode, amount string) {
		body := pageWithMerchants(merchant)
		p := body.Data.(recordsPage)
		p.Records[0].Passcode, p.Records[0].Amount = passcode, amount
		assertSameAsEncodingJSON(t, body)
	})
}

// Bodies other than a page still go through encoding/json.
func TestMarshalBodyOtherBodies(t *testing.T) {
	for _, body := range []any{errorBody{Error: "x<", Details: "y&"}, map[string]string{"status": "ok"},
		successBody{Status: "success", Data: map[string]int{"a": 1}}} {
		want, _ := json.Marshal(body)
		got, err := marshalBody(body)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("marshalBody(%#v) = %q, %v; want %q", body, got, err, want)
		}
	}
}

func TestMarshalBodyAllocatesOnceForAPage(t *testing.T) {
	// Boxed once, as writeJSON's caller does, so only the encoder is counted.
	var body any = successBody{Status: "success", Data: benchPage()}
	allocs := testing.AllocsPerRun(100, func() {
		b, _ := marshalBody(body)
		_ = append(b, '\n') // what writeJSON does: must not reallocate
	})
	if allocs > 1 {
		t.Errorf("%v allocations per page, want 1", allocs)
	}
}

func TestIntLen(t *testing.T) {
	for _, n := range []int64{0, 9, 10, -1, -10, 99, 100, math.MaxInt64, math.MinInt64, math.MinInt64 + 1} {
		if got, want := intLen(n), len(strconv.FormatInt(n, 10)); got != want {
			t.Errorf("intLen(%d) = %d, want %d", n, got, want)
		}
	}
}
