import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Chunk, Deferred, Effect, Fiber, Stream } from "effect"
import type * as VmaOutput from "../src/VmaOutput.js"
import * as VmaOutputs from "../src/VmaOutput.js"
import * as VmaError from "../src/VmaError.js"
import * as VmaWriter from "../src/VmaWriter.js"
import { CLUSTER, clusterOps, concat, encodeBytes, makeImage, verifyBytes } from "./utils.js"

/** An output keeping everything in memory and counting what it received. */
const memory = () => {
  const chunks: Array<Uint8Array> = []
  let closed = false
  const output: VmaOutput.VmaOutput = {
    write: (parts) =>
      Effect.sync(() => {
        for (const p of parts) chunks.push(Uint8Array.from(p))
      }),
    close: Effect.sync(() => {
      closed = true
    })
  }
  return {
    output,
    bytes: () => concat(chunks),
    received: () => chunks.reduce((n, c) => n + c.length, 0),
    closed: () => closed
  }
}

const devices = [{ name: "drive-scsi0", size: 10 * CLUSTER }, { name: "drive-scsi1", size: 100_000 }]

describe("VmaWriter", () => {
  it.effect("rejects misuse with typed errors and keeps its state", () =>
    Effect.gen(function*() {
      const mem = memory()
      const writer = yield* VmaWriter.make({ output: mem.output, devices })
      const cluster = new Uint8Array(CLUSTER).fill(1)
      const reason = <E extends { readonly _tag: string }>(e: Effect.Effect<unknown, E>) =>
        Effect.map(Effect.flip(e), (err) => "reason" in err ? err.reason : err._tag)
      const writerError = <E>(e: Effect.Effect<unknown, E>) =>
        Effect.flatMap(Effect.flip(e), (err) =>
          err instanceof VmaError.VmaWriterError ? Effect.succeed(err) : Effect.die(err))
      assert.strictEqual(yield* reason(writer.writeData(1, 4096, cluster)), "Unaligned")
      assert.strictEqual(yield* reason(writer.writeData(1, 0, cluster.subarray(0, 1000))), "Unaligned")
      assert.strictEqual(yield* reason(writer.writeData(1, 9 * CLUSTER, new Uint8Array(2 * CLUSTER))), "InvalidLength")
      assert.strictEqual(yield* reason(writer.writeZeros(2, 0, 200_000)), "InvalidLength")
      assert.strictEqual(yield* reason(writer.writeCluster(1, 10, null)), "ClusterOutOfRange")
      assert.strictEqual(yield* reason(writer.writeCluster(2, 0, new Uint8Array(100))), "InvalidLength")
      assert.strictEqual(yield* reason(writer.writeCluster(0, 0, null)), "UnknownDevice")
      assert.strictEqual(yield* reason(writer.writeCluster(3, 0, null)), "UnknownDevice")
      yield* writer.writeCluster(1, 3, cluster)
      assert.strictEqual(yield* reason(writer.writeCluster(1, 3, null)), "DuplicateCluster")
      const overlap = yield* writerError(writer.writeData(1, 0, new Uint8Array(5 * CLUSTER)))
      assert.deepStrictEqual([overlap.reason, overlap.device, overlap.cluster], ["DuplicateCluster", "drive-scsi0", 3])
      // nothing of the rejected range was recorded: clusters 0..2 can still be written
      yield* writer.writeData(1, 0, new Uint8Array(3 * CLUSTER))
      yield* writer.writeZeros(1, 4 * CLUSTER, 6 * CLUSTER)
      // device 2 (100 000 bytes, 2 clusters): the last cluster may be short
      yield* writer.writeData(2, 0, makeImage(CLUSTER))
      const missing = yield* writerError(writer.finish)
      assert.deepStrictEqual([missing.reason, missing.device, missing.cluster], ["MissingCluster", "drive-scsi1", 1])
      assert.isFalse(mem.closed(), "the output stays open when finish fails")
      yield* writer.writeData(2, CLUSTER, makeImage(100_000 - CLUSTER))
      const stats = yield* writer.finish
      assert.isTrue(mem.closed())
      assert.deepStrictEqual(stats.devices.map((d) => [d.written, d.transferred]), [[10, 10 * CLUSTER], [2, 100_000]])
      assert.strictEqual(stats.bytes, mem.received())
      assert.strictEqual((yield* verifyBytes(mem.bytes())).clusters, 12)
      assert.strictEqual(yield* reason(writer.writeCluster(1, 0, null)), "Finished")
      assert.strictEqual(yield* reason(writer.finish), "Finished")
    }))

  it.effect("validates configs and devices up front", () =>
    Effect.gen(function*() {
      const reason = (options: VmaWriter.VmaArchiveOptions) =>
        Effect.map(Effect.flip(encodeBytes([], options)), (e) => e.reason)
      const many = (n: number) => Array.from({ length: n }, (_, i) => ({ name: `drive-scsi${i}`, size: CLUSTER }))
      assert.strictEqual(yield* reason({ devices: many(255) }), "TooManyDevices")
      assert.strictEqual(yield* reason({ devices: [{ name: "vmstate", size: CLUSTER }] }), "InvalidDevice")
      assert.strictEqual(yield* reason({ devices: [{ name: "a", size: 0 }] }), "InvalidDevice")
      assert.strictEqual(yield* reason({ devices: [{ name: "a", size: 1 }, { name: "a", size: 1 }] }), "InvalidDevice")
      assert.strictEqual(yield* reason({ configs: [{ name: "big", data: new Uint8Array(65_536) }] }), "InvalidConfig")
      const sameBase = [{ name: "a/x", data: "" }, { name: "b/x", data: "" }]
      assert.strictEqual(yield* reason({ configs: sameBase }), "InvalidConfig")
      assert.strictEqual(yield* reason({ uuid: "nope" }), "InvalidUuid")
      assert.strictEqual(yield* reason({ clustersPerExtent: 60 }), "InvalidOption")
      // 254 devices are fine; every one must be written
      const ops = many(254).map((_, i) => VmaWriter.zeros(i + 1, 0, CLUSTER))
      const bytes = yield* encodeBytes(ops, { devices: many(254) })
      assert.strictEqual((yield* verifyBytes(bytes)).clusters, 254)
    }))

  it.effect("back-pressure: every completed extent is handed to the output before a write returns", () =>
    Effect.gen(function*() {
      const mem = memory()
      const image = makeImage(200 * CLUSTER, 4)
      const writer = yield* VmaWriter.make({ output: mem.output, devices: [{ name: "d", size: image.length }] })
      for (let off = 0; off < image.length; off += 7 * CLUSTER) {
        yield* writer.writeData(1, off, image.subarray(off, Math.min(image.length, off + 7 * CLUSTER)))
        const stats = yield* writer.stats
        assert.strictEqual(mem.received(), stats.bytes)
        // At most one extent (58 clusters) is pending inside the writer.
        assert.isAtMost(stats.devices[0]!.written - stats.extents * 58, 58)
      }
      yield* writer.finish
      assert.strictEqual((yield* verifyBytes(mem.bytes())).clusters, 200)
    }))

  it.effect("write-behind: a call waits only for the previous write; bytes and errors are unchanged", () =>
    Effect.gen(function*() {
      const image = makeImage(300 * CLUSTER, 6)
      const ops = { uuid: "0123456789abcdef0123456789abcdef", ctime: 1 } as const
      const chunk = 64 * CLUSTER
      // an output whose writes finish only when the test releases them, one at a time
      const chunks: Array<Uint8Array> = []
      const gates: Array<Deferred.Deferred<void>> = []
      let started = 0
      let finished = 0
      const gated: VmaOutput.VmaOutput = {
        write: (parts) =>
          Effect.gen(function*() {
            const gate = yield* Deferred.make<void>()
            gates.push(gate)
            started++
            yield* Deferred.await(gate)
            for (const p of parts) chunks.push(Uint8Array.from(p))
            finished++
          }),
        close: Effect.void
      }
      const writer = yield* VmaWriter.make({
        output: gated,
        devices: [{ name: "d", size: image.length }],
        ...ops,
        writeBehind: true
      })
      const releaseNext = Effect.suspend(() => Deferred.succeed(gates[finished]!, undefined))
      yield* writer.writeData(1, 0, image.subarray(0, chunk)) // completes extent 1: its write runs behind
      yield* Effect.yieldNow()
      assert.deepStrictEqual([started, finished], [1, 0])
      // the next call waits for the first write; its own write starts right after, without the caller
      const second = yield* Effect.fork(writer.writeData(1, chunk, image.subarray(chunk, 2 * chunk)))
      yield* Effect.yieldNow()
      assert.isNull(second.unsafePoll())
      yield* releaseNext
      yield* Fiber.join(second)
      yield* Effect.yieldNow()
      assert.deepStrictEqual([started, finished], [2, 1])
      const rest = yield* Effect.fork(Effect.zipRight(
        writer.writeData(1, 2 * chunk, image.subarray(2 * chunk)),
        writer.finish
      ))
      while (rest.unsafePoll() === null) {
        if (gates.length > finished) yield* releaseNext
        yield* Effect.yieldNow()
      }
      yield* Fiber.join(rest)
      const plain = memory()
      const reference = yield* VmaWriter.make({
        output: plain.output,
        devices: [{ name: "d", size: image.length }],
        ...ops
      })
      yield* reference.writeData(1, 0, image)
      yield* reference.finish
      assert.deepStrictEqual(concat(chunks), plain.bytes())

      // a failed write behind the caller fails the next call, and every later one
      const failing: VmaOutput.VmaOutput = {
        write: () => Effect.fail(new VmaError.VmaIoError({ operation: "write", path: "x", detail: "No space left" })),
        close: Effect.void
      }
      const broken = yield* VmaWriter.make({
        output: failing,
        devices: [{ name: "d", size: image.length }],
        writeBehind: true
      })
      yield* broken.writeData(1, 0, image.subarray(0, chunk))
      const next = yield* Effect.flip(broken.writeData(1, chunk, image.subarray(chunk, 2 * chunk)))
      assert.strictEqual(next._tag, "VmaIoError")
      assert.strictEqual((yield* Effect.flip(broken.finish))._tag, "VmaIoError")
    }))

  it.effect("write-behind N on an output with `begin`: N writes run at once, positions and bytes are kept", () =>
    Effect.gen(function*() {
      const image = makeImage(600 * CLUSTER, 8)
      const ops = { uuid: "0123456789abcdef0123456789abcdef", ctime: 1 } as const
      const chunk = 64 * CLUSTER
      // writes start at once and finish only when the test releases them, in any order
      const running: Array<{ readonly parts: ReadonlyArray<Uint8Array>; readonly gate: Deferred.Deferred<void> }> = []
      const done: Array<ReadonlyArray<Uint8Array>> = []
      let fail = false
      const output: VmaOutput.VmaOutput = {
        write: () => Effect.die("not used when begin is present"),
        begin: (parts) =>
          Effect.map(Deferred.make<void>(), (gate) => {
            const copy = parts.map((p) => Uint8Array.from(p))
            running.push({ parts: copy, gate })
            return Effect.zipRight(
              Deferred.await(gate),
              Effect.suspend(() =>
                fail
                  ? Effect.fail(new VmaError.VmaIoError({ operation: "write", path: "x", detail: "No space left" }))
                  : Effect.sync(() => void done.push(copy))
              )
            )
          }),
        close: Effect.void
      }
      const writer = yield* VmaWriter.make({ output, devices: [{ name: "d", size: image.length }], ...ops, writeBehind: 3 })
      // every 64-cluster call completes an extent and starts its write; three calls return without waiting
      for (let k = 0; k < 3; k++) yield* writer.writeData(1, k * chunk, image.subarray(k * chunk, (k + 1) * chunk))
      assert.strictEqual(running.length, 3)
      assert.strictEqual(done.length, 0)
      // the fourth starts its write too, then waits for the oldest
      const fourth = yield* Effect.fork(writer.writeData(1, 3 * chunk, image.subarray(3 * chunk, 4 * chunk)))
      yield* Effect.yieldNow()
      assert.strictEqual(running.length, 4)
      assert.isNull(fourth.unsafePoll())
      yield* Deferred.succeed(running[1]!.gate, undefined) // a later one finishing first does not release it
      yield* Effect.yieldNow()
      assert.isNull(fourth.unsafePoll())
      yield* Deferred.succeed(running[0]!.gate, undefined)
      yield* Fiber.join(fourth)
      const rest = yield* Effect.fork(Effect.zipRight(
        writer.writeData(1, 4 * chunk, image.subarray(4 * chunk)),
        writer.finish
      ))
      while (rest.unsafePoll() === null) {
        for (const r of running) yield* Deferred.succeed(r.gate, undefined)
        yield* Effect.yieldNow()
      }
      yield* Fiber.join(rest)
      const reference = yield* encodeBytes(clusterOps([image]), { devices: [{ name: "d", size: image.length }], ...ops })
      // the writes were started in archive order
      assert.deepStrictEqual(concat(running.flatMap((r) => r.parts)), reference)

      // a failed write fails a later call and finish
      running.length = 0
      fail = true
      const broken = yield* VmaWriter.make({ output, devices: [{ name: "d", size: image.length }], writeBehind: 2 })
      yield* broken.writeData(1, 0, image.subarray(0, chunk))
      yield* broken.writeData(1, chunk, image.subarray(chunk, 2 * chunk))
      for (const r of running) yield* Deferred.succeed(r.gate, undefined)
      const error = yield* Effect.flip(broken.writeData(1, 2 * chunk, image.subarray(2 * chunk, 3 * chunk)))
      assert.strictEqual(error._tag, "VmaIoError")
      assert.strictEqual((yield* Effect.flip(broken.finish))._tag, "VmaIoError")
      const bad = yield* Effect.flip(VmaWriter.make({ output, devices: [], writeBehind: -1 }))
      assert.strictEqual(bad._tag === "VmaWriterError" ? bad.reason : bad._tag, "InvalidOption")
    }))

  it.scopedLive("write-behind on a file and a FIFO: the same archive as without; closed before finish, the file is removed", () =>
    Effect.gen(function*() {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "vma-wb-"))
      yield* Effect.addFinalizer(() => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true })))
      const image = makeImage(1000 * CLUSTER + 4321, 9)
      const ops = { uuid: "0123456789abcdef0123456789abcdef", ctime: 1, devices: [{ name: "d", size: image.length }] }
      const file = path.join(dir, "a.vma")
      yield* Effect.scoped(Effect.gen(function*() {
        const writer = yield* VmaWriter.make({ output: yield* VmaOutputs.file(file), ...ops, writeBehind: 4 })
        for (let off = 0; off < image.length; off += 64 * CLUSTER) {
          yield* writer.writeData(1, off, image.subarray(off, off + 64 * CLUSTER))
        }
        yield* writer.finish
      }))
      assert.deepStrictEqual(new Uint8Array(fs.readFileSync(file)), yield* encodeBytes(clusterOps([image]), ops))
      // a FIFO is written in order (no positions), write-behind or not
      const fifo = path.join(dir, "fifo")
      execFileSync("mkfifo", [fifo])
      const received = Effect.promise(() =>
        new Promise<Buffer>((resolve, reject) => {
          const parts: Array<Buffer> = []
          fs.createReadStream(fifo).on("data", (d) => parts.push(d as Buffer)).on("end", () => resolve(Buffer.concat(parts)))
            .on("error", reject)
        })
      )
      const reader = yield* Effect.fork(received)
      yield* Effect.scoped(Effect.gen(function*() {
        const writer = yield* VmaWriter.make({
          output: yield* VmaOutputs.file(fifo, { exclusive: false }),
          ...ops,
          writeBehind: 4
        })
        yield* writer.writeData(1, 0, image)
        yield* writer.finish
      }))
      assert.deepStrictEqual(new Uint8Array(yield* Fiber.join(reader)), yield* encodeBytes(clusterOps([image]), ops))
      // the scope closes with writes running: the file is removed once they are done
      const second = path.join(dir, "b.vma")
      yield* Effect.scoped(Effect.gen(function*() {
        const writer = yield* VmaWriter.make({ output: yield* VmaOutputs.file(second), ...ops, writeBehind: 4 })
        yield* writer.writeData(1, 0, image.subarray(0, 512 * CLUSTER))
      }))
      assert.isFalse(fs.existsSync(second))
    }))

  it.effect("concurrent writers on different devices produce one valid archive", () =>
    Effect.gen(function*() {
      const a = makeImage(40 * CLUSTER, 5)
      const b = makeImage(33 * CLUSTER + 512, 6)
      const mem = memory()
      const writer = yield* VmaWriter.make({
        output: mem.output,
        devices: [{ name: "a", size: a.length }, { name: "b", size: b.length }]
      })
      const ops = clusterOps([a, b])
      yield* Effect.forEach([ops.filter((o) => o.device === 1), ops.filter((o) => o.device === 2)], (list) =>
        Effect.forEach(list, (op) => Effect.zipRight(Effect.yieldNow(), writer.write(op))), { concurrency: 2 })
      yield* writer.finish
      assert.strictEqual((yield* verifyBytes(mem.bytes())).clusters, 74)
    }))

  it.scopedLive("an output error fails the write and every later call", () =>
    Effect.gen(function*() {
      const fd = fs.openSync("/dev/full", "w")
      yield* Effect.addFinalizer(() => Effect.sync(() => fs.closeSync(fd)))
      const writer = yield* VmaWriter.make({
        output: yield* VmaOutputs.fd(fd),
        devices: [{ name: "d", size: 100 * CLUSTER }]
      })
      const error = yield* Effect.flip(writer.writeData(1, 0, makeImage(100 * CLUSTER)))
      assert.strictEqual(error._tag, "VmaIoError")
      assert.strictEqual(error._tag === "VmaIoError" ? error.code : "", "ENOSPC")
      const again = yield* Effect.flip(writer.finish)
      assert.strictEqual(again, error)
    }))

  it.effect("the Stream variant fails when the input ends early", () =>
    Effect.gen(function*() {
      const error = yield* Effect.flip(Stream.runCollect(VmaWriter.encode(
        Stream.make(VmaWriter.cluster(1, 0, null)),
        { devices: [{ name: "d", size: 3 * CLUSTER }] }
      )).pipe(Effect.map(Chunk.size)))
      assert.deepStrictEqual([error.reason, error.device, error.cluster], ["MissingCluster", "d", 1])
    }))
})
