// Command threeds-records serves a signed-in cardholder's 3-D Secure
// one-time passcode records: GET /3ds/my-records.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// Once shutdown has begun, a second signal gets the default action:
		// an operator's second Ctrl-C ends a drain that is taking too long.
		<-ctx.Done()
		stop()
	}()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "threeds-records:", err)
		var ce *configError
		if errors.As(err, &ce) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// configError is a missing or malformed setting: exit code 2, and the
// message names the variable.
type configError struct {
	name string
	msg  string
}

func (e *configError) Error() string { return e.name + ": " + e.msg }

type config struct {
	poolConfig      *pgxpool.Config
	poolSizeFrom    string // poolSizeFromURL or poolSizeFromGOMAXPROCS
	auth            authConfig
	listenAddr      string
	shutdownTimeout time.Duration
	shutdownDelay   time.Duration
	queryTimeout    time.Duration
	logLevel        slog.Level
	maxInFlight     int

	// The event stream (contract section 6): where new records come from,
	// the source session's target and the limits. migrate reads
	// streamSource too: it installs what that source needs.
	streamSource    string
	listenConfig    *pgx.ConnConfig
	streamsMax      int
	streamsPerUser  int
	streamHeartbeat time.Duration
}

// loadConfig reads every variable of the contract. migrateOnly asks for the
// database alone: the migration Job has no keys and no issuer.
func loadConfig(getenv func(string) string, migrateOnly bool) (*config, error) {
	c := &config{}
	var err error
	if c.queryTimeout, err = durationVar(getenv, "DB_QUERY_TIMEOUT", 3*time.Second); err != nil {
		return nil, err
	}
	if c.queryTimeout < minQueryTimeout || c.queryTimeout > maxQueryTimeout {
		// statement_timeout is whole milliseconds: under 1ms it would be sent
		// as 0, which PostgreSQL reads as "no limit".
		return nil, &configError{"DB_QUERY_TIMEOUT", fmt.Sprintf("%s is outside %s..%s", c.queryTimeout, minQueryTimeout, maxQueryTimeout)}
	}
	databaseURL := getenv("DATABASE_URL")
	if databaseURL == "" {
		return nil, &configError{"DATABASE_URL", "is required"}
	}
	if c.poolConfig, err = pgxpool.ParseConfig(databaseURL); err != nil {
		// The parse error may quote the URL, password included: say less.
		return nil, &configError{"DATABASE_URL", "is not a valid PostgreSQL connection string or URL"}
	}
	c.poolSizeFrom = poolSizeFromURL
	if !hasPoolMaxConns(databaseURL) {
		c.poolConfig.MaxConns = defaultPoolSize(runtime.GOMAXPROCS(0))
		c.poolSizeFrom = poolSizeFromGOMAXPROCS
	}
	rp := c.poolConfig.ConnConfig.RuntimeParams
	if _, set := rp["statement_timeout"]; !set && !migrateOnly {
		// A context deadline only abandons the query on the Go side; the
		// server keeps running it unless it has its own limit.
		rp["statement_timeout"] = strconv.FormatInt(c.queryTimeout.Milliseconds(), 10)
	}
	if _, set := rp["application_name"]; !set {
		rp["application_name"] = "threeds-records"
	}
	if c.poolConfig.ConnConfig.ConnectTimeout == 0 {
		// Without connect_timeout pgxpool lets a connection attempt run for two
		// minutes in the background; against a black-holed host that holds
		// every pool slot and delays recovery long after the database is back.
		c.poolConfig.ConnConfig.ConnectTimeout = defaultConnectTimeout
	}
	if c.logLevel, err = logLevelVar(getenv); err != nil {
		return nil, err
	}
	if c.streamSource, err = streamSourceVar(getenv); err != nil {
		return nil, err
	}
	if migrateOnly {
		return c, nil
	}

	a := &c.auth
	a.jwksURL, a.jwksFile = getenv("JWKS_URL"), getenv("JWKS_FILE")
	switch {
	case a.jwksURL == "" && a.jwksFile == "":
		return nil, &configError{"JWKS_URL", "or JWKS_FILE is required"}
	case a.jwksURL != "" && a.jwksFile != "":
		return nil, &configError{"JWKS_URL", "and JWKS_FILE are both set; set exactly one"}
	case a.jwksURL != "":
		u, err := url.Parse(a.jwksURL)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return nil, &configError{"JWKS_URL", "must be an absolute http(s) URL"}
		}
		a.refreshEvery, a.minRefreshGap = 30*time.Second, 5*time.Second
	default:
		// A mounted file is cheap to re-read; Kubernetes swaps ConfigMap
		// contents without telling the process.
		a.refreshEvery, a.minRefreshGap = 2*time.Second, time.Second
	}
	if a.issuer = getenv("JWT_ISSUER"); a.issuer == "" {
		return nil, &configError{"JWT_ISSUER", "is required"}
	}
	a.audience = getenv("JWT_AUDIENCE")
	if a.userClaim = getenv("JWT_USER_CLAIM"); a.userClaim == "" {
		a.userClaim = "sub"
	}
	if a.leeway, err = durationVar(getenv, "JWT_LEEWAY", 30*time.Second); err != nil {
		return nil, err
	}
	if a.leeway > 5*time.Minute {
		return nil, &configError{"JWT_LEEWAY", "must be at most 5m"}
	}
	if c.listenAddr = getenv("LISTEN_ADDR"); c.listenAddr == "" {
		c.listenAddr = ":8080"
	}
	_, port, err := net.SplitHostPort(c.listenAddr)
	if err != nil || port == "" {
		return nil, &configError{"LISTEN_ADDR", "must be host:port or :port"}
	}
	if !validPort(port) {
		// Port 0 would listen on a port nobody knows; a name or a number out
		// of range would only fail later, at listen, without naming the variable.
		return nil, &configError{"LISTEN_ADDR", fmt.Sprintf("port %q must be a number in 1..65535", port)}
	}
	if c.shutdownTimeout, err = durationVar(getenv, "SHUTDOWN_TIMEOUT", 15*time.Second); err != nil {
		return nil, err
	}
	if c.shutdownDelay, err = durationVar(getenv, "SHUTDOWN_DELAY", 0); err != nil {
		return nil, err
	}
	if c.shutdownDelay >= c.shutdownTimeout {
		// The delay is spent inside SHUTDOWN_TIMEOUT, so that one number bounds
		// SIGTERM-to-exit (terminationGracePeriodSeconds is sized from it);
		// a delay that uses it all up would leave no time to drain.
		return nil, &configError{"SHUTDOWN_DELAY", "must be shorter than SHUTDOWN_TIMEOUT"}
	}
	if c.maxInFlight, err = maxInFlightVar(getenv); err != nil {
		return nil, err
	}
	if err := loadStreamConfig(getenv, c); err != nil {
		return nil, err
	}
	return c, nil
}

