import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Path from "node:path"
import * as Url from "node:url"
import { makeTempDir, run } from "./utils/Qemu.js"

const here = Path.dirname(Url.fileURLToPath(import.meta.url))
const tsx = Path.resolve(here, "../../../node_modules/.bin/tsx")
const churn = Path.join(here, "utils/usocketChurn.ts")

// Enough rounds that a plain usocket aborts the child every time we tried (at 60 the reset case sometimes survived).
const ROUNDS = 150

interface ChurnResult {
  readonly rounds: number
  readonly resets: number
  readonly keptAfterTwoTurns: number
}

const churnChild = (way: "client" | "reset" | "server") =>
  Effect.gen(function*() {
    const dir = yield* makeTempDir("vzusock-")
    // `run` turns a child that aborted (SIGABRT from libuv's assertion) into a defect carrying its stderr.
    const stdout = yield* run(tsx, ["--expose-gc", churn, dir, way, String(ROUNDS)])
    return JSON.parse(stdout.trim().split("\n").pop()!) as ChurnResult
  })

const ways = [
  { way: "client", title: "the client destroys its socket" },
  { way: "reset", title: "the peer goes away with our byte unread: the addon closes the socket on the error" },
  { way: "server", title: "the server destroys the connection it accepted, then closes" }
] as const

describe("SafeUSocket and SafeUServer: a garbage collection right after a close does not abort the process", () => {
  for (const { title, way } of ways) {
    it.scopedLive(title, () =>
      Effect.gen(function*() {
        const result = yield* churnChild(way)
        assert.strictEqual(result.rounds, ROUNDS)
        // Every round of `reset` really ended on the addon's error.
        assert.strictEqual(result.resets, way === "reset" ? ROUNDS : 0)
        assert.strictEqual(result.keptAfterTwoTurns, 0)
      }), 120_000)
  }
})
