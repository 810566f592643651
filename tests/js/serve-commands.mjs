// The stdin/stdout protocol shared by the Node scripts that sheaf's tests and benches drive
// (client.mjs, presence.mjs, typist.mjs): one JSON command per line on stdin, one JSON
// answer per command on stdout ({"ok":true,"id":N,...} or {"ok":false,"id":N,"error":...}),
// events as {"event":...} lines at any time. Closing stdin ends the process.

import { createInterface } from "node:readline"

export const out = obj => process.stdout.write(JSON.stringify(obj) + "\n")

// Answer each command line with `commands[cmd.cmd](cmd)`, then print `ready` (the script's
// "I am up" event).
export function serveCommands(commands, ready) {
  const rl = createInterface({ input: process.stdin })
  rl.on("line", async line => {
    if (!line.trim()) return
    let cmd
    try {
      cmd = JSON.parse(line)
    } catch (e) {
      return out({ ok: false, error: `bad json: ${e}` })
    }
    const f = commands[cmd.cmd]
    if (!f) return out({ ok: false, id: cmd.id, error: `unknown command ${cmd.cmd}` })
    try {
      out({ ok: true, id: cmd.id, ...(await f(cmd)) })
    } catch (e) {
      out({ ok: false, id: cmd.id, error: String(e?.message ?? e) })
    }
  })
  rl.on("close", () => process.exit(0))
  out(ready)
}
