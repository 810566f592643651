// The upload race (NOTES §1): a JS client creates a note and hands its URL to a second JS
// client a few milliseconds later, both connected to the same server. The second client's
// `find` must succeed, not fail with "unavailable" while the first is still uploading.
//
// Usage: node upload-race.mjs <ws-url> [rounds] [timeoutMs]
// Prints one {"round","delayMs","ok","doc"|"error","ms"} line per round, then
// {"done":true,"failures":N}. Exit code 0 when every round found the note, 1 otherwise,
// 2 on the overall timeout.

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const [url, roundsArg = "6", timeoutArg = "60000"] = process.argv.slice(2)
if (!url) {
  console.error("usage: node upload-race.mjs <ws-url> [rounds] [timeoutMs]")
  process.exit(64)
}
setTimeout(() => {
  console.error("upload-race.mjs: overall timeout")
  process.exit(2)
}, Number(timeoutArg)).unref()

const out = obj => process.stdout.write(JSON.stringify(obj) + "\n")
const sleep = ms => new Promise(r => setTimeout(r, ms))

async function client(peerId) {
  const adapter = new WebSocketClientAdapter(url, 200)
  const repo = new Repo({ network: [adapter], peerId })
  await adapter.whenReady()
  return repo
}

const delays = [0, 1, 3, 5, 10, 25]
let failures = 0
for (let round = 0; round < Number(roundsArg); round++) {
  const delayMs = delays[round % delays.length]
  // Fresh repos each round: the finder must not have the note from an earlier round.
  const a = await client(`js-creator-${round}`)
  const b = await client(`js-finder-${round}`)
  const text = `round ${round} ` + "x".repeat(2000)
  const h = a.create({ text, round })
  if (delayMs) await sleep(delayMs)
  const t0 = Date.now()
  try {
    const found = await b.find(h.url, { signal: AbortSignal.timeout(10000) })
    const doc = JSON.parse(JSON.stringify(found.doc()))
    const ok = doc.text === text && doc.round === round
    if (!ok) failures++
    out({ round, delayMs, ok, doc: { round: doc.round, textLength: doc.text?.length }, ms: Date.now() - t0 })
  } catch (e) {
    failures++
    out({ round, delayMs, ok: false, error: String(e?.message ?? e), ms: Date.now() - t0 })
  }
  await Promise.all([a.shutdown().catch(() => {}), b.shutdown().catch(() => {})])
}
out({ done: true, failures })
process.exit(failures ? 1 : 0)
