// Check that JS decodes sheaf's encodings as it decodes its own frames.
//
// `cargo test --test protocol_js_vectors` re-encodes every golden frame with sheaf's encoder
// into target/tmp/js-reencoded/. This script decodes each with automerge-repo's own cbor
// helper and compares the result with what the original JS frame decoded to (index.json),
// treating `undefined`-valued keys as absent (sheaf omits them). Numbers must be JS numbers
// (not BigInt), byte fields Uint8Array.
//
// Usage: node decode-check.mjs [dir]

import { readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"
import { isDeepStrictEqual } from "node:util"

import { cbor } from "@automerge/automerge-repo"

const here = dirname(fileURLToPath(import.meta.url))
const dir = process.argv[2] ?? join(here, "../../target/tmp/js-reencoded")
const index = JSON.parse(
  readFileSync(join(here, "../fixtures/js-frames/index.json"), "utf8")
)

/** Same view as capture-frames.mjs, minus undefined-valued keys; BigInt is flagged. */
function normalize(v) {
  if (typeof v === "bigint") return { $bigint: v.toString() }
  if (v instanceof Uint8Array) return { $bytes: Buffer.from(v).toString("hex") }
  if (Array.isArray(v)) return v.map(normalize)
  if (v !== null && typeof v === "object") {
    if (v.$undefined) return undefined
    return Object.fromEntries(
      Object.entries(v)
        .map(([k, x]) => [k, normalize(x)])
        .filter(([, x]) => x !== undefined)
    )
  }
  return v
}

let failed = 0
for (const f of index.frames) {
  const ours = cbor.decode(readFileSync(join(dir, f.file)))
  const got = normalize(ours)
  const want = normalize(f.message)
  // sheaf always writes isEphemeral; a JS peer that sent `{}` meant false.
  if (want.peerMetadata && !("isEphemeral" in want.peerMetadata) && got.peerMetadata?.isEphemeral === false)
    delete got.peerMetadata.isEphemeral
  if (!isDeepStrictEqual(got, want)) {
    failed++
    console.error(`MISMATCH ${f.file}\n  js:    ${JSON.stringify(want)}\n  sheaf: ${JSON.stringify(got)}`)
  }
}
console.log(
  `${index.frames.length - failed}/${index.frames.length} re-encoded frames decode in JS as the originals`
)
process.exit(failed ? 1 : 0)
