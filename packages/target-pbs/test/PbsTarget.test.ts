import { assert, describe, it } from "@effect/vitest"
import { Config, ConfigProvider, Effect, Exit, Layer, Redacted } from "effect"
import { execFile } from "node:child_process"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import * as path from "node:path"
import { promisify } from "node:util"
import { BackupTarget, writeImage } from "@vzdump/core/BackupTarget"
import type { ArchiveRequest, ArchiveSession } from "@vzdump/core/BackupTarget"
import * as CryptConfig from "../src/CryptConfig.js"
import * as KeyConfig from "../src/KeyConfig.js"
import * as Manifest from "../src/Manifest.js"
import * as PbsTarget from "../src/PbsTarget.js"
import * as PbsVmRestore from "../src/PbsVmRestore.js"
import { CS, makeClient, settle, startServer, T0, TOKEN_ID, TOKEN_SECRET, wrapUploads } from "./utils/fixtures.js"

const run = promisify(execFile)
const KiB = 1024
const MiB = 1024 * KiB
const sha = (data: Uint8Array) => crypto.createHash("sha256").update(data).digest("hex")

/** scsi0: random chunk, zero chunk, half-random chunk, 123-byte tail; virtio1: a pattern and zeros. */
const makeDisks = () => {
  const scsi0 = Buffer.alloc(3 * CS + 123)
  crypto.randomFillSync(scsi0, 0, CS)
  crypto.randomFillSync(scsi0, 2 * CS + CS / 4, CS / 2)
  crypto.randomFillSync(scsi0, 3 * CS, 123)
  const virtio1 = Buffer.alloc(2 * MiB)
  virtio1.fill(0x5a, 64 * KiB, 640 * KiB)
  return [scsi0, virtio1] as const
}

const request = (disks: ReadonlyArray<Buffer>, startTime: number): ArchiveRequest => ({
  vmid: 100,
  startTime: new Date(startTime * 1000),
  configs: [
    {
      name: "qemu-server.conf",
      data: Buffer.from("memory: 128\nscsi0: local:100/a.raw\nvirtio1: local:100/b.raw\n" +
        "#qmdump#map:scsi0:drive-scsi0:local:raw:\n#qmdump#map:virtio1:drive-virtio1:local:raw:\n")
    },
    { name: "qemu-server.fw", data: Buffer.from("[OPTIONS]\nenable: 1\n") }
  ],
  devices: [{ name: "drive-scsi0", size: disks[0]!.length }, { name: "drive-virtio1", size: disks[1]!.length }]
})

/** Writes a disk in pieces of `piece` bytes, all-zero pieces as `writeZeros`. */
const feed = (session: ArchiveSession, device: number, disk: Buffer, piece: number) =>
  Effect.gen(function*() {
    for (let offset = 0; offset < disk.length; offset += piece) {
      const part = disk.subarray(offset, Math.min(disk.length, offset + piece))
      if (part.every((b) => b === 0)) yield* session.writeZeros(device, offset, part.length)
      else yield* session.writeData(device, offset, part)
    }
  })

const backup = (
  target: PbsTarget.PbsTargetService,
  disks: ReadonlyArray<Buffer>,
  startTime: number,
  piece: number
) =>
  Effect.scoped(Effect.gen(function*() {
    const session = yield* target.open(request(disks, startTime))
    for (const [i, disk] of disks.entries()) yield* feed(session, i, disk, piece)
    return { session, result: yield* session.commit }
  }))

