// A client of GET /3ds/my-records/events built on fetch and a stream reader,
// for browsers (index.html loads it) and Node 18+ (node-run.js), with no
// dependency and no build step. Why not EventSource: a browser's EventSource
// cannot send an Authorization header, and it gives up for good on any
// non-200 answer. The rules it follows are docs/clients.md's.

const defaultBackoff = { minMs: 1000, maxMs: 30000 }

// subscribe opens the stream and keeps it open until stop() or until the
// server says `replaced`. getToken is called before every connect, so a
// refreshed token is always the one sent. Callbacks (all optional):
//   onRecord(record)          each record id once, however often it is resent
//   onReady()                 the snapshot is complete
//   onEnd(reason)             the server ended the stream (event: end)
//   onFailure({status, error, retryInMs})  a connect failed; retrying
//   onConnect(attempt)        a connect is about to start
//   onStop(reason)            no more connects ('replaced' or 'stopped')
// Returns { stop() }.
export function subscribe ({ url, getToken, backoff = defaultBackoff, fetchImpl = globalThis.fetch, ...callbacks }) {
  const cb = (name, ...args) => { if (callbacks[name]) callbacks[name](...args) }
  const seen = new Map() // record id -> when it expires (ms since the epoch)
  let controller = null
  let stopped = false
  let failures = 0
  let timer = null
  let wake = null

  const sleep = (ms) => new Promise((resolve) => {
    wake = resolve
    timer = setTimeout(resolve, ms)
  })

  // Doubling from minMs to maxMs, with full jitter so that the clients of a
  // restarted instance do not all come back in the same millisecond.
  const backoffMs = () => {
    const ceiling = Math.min(backoff.maxMs, backoff.minMs * 2 ** Math.min(Math.max(failures - 1, 0), 20))
    return Math.round(ceiling / 2 + Math.random() * ceiling / 2)
  }

  const forget = () => {
    const now = Date.now()
    for (const [id, expires] of seen) if (expires < now) seen.delete(id)
  }

  const onEvent = (ev) => {
    if (ev.event === 'record') {
      const record = JSON.parse(ev.data)
      // The snapshot is resent on every connect and overlaps the live feed:
      // show each id once.
      if (seen.has(record.id)) return
      const expires = Date.parse(record.received_at) + record.expires_after * 1000
      seen.set(record.id, Number.isNaN(expires) ? Infinity : expires)
      cb('onRecord', record)
    } else if (ev.event === 'ready') {
      failures = 0
      forget()
      cb('onReady')
    } else if (ev.event === 'end') {
      let reason = 'unknown'
      try { reason = JSON.parse(ev.data).reason } catch { /* keep unknown */ }
      return reason
    }
  }

  // connectOnce runs one connection to its end and says what to do next:
  // { again: true, delayMs } or { again: false, reason }.
  const connectOnce = async (attempt) => {
    cb('onConnect', attempt)
    controller = new AbortController()
    let token
    try {
      token = await getToken()
    } catch (error) {
      failures++
      const retryInMs = backoffMs()
      cb('onFailure', { status: 0, error: `no token: ${error.message}`, retryInMs })
      return { again: true, delayMs: retryInMs }
    }
    let resp
    try {
      resp = await fetchImpl(url, {
        headers: { Authorization: `Bearer ${token}`, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: controller.signal
      })
    } catch (error) {
      if (stopped) return { again: false, reason: 'stopped' }
      failures++
      const retryInMs = backoffMs()
      cb('onFailure', { status: 0, error: error.message, retryInMs })
      return { again: true, delayMs: retryInMs }
    }
    if (resp.status !== 200) {
      // 401: the next connect reads a fresh token; 503: Retry-After is a floor.
      failures++
      const retryAfter = Number(resp.headers.get('Retry-After')) * 1000 || 0
      const retryInMs = Math.max(backoffMs(), retryAfter)
      let error = ''
      try { error = (await resp.json()).error || '' } catch { /* not JSON: a gateway's page */ }
      cb('onFailure', { status: resp.status, error, retryInMs })
      return { again: true, delayMs: retryInMs }
    }
    let reason = null
    try {
      for await (const ev of events(resp.body)) {
        reason = onEvent(ev) ?? null
        if (reason) break
      }
    } catch (error) {
      if (stopped) return { again: false, reason: 'stopped' }
      // The connection broke (a network change, a gateway's timeout).
    } finally {
      controller.abort()
    }
    if (stopped) return { again: false, reason: 'stopped' }
    if (reason === null) {
      failures++
      const retryInMs = backoffMs()
      cb('onFailure', { status: 200, error: 'the stream broke off', retryInMs })
      return { again: true, delayMs: retryInMs }
    }
    cb('onEnd', reason)
    switch (reason) {
      case 'replaced':
        // A newer stream of this user took this one's place: coming back
        // would replace that one in turn, forever.
        return { again: false, reason }
      case 'token_expired':
      case 'key_removed':
        // getToken is asked again on the next connect.
        return { again: true, delayMs: 0 }
      default:
        // shutting_down, unavailable: another instance takes over; spread
        // the reconnects a little.
        return { again: true, delayMs: Math.round(Math.random() * backoff.minMs) }
    }
  }

  const loop = async () => {
    for (let attempt = 1; !stopped; attempt++) {
      const next = await connectOnce(attempt)
      if (!next.again) {
        stopped = true
        cb('onStop', next.reason)
        return
      }
      if (next.delayMs > 0) await sleep(next.delayMs)
    }
    cb('onStop', 'stopped')
  }
  loop()

  return {
    stop () {
      if (stopped) return
      stopped = true
      clearTimeout(timer)
      if (wake) wake()
      if (controller) controller.abort()
    }
  }
}

// events parses a text/event-stream body as the HTML standard says and
// yields each dispatched event as { event, id, data } (comments such as
// `: ping` are skipped; retry is ignored: the backoff is the client's).
export async function * events (body) {
  const reader = body.getReader()
  const decoder = new TextDecoder()
  let buffer = ''
  let event = ''
  let data = []
  let id = ''
  try {
    for (;;) {
      const { value, done } = await reader.read()
      if (done) return
      buffer += decoder.decode(value, { stream: true })
      let nl
      while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
        // A lone \r at the end may be the first half of \r\n: wait for more.
        if (buffer[nl] === '\r' && nl === buffer.length - 1) break
        const line = buffer.slice(0, nl)
        buffer = buffer.slice(nl + (buffer.startsWith('\r\n', nl) ? 2 : 1))
        if (line === '') {
          if (data.length > 0) yield { event: event || 'message', id, data: data.join('\n') }
          event = ''
          data = []
          continue
        }
        if (line.startsWith(':')) continue
        const colon = line.indexOf(':')
        const field = colon < 0 ? line : line.slice(0, colon)
        let value = colon < 0 ? '' : line.slice(colon + 1)
        if (value.startsWith(' ')) value = value.slice(1)
        if (field === 'event') event = value
        else if (field === 'data') data.push(value)
        else if (field === 'id' && !value.includes('\0')) id = value
      }
    }
  } finally {
    reader.releaseLock()
  }
}