// loadStreamConfig reads the event stream's variables. DATABASE_LISTEN_URL
// defaults to DATABASE_URL's settings, under an application_name of its own
// so the LISTEN session is told apart from the query pool in
// pg_stat_activity.
func loadStreamConfig(getenv func(string) string, c *config) error {
	if raw := getenv("DATABASE_LISTEN_URL"); raw != "" {
		// Parsed as the pool's URL is, so that pool parameters copied from
		// DATABASE_URL (pool_max_conns, ...) are taken out rather than
		// sent to the server as settings it refuses at every connect.
		pc, err := pgxpool.ParseConfig(raw)
		if err != nil {
			// The parse error may quote the URL, password included.
			return &configError{"DATABASE_LISTEN_URL", "is not a valid PostgreSQL connection string or URL"}
		}
		cc := pc.ConnConfig
		rp := cc.RuntimeParams
		if _, set := rp["statement_timeout"]; !set {
			rp["statement_timeout"] = strconv.FormatInt(c.queryTimeout.Milliseconds(), 10)
		}
		if _, set := rp["application_name"]; !set {
			rp["application_name"] = "threeds-records-listen"
		}
		if cc.ConnectTimeout == 0 {
			cc.ConnectTimeout = defaultConnectTimeout
		}
		c.listenConfig = cc
	} else {
		c.listenConfig = c.poolConfig.ConnConfig.Copy()
		if c.listenConfig.RuntimeParams["application_name"] == "threeds-records" {
			c.listenConfig.RuntimeParams["application_name"] = "threeds-records-listen"
		}
	}
	var err error
	if c.streamsMax, err = intVar(getenv, "STREAMS_MAX", 10000, 1, 1_000_000); err != nil {
		return err
	}
	if c.streamsPerUser, err = intVar(getenv, "STREAMS_PER_USER", 5, 1, 1000); err != nil {
		return err
	}
	if c.streamHeartbeat, err = durationVar(getenv, "STREAM_HEARTBEAT", 15*time.Second); err != nil {
		return err
	}
	if c.streamHeartbeat < time.Second || c.streamHeartbeat > 5*time.Minute {
		// Gateways and load balancers close connections idle for about a
		// minute, so a longer silence defeats the heartbeat's purpose; a
		// shorter one than a second is a typo that floods every client.
		return &configError{"STREAM_HEARTBEAT", fmt.Sprintf("%s is outside 1s..5m", c.streamHeartbeat)}
	}
	return nil
}

