// Command streamcount holds event streams open and counts the records they
// receive, for bench/writer-cost.sh: the writer's cost is measured while a
// real service delivers every record to a real stream.
//
//	streamcount -addr 127.0.0.1:8080 -tokens tokens.txt -count-file count
//
// tokens.txt has one "USER TOKEN" pair a line; one stream is opened per line.
// Once every stream has sent `event: ready` it prints "ready N" on stdout and
// from then on rewrites -count-file every 100 ms with the number of records
// received after ready. On SIGTERM or SIGINT it prints "received R
// duplicates D ends E" and exits 0. A stream refused or ended before ready
// prints "refused: ..." and exits 3.
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type counter struct {
	received, duplicates, ends atomic.Int64
}

func main() {
	addr := flag.String("addr", "", "the service's host:port")
	tokensPath := flag.String("tokens", "", `file of "USER TOKEN" lines, one stream each`)
	countFile := flag.String("count-file", "", "file rewritten every 100 ms with the records received after ready")
	readyTimeout := flag.Duration("ready-timeout", 30*time.Second, "how long every stream may take to send ready")
	flag.Parse()
	if *addr == "" || *tokensPath == "" || *countFile == "" {
		flag.Usage()
		os.Exit(2)
	}
	tokens, err := readTokens(*tokensPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "streamcount:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	var c counter
	ready := make(chan error, len(tokens))
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	until := time.Now().Add(*readyTimeout)
	for _, tok := range tokens {
		go stream(ctx, client, "http://"+*addr+"/3ds/my-records/events", tok, until, &c, ready)
	}
	deadline := time.After(*readyTimeout + time.Second)
	for range tokens {
		select {
		case err := <-ready:
			if err != nil {
				fmt.Println("refused:", err)
				os.Exit(3)
			}
		case <-deadline:
			fmt.Println("refused: not every stream was ready within", *readyTimeout)
			os.Exit(3)
		case <-ctx.Done():
			os.Exit(3)
		}
	}
	fmt.Println("ready", len(tokens))

	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if err := writeCount(*countFile, c.received.Load()); err != nil {
			fmt.Fprintln(os.Stderr, "streamcount:", err)
			os.Exit(1)
		}
		select {
		case <-ctx.Done():
			fmt.Printf("received %d duplicates %d ends %d\n", c.received.Load(), c.duplicates.Load(), c.ends.Load())
			return
		case <-tick.C:
		}
	}
}

func readTokens(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var tokens []string
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("%s: %q is not USER TOKEN", path, line)
		}
		tokens = append(tokens, f[1])
	}
	return tokens, nil
}

// writeCount replaces path atomically, so a reader never sees half a number.
func writeCount(path string, n int64) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.FormatInt(n, 10)+"\n"), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// stream reads one event stream until ctx ends; ready gets one value: nil
// after `event: ready`, else why the stream failed before it. A refused
// open (a service still starting, its source session not up yet) is tried
// again every 250 ms until until.
func stream(ctx context.Context, client *http.Client, url, token string, until time.Time, c *counter, ready chan<- error) {
	var once sync.Once
	signal := func(err error) { once.Do(func() { ready <- err }) }
	resp, err := open(ctx, client, url, token)
	for err != nil && time.Now().Before(until) && ctx.Err() == nil {
		time.Sleep(250 * time.Millisecond)
		resp, err = open(ctx, client, url, token)
	}
	if err != nil {
		signal(err)
		return
	}
	defer resp.Body.Close()
	seen := map[string]bool{}
	isReady := false
	event, id := "", ""
	br := bufio.NewReader(resp.Body)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			signal(fmt.Errorf("stream ended before ready: %w", err))
			return
		}
		line = strings.TrimRight(line, "\r\n")
		switch {
		case line == "":
			switch {
			case event == "ready" && !isReady:
				isReady = true
				signal(nil)
			case event == "record" && isReady:
				if seen[id] {
					c.duplicates.Add(1)
				} else {
					seen[id] = true
					c.received.Add(1)
				}
			case event == "end":
				c.ends.Add(1)
			}
			event, id = "", ""
		case strings.HasPrefix(line, "event:"):
			event = strings.TrimSpace(line[len("event:"):])
		case strings.HasPrefix(line, "id:"):
			id = strings.TrimSpace(line[len("id:"):])
		}
	}
}

// open asks for one stream; anything but a 200 is an error.
func open(ctx context.Context, client *http.Client, url, token string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		resp.Body.Close()
		return nil, fmt.Errorf("HTTP %d %s", resp.StatusCode, bytes.TrimSpace(body))
	}
	return resp, nil
}
