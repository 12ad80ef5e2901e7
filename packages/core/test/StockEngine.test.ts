/**
 * The stock-QEMU engine's data path against a real (paused) QEMU: the archive receives exactly the
 * disk's bytes with the default read options and with several NBD connections, small requests and
 * chunks that do not divide the disk; afterwards nothing of the backup is left in QEMU or on disk.
 */
import { assert, describe, it } from "@effect/vitest"
import * as NodeQmpTransport from "@vzdump/qmp/NodeQmpTransport"
import * as QmpClient from "@vzdump/qmp/QmpClient"
import type { QmpClientService } from "@vzdump/qmp/QmpClient"
import { Effect, Layer } from "effect"
import { spawn, spawnSync } from "node:child_process"
import { randomFillSync } from "node:crypto"
import * as Fs from "node:fs"
import * as Path from "node:path"
import type { EngineJob } from "../src/BackupEngine.js"
import * as BackupTarget from "../src/BackupTarget.js"
import * as HostCommand from "../src/HostCommand.js"
import * as StockEngine from "../src/StockEngine.js"

const hasQemu = spawnSync("sh", ["-c", "command -v qemu-system-x86_64 && command -v qemu-img"], { stdio: "ignore" })
  .status === 0

const MiB = 1024 * 1024
/** Not a multiple of the chunk sizes used below, so the last chunk is short. */
const SIZE = 21 * MiB + 64 * 1024

/** Random data at 0 (3 MiB), 7.5M (2 MiB + 4 KiB) and in the last 100 KiB; holes elsewhere. */
const makeDisk = (file: string) => {
  const fd = Fs.openSync(file, "w")
  Fs.ftruncateSync(fd, SIZE)
  for (const [offset, length] of [[0, 3 * MiB], [7.5 * MiB, 2 * MiB + 4096], [SIZE - 100 * 1024, 100 * 1024]]) {
    const data = randomFillSync(Buffer.allocUnsafe(length))
    Fs.writeSync(fd, data, 0, length, offset)
  }
  Fs.closeSync(fd)
  return Fs.readFileSync(file)
}

/** A paused QEMU with the disk as virtio-blk `scsi0` (node `drive-scsi0`), killed by PID on scope close. */
const startQemu = (dir: string, disk: string) =>
  Effect.acquireRelease(
    Effect.async<{ readonly pid: number; readonly qmp: string }, Error>((resume) => {
      const qmp = Path.join(dir, "qmp.sock")
      const child = spawn("qemu-system-x86_64", [
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "q35,accel=tcg",
        "-m",
        "64",
        "-qmp",
        `unix:${qmp},server=on,wait=off`,
        "-blockdev",
        `driver=file,filename=${disk},node-name=file-scsi0`,
        "-blockdev",
        "driver=raw,file=file-scsi0,node-name=drive-scsi0",
        "-device",
        "virtio-blk-pci,drive=drive-scsi0,id=scsi0"
      ], { stdio: "ignore" })
      let tries = 0
      const poll = () => {
        if (Fs.existsSync(qmp)) return resume(Effect.succeed({ pid: child.pid!, qmp }))
        if (child.exitCode !== null || ++tries > 400) {
          if (child.exitCode === null) child.kill("SIGKILL")
          return resume(Effect.fail(new Error("QEMU did not open its QMP socket")))
        }
        setTimeout(poll, 25)
      }
      poll()
    }),
    ({ pid }) =>
      Effect.sync(() => {
        try {
          process.kill(pid, "SIGKILL")
        } catch {
          // already gone
        }
      })
  )

/** One backup of the disk through the engine into the memory target; returns the archive and the final status. */
const backup = (qmp: QmpClientService, dir: string, options: Partial<StockEngine.StockEngineOptions>) =>
  Effect.gen(function*() {
    const engine = yield* StockEngine.make({ fleeceDir: dir, socketDir: dir, ...options })
    const target = yield* BackupTarget.BackupTarget
    const store = yield* BackupTarget.MemoryStore
    const status = yield* Effect.scoped(Effect.gen(function*() {
      const archive = yield* target.open({
        vmid: 300,
        startTime: new Date(),
        configs: [],
        devices: [{ name: "drive-scsi0", size: SIZE }]
      })
      const job: EngineJob = {
        vmid: 300,
        devices: [{ virtdev: "scsi0", qmdevice: "drive-scsi0", path: "", format: "raw", size: SIZE }],
        qmp,
        archive,
        speed: 0,
        log: () => Effect.void
      }
      yield* engine.prepare(job)
      const running = yield* engine.start(job)
      let status = yield* running.status
      while (status.status === "active") {
        yield* Effect.sleep("20 millis")
        status = yield* running.status
      }
      yield* archive.commit
      return status
    }))
    return { archive: store[store.length - 1]!, status }
  }).pipe(Effect.provide(Layer.merge(BackupTarget.layerMemory, HostCommand.layer)))

/** What a backup may leave behind in QEMU: exports, jobs, fleece nodes. */
const leftovers = (qmp: QmpClientService) =>
  Effect.gen(function*() {
    const exports = (yield* qmp.execute("query-block-exports")) as ReadonlyArray<unknown>
    const jobs = (yield* qmp.execute("query-jobs")) as ReadonlyArray<unknown>
    const nodes = (yield* qmp.execute("query-named-block-nodes", { flat: true })) as ReadonlyArray<
      { readonly "node-name": string }
    >
    return {
      exports: exports.length,
      jobs: jobs.length,
      fleeceNodes: nodes.filter((node) => node["node-name"].startsWith("vzdump-")).length
    }
  })

describe("StockEngine against a paused QEMU", () => {
  it.scopedLive.skipIf(!hasQemu)("archives the exact disk with default and multi-connection reads; cleans up", () =>
    Effect.gen(function*() {
      const dir = yield* Effect.acquireRelease(
        Effect.sync(() => Fs.mkdtempSync("/tmp/vse-")),
        (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
      )
      const disk = Path.join(dir, "disk.raw")
      const expected = makeDisk(disk)
      const qemu = yield* startQemu(dir, disk)
      const qmp = yield* QmpClient.make({ address: qemu.qmp, handshakeTimeout: "10 seconds" })
      const variants: ReadonlyArray<Partial<StockEngine.StockEngineOptions>> = [
        {},
        { connections: 3, requestSize: 512 * 1024, chunkSize: 2 * MiB, concurrency: 5 },
        { requestSize: 4 * MiB, chunkSize: 8 * MiB, concurrency: 1 }
      ]
      for (const options of variants) {
        const { archive, status } = yield* backup(qmp, dir, options)
        const label = JSON.stringify(options)
        assert.strictEqual(status.status, "done", label)
        assert.strictEqual(status.transferred, SIZE, label)
        assert.isTrue(Buffer.from(archive.disks[0]!).equals(expected), `archive = disk bytes for ${label}`)
        // holes (from base:allocation or read replies) are counted, data is not
        const data = 3 * MiB + 2 * MiB + 4096 + 100 * 1024
        assert.isTrue(status["zero-bytes"]! > 0 && status["zero-bytes"]! <= SIZE - data, label)
        assert.deepStrictEqual(yield* leftovers(qmp), { exports: 0, jobs: 0, fleeceNodes: 0 }, label)
        assert.deepStrictEqual(Fs.readdirSync(dir).sort(), ["disk.raw", "qmp.sock"], label)
      }
    }).pipe(Effect.provide(NodeQmpTransport.layer)), 60_000)
})
