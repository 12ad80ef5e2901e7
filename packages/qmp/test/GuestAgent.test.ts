import { assert, describe, it } from "@effect/vitest"
import { Effect, Fiber, Layer } from "effect"
import * as Path from "node:path"
import * as GuestAgent from "../src/GuestAgent.js"
import * as NodeQmpTransport from "../src/NodeQmpTransport.js"
import type { QmpDecodeError } from "../src/QmpError.js"
import type * as QmpTransport from "../src/QmpTransport.js"
import { commandOf, fakePeer, idOf } from "./utils/FakePeer.js"
import { hasQemu, makeTempDir, startQemu } from "./utils/Qemu.js"
import { allowedCommands, hasQemuGa, startQemuGa } from "./utils/QemuGa.js"

const TIMEOUT = 60_000

const connect = (address: string | QmpTransport.QmpAddress, options: Partial<GuestAgent.GuestAgentOptions> = {}) =>
  GuestAgent.make({ address, ...options }).pipe(Effect.provide(NodeQmpTransport.layer))

const withAgent = (agent: GuestAgent.GuestAgentService) => Effect.provideService(GuestAgent.GuestAgent, agent)

const elapsed = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  Effect.gen(function*() {
    const start = Date.now()
    const result = yield* effect
    return [result, Date.now() - start] as const
  })

describe.skipIf(!hasQemuGa)("GuestAgent against a host qemu-ga (state-changing RPCs blocked)", () => {
  it.scopedLive("the fixture blocks freeze, thaw and every other state-changing RPC", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      for (const name of ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-shutdown", "guest-exec"]) {
        assert.include(qga.blocked, name)
      }
      for (const name of allowedCommands) assert.notInclude(qga.blocked, name)
      assert.strictEqual(qga.blocked.length, 34)
    }), TIMEOUT)

  it.scopedLive("syncs on connect, pings, and syncs again on demand", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      const agent = yield* connect(qga.socketPath)
      yield* GuestAgent.ping().pipe(withAgent(agent))
      yield* agent.sync()
      yield* GuestAgent.ping().pipe(withAgent(agent))
    }), TIMEOUT)

  it.scopedLive("guest-info reports the version and the disabled commands", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      const agent = yield* connect(qga.socketPath)
      const info = yield* GuestAgent.info().pipe(withAgent(agent))
      assert.match(info.version, /^7\.2\./)
      const enabled = new Map(info.supported_commands.map((c) => [c.name, c.enabled]))
      assert.isTrue(enabled.get("guest-ping"))
      assert.isTrue(enabled.get("guest-fsfreeze-status"))
      assert.isFalse(enabled.get("guest-fsfreeze-freeze"))
      assert.isFalse(enabled.get("guest-fsfreeze-thaw"))
      for (const name of qga.blocked) assert.isFalse(enabled.get(name), name)
    }), TIMEOUT)

  it.scopedLive("guest-fsfreeze-status is thawed", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      const agent = yield* connect(qga.socketPath)
      assert.strictEqual(yield* GuestAgent.fsfreezeStatus().pipe(withAgent(agent)), "thawed")
    }), TIMEOUT)

  it.scopedLive("blocked RPCs fail with CommandNotFound: has been disabled", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      const agent = yield* connect(qga.socketPath)
      type Call = Effect.Effect<unknown, GuestAgent.GuestAgentError | QmpDecodeError, GuestAgent.GuestAgent>
      const calls: ReadonlyArray<readonly [string, Call]> = [
        ["guest-fsfreeze-freeze", GuestAgent.fsfreezeFreeze()],
        ["guest-fsfreeze-thaw", GuestAgent.fsfreezeThaw()],
        ["guest-get-fsinfo", GuestAgent.getFsinfo()]
      ]
      for (const [command, call] of calls) {
        const error = yield* Effect.flip(call.pipe(withAgent(agent)))
        assert.strictEqual(error._tag, "GuestAgentCommandError")
        if (error._tag === "GuestAgentCommandError") {
          assert.strictEqual(error.command, command)
          assert.strictEqual(error.errorClass, "CommandNotFound")
          assert.strictEqual(error.desc, `Command ${command} has been disabled`)
        }
      }
      assert.strictEqual(yield* GuestAgent.fsfreezeStatus().pipe(withAgent(agent)), "thawed")
    }), TIMEOUT)

  it.scopedLive("an unknown command fails with CommandNotFound", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      const agent = yield* connect(qga.socketPath)
      const error = yield* Effect.flip(agent.execute("guest-no-such-thing"))
      assert.strictEqual(error._tag, "GuestAgentCommandError")
      if (error._tag === "GuestAgentCommandError") assert.strictEqual(error.errorClass, "CommandNotFound")
    }), TIMEOUT)

  it.scopedLive("a call that times out resyncs, so its late reply does not reach the next call", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      const agent = yield* connect(qga.socketPath)
      yield* qga.signal("SIGSTOP")
      const [error, ms] = yield* elapsed(Effect.flip(GuestAgent.ping({ timeout: "300 millis" }).pipe(withAgent(agent))))
      assert.strictEqual(error._tag, "GuestAgentTimeoutError")
      if (error._tag === "GuestAgentTimeoutError") assert.strictEqual(error.command, "guest-ping")
      assert.isAtLeast(ms, 250)
      yield* qga.signal("SIGCONT")
      // The agent now answers the abandoned ping ({}) first; the next call must get its own reply.
      assert.strictEqual(yield* GuestAgent.fsfreezeStatus().pipe(withAgent(agent)), "thawed")
    }), TIMEOUT)

  it.scopedLive("qemu-ga killed mid-call fails the call with QmpClosedError", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      const agent = yield* connect(qga.socketPath)
      yield* qga.signal("SIGSTOP")
      const pending = yield* Effect.fork(GuestAgent.fsfreezeStatus().pipe(withAgent(agent)))
      yield* Effect.sleep("200 millis")
      yield* qga.signal("SIGKILL")
      const error = yield* Effect.flip(Fiber.join(pending)).pipe(Effect.timeout("5 seconds"))
      assert.strictEqual(error._tag, "QmpClosedError")
    }), TIMEOUT)

  it.scopedLive("layer provides the service to the command functions", () =>
    Effect.gen(function*() {
      const qga = yield* startQemuGa
      const layer = GuestAgent.layer({ address: qga.socketPath, commandTimeout: "5 seconds" }).pipe(
        Layer.provide(NodeQmpTransport.layer)
      )
      const status = yield* GuestAgent.fsfreezeStatus().pipe(Effect.provide(layer))
      assert.strictEqual(status, "thawed")
    }), TIMEOUT)
})