describe("PbsTarget", () => {
  it.scopedLive("gathers small pieces into chunks, dedups the second backup, restores raw and qcow2", () =>
    Effect.gen(function*() {
      const { dir, server, store } = yield* startServer()
      const client = yield* makeClient(server)
      const target = yield* PbsTarget.make(client)
      const disks = makeDisks()

      const first = yield* backup(target, disks, T0, 64 * KiB + 512)
      assert.strictEqual(first.result.location, "vm/100/2024-06-05T12:00:00Z")
      assert.strictEqual(
        first.session.openedLine,
        "creating Proxmox Backup Server archive 'vm/100/2024-06-05T12:00:00Z'"
      )
      const afterFirst = yield* server.stats
      // scsi0: random, zero, half, tail; virtio1: one short chunk
      assert.strictEqual(afterFirst.chunkUploads, 5)
      const snapDir = path.join(store, "vm", "100", "2024-06-05T12:00:00Z")
      assert.deepStrictEqual(fs.readdirSync(snapDir).sort(), [
        "drive-scsi0.img.fidx",
        "drive-virtio1.img.fidx",
        "fw.conf.blob",
        "index.json.blob",
        "qemu-server.conf.blob"
      ])

      // same content, whole 4 MiB writes this time: nothing new is uploaded, everything is reused
      const second = yield* backup(target, disks, T0 + 60, CS)
      assert.strictEqual((yield* server.stats).chunkUploads, 5)
      const total = disks[0]!.length + disks[1]!.length
      assert.deepStrictEqual(second.result.logLines, [])
      assert.strictEqual(yield* second.session.reused!, total)
      const committed = yield* target.committed
      assert.strictEqual(committed.length, 2)
      assert.strictEqual(committed[1]!.reused, total)

      yield* target.uploadLog(second.result.location, ["INFO: line one", "INFO: line two"])
      assert.isTrue(fs.existsSync(path.join(store, "vm", "100", "2024-06-05T12:01:00Z", "client.log.blob")))

      const raw = yield* PbsVmRestore.restoreVm(client, { vmid: 100, directory: path.join(dir, "raw") })
      assert.strictEqual(raw.snapshot.backupTime, T0 + 60, "the newest snapshot by default")
      assert.deepStrictEqual(raw.disks.map((d) => d.virtdev), ["scsi0", "virtio1"])
      assert.strictEqual(sha(fs.readFileSync(raw.disks[0]!.path)), sha(disks[0]!))
      assert.strictEqual(sha(fs.readFileSync(raw.disks[1]!.path)), sha(disks[1]!))
      assert.strictEqual(raw.disks[0]!.holeChunks, 1)
      assert.isBelow(fs.statSync(raw.disks[0]!.path).blocks * 512, disks[0]!.length - CS / 2, "sparse")
      assert.include(fs.readFileSync(raw.configPath, "utf8"), "#qmdump#map:scsi0:drive-scsi0:local:raw:")
      assert.strictEqual(fs.readFileSync(raw.firewallPath!, "utf8"), "[OPTIONS]\nenable: 1\n")

      const qcow = yield* PbsVmRestore.restoreVm(client, {
        vmid: 100,
        backupTime: T0,
        format: "qcow2",
        directory: path.join(dir, "qcow")
      })
      assert.deepStrictEqual(fs.readdirSync(path.join(dir, "qcow")).sort(), [
        "fw.conf",
        "qemu-server.conf",
        "scsi0.qcow2",
        "virtio1.qcow2"
      ])
      for (const [i, disk] of qcow.disks.entries()) {
        const rawFile = path.join(dir, `check-${i}.raw`)
        yield* Effect.promise(() => run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", disk.path, rawFile]))
        // qcow2 sizes are whole sectors: the 123-byte tail is padded with zeros
        const back = fs.readFileSync(rawFile)
        assert.strictEqual(back.length, Math.ceil(disks[i]!.length / 512) * 512)
        assert.strictEqual(sha(back.subarray(0, disks[i]!.length)), sha(disks[i]!))
        assert.isTrue(back.subarray(disks[i]!.length).every((b) => b === 0))
      }
    }), 60_000)

  it.scopedLive("names the base bitmap of the latest snapshot and takes unchanged chunks from its index", () =>
    Effect.gen(function*() {
      const { dir, server } = yield* startServer()
      const client = yield* makeClient(server)
      const target = yield* PbsTarget.make(client, { id: "lab1" })
      const disks = makeDisks()

      const first = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* target.open(request(disks, T0))
        assert.deepStrictEqual(session.incremental, {
          chunkSize: CS,
          prefix: "vzdump-lab1-",
          next: `vzdump-lab1-${T0}`,
          base: [undefined, undefined]
        })
        const noBase = yield* Effect.flip(session.writeReused!(0, 0, CS))
        assert.include(noBase.detail, "no base snapshot")
        for (const [i, disk] of disks.entries()) yield* feed(session, i, disk, CS)
        yield* session.complete!
        return yield* session.commit
      }))
      assert.strictEqual(first.location, "vm/100/2024-06-05T12:00:00Z")

      // the guest changed scsi0's chunk 2; everything else is reused from the first snapshot
      const changed = Buffer.from(disks[0]!)
      changed.fill(0x77, 2 * CS + 100, 2 * CS + 200)
      const before = (yield* server.stats).chunkUploads
      const second = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* target.open(request([changed, disks[1]!], T0 + 60))
        assert.deepStrictEqual(session.incremental?.base, [`vzdump-lab1-${T0}`, `vzdump-lab1-${T0}`])
        assert.strictEqual(session.incremental?.next, `vzdump-lab1-${T0 + 60}`)
        const inside = yield* Effect.flip(session.writeReused!(0, 0, CS / 2))
        assert.include(inside.detail, "ends inside a chunk")
        yield* session.writeReused!(0, 0, 2 * CS)
        yield* session.writeData(0, 2 * CS, changed.subarray(2 * CS, 3 * CS))
        yield* session.writeReused!(0, 3 * CS, 123)
        yield* session.writeReused!(1, 0, disks[1]!.length)
        assert.strictEqual(yield* session.reused!, 2 * CS + 123 + disks[1]!.length)
        return yield* session.commit
      }))
      assert.strictEqual((yield* server.stats).chunkUploads - before, 1, "only the changed chunk")
      assert.strictEqual(second.location, "vm/100/2024-06-05T12:01:00Z")
      const restored = yield* PbsVmRestore.restoreVm(client, { vmid: 100, directory: path.join(dir, "r") })
      assert.strictEqual(sha(fs.readFileSync(restored.disks[0]!.path)), sha(changed))
      assert.strictEqual(sha(fs.readFileSync(restored.disks[1]!.path)), sha(disks[1]!))

      // a different size has no base; another target id names other bitmaps
      const other = yield* PbsTarget.make(client)
      yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* other.open({
          ...request([changed, disks[1]!], T0 + 120),
          devices: [{ name: "drive-scsi0", size: changed.length }, { name: "drive-virtio1", size: 4 * MiB }]
        })
        assert.match(session.incremental!.prefix, /^vzdump-[0-9a-f]{12}-$/)
        assert.deepStrictEqual(session.incremental!.base, [
          `${session.incremental!.prefix}${T0 + 60}`,
          undefined
        ])
      }))
      const plain = yield* PbsTarget.make(client, { dirtyBitmaps: false })
      yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* plain.open(request(disks, T0 + 180))
        assert.isUndefined(session.incremental)
        assert.isUndefined(session.writeReused)
      }))
    }), 60_000)

  it.scopedLive("sends whole chunks from the caller's buffers, which it may reuse after `bufferRetention` bytes", () =>
    Effect.gen(function*() {
      const { dir, server } = yield* startServer()
      const real = yield* makeClient(server)
      // late uploads: a buffer reused too early would reach the server changed (wrong digest)
      const slow = wrapUploads(real, (upload) => (wid, chunk) =>
        Effect.zipRight(Effect.sleep("100 millis"), upload(wid, chunk)))
      const target = yield* PbsTarget.make(slow, { uploadConcurrency: 2 })
      const scsi0 = crypto.randomBytes(6 * CS + 1000)
      const virtio1 = crypto.randomBytes(5 * CS)
      virtio1.fill(0, 2 * CS, 3 * CS)
      const disks = [scsi0, virtio1]
      const session = yield* target.open(request(disks, T0))
      assert.strictEqual(session.bufferRetention, 2 * CS)
      // scsi0 in whole chunks (sent from these buffers), virtio1 in 1 MiB pieces (gathered by the target);
      // buffers are reused (and scribbled over) as soon as the retention allows
      const whole = yield* writeImage(session, 0, scsi0, CS)
      const pieces = yield* writeImage(session, 1, virtio1, MiB)
      yield* session.commit
      assert.isAbove(whole.reused + pieces.reused, 0)
      assert.isBelow(whole.allocated + pieces.allocated, 20)
      const restored = yield* PbsVmRestore.restoreVm(real, { vmid: 100, directory: path.join(dir, "r") })
      assert.strictEqual(sha(fs.readFileSync(restored.disks[0]!.path)), sha(scsi0))
      assert.strictEqual(sha(fs.readFileSync(restored.disks[1]!.path)), sha(virtio1))
    }), 60_000)

  it.scopedLive("writes must come in order and cover every byte; an aborted session leaves no snapshot", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const client = yield* makeClient(server)
      const target = yield* PbsTarget.make(client)
      const disks = makeDisks()

      const outOfOrder = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* target.open(request(disks, T0))
        yield* session.writeData(0, 0, disks[0]!.subarray(0, MiB))
        return yield* Effect.flip(session.writeData(0, 2 * MiB, disks[0]!.subarray(2 * MiB, 3 * MiB)))
      }))
      assert.strictEqual(outOfOrder.reason, "Invalid")
      assert.include(outOfOrder.detail, "expected 1048576")

      const incomplete = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* target.open(request(disks, T0 + 1))
        yield* feed(session, 0, disks[0]!, CS)
        return yield* Effect.flip(session.commit)
      }))
      assert.strictEqual(incomplete.reason, "Commit")
      assert.strictEqual(incomplete.detail, "drive-virtio1: 0 of 2097152 bytes written")

      const past = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* target.open(request(disks, T0 + 2))
        return yield* Effect.flip(session.writeZeros(1, 0, disks[1]!.length + 1))
      }))
      assert.strictEqual(past.reason, "Invalid")

      yield* settle(server)
      assert.strictEqual((yield* server.stats).finishedSnapshots, 0)
      const group = path.join(store, "vm", "100")
      const snapshots = fs.existsSync(group) ? fs.readdirSync(group).filter((name) => name.endsWith("Z")) : []
      assert.deepStrictEqual(snapshots, [], "no snapshot directory left")
      const notCommitted = yield* Effect.flip(target.uploadLog("vm/100/2024-06-05T12:00:00Z", ["x"]))
      assert.strictEqual(notCommitted.reason, "Invalid")
    }), 60_000)

  it.scopedLive("encrypts with a key file and a master key; the restore needs the key", () =>
    Effect.gen(function*() {
      const { dir, server, store } = yield* startServer({ namespaces: [{ store: "store1", ns: "lab" }] })
      const client = yield* makeClient(server)
      const crypt = yield* CryptConfig.generate
      const keyFile = path.join(dir, "pbs.enc")
      fs.writeFileSync(keyFile, KeyConfig.toJson(yield* KeyConfig.create(crypt, { kdf: "none" })))
      const { publicKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 })
      const pemFile = path.join(dir, "master.pem")
      fs.writeFileSync(pemFile, publicKey.export({ type: "spki", format: "pem" }))
      const target = yield* PbsTarget.make(client, {
        encryptionKey: keyFile,
        masterPublicKey: pemFile,
        namespace: "lab"
      })
      assert.strictEqual(target.crypt?.fingerprint, crypt.fingerprint)
      const disks = makeDisks()

      const { result, session } = yield* backup(target, disks, T0, 1 * MiB)
      assert.strictEqual(result.location, "ns/lab/vm/100/2024-06-05T12:00:00Z")
      assert.strictEqual(
        session.openedLine,
        "creating Proxmox Backup Server archive 'vm/100/2024-06-05T12:00:00Z'\n" +
          "enabling encryption with master key feature"
      )
      yield* target.uploadLog(result.location, ["INFO: secret log"])
      const snapDir = path.join(store, "ns", "lab", "vm", "100", "2024-06-05T12:00:00Z")
      const manifest = yield* Manifest.decodeBlob(fs.readFileSync(path.join(snapDir, "index.json.blob")), crypt)
      assert.isTrue(manifest.files.every((f) => f["crypt-mode"] === "encrypt"))
      assert.isString(manifest.signature)
      assert.isTrue(fs.existsSync(path.join(snapDir, "rsa-encrypted.key.blob")))
      // the log blob is encrypted: its plaintext is not in the file
      assert.notInclude(fs.readFileSync(path.join(snapDir, "client.log.blob")).toString("latin1"), "secret log")

      const restored = yield* PbsVmRestore.restoreVm(client, {
        vmid: 100,
        namespace: "lab",
        crypt,
        directory: path.join(dir, "out")
      })
      assert.strictEqual(sha(fs.readFileSync(restored.disks[0]!.path)), sha(disks[0]!))
      assert.strictEqual(sha(fs.readFileSync(restored.disks[1]!.path)), sha(disks[1]!))

      const noKey = yield* Effect.flip(
        PbsVmRestore.restoreVm(client, { vmid: 100, namespace: "lab", directory: path.join(dir, "nokey") })
      )
      assert.oneOf(noKey._tag, ["DataBlobError", "ManifestError"])
      const wrongKey = yield* Effect.flip(
        PbsVmRestore.restoreVm(client, {
          vmid: 100,
          namespace: "lab",
          crypt: yield* CryptConfig.generate,
          directory: path.join(dir, "wrong")
        })
      )
      assert.oneOf(wrongKey._tag, ["DataBlobError", "ManifestError"])
    }), 60_000)

  it.scopedLive("layerConfig reads a PBS storage from configuration, secrets redacted", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      const provider = ConfigProvider.fromMap(
        new Map([
          ["PBS.HOST", "127.0.0.1"],
          ["PBS.PORT", String(server.port)],
          ["PBS.DATASTORE", "store1"],
          ["PBS.FINGERPRINT", server.fingerprint],
          ["PBS.TOKEN_ID", TOKEN_ID],
          ["PBS.TOKEN_SECRET", TOKEN_SECRET]
        ])
      )
      const options = yield* Effect.withConfigProvider(Config.nested(PbsTarget.config, "PBS"), provider)
      assert.strictEqual(options.port, server.port)
      assert.strictEqual(options.auth._tag, "ApiToken")
      assert.notInclude(String(options.auth._tag === "ApiToken" ? options.auth.secret : ""), TOKEN_SECRET)
      const name = yield* Effect.flatMap(BackupTarget, (target) => Effect.succeed(target.name)).pipe(
        Effect.provide(PbsTarget.layerConfig(Config.nested(PbsTarget.config, "PBS"))),
        Effect.withConfigProvider(provider)
      )
      assert.strictEqual(name, "pbs")
      const bad = yield* Effect.exit(
        Layer.build(PbsTarget.layer({
          ...options,
          auth: { _tag: "ApiToken", tokenId: TOKEN_ID, secret: Redacted.make("no") }
        }))
      )
      assert.isTrue(Exit.isFailure(bad))
    }), 60_000)
})
