// The JS reference sync server (automerge-repo 2.x Repo + NodeWSServerAdapter) for sheaf's
// interop tests (tests/js_interop.rs): in-memory storage, announces nothing, like
// automerge-repo-sync-server.
//
// Usage: node sync-server.mjs [timeoutMs]   (SHEAF_JS_GOSSIP=1: with remote-heads gossip)
// Prints {"event":"listening","url":"ws://127.0.0.1:PORT"} once it accepts connections, then
// answers JSON commands on stdin like client.mjs:
//   {"cmd":"find","url":U,"timeoutMs":N} -> {"url","doc"}  (the server's own copy)
//   {"cmd":"quit"}
// Exits on `quit`, when stdin closes, or after timeoutMs (default 60 s, exit code 2).

import { out, serveCommands } from "./serve-commands.mjs"
import { Repo } from "@automerge/automerge-repo"
import { NodeWSServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { WebSocketServer } from "ws"

const timeoutMs = Number(process.argv[2] ?? "60000")
setTimeout(() => {
  console.error("sync-server.mjs: overall timeout")
  process.exit(2)
}, timeoutMs).unref()

const json = doc => JSON.parse(JSON.stringify(doc))

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
    return [...this.#m.values()].filter(c => prefix.every((p, i) => c.key[i] === p))
  }
  async removeRange(prefix) {
    for (const c of await this.loadRange(prefix)) this.#m.delete(this.#k(c.key))
  }
}

const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
await new Promise(r => wss.on("listening", r))
const repo = new Repo({
  network: [new NodeWSServerAdapter(wss)],
  storage: new MemoryStorage(),
  peerId: "js-sync-server",
  sharePolicy: async () => false,
  // SHEAF_JS_GOSSIP=1: pass remote heads on, as a server for apps that use them would.
  enableRemoteHeadsGossiping: process.env.SHEAF_JS_GOSSIP === "1",
})

serveCommands(
  {
    async find({ url, timeoutMs = 10000 }) {
      const h = await repo.find(url, { signal: AbortSignal.timeout(timeoutMs) })
      return { url: h.url, doc: json(h.doc()) }
    },
    async quit() {
      await repo.shutdown().catch(() => {})
      wss.close()
      process.exit(0)
    },
  },
  { event: "listening", url: `ws://127.0.0.1:${wss.address().port}` }
)