describe("GuestAgent without an agent", () => {
  it.scopedLive.skipIf(!hasQemu)("QEMU's chardev with no guest agent: the sync times out", () =>
    Effect.gen(function*() {
      const qemu = yield* startQemu({ guestAgentChardev: true })
      const [error, ms] = yield* elapsed(Effect.flip(connect(qemu.qgaPath!, { syncTimeout: "1 second" })))
      assert.strictEqual(error._tag, "GuestAgentTimeoutError")
      if (error._tag === "GuestAgentTimeoutError") assert.strictEqual(error.command, "guest-sync-delimited")
      assert.isAtLeast(ms, 900)
      assert.isBelow(ms, 5000)
    }), TIMEOUT)

  it.scopedLive("a socket whose peer never answers: the sync times out", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const peer = yield* fakePeer(Path.join(dir, "qga.sock"), {})
      const error = yield* Effect.flip(connect(peer.path, { syncTimeout: "500 millis" }))
      assert.strictEqual(error._tag, "GuestAgentTimeoutError")
      assert.isTrue(peer.received.some((line) => line.startsWith("\xff") && line.includes("guest-sync-delimited")))
    }), TIMEOUT)

  it.scopedLive("a missing socket fails with QmpConnectError (Open)", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      const error = yield* Effect.flip(connect(Path.join(dir, "absent.sock")))
      assert.strictEqual(error._tag, "QmpConnectError")
      if (error._tag === "QmpConnectError") assert.strictEqual(error.reason, "Open")
    }), TIMEOUT)

  it.scopedLive("output before the 0xFF delimiter and replies to other syncs are discarded", () =>
    Effect.gen(function*() {
      const dir = yield* makeTempDir()
      // What a channel can hold (stock-qemu.md §9.1): an error for a truncated request, even a reply carrying our
      // id but sent before the delimiter, junk, half a line; then the delimiter and a reply to an older sync.
      // The reply to our sync comes 300 ms later: a client accepting any of the earlier ones would finish sooner.
      const peer = yield* fakePeer(Path.join(dir, "qga.sock"), {
        onLine: (line, connection) => {
          const body = line.replace(/^\xff/, "")
          const command = commandOf(body)
          if (command === "guest-sync-delimited") {
            const nonce = (JSON.parse(body) as { arguments: { id: number } }).arguments.id
            connection.write("{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray\"}}\n")
            connection.write(`{"return": ${nonce}}\njunk\n{"return": "half a rep`)
            connection.write(Buffer.from([0xff]))
            connection.write(`{"return": ${nonce + 1}}\n`)
            setTimeout(() => connection.write(`{"return": ${nonce}}\n`), 300)
          } else if (command === "guest-fsfreeze-status") {
            connection.write(`{"return": "thawed", "id": ${idOf(body)}}\n`)
          }
        }
      })
      const [agent, ms] = yield* elapsed(connect(peer.path, { syncTimeout: "5 seconds" }))
      assert.isAtLeast(ms, 250)
      assert.strictEqual(yield* GuestAgent.fsfreezeStatus().pipe(withAgent(agent)), "thawed")
    }), TIMEOUT)
})
