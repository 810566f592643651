// A JS automerge-repo 2.x client using the library's own `Presence` class (which sends with
// `handle.broadcast` and listens to `ephemeral-message`), for sheaf's presence interop test
// (tests/presence.rs). Same JSON-lines protocol as client.mjs.
//
// Usage: node presence.mjs <ws-url> [peerId] [timeoutMs]
//
// Commands (each may carry "id", echoed back):
//   {"cmd":"find","url":U,"timeoutMs":N}          -> {"url"}  (the note this client works on)
//   {"cmd":"start","initialState":S,"heartbeatMs":H,"peerTtlMs":T} -> {}  (Presence.start)
//   {"cmd":"set","channel":C,"value":V}           -> {}  (Presence.broadcast: an "update")
//   {"cmd":"states"}                              -> {"states": {peerId: {value, lastSeenAt,
//                                                     lastActiveAt}}}  (getPeerStates)
//   {"cmd":"raw","message":M}                     -> {}  (handle.broadcast(M), hand-rolled)
//   {"cmd":"stop"}                                -> {}  (Presence.stop: sends "goodbye")
//   {"cmd":"quit"}
// Events: {"event":"presence","kind":"snapshot"|"update"|"heartbeat"|"goodbye","peerId",...}
//         {"event":"pruning","pruned":[...]}
//         {"event":"ephemeral","senderId","message"}  (every payload, as the handle sees it)

import { out, serveCommands } from "./serve-commands.mjs"
import { Repo, Presence } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const [url, peerId = `js-${process.pid}`, timeoutArg = "60000"] = process.argv.slice(2)
if (!url) {
  console.error("usage: node presence.mjs <ws-url> [peerId] [timeoutMs]")
  process.exit(64)
}
setTimeout(() => {
  console.error("presence.mjs: overall timeout")
  process.exit(2)
}, Number(timeoutArg)).unref()


const repo = new Repo({ network: [new WebSocketClientAdapter(url, 200)], peerId })
let handle
let presence

const commands = {
  async find({ url: u, timeoutMs = 10000 }) {
    handle = await repo.find(u, { signal: AbortSignal.timeout(timeoutMs) })
    handle.on("ephemeral-message", ({ senderId, message }) =>
      out({ event: "ephemeral", senderId, message })
    )
    return { url: handle.url }
  },
  async start({ initialState, heartbeatMs, peerTtlMs }) {
    presence = new Presence({ handle })
    for (const kind of ["snapshot", "update", "heartbeat", "goodbye"]) {
      presence.on(kind, e => out({ event: "presence", kind, ...e }))
    }
    presence.on("pruning", ({ pruned }) => out({ event: "pruning", pruned }))
    presence.start({ initialState, heartbeatMs, peerTtlMs })
    return {}
  },
  async set({ channel, value }) {
    presence.broadcast(channel, value)
    return {}
  },
  async states() {
    return { states: presence.getPeerStates().value }
  },
  async raw({ message }) {
    handle.broadcast(message)
    return {}
  },
  async stop() {
    presence.stop()
    return {}
  },
  async quit() {
    out({ ok: true, event: "bye" })
    process.exit(0)
  },
}

serveCommands(commands, { event: "ready", peerId })