// streamSourceVar reads STREAM_SOURCE: notify (default) or wal.
func streamSourceVar(getenv func(string) string) (string, error) {
	switch s := getenv("STREAM_SOURCE"); s {
	case "", sourceNotify:
		return sourceNotify, nil
	case sourceWAL:
		return sourceWAL, nil
	default:
		return "", &configError{"STREAM_SOURCE", fmt.Sprintf("%q must be notify or wal", s)}
	}
}

// intVar reads a decimal integer in lo..hi.
func intVar(getenv func(string) string, name string, def, lo, hi int) (int, error) {
	s := getenv(name)
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		return 0, &configError{name, fmt.Sprintf("%q is not an integer from %d to %d", s, lo, hi)}
	}
	return n, nil
}

// defaultConnectTimeout applies when DATABASE_URL has no connect_timeout.
const defaultConnectTimeout = 5 * time.Second

// The range of DB_QUERY_TIMEOUT the contract allows.
const (
	minQueryTimeout = time.Millisecond
	maxQueryTimeout = 24 * time.Hour
)

// validPort reports whether s is a TCP port number in 1..65535, in digits only.
func validPort(s string) bool {
	if s == "" || len(s) > 5 {
		return false
	}
	n := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
		n = n*10 + int(c-'0')
	}
	return n >= 1 && n <= 65535
}

func durationVar(getenv func(string) string, name string, def time.Duration) (time.Duration, error) {
	s := getenv(name)
	if s == "" {
		return def, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 || (d == 0 && def != 0 && name != "JWT_LEEWAY") {
		return 0, &configError{name, fmt.Sprintf("%q is not a positive duration such as 30s", s)}
	}
	return d, nil
}

func logLevelVar(getenv func(string) string) (slog.Level, error) {
	switch strings.ToLower(getenv("LOG_LEVEL")) {
	case "", "info":
		return slog.LevelInfo, nil
	case "debug":
		return slog.LevelDebug, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, &configError{"LOG_LEVEL", "must be one of debug, info, warn, error"}
}

// redactedURL is DATABASE_URL fit for a log line.
func redactedURL(pc *pgxpool.Config) string { return redactedConnURL(pc.ConnConfig) }

// redactedJWKSURL hides credentials an operator may have put in JWKS_URL
// (user:password@ or a query-string key), keeping the host for debugging.
func redactedJWKSURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable)"
	}
	if u.User != nil {
		u.User = url.UserPassword("xxxxx", "xxxxx")
	}
	if u.RawQuery != "" {
		u.RawQuery = "xxxxx"
	}
	return u.String()
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	migrate := false
	switch {
	case len(args) == 0:
	case len(args) == 1 && args[0] == "migrate":
		migrate = true
	default:
		return &configError{"arguments", fmt.Sprintf("unknown %q; usage: threeds-records [migrate]", strings.Join(args, " "))}
	}
	cfg, err := loadConfig(getenv, migrate)
	if err != nil {
		return err
	}
	// Access-log lines are written in batches (accesslog.go); Close writes
	// out the last of them however run returns, after the server has drained.
	logger, logOut := newBufferedLogger(stdout, cfg.logLevel)
	defer logOut.Close()

	pool, err := newPool(ctx, cfg, logger)
	if err != nil {
		return fmt.Errorf("create pool: %w", err)
	}
	defer pool.Close()
	if migrate {
		// No per-statement limit: building the index on a table the writer
		// has already filled may take minutes.
		return runMigrate(ctx, NewStore(pool, 0), cfg, logger)
	}
	return serve(ctx, cfg, NewStore(pool, cfg.queryTimeout), logger)
}

