/**
 * End to end: dirty-bitmap incrementals of the stock engine to the PBS test server. The bitmaps live
 * in the running QEMU (persistent in qcow2 images, in memory for raw ones); their names say which
 * snapshot they describe the changes since (`vzdump-<target id>-<backup time>`).
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { readFileSync } from "node:fs"
import * as BackupJob from "@vzdump/core/BackupJob"
import { BackupTarget } from "@vzdump/core/BackupTarget"
import { Hypervisor } from "@vzdump/core/Hypervisor"
import * as PbsTarget from "@vzdump/target-pbs/PbsTarget"
import { makeRecorder, makeTestHost, qmp, sha256, startVm } from "./utils/env.js"
import {
  createVm,
  CS,
  guestWrite,
  lineOf,
  MiB,
  nextSecond,
  restored,
  startPbs,
  untimed,
  withTarget
} from "./utils/pbs.js"

interface Bitmap {
  readonly name?: string
  readonly recording: boolean
  readonly persistent: boolean
  readonly count: number
  readonly inconsistent?: boolean
}

/** The named dirty bitmaps of the VM's two disks, by drive (`scsi0`, `virtio1`). */
const bitmapsOf = (vmid: number) =>
  Effect.gen(function*() {
    const blocks = (yield* qmp(vmid, "query-block")) as ReadonlyArray<{
      readonly qdev?: string
      readonly inserted?: { readonly "node-name"?: string }
    }>
    const nodes = (yield* qmp(vmid, "query-named-block-nodes", { flat: true })) as ReadonlyArray<{
      readonly "node-name": string
      readonly "dirty-bitmaps"?: ReadonlyArray<Bitmap>
    }>
    const of = (drive: string) => {
      const node = blocks.find((b) => b.qdev === drive || b.qdev?.startsWith(`/machine/peripheral/${drive}/`))
        ?.inserted?.["node-name"]
      return (nodes.find((n) => n["node-name"] === node)?.["dirty-bitmaps"] ?? []).filter((b) => b.name !== undefined)
    }
    return { scsi0: of("scsi0"), virtio1: of("virtio1") }
  })

const timeOf = (location: string) => Math.floor(Date.parse(location.split("/").at(-1)!) / 1000)

/** Stops QEMU cleanly (`quit`: persistent bitmaps are written to the qcow2) and starts it again. */
const restart = (vmid: number) =>
  Effect.gen(function*() {
    yield* Effect.flatMap(Hypervisor, (h) => h.stop(vmid))
    yield* startVm(vmid)
  })

/** `kill -9` of the VM's QEMU, then a new start. */
const crashAndStart = (runDir: string, vmid: number) =>
  Effect.gen(function*() {
    const pid = Number(readFileSync(`${runDir}/${vmid}/qemu.pid`, "utf8").trim())
    const alive = () => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("qemu")
      } catch {
        return false
      }
    }
    assert.isTrue(alive())
    process.kill(pid, "SIGKILL")
    for (let i = 0; i < 100 && alive(); i++) yield* Effect.sleep("50 millis")
    assert.isFalse(alive())
    yield* startVm(vmid)
  })

const statusLines = (lines: ReadonlyArray<string>) =>
  untimed(lines).filter((line) => line.includes("dirty-bitmap"))

