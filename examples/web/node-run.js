// Runs the web page's client (sse-client.js) under Node 18+, which has fetch
// and ReadableStream built in: the same code the page runs, printing one
// JSON line per event. The test suite (clients_test.go) drives it.
//
//   EVENTS_URL=http://127.0.0.1:8080/3ds/my-records/events TOKEN_FILE=token node web/node-run.js
import { subscribe } from './sse-client.js'
import { print, settings } from '../token.js'

let cfg
try {
  cfg = settings()
} catch (error) {
  console.error(error.message)
  process.exit(2)
}

const sub = subscribe({
  ...cfg,
  onConnect: (attempt) => print('connect', { attempt }),
  onRecord: (record) => print('record', { id: record.id, record }),
  onReady: () => print('ready'),
  onEnd: (reason) => print('end', { reason }),
  onFailure: ({ status, error, retryInMs }) => print('failure', { status, error, retry_in_ms: retryInMs }),
  onStop: (reason) => {
    print('stop', { reason })
    process.exit(0)
  }
})
process.on('SIGTERM', () => sub.stop())
process.on('SIGINT', () => sub.stop())
