import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import * as Fs from "node:fs/promises"
import * as BackupJob from "@vzdump/core/BackupJob"
import { MemoryStore } from "@vzdump/core/BackupTarget"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import { imageBytes, makeTestHost, memoryTarget, sha256, stopOnExit } from "./utils/env.js"
import * as BackupReporter from "@vzdump/core/BackupReporter"
const silent = process.env.VZDUMP_TEST_LOG ? BackupReporter.layerStderr : BackupReporter.layerSilent

const MiB = 1024 * 1024

describe("backup workflow on stock QEMU (memory target)", () => {
  it.scopedLive("a VM that is off is started paused, backed up and stopped again", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const disk0 = `${host.dir}/disk0.qcow2`
      const disk1 = `${host.dir}/disk1.raw`
      yield* Effect.promise(async () => {
        const { run } = await import("./utils/env.js")
        await run("qemu-img", ["create", "-q", "-f", "qcow2", disk0, "16M"])
        await run("qemu-img", ["create", "-q", "-f", "raw", disk1, "8M"])
      })
      yield* host.qemuIo(disk0, "qcow2", ["write -P 0x11 0 1M", "write -P 0x22 5M 64k", "write -z 8M 1M"])
      yield* host.qemuIo(disk1, "raw", ["write -P 0x33 1M 2M", "write -P 0x44 7M 4k"])
      yield* host.writeConfig(
        101,
        `name: demo\nmemory: 128\nscsi0: ${disk0},size=16M\nvirtio1: ${disk1},size=8M\nunused0: local:101/vm-101-disk-9.raw\n`
      )
      const expected = yield* Effect.promise(() =>
        Promise.all([imageBytes(disk0, "qcow2", host.dir), imageBytes(disk1, "raw", host.dir)])
      )
      const layer = Layer.mergeAll(host.layer, memoryTarget, silent)
      const outcome = yield* Effect.gen(function*() {
        yield* stopOnExit(101)
        const result = yield* BackupJob.backupVm({ vmid: 101 })
        const store = yield* MemoryStore
        const status = yield* Effect.flatMap(Hypervisor, (h) => h.status(101))
        return { result, store, status }
      }).pipe(Effect.provide(layer))
      assert.strictEqual(outcome.status.running, false, "QEMU stopped again after the backup")
      assert.strictEqual(outcome.store.length, 1)
      const archive = outcome.store[0]!
      assert.deepStrictEqual(archive.request.devices.map((d) => [d.name, d.size]), [
        ["drive-scsi0", 16 * MiB],
        ["drive-virtio1", 8 * MiB]
      ])
      assert.strictEqual(sha256(archive.disks[0]!), sha256(expected[0]))
      assert.strictEqual(sha256(archive.disks[1]!), sha256(expected[1]))
      const conf = new TextDecoder().decode(archive.request.configs[0]!.data)
      assert.include(conf, "#qmdump#map:scsi0:drive-scsi0::qcow2:")
      assert.notInclude(conf, "unused0")
      const lines = outcome.result.logLines.map((line) => line.replace(/^\S+ \S+ /, ""))
      assert.include(lines, "INFO: status = stopped")
      assert.include(lines, "INFO: backup mode: stop")
      assert.include(lines, "INFO: starting kvm to execute backup task")
      assert.include(lines, "INFO: stopping kvm after backup task")
      assert.isTrue(lines.some((line) => /^INFO: Finished Backup of VM 101 \(\d\d:\d\d:\d\d\)$/.test(line)))
      const config = yield* Effect.promise(() => Fs.readFile(`${host.configDir}/101.conf`, "utf8"))
      assert.notInclude(config, "lock:")
    }), 120_000)
})
