/**
 * End to end: a running VM on stock QEMU backed up by the workflow (stock engine, fleecing + NBD)
 * to the in-repo PBS test server over loopback, restored through the reader protocol.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as crypto from "node:crypto"
import * as Fs from "node:fs/promises"
import { existsSync, readdirSync } from "node:fs"
import * as BackupJob from "@vzdump/core/BackupJob"
import * as CryptConfig from "@vzdump/target-pbs/CryptConfig"
import * as DataBlob from "@vzdump/target-pbs/DataBlob"
import * as Manifest from "@vzdump/target-pbs/Manifest"
import * as PbsTarget from "@vzdump/target-pbs/PbsTarget"
import * as PbsVmRestore from "@vzdump/target-pbs/PbsVmRestore"
import { imageBytes, makeTestHost, qmp, runState, sha256 } from "./utils/env.js"
import {
  createVm,
  CS,
  guestWrite,
  lineOf,
  MiB,
  nextSecond,
  restored,
  startPbs,
  withTarget
} from "./utils/pbs.js"

describe("backups of a running stock-QEMU VM to PBS", () => {
  it.scopedLive("full backup restores to the source; without bitmaps the next one still uploads only new chunks", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const { client, server, store } = yield* startPbs(host)
      // dedup against the previous index only: every chunk is read and hashed
      const target = yield* PbsTarget.make(client, { dirtyBitmaps: false })
      yield* Effect.gen(function*() {
        const vmid = 111
        const vm = yield* createVm(host, vmid)

        const first = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        const firstStats = yield* server.stats
        // scsi0 chunk 0 and 1, the zero chunk (once), virtio1 chunk 0
        assert.strictEqual(firstStats.chunkUploads, 4)
        assert.strictEqual(firstStats.finishedSnapshots, 1)
        assert.match(first.archive.location, /^vm\/111\/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/)
        assert.strictEqual(
          lineOf(first.logLines, "INFO: creating Proxmox Backup Server archive"),
          `INFO: creating Proxmox Backup Server archive '${first.archive.location}'`
        )
        const firstDir = `${store}/${first.archive.location}`
        // the workflow uploaded the per-guest log after the backup (vzdump's upload-log)
        const log = yield* DataBlob.decode(yield* Effect.promise(() => Fs.readFile(`${firstDir}/client.log.blob`)))
        assert.match(log.toString("utf8"), /^\S+ \S+ INFO: Starting Backup of VM 111 \(qemu\)\n/)
        assert.match(log.toString("utf8"), /\S+ \S+ INFO: Finished Backup of VM 111 \(\d\d:\d\d:\d\d\)\n$/)
        assert.deepStrictEqual(readdirSync(firstDir).sort(), [
          "client.log.blob",
          "drive-scsi0.img.fidx",
          "drive-virtio1.img.fidx",
          "index.json.blob",
          "qemu-server.conf.blob"
        ])

        // the guest writes: scsi0 chunk 0 (data) and chunk 3 (a hole until now), virtio1 chunk 1
        yield* guestWrite(vmid, "scsi0", 0xa1, 0, MiB)
        yield* guestWrite(vmid, "scsi0", 0xa2, 12 * MiB, 64 * 1024)
        yield* guestWrite(vmid, "virtio1", 0xa3, 4 * MiB, 4096)
        const expected = [Buffer.from(vm.content[0]), Buffer.from(vm.content[1])]
        expected[0]!.fill(0xa1, 0, MiB)
        expected[0]!.fill(0xa2, 12 * MiB, 12 * MiB + 64 * 1024)
        expected[1]!.fill(0xa3, 4 * MiB, 4 * MiB + 4096)

        yield* nextSecond
        const second = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        const secondStats = yield* server.stats
        assert.strictEqual(secondStats.chunkUploads - firstStats.chunkUploads, 3, "exactly the 3 changed chunks")
        assert.strictEqual(secondStats.duplicateChunks, 0)
        // every chunk was read and hashed: no bitmap was involved
        assert.isDefined(lineOf(second.logLines, "INFO: transferred 24.00 MiB in"))
        assert.isUndefined(lineOf(second.logLines, "INFO: scsi0: dirty-bitmap status"))
        const committed = yield* target.committed
        assert.strictEqual(committed[1]!.reused, 24 * MiB - 3 * CS)
        assert.strictEqual(
          lineOf(second.logLines, "INFO: backup was done incrementally"),
          "INFO: backup was done incrementally, reused 12.00 MiB (50%)"
        )

        // each snapshot holds its own point in time
        const one = yield* restored(client, { vmid, backupTime: committed[0]!.snapshot.backupTime }, `${host.dir}/r1`)
        assert.strictEqual(sha256(one.disks[0]!), sha256(vm.content[0]!))
        assert.strictEqual(sha256(one.disks[1]!), sha256(vm.content[1]!))
        const two = yield* restored(client, { vmid }, `${host.dir}/r2`)
        assert.strictEqual(two.vm.snapshotPath, second.archive.location)
        assert.strictEqual(sha256(two.disks[0]!), sha256(expected[0]!))
        assert.strictEqual(sha256(two.disks[1]!), sha256(expected[1]!))
        assert.include(two.vm.config, "#qmdump#map:scsi0:drive-scsi0::qcow2:")
        assert.include(two.vm.config, "#qmdump#map:virtio1:drive-virtio1::raw:")
        // qcow2 output too
        const qcow = yield* PbsVmRestore.restoreVm(client, { vmid, format: "qcow2", directory: `${host.dir}/r3` })
        const back = yield* Effect.promise(() => imageBytes(qcow.disks[0]!.path, "qcow2", host.dir))
        assert.strictEqual(sha256(back), sha256(expected[0]!))
      }).pipe(Effect.scoped, Effect.provide(host.layer))
    }), 180_000)

  it.scopedLive("encrypted backup with a master key; restore needs the key", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const { client, store } = yield* startPbs(host, { namespaces: [{ store: "store1", ns: "site" }] })
      const crypt = yield* CryptConfig.generate
      const { publicKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 })
      const target = yield* PbsTarget.make(client, {
        encryptionKey: crypt,
        masterPublicKey: publicKey.export({ type: "spki", format: "pem" }).toString(),
        namespace: "site"
      })
      yield* Effect.gen(function*() {
        const vmid = 112
        const vm = yield* createVm(host, vmid)
        const result = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        assert.match(result.archive.location, /^ns\/site\/vm\/112\//)
        assert.isDefined(lineOf(result.logLines, "INFO: enabling encryption with master key feature"))
        const dir = `${store}/${result.archive.location}`
        assert.isTrue(existsSync(`${dir}/rsa-encrypted.key.blob`))
        const manifestBlob = yield* Effect.promise(() => Fs.readFile(`${dir}/index.json.blob`))
        const manifest = yield* Manifest.decodeBlob(manifestBlob, crypt)
        assert.isString(manifest.signature)
        assert.deepStrictEqual([...new Set(manifest.files.map((f) => f["crypt-mode"]))], ["encrypt"])

        const back = yield* restored(client, { vmid, namespace: "site", crypt }, `${host.dir}/out`)
        assert.strictEqual(sha256(back.disks[0]!), sha256(vm.content[0]!))
        assert.strictEqual(sha256(back.disks[1]!), sha256(vm.content[1]!))
        const refused = yield* Effect.flip(
          PbsVmRestore.restoreVm(client, { vmid, namespace: "site", directory: `${host.dir}/nokey` })
        )
        assert.oneOf(refused._tag, ["DataBlobError", "ManifestError"])
      }).pipe(Effect.scoped, Effect.provide(host.layer))
    }), 180_000)

  it.scopedLive("connection dropped mid-upload: the backup fails cleanly, nothing finished is kept", () =>
    Effect.gen(function*() {
      const host = yield* makeTestHost()
      const { client, server, store } = yield* startPbs(host)
      const target = yield* PbsTarget.make(client)
      let chunks = 0
      yield* server.setOnRequest((request) =>
        request.protocol === "backup" && request.path.endsWith("fixed_chunk") && ++chunks === 2 ? "drop" : undefined
      )
      yield* Effect.gen(function*() {
        const vmid = 113
        const vm = yield* createVm(host, vmid)
        const failed = yield* Effect.flip(BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target))))
        assert.strictEqual(failed._tag, "BackupFailed")
        assert.include(failed.message, "fixed_chunk")
        assert.isAtLeast(chunks, 2)

        yield* Effect.sleep("200 millis")
        assert.strictEqual(yield* server.activeSessions, 0)
        const stats = yield* server.stats
        assert.strictEqual(stats.finishedSnapshots, 0)
        const group = `${store}/vm/${vmid}`
        const snapshots = existsSync(group) ? readdirSync(group).filter((name) => name.endsWith("Z")) : []
        assert.deepStrictEqual(snapshots, [], "the unfinished snapshot was removed")
        assert.deepStrictEqual(yield* client.listSnapshots({ backupId: String(vmid) }), [])

        assert.strictEqual(yield* runState(vmid), "running")
        const config = yield* Effect.promise(() => Fs.readFile(`${host.configDir}/${vmid}.conf`, "utf8"))
        assert.notInclude(config, "lock:")
        const leftovers = {
          exports: (yield* qmp(vmid, "query-block-exports")) as ReadonlyArray<unknown>,
          jobs: (yield* qmp(vmid, "query-jobs")) as ReadonlyArray<unknown>
        }
        assert.deepStrictEqual(leftovers, { exports: [], jobs: [] })

        // the next backup works and holds the VM's content
        yield* server.setOnRequest(undefined)
        yield* nextSecond
        const ok = yield* BackupJob.backupVm({ vmid }).pipe(Effect.provide(withTarget(target)))
        const back = yield* restored(client, { vmid }, `${host.dir}/out`)
        assert.strictEqual(back.vm.snapshotPath, ok.archive.location)
        assert.strictEqual(sha256(back.disks[0]!), sha256(vm.content[0]!))
        assert.strictEqual(sha256(back.disks[1]!), sha256(vm.content[1]!))
      }).pipe(Effect.scoped, Effect.provide(host.layer))
    }), 180_000)
})
