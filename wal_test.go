package main

import (
	"context"
	"os"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The stream tests of events_test.go run once per source: as written with
// notify (the default), and again under TestEveryStreamTestWithTheWalSource
// with wal. STREAM_TEST_SOURCE=wal runs every one of them with wal.
const walSubtestsOf = "TestEveryStreamTestWithTheWalSource/"

// streamTestsForEachSource are the tests of events_test.go that open
// streams fed by a source. Left out: the config errors (no source runs) and
// the PgBouncer verdict (each source says it its own way: see
// TestWalThroughPgBouncerAnswers503SayingSo).
var streamTestsForEachSource = []func(*testing.T){
	TestStreamStartsWithRetryThenTheLiveSnapshotOldestFirstThenReady,
	TestStreamDeliversTheUsersNewLiveRecordsAndNothingElse,
	TestStreamSnapshotBoundaryDeliversEveryRecordExactlyOnce,
	TestStreamLosesNothingAndDuplicatesNothingWhenTheListenBackendIsKilled,
	TestStreamSendsAPingWhenSilentForTheHeartbeat,
	TestStreamEndsWithTokenExpiredWhenTheTokenExpires,
	TestStreamEndsWithKeyRemovedWhenItsKeyLeavesTheKeySet,
	TestStreamLimitsAnswer429PerUserAnd503OverTheProcessLimit,
	TestStreamRefusesBeforeStartingWithTheJSONErrorOfTheListEndpoint,
	TestStreamEndsAtOnceOnShutdownWhileTheListEndpointDrains,
	TestStreamOutlivesTheServersReadAndWriteTimeouts,
	TestStreamMemoryPerOpenStreamStaysUnder32KiB,
}

func TestEveryStreamTestWithTheWalSource(t *testing.T) {
	if os.Getenv("STREAM_TEST_SOURCE") == sourceWAL {
		t.Skip("STREAM_TEST_SOURCE=wal: the stream tests themselves run with wal")
	}
	for _, test := range streamTestsForEachSource {
		name := runtime.FuncForPC(reflect.ValueOf(test).Pointer()).Name()
		t.Run(name[strings.LastIndexByte(name, '.')+1:], test)
	}
}

// testStreamSource is the source a stream test runs with.
func testStreamSource(t testing.TB) string {
	if strings.HasPrefix(t.Name(), walSubtestsOf) || os.Getenv("STREAM_TEST_SOURCE") == sourceWAL {
		return sourceWAL
	}
	return sourceNotify
}

// prepareTestSource gives dsn's database what source needs beyond what
// newTestDB's migrate installs: the wal source's publication. (Once migrate
// installs it for STREAM_SOURCE=wal, this can call that instead.)
func prepareTestSource(t testing.TB, dsn, source string) {
	t.Helper()
	if source != sourceWAL {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, `
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'threeds_records_events') THEN
    CREATE PUBLICATION threeds_records_events FOR TABLE threeds_records WITH (publish = 'insert');
  END IF;
END $$`)
	if err != nil {
		t.Fatalf("create the publication: %v", err)
	}
}
