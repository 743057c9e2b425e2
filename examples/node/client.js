// A Node client of GET /3ds/my-records/events on the npm `eventsource`
// package (3.x: its `fetch` option is how the Authorization header gets in).
// It prints one JSON line per thing that happened. The rules it follows are
// docs/clients.md's:
//   - a fresh token on every connect (TOKEN_FILE or TOKEN_COMMAND, read anew);
//   - EventSource gives up for good on a non-200 and ignores Retry-After, and
//     retries a broken connection at the server's fixed `retry:` pace: so on
//     any error this client closes it and makes a new one itself, with
//     backoff, Retry-After as a floor;
//   - each record id shown once (every connect resends the live snapshot);
//   - `replaced` means stop; every other end means connect again.
//
//   EVENTS_URL=http://127.0.0.1:8080/3ds/my-records/events TOKEN_FILE=token node node/client.js
import { EventSource } from 'eventsource'
import { print, settings } from '../token.js'

let cfg
try {
  cfg = settings()
} catch (error) {
  console.error(error.message)
  process.exit(2)
}

const seen = new Map() // record id -> when it expires (ms since the epoch)
let failures = 0
let attempt = 0
let source = null
let timer = null
let stopped = false

// Doubling from minMs to maxMs with full jitter, so that the clients of a
// restarted instance do not all come back in the same millisecond.
function backoffMs () {
  const { minMs, maxMs } = cfg.backoff
  const ceiling = Math.min(maxMs, minMs * 2 ** Math.min(Math.max(failures - 1, 0), 20))
  return Math.round(ceiling / 2 + Math.random() * ceiling / 2)
}

function stop (reason) {
  stopped = true
  clearTimeout(timer)
  if (source) source.close()
  print('stop', { reason })
  process.exit(0)
}

function reconnect (delayMs) {
  if (source) source.close()
  source = null
  clearTimeout(timer)
  timer = setTimeout(connect, delayMs)
}

function connect () {
  if (stopped) return
  attempt++
  print('connect', { attempt })
  // What the last answer said, for the error handler: EventSource's error
  // event carries the status but not the headers.
  const last = { status: 0, retryAfterMs: 0, error: '' }
  const es = new EventSource(cfg.url, {
    fetch: async (input, init) => {
      const token = await cfg.getToken()
      const resp = await fetch(input, { ...init, headers: { ...init.headers, Authorization: `Bearer ${token}` } })
      last.status = resp.status
      last.retryAfterMs = Number(resp.headers.get('Retry-After')) * 1000 || 0
      return resp
    }
  })
  source = es

  es.addEventListener('record', (ev) => {
    const record = JSON.parse(ev.data)
    if (seen.has(record.id)) return
    const expires = Date.parse(record.received_at) + record.expires_after * 1000
    seen.set(record.id, Number.isNaN(expires) ? Infinity : expires)
    print('record', { id: record.id, record })
  })

  es.addEventListener('ready', () => {
    failures = 0
    const now = Date.now()
    for (const [id, expires] of seen) if (expires < now) seen.delete(id)
    print('ready')
  })

  es.addEventListener('end', (ev) => {
    let reason = 'unknown'
    try { reason = JSON.parse(ev.data).reason } catch { /* keep unknown */ }
    print('end', { reason })
    es.close()
    if (reason === 'replaced') {
      // A newer stream of this user took this one's place: coming back
      // would replace that one in turn, forever.
      stop(reason)
      return
    }
    // token_expired, key_removed: the next connect reads a fresh token.
    // shutting_down, unavailable: another instance takes over; spread the
    // reconnects a little.
    const delay = reason === 'token_expired' || reason === 'key_removed' ? 0 : Math.round(Math.random() * cfg.backoff.minMs)
    reconnect(delay)
  })

  es.addEventListener('error', (ev) => {
    if (source !== es) return
    failures++
    const retryInMs = Math.max(backoffMs(), last.retryAfterMs)
    print('failure', { status: ev.code ?? last.status, error: ev.message ?? '', retry_in_ms: retryInMs })
    reconnect(retryInMs)
  })
}

process.on('SIGTERM', () => stop('stopped'))
process.on('SIGINT', () => stop('stopped'))
connect()