describe("dirty-bitmap incrementals to PBS", () => {
  it.scopedLive("an incremental reads and uploads exactly the dirty chunks; unknown latest snapshot: full read", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const { client, server } = yield* startPbs(host)
      const target = yield* PbsTarget.make(client, { id: "e2e" })
      yield* Effect.gen(function*() {
        const vmid = 121
        const vm = yield* createVm(host, vmid)
        const p2 = (vmid * 7 + 2) & 0xff

        const first = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        assert.deepStrictEqual(statusLines(first.logLines), [
          "INFO: scsi0: dirty-bitmap status: created new",
          "INFO: virtio1: dirty-bitmap status: created new"
        ])
        const t1 = timeOf(first.archive.location)
        const afterFirst = yield* bitmapsOf(vmid)
        assert.deepStrictEqual(afterFirst.scsi0.map((b) => [b.name, b.recording, b.persistent, b.count]), [
          [`vzdump-e2e-${t1}`, true, true, 0]
        ])
        assert.deepStrictEqual(afterFirst.virtio1.map((b) => [b.name, b.recording, b.persistent]), [
          [`vzdump-e2e-${t1}`, true, false]
        ])

        // scsi0: chunk 0 and chunk 3 changed, chunk 1 rewritten with the same bytes; virtio1: chunk 1
        yield* guestWrite(vmid, "scsi0", 0xa1, 0, MiB)
        yield* guestWrite(vmid, "scsi0", 0xa2, 12 * MiB, 64 * 1024)
        yield* guestWrite(vmid, "scsi0", p2, 5 * MiB, MiB)
        yield* guestWrite(vmid, "virtio1", 0xa3, 4 * MiB, 4096)
        const expected = [Buffer.from(vm.content[0]), Buffer.from(vm.content[1])]
        expected[0]!.fill(0xa1, 0, MiB)
        expected[0]!.fill(0xa2, 12 * MiB, 12 * MiB + 64 * 1024)
        expected[1]!.fill(0xa3, 4 * MiB, 4 * MiB + 4096)

        yield* nextSecond
        const before = yield* server.stats
        const second = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        const after = yield* server.stats
        assert.deepStrictEqual(statusLines(second.logLines), [
          "INFO: scsi0: dirty-bitmap status: OK (12.0 MiB of 16.0 MiB dirty)",
          "INFO: virtio1: dirty-bitmap status: OK (4.0 MiB of 8.0 MiB dirty)",
          "INFO: using fast incremental mode (dirty-bitmap), 16.0 MiB dirty of 24.0 MiB total"
        ])
        // 4 dirty chunks read; the one rewritten with its old bytes is known to the server
        assert.isDefined(lineOf(second.logLines, "INFO: transferred 16.00 MiB in"))
        assert.strictEqual(after.chunkUploads - before.chunkUploads, 3)
        assert.strictEqual(
          lineOf(second.logLines, "INFO: backup was done incrementally"),
          "INFO: backup was done incrementally, reused 12.00 MiB (50%)"
        )
        const t2 = timeOf(second.archive.location)
        const afterSecond = yield* bitmapsOf(vmid)
        assert.deepStrictEqual(afterSecond.scsi0.map((b) => [b.name, b.recording]), [[`vzdump-e2e-${t2}`, true]])
        assert.deepStrictEqual(afterSecond.virtio1.map((b) => [b.name, b.recording]), [[`vzdump-e2e-${t2}`, true]])

        const one = yield* restored(client, { vmid, backupTime: t1 }, `${host.dir}/r1`)
        assert.strictEqual(sha256(one.disks[0]!), sha256(vm.content[0]!))
        assert.strictEqual(sha256(one.disks[1]!), sha256(vm.content[1]!))
        const two = yield* restored(client, { vmid, backupTime: t2 }, `${host.dir}/r2`)
        assert.strictEqual(sha256(two.disks[0]!), sha256(expected[0]!))
        assert.strictEqual(sha256(two.disks[1]!), sha256(expected[1]!))

        // another client adds a snapshot to the group: the bitmap no longer belongs to the latest one
        yield* nextSecond
        const other = yield* PbsTarget.make(client, { dirtyBitmaps: false })
        yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(other)))
        assert.deepStrictEqual((yield* bitmapsOf(vmid)).scsi0.map((b) => b.name), [`vzdump-e2e-${t2}`])
        yield* nextSecond
        const fourth = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        assert.deepStrictEqual(statusLines(fourth.logLines), [
          "INFO: scsi0: dirty-bitmap status: existing bitmap was invalid and has been cleared",
          "INFO: virtio1: dirty-bitmap status: existing bitmap was invalid and has been cleared"
        ])
        assert.isDefined(lineOf(fourth.logLines, "INFO: transferred 24.00 MiB in"))
        const t4 = timeOf(fourth.archive.location)
        assert.deepStrictEqual((yield* bitmapsOf(vmid)).scsi0.map((b) => b.name), [`vzdump-e2e-${t4}`])
      }).pipe(Effect.scoped, Effect.provide(host.layer))
    }), 180_000)

  it.scopedLive("QEMU restarted between backups: the qcow2 bitmap survives and the backup is incremental", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const { client, server } = yield* startPbs(host)
      const target = yield* PbsTarget.make(client, { id: "e2e" })
      yield* Effect.gen(function*() {
        const vmid = 122
        const vm = yield* createVm(host, vmid)
        const first = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        const t1 = timeOf(first.archive.location)

        yield* restart(vmid)
        const loaded = yield* bitmapsOf(vmid)
        assert.deepStrictEqual(loaded.scsi0.map((b) => [b.name, b.recording, b.persistent, b.inconsistent]), [
          [`vzdump-e2e-${t1}`, true, true, undefined]
        ])
        assert.deepStrictEqual(loaded.virtio1, [], "a raw disk's bitmap ends with the QEMU process")

        yield* guestWrite(vmid, "scsi0", 0xb1, 9 * MiB, 4096)
        yield* guestWrite(vmid, "virtio1", 0xb2, 0, 4096)
        const expected = [Buffer.from(vm.content[0]), Buffer.from(vm.content[1])]
        expected[0]!.fill(0xb1, 9 * MiB, 9 * MiB + 4096)
        expected[1]!.fill(0xb2, 0, 4096)

        yield* nextSecond
        const before = yield* server.stats
        const second = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        assert.deepStrictEqual(statusLines(second.logLines), [
          "INFO: scsi0: dirty-bitmap status: OK (4.0 MiB of 16.0 MiB dirty)",
          "INFO: virtio1: dirty-bitmap status: created new",
          "INFO: using fast incremental mode (dirty-bitmap), 12.0 MiB dirty of 24.0 MiB total"
        ])
        assert.isDefined(lineOf(second.logLines, "INFO: transferred 12.00 MiB in"))
        assert.strictEqual((yield* server.stats).chunkUploads - before.chunkUploads, 2)
        const back = yield* restored(client, { vmid }, `${host.dir}/r`)
        assert.strictEqual(back.vm.snapshotPath, second.archive.location)
        assert.strictEqual(sha256(back.disks[0]!), sha256(expected[0]!))
        assert.strictEqual(sha256(back.disks[1]!), sha256(expected[1]!))
      }).pipe(Effect.scoped, Effect.provide(host.layer))
    }), 180_000)

  it.scopedLive("after a QEMU crash the bitmap is inconsistent: a full read, logged; then incremental again", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const { client, server } = yield* startPbs(host)
      const target = yield* PbsTarget.make(client, { id: "e2e" })
      yield* Effect.gen(function*() {
        const vmid = 123
        const vm = yield* createVm(host, vmid)
        const first = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        const t1 = timeOf(first.archive.location)
        // the bitmap gets into the image with a clean quit; the next QEMU loads it (and marks it in use)
        yield* restart(vmid)
        yield* crashAndStart(host.runDir, vmid)
        const loaded = yield* bitmapsOf(vmid)
        assert.deepStrictEqual(loaded.scsi0.map((b) => [b.name, b.recording, b.inconsistent]), [
          [`vzdump-e2e-${t1}`, false, true]
        ])

        yield* guestWrite(vmid, "scsi0", 0xc1, 0, 4096)
        const expected = [Buffer.from(vm.content[0]), Buffer.from(vm.content[1])]
        expected[0]!.fill(0xc1, 0, 4096)
        yield* nextSecond
        const before = yield* server.stats
        const second = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        assert.deepStrictEqual(statusLines(second.logLines), [
          "INFO: scsi0: dirty-bitmap status: existing bitmap was invalid and has been cleared",
          "INFO: virtio1: dirty-bitmap status: created new"
        ])
        assert.isDefined(lineOf(second.logLines, "INFO: transferred 24.00 MiB in"))
        // a full read, but the server still gets only the chunk it lacks
        assert.strictEqual((yield* server.stats).chunkUploads - before.chunkUploads, 1)
        const t2 = timeOf(second.archive.location)
        assert.deepStrictEqual((yield* bitmapsOf(vmid)).scsi0.map((b) => [b.name, b.recording, b.inconsistent]), [
          [`vzdump-e2e-${t2}`, true, undefined]
        ])
        const back = yield* restored(client, { vmid }, `${host.dir}/r2`)
        assert.strictEqual(sha256(back.disks[0]!), sha256(expected[0]!))
        assert.strictEqual(sha256(back.disks[1]!), sha256(vm.content[1]!))

        yield* guestWrite(vmid, "scsi0", 0xc2, 15 * MiB, 4096)
        expected[0]!.fill(0xc2, 15 * MiB, 15 * MiB + 4096)
        yield* nextSecond
        const third = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        assert.deepStrictEqual(statusLines(third.logLines), [
          "INFO: scsi0: dirty-bitmap status: OK (4.0 MiB of 16.0 MiB dirty)",
          "INFO: virtio1: dirty-bitmap status: OK (drive clean)",
          "INFO: using fast incremental mode (dirty-bitmap), 4.0 MiB dirty of 24.0 MiB total"
        ])
        const again = yield* restored(client, { vmid }, `${host.dir}/r3`)
        assert.strictEqual(sha256(again.disks[0]!), sha256(expected[0]!))
        assert.strictEqual(sha256(again.disks[1]!), sha256(vm.content[1]!))
      }).pipe(Effect.scoped, Effect.provide(host.layer))
    }), 180_000)

  it.scopedLive("a failed incremental merges its bitmaps back: the next one still sees every change", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const { client, server } = yield* startPbs(host)
      const target = yield* PbsTarget.make(client, { id: "e2e" })
      yield* Effect.gen(function*() {
        const vmid = 124
        const vm = yield* createVm(host, vmid)
        const first = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        const t1 = timeOf(first.archive.location)
        const expected = [Buffer.from(vm.content[0]), Buffer.from(vm.content[1])]

        // A: before the failed backup
        yield* guestWrite(vmid, "scsi0", 0xd1, 0, 4096)
        expected[0]!.fill(0xd1, 0, 4096)
        yield* nextSecond
        // the connection drops at the first chunk upload; C is written right after the point in time
        yield* server.setOnRequest((request) =>
          request.protocol === "backup" && request.path.endsWith("fixed_chunk") ? "drop" : undefined
        )
        const recorder = makeRecorder()
        recorder.on("started backup task", guestWrite(vmid, "scsi0", 0xd3, 13 * MiB, 4096))
        expected[0]!.fill(0xd3, 13 * MiB, 13 * MiB + 4096)
        const failed = yield* Effect.flip(
          BackupJob.backupVm({ vmid }).pipe(
            Effect.provide(Layer.mergeAll(Layer.succeed(BackupTarget, target), recorder.layer))
          )
        )
        assert.strictEqual(failed._tag, "BackupFailed")
        assert.isTrue(recorder.fired("started backup task"))
        yield* server.setOnRequest(undefined)
        // the base bitmap records again and holds A and C; the failed backup's own bitmap is gone
        const merged = yield* bitmapsOf(vmid)
        assert.deepStrictEqual(merged.scsi0.map((b) => [b.name, b.recording, b.count]), [
          [`vzdump-e2e-${t1}`, true, 2 * CS]
        ])
        assert.deepStrictEqual(merged.virtio1.map((b) => [b.name, b.recording, b.count]), [
          [`vzdump-e2e-${t1}`, true, 0]
        ])

        // B: after it
        yield* guestWrite(vmid, "virtio1", 0xd2, 5 * MiB, 4096)
        expected[1]!.fill(0xd2, 5 * MiB, 5 * MiB + 4096)
        yield* nextSecond
        const before = yield* server.stats
        const third = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        assert.deepStrictEqual(statusLines(third.logLines), [
          "INFO: scsi0: dirty-bitmap status: OK (8.0 MiB of 16.0 MiB dirty)",
          "INFO: virtio1: dirty-bitmap status: OK (4.0 MiB of 8.0 MiB dirty)",
          "INFO: using fast incremental mode (dirty-bitmap), 12.0 MiB dirty of 24.0 MiB total"
        ])
        assert.strictEqual((yield* server.stats).chunkUploads - before.chunkUploads, 3)
        const back = yield* restored(client, { vmid }, `${host.dir}/r`)
        assert.strictEqual(back.vm.snapshotPath, third.archive.location)
        assert.strictEqual(sha256(back.disks[0]!), sha256(expected[0]!))
        assert.strictEqual(sha256(back.disks[1]!), sha256(expected[1]!))
      }).pipe(Effect.scoped, Effect.provide(host.layer))
    }), 180_000)

  it.scopedLive("a frozen bitmap left by a crashed run is merged back before the next backup", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const { client } = yield* startPbs(host)
      const target = yield* PbsTarget.make(client, { id: "e2e" })
      yield* Effect.gen(function*() {
        const vmid = 125
        const vm = yield* createVm(host, vmid)
        const first = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        const t1 = timeOf(first.archive.location)
        const expected = [Buffer.from(vm.content[0]), Buffer.from(vm.content[1])]
        yield* guestWrite(vmid, "scsi0", 0xe1, 0, 4096)
        expected[0]!.fill(0xe1, 0, 4096)

        // what a run that died after its point in time leaves: the base frozen, the next one recording
        const blocks = (yield* qmp(vmid, "query-block")) as ReadonlyArray<{
          readonly qdev?: string
          readonly inserted?: { readonly "node-name"?: string }
        }>
        const node = blocks.find((b) => b.qdev === "scsi0")!.inserted!["node-name"]!
        yield* qmp(vmid, "transaction", {
          actions: [
            {
              type: "block-dirty-bitmap-add",
              data: { node, name: `vzdump-e2e-${t1 + 1}`, persistent: true, granularity: CS }
            },
            { type: "block-dirty-bitmap-disable", data: { node, name: `vzdump-e2e-${t1}` } }
          ]
        })
        yield* guestWrite(vmid, "scsi0", 0xe2, 10 * MiB, 4096)
        expected[0]!.fill(0xe2, 10 * MiB, 10 * MiB + 4096)

        yield* nextSecond
        const second = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        assert.include(
          untimed(second.logLines),
          `WARN: merging left-over dirty bitmap 'vzdump-e2e-${t1}' back (node ${node})`
        )
        assert.deepStrictEqual(statusLines(second.logLines), [
          "INFO: scsi0: dirty-bitmap status: OK (8.0 MiB of 16.0 MiB dirty)",
          "INFO: virtio1: dirty-bitmap status: OK (drive clean)",
          "INFO: using fast incremental mode (dirty-bitmap), 8.0 MiB dirty of 24.0 MiB total"
        ])
        const back = yield* restored(client, { vmid }, `${host.dir}/r`)
        assert.strictEqual(sha256(back.disks[0]!), sha256(expected[0]!))
        assert.strictEqual(sha256(back.disks[1]!), sha256(expected[1]!))
      }).pipe(Effect.scoped, Effect.provide(host.layer))
    }), 180_000)
})
