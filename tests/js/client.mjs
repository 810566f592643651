// A JS automerge-repo 2.x client driven over stdin, for sheaf's interop tests
// (tests/js_interop.rs).
//
// Usage: node client.mjs <ws-url> [peerId] [timeoutMs]
//
// Reads one JSON command per line on stdin and answers with one JSON line on stdout per
// command ({"ok":true,"id":N,...} or {"ok":false,"id":N,"error":...}); events arrive as
// {"event":...} lines at any time. Exits by itself after timeoutMs (default 60 s) with
// code 2, and on `quit` or when stdin closes.
//
// Commands (each may carry "id", echoed back):
//   {"cmd":"create","init":{...}}            -> {"url"}
//   {"cmd":"find","url":U,"timeoutMs":N}     -> {"url","doc"}   (rejects if unavailable)
//   {"cmd":"put","url":U,"key":K,"value":V}  -> {"doc"}         (JSON value at the root)
//   {"cmd":"splice","url":U,"key":K,"index":I,"del":D,"text":T} -> {"doc"}  (text at root.K)
//   {"cmd":"doc","url":U}                    -> {"doc","heads","hexHeads"} (heads: bs58 url
//                                               heads; hexHeads: hex change hashes)
//   {"cmd":"waitDoc","url":U,"doc":D,"timeoutMs":N} -> {"doc"} once the doc's JSON equals D
//   {"cmd":"broadcast","url":U,"message":M}  -> {}   (ephemeral; cbor-x encodes M)
//   {"cmd":"mark","url":U,"key":K,"start":S,"end":E,"expand":X,"name":N,"value":V} -> {doc}
//   {"cmd":"marks","url":U,"key":K}          -> {"marks":[{name,value,start,end}]}
//   {"cmd":"cursor","url":U,"key":K,"index":I} -> {"cursor"}    (A.getCursor)
//   {"cmd":"cursorPosition","url":U,"key":K,"cursor":C} -> {"index"}
//   Text indices here are JS string indices: UTF-16 code units.
//   {"cmd":"quit"}
//   {"cmd":"viewUrl","url":U}               -> {"url"}   (the URL of handle.view(heads()))
//   {"cmd":"storageId"}                     -> {"storageId"} (gossip mode only, see below)
//   {"cmd":"subscribeRemotes","storageIds":[S]} -> {}   (repo.subscribeToRemotes)
//   {"cmd":"syncInfo","url":U,"storageId":S} -> {"heads"} (handle.getSyncInfo: null if none)
// Events: {"event":"ephemeral","url","senderId","message"} for every handle we hold;
//         {"event":"peer","state":"connected"|"disconnected","peerId"};
//         {"event":"remote-heads","url","storageId","heads","timestamp"} (gossip mode).
//
// With SHEAF_JS_GOSSIP=1 in the environment the repo has an in-memory storage (so it has a
// storage id, as a browser app with IndexedDB does) and `enableRemoteHeadsGossiping`.

import { out, serveCommands } from "./serve-commands.mjs"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import * as A from "@automerge/automerge"

const [url, peerId = `js-${process.pid}`, timeoutArg = "60000"] = process.argv.slice(2)
if (!url) {
  console.error("usage: node client.mjs <ws-url> [peerId] [timeoutMs]")
  process.exit(64)
}
setTimeout(() => {
  console.error("client.mjs: overall timeout")
  process.exit(2)
}, Number(timeoutArg)).unref()

const json = doc => JSON.parse(JSON.stringify(doc))
const sleep = ms => new Promise(r => setTimeout(r, ms))

