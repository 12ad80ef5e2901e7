/**
 * The workflow writing real VMA archives with vzdump's dump-directory conventions (VmaTarget), read
 * back with this project's reader and checked with the `vma` CLI.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import * as Fs from "node:fs/promises"
import * as BackupJob from "@vzdump/core/BackupJob"
import * as BackupReporter from "@vzdump/core/BackupReporter"
import * as VmaInput from "@vzdump/target-vma/VmaInput"
import * as VmaReader from "@vzdump/target-vma/VmaReader"
import * as VmaTarget from "@vzdump/target-vma/VmaTarget"
import { imageBytes, makeTestHost, run, sha256, sha256File, stopOnExit } from "./utils/env.js"

const extract = (archive: string, directory: string) =>
  Effect.scoped(Effect.gen(function*() {
    const input = yield* VmaInput.file(archive)
    return yield* VmaReader.extract(yield* VmaReader.open(input), { directory })
  }))

describe("backup workflow to VMA archives", () => {
  for (const compress of ["gzip", "lzo", "0"] as const) {
    it.scopedLive(`a VM that is off, compress=${compress}: vzdump's names, .log beside it, disks restored exactly`, () =>
      Effect.gen(function*() {
        const host = yield* makeTestHost()
        const dumpdir = `${host.dir}/dump`
        const disk0 = `${host.dir}/d0.qcow2`
        yield* Effect.promise(() => run("qemu-img", ["create", "-q", "-f", "qcow2", disk0, "8M"]))
        yield* host.qemuIo(disk0, "qcow2", ["write -P 0x61 0 300k", "write -P 0x62 6M 1M"])
        yield* host.writeConfig(120, `name: vma-test\nmemory: 128\nvirtio0: ${disk0},size=8M\n`)
        const expected = yield* Effect.promise(() => imageBytes(disk0, "qcow2", host.dir))
        const result = yield* Effect.gen(function*() {
          yield* stopOnExit(120)
          return yield* BackupJob.backupVm({ vmid: 120 })
        }).pipe(Effect.provide(Layer.mergeAll(
          host.layer,
          VmaTarget.layer({ dumpdir, compress }),
          BackupReporter.layerSilent
        )))
        const extension = { gzip: ".vma.gz", lzo: ".vma.lzo", "0": ".vma" }[compress]
        assert.match(result.archive.location, new RegExp(`/vzdump-qemu-120-\\d{4}_\\d\\d_\\d\\d-\\d\\d_\\d\\d_\\d\\d\\${extension}$`))
        const files = (yield* Effect.promise(() => Fs.readdir(dumpdir))).sort()
        const base = result.archive.location.slice(dumpdir.length + 1).replace(/\.vma.*$/, "")
        assert.deepStrictEqual(files, [`${base}.log`, `${base}${extension}`])
        const log = yield* Effect.promise(() => Fs.readFile(`${dumpdir}/${base}.log`, "utf8"))
        assert.match(log, /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO: Starting Backup of VM 120 \(qemu\)$/m)
        assert.match(log, /INFO: archive file size: /)
        assert.match(log, /INFO: Finished Backup of VM 120 \(\d\d:\d\d:\d\d\)\n$/)
        const out = yield* extract(result.archive.location, `${host.dir}/x`)
        assert.deepStrictEqual(out.configs.map((c) => c.replace(/^.*\//, "")), ["qemu-server.conf"])
        const disk = out.disks.find((d) => d.device.name === "drive-virtio0")!
        assert.strictEqual(yield* Effect.promise(() => sha256File(disk.path)), sha256(expected))
        const conf = yield* Effect.promise(() => Fs.readFile(`${host.dir}/x/qemu-server.conf`, "utf8"))
        assert.include(conf, "#qmdump#map:virtio0:drive-virtio0::qcow2:")
        const { stdout } = yield* Effect.promise(() => run("npx", ["vma", "verify", result.archive.location]))
        assert.strictEqual(stdout, "")
      }), 120_000)
  }

  it.scopedLive("a diskless VM: an archive with the config and no devices, no QMP job", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const dumpdir = `${host.dir}/dump`
      yield* host.writeConfig(121, "name: diskless\nmemory: 128\nide2: none,media=cdrom\n")
      const events: Array<string> = []
      const reporter = Layer.succeed(BackupReporter.BackupReporter, {
        report: (event) => Effect.sync(() => event._tag === "Log" && events.push(event.message))
      })
      const result = yield* Effect.gen(function*() {
        yield* stopOnExit(121)
        return yield* BackupJob.backupVm({ vmid: 121 })
      }).pipe(Effect.provide(Layer.mergeAll(host.layer, VmaTarget.layer({ dumpdir, compress: "zstd" }), reporter)))
      assert.include(events, "starting diskless backup")
      assert.notInclude(events, "starting backup via QMP command")
      assert.isFalse(events.some((line) => line.startsWith("started backup task")))
      const { stdout } = yield* Effect.promise(() => run("npx", ["vma", "config", result.archive.location]))
      assert.include(stdout, "name: diskless")
      const out = yield* extract(result.archive.location, `${host.dir}/x`)
      assert.strictEqual(out.disks.length, 0)
    }), 120_000)
})
