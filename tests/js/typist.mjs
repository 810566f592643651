// One JS automerge-repo 2.x client typing into a note, for sheaf's relay benchmark
// (benches/relay.rs, scenario "long"). The bench runs K of these, one Node process each (a
// Node process is one thread, and one remote edit into a long text costs ~40 ms to apply
// in JS, so K clients in one process would measure Node rather than the relay).
//
// Usage: node typist.mjs <ws-url> <index> [timeoutMs]
//
// JSON lines on stdin, one answer per command on stdout ({"ok":true,"id":N,...}):
//   {"cmd":"find","url":U}                 -> {"len"}    (text length; observing starts)
//   {"cmd":"type","ms":D,"hz":R,"seed":S}  -> {"sent"}   (after D ms of typing R keys/s)
//   {"cmd":"drain","expect":E,"ms":T}      -> {"received","lat":[ms...]}
//   {"cmd":"quit"}
// Each keystroke inserts "x" at a random place in the note's `text` and, in the same change,
// appends its wall-clock time (ms since the epoch, sub-millisecond) to the list `ts<index>`.
// On every change event the client reads the other clients' `ts*` lists: each entry it has
// not seen yet is one delivered keystroke, with latency = now - that time. The processes run
// on one machine, so their clocks agree.

import { out, serveCommands } from "./serve-commands.mjs"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import * as A from "@automerge/automerge"

const [url, indexArg, timeoutArg = "120000"] = process.argv.slice(2)
if (!url || indexArg === undefined) {
  console.error("usage: node typist.mjs <ws-url> <index> [timeoutMs]")
  process.exit(64)
}
const index = Number(indexArg)
const myKey = `ts${index}`
setTimeout(() => {
  console.error("typist.mjs: overall timeout")
  process.exit(2)
}, Number(timeoutArg)).unref()

const sleep = ms => new Promise(r => setTimeout(r, ms))
const now = () => performance.timeOrigin + performance.now()

const repo = new Repo({ network: [new WebSocketClientAdapter(url, 200)] })
let handle
const seen = new Map() // key -> entries accounted for
const lat = []
let received = 0

function account(doc) {
  const t = now()
  for (const [key, list] of Object.entries(doc)) {
    if (!key.startsWith("ts") || key === myKey || !Array.isArray(list)) continue
    const from = seen.get(key) ?? 0
    for (let i = from; i < list.length; i++) lat.push(t - list[i])
    received += Math.max(0, list.length - from)
    seen.set(key, Math.max(from, list.length))
  }
}

// A small deterministic generator (mulberry32), so runs are repeatable.
function rng(seed) {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

const commands = {
  async find({ url: u, timeoutMs = 60000 }) {
    handle = await repo.find(u, { signal: AbortSignal.timeout(timeoutMs) })
    // Whatever the others typed before we looked does not count.
    for (const [key, list] of Object.entries(handle.doc())) {
      if (key.startsWith("ts") && Array.isArray(list)) seen.set(key, list.length)
    }
    handle.on("change", ({ doc }) => account(doc))
    return { len: handle.doc().text.length }
  },
  async type({ ms, hz, seed = index + 1 }) {
    const random = rng(seed)
    const period = 1000 / hz
    const start = now()
    let sent = 0
    for (let next = start; now() - start < ms; next += period) {
      const wait = next - now()
      // A late keystroke is typed late, not made up for (as the Rust typists do).
      if (wait > 0) await sleep(wait)
      else next = now()
      if (now() - start >= ms) break
      const t = now()
      handle.change(d => {
        if (!Array.isArray(d[myKey])) d[myKey] = []
        A.splice(d, ["text"], Math.floor(random() * (d.text.length + 1)), 0, "x")
        d[myKey].push(t)
      })
      sent++
    }
    return { sent }
  },
  async drain({ expect, ms }) {
    const deadline = now() + ms
    while (received < expect && now() < deadline) await sleep(20)
    return { received, lat }
  },
  async quit() {
    out({ ok: true, event: "bye" })
    process.exit(0)
  },
}

serveCommands(commands, { event: "ready", index })
