// Where the example clients get a token: read anew before every connect, so
// the app's token refresh (rewriting the file, or the command printing a new
// one) is picked up by the next connect. Never logged.
import { readFile } from 'node:fs/promises'
import { execFile } from 'node:child_process'
import { promisify } from 'node:util'

const run = promisify(execFile)

export function tokenSource (env = process.env) {
  if (env.TOKEN_FILE) {
    return async () => (await readFile(env.TOKEN_FILE, 'utf8')).trim()
  }
  if (env.TOKEN_COMMAND) {
    return async () => (await run('/bin/sh', ['-c', env.TOKEN_COMMAND], { timeout: 10000 })).stdout.trim()
  }
  throw new Error('set TOKEN_FILE (a file holding the token) or TOKEN_COMMAND (a command printing it)')
}

// settings reads the examples' environment: EVENTS_URL, BACKOFF_MIN_MS and
// BACKOFF_MAX_MS.
export function settings (env = process.env) {
  if (!env.EVENTS_URL) throw new Error('set EVENTS_URL, e.g. https://api.example.com/3ds/my-records/events')
  return {
    url: env.EVENTS_URL,
    getToken: tokenSource(env),
    backoff: {
      minMs: Number(env.BACKOFF_MIN_MS) || 1000,
      maxMs: Number(env.BACKOFF_MAX_MS) || 30000
    }
  }
}

// print writes one JSON line per thing that happened, for people and tests.
export function print (what, fields = {}) {
  process.stdout.write(JSON.stringify({ what, ...fields }) + '\n')
}
