// Capture golden automerge-repo WebSocket frames from the real JS packages.
//
// Starts a JS sync server (Repo + NodeWSServerAdapter, in-memory storage, announces
// nothing) on 127.0.0.1 at a free port and drives it with JS client Repos
// (BrowserWebSocketClientAdapter): handshake, create a doc, a second client finds it
// (request/sync), an ephemeral broadcast, remote-heads gossip, a find of an unknown id
// (doc-unavailable), and a raw join offering only protocol "2" (error). Every binary frame
// that crosses the server's sockets, in both directions, is written to
// ../fixtures/js-frames/NNN-<type>.cbor, described in ../fixtures/js-frames/index.json.
//
// Usage: npm ci && node capture-frames.mjs   (rewrites the fixtures)

import { mkdirSync, readdirSync, rmSync, writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

import { Repo, generateAutomergeUrl, cbor } from "@automerge/automerge-repo"
import {
  NodeWSServerAdapter,
  BrowserWebSocketClientAdapter,
} from "@automerge/automerge-repo-network-websocket"
import WebSocket, { WebSocketServer } from "ws"

const OUT = join(dirname(fileURLToPath(import.meta.url)), "../fixtures/js-frames")
const MAX_PER_KIND = 3 // frames kept per (type, direction, connection)
const MAX_FILES = 36

const sleep = ms => new Promise(r => setTimeout(r, ms))

/** Minimal in-memory StorageAdapterInterface, so the server has a storageId. */
class MemoryStorage {
  #m = new Map()
  #k = key => key.join("\u0000")
  async load(key) {
    return this.#m.get(this.#k(key))?.data
  }
  async save(key, data) {
    this.#m.set(this.#k(key), { key, data })
  }
  async remove(key) {
    this.#m.delete(this.#k(key))
  }
  async loadRange(prefix) {
    return [...this.#m.values()].filter(c =>
      prefix.every((p, i) => c.key[i] === p)
    )
  }
  async removeRange(prefix) {
    for (const c of await this.loadRange(prefix)) this.#m.delete(this.#k(c.key))
  }
}

// ---- recording ----------------------------------------------------------------------

const frames = []
const kindCounts = new Map()

/** JSON-safe view of a cbor-x decoded value (bytes as hex, undefined kept visible). */
function describe(v) {
  if (v === undefined) return { $undefined: true }
  if (v instanceof Uint8Array) return { $bytes: Buffer.from(v).toString("hex") }
  if (Array.isArray(v)) return v.map(describe)
  if (v !== null && typeof v === "object") {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, describe(x)]))
  }
  return v
}

function record(direction, connection, raw) {
  const bytes = Buffer.from(raw instanceof ArrayBuffer ? new Uint8Array(raw) : raw)
  let msg
  try {
    msg = cbor.decode(bytes)
  } catch (e) {
    console.error("undecodable frame", direction, e)
    return
  }
  const kind = `${msg.type}|${direction}|${connection}`
  const n = kindCounts.get(kind) ?? 0
  kindCounts.set(kind, n + 1)
  if (n >= MAX_PER_KIND || frames.length >= MAX_FILES) return
  frames.push({ direction, connection, bytes, msg })
}

// ---- the scenario -------------------------------------------------------------------

const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
await new Promise(r => wss.on("listening", r))
const { port } = wss.address()
const url = `ws://127.0.0.1:${port}`

let nextConn = 0
// Registered before the adapter's own listener, so `send` is wrapped before any frame goes out.
wss.on("connection", socket => {
  const connection = `conn${++nextConn}`
  socket.on("message", (data, isBinary) => {
    if (isBinary) record("client->server", connection, data)
  })
  const send = socket.send.bind(socket)
  socket.send = (data, ...rest) => {
    record("server->client", connection, data)
    return send(data, ...rest)
  }
})

const server = new Repo({
  network: [new NodeWSServerAdapter(wss)],
  storage: new MemoryStorage(),
  peerId: "js-server",
  sharePolicy: async () => false,
  enableRemoteHeadsGossiping: true,
})

async function client(peerId, storage) {
  const adapter = new BrowserWebSocketClientAdapter(url)
  const repo = new Repo({
    network: [adapter],
    storage,
    peerId,
    enableRemoteHeadsGossiping: true,
  })
  await adapter.whenReady()
  return repo
}

// 1. client-1 (conn1, with storage) joins and creates a doc; it announces it (sharePolicy
//    default).
const c1 = await client("js-client-1", new MemoryStorage())
const h1 = c1.create({ title: "golden", items: [1, 2, 3] })
h1.change(d => {
  d.title = "golden vectors"
})
await sleep(300)

// 2. client-2 (conn2, no storage) joins, subscribes to client-1's storage heads (the server
//    relays them as remote-heads-changed), finds the doc.
const c2 = await client("js-client-2")
c2.subscribeToRemotes([await c1.storageId()])
await sleep(100)
const h2 = await c2.find(h1.url)
await sleep(200)

// 3. An edit on client-1 gives sync traffic to the server and remote-heads-changed to client-2.
h1.change(d => {
  d.items.push(4)
})
await sleep(300)

// 4. An ephemeral broadcast from client-2 (forwarded by the server to client-1).
h2.broadcast({ cursor: 7, who: "js-client-2" })
await sleep(200)

// 5. client-2 asks for a document nobody has.
const unknown = generateAutomergeUrl()
try {
  await c2.find(unknown, { signal: AbortSignal.timeout(3000) })
  console.error("unexpected: unknown doc found")
} catch (e) {
  // expected: unavailable
}
await sleep(100)

// 6. A raw client offering only protocol "2": the server answers `error` and closes.
await new Promise((resolve, reject) => {
  const ws = new WebSocket(url)
  ws.on("open", () =>
    ws.send(
      cbor.encode({
        type: "join",
        senderId: "raw-v2-client",
        peerMetadata: {},
        supportedProtocolVersions: ["2"],
      })
    )
  )
  ws.on("close", resolve)
  ws.on("error", reject)
})

// shutdown() rejects in 2.5.6 when a handle is unavailable (fixed upstream in #719).
for (const repo of [c1, c2, server]) await repo.shutdown().catch(() => {})
wss.close()

// ---- write fixtures -----------------------------------------------------------------

mkdirSync(OUT, { recursive: true })
for (const f of readdirSync(OUT)) rmSync(join(OUT, f))
const index = frames.map((f, i) => {
  const file = `${String(i).padStart(3, "0")}-${f.msg.type}.cbor`
  writeFileSync(join(OUT, file), f.bytes)
  return {
    file,
    type: f.msg.type,
    direction: f.direction,
    connection: f.connection,
    bytes: f.bytes.length,
    keys: Object.keys(f.msg),
    message: describe(f.msg),
  }
})
writeFileSync(
  join(OUT, "index.json"),
  JSON.stringify(
    {
      generator: "tests/js/capture-frames.mjs",
      packages: {
        "@automerge/automerge-repo": "2.5.6",
        "@automerge/automerge-repo-network-websocket": "2.5.6",
      },
      notes:
        "message is cbor-x's decoding of the frame: byte strings as {$bytes: hex}, CBOR undefined as {$undefined: true}; keys in wire order",
      frames: index,
    },
    null,
    1
  ) + "\n"
)
const total = frames.reduce((n, f) => n + f.bytes.length, 0)
console.log(`wrote ${frames.length} frames (${total} bytes) to ${OUT}`)
for (const [k, n] of kindCounts) console.log(`  ${k}: ${n}`)
process.exit(0)