// Enough of a storage adapter for a repo to have a storage id (keys are string arrays).
class MemoryStorage {
  #data = new Map()
  async load(key) {
    return this.#data.get(key.join("/"))
  }
  async save(key, data) {
    this.#data.set(key.join("/"), data)
  }
  async remove(key) {
    this.#data.delete(key.join("/"))
  }
  async loadRange(prefix) {
    const p = prefix.join("/")
    return [...this.#data]
      .filter(([k]) => k === p || k.startsWith(p + "/"))
      .map(([k, data]) => ({ key: k.split("/"), data }))
  }
  async removeRange(prefix) {
    for (const { key } of await this.loadRange(prefix)) this.#data.delete(key.join("/"))
  }
}

const gossip = process.env.SHEAF_JS_GOSSIP === "1"
const adapter = new WebSocketClientAdapter(url, 200)
const repo = new Repo({
  network: [adapter],
  peerId,
  ...(gossip ? { storage: new MemoryStorage(), enableRemoteHeadsGossiping: true } : {}),
})
repo.networkSubsystem.on("peer", ({ peerId }) => out({ event: "peer", state: "connected", peerId }))
repo.networkSubsystem.on("peer-disconnected", ({ peerId }) =>
  out({ event: "peer", state: "disconnected", peerId })
)

const handles = new Map()
function track(handle) {
  if (handles.has(handle.url)) return handle
  handles.set(handle.url, handle)
  handle.on("ephemeral-message", ({ senderId, message }) =>
    out({ event: "ephemeral", url: handle.url, senderId, message })
  )
  handle.on("remote-heads", ({ storageId, heads, timestamp }) =>
    out({ event: "remote-heads", url: handle.url, storageId, heads, timestamp })
  )
  return handle
}
async function get(u) {
  return handles.get(u) ?? track(await repo.find(u))
}

const commands = {
  async create({ init }) {
    const h = track(repo.create(init ?? {}))
    return { url: h.url, doc: json(h.doc()) }
  },
  async find({ url: u, timeoutMs = 10000 }) {
    const h = track(await repo.find(u, { signal: AbortSignal.timeout(timeoutMs) }))
    return { url: h.url, doc: json(h.doc()) }
  },
  async put({ url: u, key, value }) {
    const h = await get(u)
    h.change(d => {
      d[key] = value
    })
    return { doc: json(h.doc()) }
  },
  async splice({ url: u, key, index, del = 0, text = "" }) {
    const h = await get(u)
    h.change(d => {
      A.splice(d, [key], index, del, text)
    })
    return { doc: json(h.doc()) }
  },
  async doc({ url: u }) {
    const h = await get(u)
    return { doc: json(h.doc()), heads: h.heads(), hexHeads: A.getHeads(h.doc()) }
  },
  async waitDoc({ url: u, doc: want, timeoutMs = 10000 }) {
    const h = await get(u)
    const wantS = JSON.stringify(sortKeys(want))
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const now = json(h.doc())
      if (JSON.stringify(sortKeys(now)) === wantS) return { doc: now }
      if (Date.now() > deadline) throw new Error(`timed out; doc is ${JSON.stringify(now)}`)
      await sleep(20)
    }
  },
  async mark({ url: u, key, start, end, expand = "after", name, value }) {
    const h = await get(u)
    h.change(d => {
      A.mark(d, [key], { start, end, expand }, name, value)
    })
    return { doc: json(h.doc()) }
  },
  async marks({ url: u, key }) {
    const h = await get(u)
    return { marks: A.marks(h.doc(), [key]) }
  },
  async cursor({ url: u, key, index }) {
    const h = await get(u)
    return { cursor: A.getCursor(h.doc(), [key], index) }
  },
  async cursorPosition({ url: u, key, cursor }) {
    const h = await get(u)
    return { index: A.getCursorPosition(h.doc(), [key], cursor) }
  },
  async broadcast({ url: u, message }) {
    const h = await get(u)
    h.broadcast(message)
    return {}
  },
  async viewUrl({ url: u }) {
    const h = await get(u)
    return { url: h.view(h.heads()).url }
  },
  async storageId() {
    return { storageId: await repo.storageId() }
  },
  async subscribeRemotes({ storageIds }) {
    repo.subscribeToRemotes(storageIds)
    return {}
  },
  async syncInfo({ url: u, storageId }) {
    const h = await get(u)
    return { heads: h.getSyncInfo(storageId)?.lastHeads ?? null }
  },
  async quit() {
    // No repo.shutdown(): in 2.5.6 it can throw from a socket still connecting.
    out({ ok: true, event: "bye" })
    process.exit(0)
  },
}

function sortKeys(v) {
  if (Array.isArray(v)) return v.map(sortKeys)
  if (v && typeof v === "object")
    return Object.fromEntries(Object.keys(v).sort().map(k => [k, sortKeys(v[k])]))
  return v
}

serveCommands(commands, { event: "ready", peerId })