func serve(ctx context.Context, cfg *config, store *Store, logger *slog.Logger) error {
	verifier := NewVerifier(cfg.auth, logger)
	defer verifier.Close()
	hub := newHub(hubConfig{
		source:       cfg.streamSource,
		conn:         cfg.listenConfig,
		maxStreams:   cfg.streamsMax,
		perUser:      cfg.streamsPerUser,
		heartbeat:    cfg.streamHeartbeat,
		queryTimeout: cfg.queryTimeout,
	}, logger)
	hub.start()
	defer hub.shutdown()
	srv := newServer(store, verifier, hub, logger, withMaxInFlight(cfg.maxInFlight))

	ln, err := listenTCP(ctx, cfg.listenAddr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	httpServer := &http.Server{
		Handler:           srv,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      cfg.queryTimeout + 10*time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	keys := "JWKS_URL=" + redactedJWKSURL(cfg.auth.jwksURL)
	if cfg.auth.jwksFile != "" {
		keys = "JWKS_FILE=" + cfg.auth.jwksFile
	}
	logger.Info("listening",
		"addr", ln.Addr().String(),
		"database", redactedURL(cfg.poolConfig),
		"listen_database", redactedConnURL(cfg.listenConfig),
		"keys", keys,
		"issuer", cfg.auth.issuer,
		"audience", cfg.auth.audience,
		"user_claim", cfg.auth.userClaim,
		"leeway", cfg.auth.leeway.String(),
		"db_query_timeout", cfg.queryTimeout.String(),
		"db_pool_max_conns", cfg.poolConfig.MaxConns,
		"db_pool_max_conns_from", cfg.poolSizeFrom,
		"gomaxprocs", runtime.GOMAXPROCS(0),
		"max_in_flight", cfg.maxInFlight,
		"shutdown_timeout", cfg.shutdownTimeout.String(),
		"shutdown_delay", cfg.shutdownDelay.String(),
		"stream_source", cfg.streamSource,
		"streams_max", cfg.streamsMax,
		"streams_per_user", cfg.streamsPerUser,
		"stream_heartbeat", cfg.streamHeartbeat.String(),
		"log_level", cfg.logLevel.String(),
	)

	serveErr := make(chan error, 1)
	go func() { serveErr <- httpServer.Serve(ln) }()

	select {
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}

	return shutdown(cfg, httpServer, srv, store, verifier, hub, logger)
}

// Vanished peers (contract section 6): a phone that dropped off the network
// leaves its connection open until TCP gives up, about 15 minutes, holding
// its places under STREAMS_MAX and STREAMS_PER_USER. Keepalive probes find
// an idle one, and peerTimeout, as TCP_USER_TIMEOUT, closes a connection
// whose probes or writes stay unacknowledged that long: a vanished peer is
// cut within about keepalive idle + peerTimeout (45 s), and its stream's
// request context ends, which frees its places.
const (
	peerTimeout   = 30 * time.Second
	keepAliveIdle = 15 * time.Second
)

// listenTCP listens on addr; every accepted connection gets the keepalive
// and the peer timeout above.
func listenTCP(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{KeepAliveConfig: net.KeepAliveConfig{
		Enable: true, Idle: keepAliveIdle, Interval: 5 * time.Second, Count: 3,
	}}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return peerTimeoutListener{ln}, nil
}

type peerTimeoutListener struct{ net.Listener }

func (l peerTimeoutListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		// Best effort: where the option is missing the keepalive still
		// cuts the connection, later.
		_ = setPeerTimeout(tc, peerTimeout)
	}
	return c, nil
}

// shutdown runs the SIGTERM sequence. Readiness turns 503 first so the load
// balancer stops sending; then in-flight requests drain. Serve returns at
// once on Shutdown, so it is Shutdown's return that says the handlers are
// done, and only then may the pool close under them.
func shutdown(cfg *config, httpServer *http.Server, srv *server, store *Store, verifier *Verifier, hub *hub, logger *slog.Logger) error {
	// One deadline for the whole sequence, delay included: SHUTDOWN_TIMEOUT
	// is the longest SIGTERM-to-exit takes, which is what the grace period
	// of the orchestrator has to cover.
	ctx, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
	defer cancel()
	srv.draining.Store(true)
	logger.Info("shutting down", "delay", cfg.shutdownDelay.String(), "timeout", cfg.shutdownTimeout.String())
	if cfg.shutdownDelay > 0 {
		// Without a preStop hook, this is the window in which endpoints
		// controllers notice the 503 readiness and stop routing here; the
		// listener stays open and keeps serving meanwhile, event streams
		// included: a browser's EventSource that reconnects here now and
		// meets a 503 would give up for good.
		time.Sleep(cfg.shutdownDelay)
	}
	// Draining starts: event streams end now with shutting_down (their
	// clients reconnect to another replica) and new ones are refused, so
	// Shutdown does not wait on them.
	hub.shutdown()
	if err := httpServer.Shutdown(ctx); err != nil {
		logger.Warn("shutdown timed out; closing remaining connections", "error", err.Error())
		_ = httpServer.Close()
	}
	verifier.Close()
	// After a timed-out Shutdown a handler may still hold a connection; Close
	// waits for it, and DB_QUERY_TIMEOUT bounds that wait.
	store.pool.Close()
	logger.Info("stopped", "pool", "closed")
	return nil
}
