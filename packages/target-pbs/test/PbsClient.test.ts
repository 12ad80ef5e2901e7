import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect, Either, Exit, Fiber, Redacted, Scope } from "effect"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import * as path from "node:path"
import * as CryptConfig from "../src/CryptConfig.js"
import * as DataBlob from "../src/DataBlob.js"
import * as FixedIndex from "../src/FixedIndex.js"
import * as KeyConfig from "../src/KeyConfig.js"
import * as Manifest from "../src/Manifest.js"
import * as PbsClient from "../src/PbsClient.js"
import * as PbsRestore from "../src/PbsRestore.js"
import * as PbsSnapshotWriter from "../src/PbsSnapshotWriter.js"
import {
  CS,
  makeClient,
  makeDisk,
  PASSWORD,
  settle,
  sha256File,
  startServer,
  T0,
  TOKEN_SECRET,
  touchSlot,
  USER,
  vmConfig,
  wrapUploads
} from "./utils/fixtures.js"

const DEVICES = ["scsi0", "scsi1", "efidisk0"] as const

/** Three small disks with holes: ~12 MiB, 8 MiB, 1 MiB. */
const makeDisks = (dir: string) => {
  const files = {
    scsi0: path.join(dir, "scsi0.raw"),
    scsi1: path.join(dir, "scsi1.raw"),
    efidisk0: path.join(dir, "efidisk0.raw")
  }
  makeDisk(files.scsi0, ["random", "hole", "half"], 100_000)
  makeDisk(files.scsi1, ["zero", "random"])
  makeDisk(files.efidisk0, [], 1024 * 1024)
  return files
}

const backup = (
  client: PbsClient.PbsClientService,
  files: Record<string, string>,
  options: Partial<PbsSnapshotWriter.SnapshotWriterOptions> & { readonly backupTime: number },
  reuse?: (device: string, slot: number) => boolean
) =>
  Effect.scoped(Effect.gen(function*() {
    const writer = yield* PbsSnapshotWriter.open(client, { backupId: "100", ...options })
    yield* writer.addConfig(vmConfig(Object.keys(files)))
    yield* writer.addFirewallConfig("[OPTIONS]\nenable: 1\n")
    const drives: Array<PbsSnapshotWriter.DriveResult> = []
    for (const [device, file] of Object.entries(files)) {
      drives.push(
        yield* PbsSnapshotWriter.writeImageFile(writer, device, file, reuse ? { reuse: (slot) => reuse(device, slot) } : {})
      )
    }
    const result = yield* writer.finish
    return { result, drives, writer }
  }))

const restore = (
  client: PbsClient.PbsClientService,
  dir: string,
  options: Partial<PbsRestore.RestoreOptions> & { readonly backupTime: number }
) =>
  Effect.scoped(Effect.gen(function*() {
    const reader = yield* PbsRestore.open(client, { backupId: "100", ...options })
    fs.mkdirSync(dir, { recursive: true })
    return yield* reader.restoreVm(dir)
  }))

describe("PbsClient", () => {
  it.scopedLive("backs up small disks with holes and restores them bit for bit", () =>
    Effect.gen(function*() {
      const { dir, server, store } = yield* startServer()
      const client = yield* makeClient(server)
      const files = makeDisks(dir)
      const { drives, result } = yield* backup(client, files, { backupTime: T0 })
      assert.strictEqual(result.path, "vm/100/2024-06-05T12:00:00Z")
      assert.deepStrictEqual(result.manifest.files.map((f) => f.filename), [
        "qemu-server.conf.blob",
        "fw.conf.blob",
        "drive-scsi0.img.fidx",
        "drive-scsi1.img.fidx",
        "drive-efidisk0.img.fidx"
      ])
      const stats = yield* server.stats
      // scsi0: random, zero(hole), half, tail; scsi1: zero (known), random; efidisk0: one short chunk
      assert.strictEqual(stats.chunkUploads, 6)
      assert.strictEqual(drives[0]!.zeroChunks, 1)
      assert.strictEqual(drives[1]!.knownChunks, 1)
      yield* settle(server)
      const snap = path.join(store, "vm", "100", "2024-06-05T12:00:00Z")
      const onDisk = yield* Manifest.decodeBlob(fs.readFileSync(path.join(snap, "index.json.blob")))
      assert.strictEqual(onDisk.signature, null)
      for (const file of onDisk.files) {
        const bytes = fs.readFileSync(path.join(snap, file.filename))
        if (file.filename.endsWith(".blob")) {
          assert.strictEqual(file.size, bytes.length)
          assert.strictEqual(file.csum, crypto.createHash("sha256").update(bytes).digest("hex"))
        } else {
          const index = yield* FixedIndex.decode(bytes)
          assert.strictEqual(file.size, index.size)
          assert.strictEqual(file.csum, Buffer.from(FixedIndex.csum(index)).toString("hex"))
        }
      }
      const zeroChunk = path.join(store, ".chunks", FixedIndex.ZERO_CHUNK_DIGEST_HEX.slice(0, 4), FixedIndex.ZERO_CHUNK_DIGEST_HEX)
      assert.isTrue(fs.existsSync(zeroChunk))

      const restored = yield* restore(client, path.join(dir, "restore"), { backupTime: T0 })
      assert.strictEqual(restored.config, vmConfig(Object.keys(files)))
      assert.strictEqual(restored.firewall, "[OPTIONS]\nenable: 1\n")
      assert.deepStrictEqual(restored.drives.map((d) => d.device), [...DEVICES])
      for (const drive of restored.drives) {
        const original = files[drive.device as keyof typeof files]
        assert.strictEqual(fs.statSync(drive.path).size, fs.statSync(original).size)
        assert.strictEqual(sha256File(drive.path), sha256File(original), drive.device)
      }
      assert.strictEqual(restored.drives[0]!.holeChunks, 1)
      assert.strictEqual(restored.drives[1]!.holeChunks, 1)
    }), { timeout: 60_000 })

  it.scopedLive("a second backup uploads only the changed chunks; dirty-bitmap reuse uses reuse-csum", () =>
    Effect.gen(function*() {
      const { dir, server } = yield* startServer()
      const client = yield* makeClient(server)
      const files = makeDisks(dir)
      yield* backup(client, files, { backupTime: T0 })
      yield* settle(server)
      const before = (yield* server.stats).chunkUploads

      touchSlot(files.scsi0, 2)
      const second = yield* backup(client, files, { backupTime: T0 + 3600 })
      yield* settle(server)
      const afterSecond = (yield* server.stats).chunkUploads
      assert.strictEqual(afterSecond - before, 1, "only the changed chunk crosses the network")
      assert.deepStrictEqual(second.drives.map((d) => d.uploadedChunks), [1, 0, 0])
      assert.isTrue(second.writer.previousManifest !== undefined)

      touchSlot(files.scsi1, 1)
      const dirty = new Set(["scsi1:1"])
      const third = yield* backup(client, files, { backupTime: T0 + 7200 }, (device, slot) => !dirty.has(`${device}:${slot}`))
      yield* settle(server)
      assert.strictEqual((yield* server.stats).chunkUploads - afterSecond, 1)
      assert.isTrue(third.drives.every((d) => d.incremental))
      assert.deepStrictEqual(third.drives.map((d) => d.reusedChunks), [4, 1, 1])

      const restored = yield* restore(client, path.join(dir, "restore3"), { backupTime: T0 + 7200 })
      for (const drive of restored.drives) {
        assert.strictEqual(sha256File(drive.path), sha256File(files[drive.device as keyof typeof files]), drive.device)
      }
    }), { timeout: 60_000 })

  it.scopedLive("encrypted backup: encrypted chunks, signed manifest, master-key blob; wrong or missing key refused", () =>
    Effect.gen(function*() {
      const { dir, server, store } = yield* startServer()
      const client = yield* makeClient(server)
      const files = makeDisks(dir)
      const passphrase = Redacted.make("a long passphrase")
      const keyFile = KeyConfig.toJson(yield* KeyConfig.create(yield* CryptConfig.generate, { kdf: "pbkdf2", passphrase }))
      const crypt = yield* KeyConfig.load(keyFile, passphrase)
      const { privateKey, publicKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 })
      const { result } = yield* backup(client, files, {
        backupTime: T0,
        crypt,
        masterPublicKeyPem: publicKey.export({ type: "spki", format: "pem" }).toString()
      })
      assert.isTrue(result.manifest.files.every((f) => f["crypt-mode"] === "encrypt"))
      yield* settle(server)
      const snap = path.join(store, "vm", "100", "2024-06-05T12:00:00Z")
      const manifestBlob = fs.readFileSync(path.join(snap, "index.json.blob"))
      assert.strictEqual(Either.getOrThrow(DataBlob.kindOf(manifestBlob)), "compressed")
      const manifest = yield* Manifest.decodeBlob(manifestBlob, crypt)
      assert.match(manifest.signature ?? "", /^[0-9a-f]{64}$/)
      assert.strictEqual(manifest.unprotected["key-fingerprint"], crypt.fingerprint)
      const conf = fs.readFileSync(path.join(snap, "qemu-server.conf.blob"))
      assert.strictEqual(Either.getOrThrow(DataBlob.kindOf(conf)), "encrypted-compressed")
      const chunkDirs = fs.readdirSync(path.join(store, ".chunks"))
      for (const prefix of chunkDirs) {
        for (const name of fs.readdirSync(path.join(store, ".chunks", prefix))) {
          const kind = Either.getOrThrow(DataBlob.kindOf(fs.readFileSync(path.join(store, ".chunks", prefix, name))))
          assert.isTrue(DataBlob.isEncryptedKind(kind), `${name} is ${kind}`)
          assert.notStrictEqual(name, FixedIndex.ZERO_CHUNK_DIGEST_HEX)
        }
      }
      const keyBlob = fs.readFileSync(path.join(snap, KeyConfig.MASTER_KEY_BLOB_NAME))
      assert.strictEqual(Either.getOrThrow(DataBlob.kindOf(keyBlob)), "uncompressed")
      const recovered = yield* KeyConfig.recoverFromMasterKeyBlob(
        keyBlob,
        Redacted.make(privateKey.export({ type: "pkcs8", format: "pem" }).toString())
      )
      assert.strictEqual(recovered.fingerprint, crypt.fingerprint)

      const restored = yield* restore(client, path.join(dir, "restore"), { backupTime: T0, crypt })
      for (const drive of restored.drives) {
        assert.strictEqual(sha256File(drive.path), sha256File(files[drive.device as keyof typeof files]), drive.device)
      }
      const other = yield* CryptConfig.generate
      const wrongKey = yield* Effect.flip(restore(client, path.join(dir, "wrong"), { backupTime: T0, crypt: other }))
      assert.strictEqual(wrongKey._tag, "ManifestError")
      assert.strictEqual((wrongKey as { reason: string }).reason, "FingerprintMismatch")
      const noKey = yield* Effect.flip(restore(client, path.join(dir, "nokey"), { backupTime: T0 }))
      assert.strictEqual(noKey._tag, "DataBlobError")
      assert.strictEqual((noKey as { reason: string }).reason, "MissingKey")
    }), { timeout: 60_000 })

  it.scopedLive("a wrong certificate fingerprint is refused before any credential is sent", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      const wrong = yield* Effect.flip(makeClient(server, { fingerprint: "00".repeat(32).replace(/(..)(?!$)/g, "$1:") }))
      assert.strictEqual(wrong._tag, "PbsTlsError")
      assert.strictEqual((wrong as { reason: string }).reason, "FingerprintMismatch")
      assert.include(wrong.message, server.fingerprint)
      const none = yield* Effect.flip(makeClient(server, { fingerprint: undefined }))
      assert.strictEqual((none as { reason: string }).reason, "Untrusted")
      const password = yield* Effect.flip(makeClient(server, {
        fingerprint: "ab".repeat(32),
        auth: { _tag: "Password", userid: USER, password: Redacted.make(PASSWORD) }
      }))
      assert.strictEqual(password._tag, "PbsTlsError")
      yield* Effect.sleep("50 millis")
      const stats = yield* server.stats
      assert.strictEqual(stats.tcpConnections, 3)
      assert.strictEqual(stats.httpRequests, 0)
      assert.strictEqual(stats.authFailures, 0)
      assert.deepStrictEqual(yield* server.requests, [])
      const upper = yield* makeClient(server, { fingerprint: server.fingerprint.toUpperCase() })
      assert.strictEqual((yield* upper.version).version, "3.2.4")
    }), { timeout: 30_000 })

  it.scopedLive("bad credentials give typed authentication errors without the secret", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      const badToken = yield* Effect.flip(makeClient(server, {
        auth: { _tag: "ApiToken", tokenId: "backup@pbs!test", secret: Redacted.make("not-the-secret") }
      }))
      assert.strictEqual(badToken._tag, "PbsAuthError")
      assert.strictEqual((badToken as { status: number }).status, 401)
      assert.strictEqual((badToken as { text: string }).text, "authentication failed - invalid API token")
      assert.notInclude(badToken.message, "not-the-secret")
      const badPassword = yield* Effect.flip(makeClient(server, {
        auth: { _tag: "Password", userid: USER, password: Redacted.make("wrong-password") }
      }))
      assert.strictEqual(badPassword._tag, "PbsAuthError")
      assert.notInclude(JSON.stringify(badPassword), "wrong-password")
      const log = JSON.stringify(yield* server.requests)
      assert.notInclude(log, "not-the-secret")
      assert.notInclude(log, TOKEN_SECRET)
    }), { timeout: 30_000 })

  it.scopedLive("ticket authentication: backup, log upload, listing and restore as a user", () =>
    Effect.gen(function*() {
      const { dir, server, store } = yield* startServer()
      const client = yield* makeClient(server, {
        auth: { _tag: "Password", userid: USER, password: Redacted.make(PASSWORD) }
      })
      assert.strictEqual(client.authId, USER)
      const file = path.join(dir, "small.raw")
      makeDisk(file, ["half"], 777)
      yield* backup(client, { scsi0: file }, { backupTime: T0, ns: undefined })
      yield* settle(server)
      assert.strictEqual(fs.readFileSync(path.join(store, "vm", "100", "owner"), "utf8"), `${USER}\n`)
      const id = { backupType: "vm", backupId: "100", backupTime: T0 } as const
      yield* PbsSnapshotWriter.uploadLog(client, id, "INFO: starting new backup job\nINFO: Finished Backup of VM 100\n")
      const logBlob = fs.readFileSync(path.join(store, "vm", "100", "2024-06-05T12:00:00Z", "client.log.blob"))
      assert.include((yield* DataBlob.decode(logBlob)).toString(), "Finished Backup of VM 100")
      const twice = yield* Effect.flip(PbsSnapshotWriter.uploadLog(client, id, "again"))
      assert.strictEqual(twice._tag, "PbsHttpError")
      assert.strictEqual((twice as { text: string }).text, "backup already contains a log.")
      const list = yield* client.listSnapshots({ backupType: "vm", backupId: "100" })
      assert.deepStrictEqual(list.map((s) => s.backupTime), [T0])
      const restored = yield* restore(client, path.join(dir, "r"), { backupTime: T0 })
      assert.strictEqual(sha256File(restored.drives[0]!.path), sha256File(file))
      const stats = yield* server.stats
      assert.strictEqual(stats.ticketLogins, 1)
    }), { timeout: 60_000 })

  it.scopedLive("a connection dropped mid-upload fails cleanly and leaves no finished snapshot", () =>
    Effect.gen(function*() {
      let uploads = 0
      const { dir, server, store } = yield* startServer({
        onRequest: (r) => (r.path === "/fixed_chunk" && ++uploads === 3 ? "drop" : undefined)
      })
      const client = yield* makeClient(server)
      const files = makeDisks(dir)
      const error = yield* Effect.flip(backup(client, files, { backupTime: T0 }))
      assert.strictEqual(error._tag, "PbsConnectionError")
      yield* settle(server)
      assert.isFalse(fs.existsSync(path.join(store, "vm", "100", "2024-06-05T12:00:00Z")))
      const stats = yield* server.stats
      assert.strictEqual(stats.finishedSnapshots, 0)
      assert.strictEqual(stats.removedSnapshots, 1)
      yield* server.setOnRequest(undefined)
      const retry = yield* backup(client, files, { backupTime: T0 + 1 })
      assert.strictEqual(retry.result.drives.length, 3)
    }), { timeout: 60_000 })

  it.scopedLive("closing the writer's scope without finish discards the snapshot", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const client = yield* makeClient(server)
      const scope = yield* Scope.make()
      const writer = yield* Scope.extend(PbsSnapshotWriter.open(client, { backupId: "100", backupTime: T0 }), scope)
      yield* writer.addConfig("memory: 512\n")
      const drive = yield* writer.openDrive("scsi0", CS)
      yield* drive.write(PbsSnapshotWriter.zero)
      yield* drive.close
      const snap = path.join(store, "vm", "100", "2024-06-05T12:00:00Z")
      assert.isTrue(fs.existsSync(snap))
      yield* Scope.close(scope, Exit.void)
      yield* settle(server)
      assert.isFalse(fs.existsSync(snap))
    }), { timeout: 30_000 })

  it.scopedLive("server-side rejections arrive as typed errors with status and text", () =>
    Effect.gen(function*() {
      const { dir, server } = yield* startServer()
      const client = yield* makeClient(server)
      const unknown = yield* Effect.flip(Effect.scoped(Effect.gen(function*() {
        const protocol = yield* client.openBackup({ backupType: "vm", backupId: "200", backupTime: T0 })
        const wid = yield* protocol.createFixedIndex("drive-scsi0.img.fidx", CS)
        yield* protocol.appendFixedIndex(wid, [{ digest: "cd".repeat(32), offset: 0 }])
      })))
      assert.strictEqual(unknown._tag, "PbsHttpError")
      assert.deepStrictEqual(
        [(unknown as { status: number }).status, (unknown as { text: string }).text],
        [400, `no such chunk ${"cd".repeat(32)}`]
      )
      const csum = yield* Effect.flip(Effect.scoped(Effect.gen(function*() {
        const protocol = yield* client.openBackup({ backupType: "vm", backupId: "200", backupTime: T0 })
        const wid = yield* protocol.createFixedIndex("drive-scsi0.img.fidx", 100)
        const chunk = Buffer.alloc(100, 9)
        const digest = Buffer.from(DataBlob.chunkDigest(chunk)).toString("hex")
        yield* protocol.uploadFixedChunk(wid, { digest, size: 100, blob: yield* DataBlob.encode(chunk) })
        yield* protocol.appendFixedIndex(wid, [{ digest, offset: 0 }])
        yield* protocol.closeFixedIndex(wid, { chunkCount: 1, size: 100, csum: "ee".repeat(32) })
      })))
      assert.strictEqual(
        (csum as { text: string }).text,
        "fixed writer 'drive-scsi0.img.fidx' close failed - got unexpected checksum"
      )
      const file = path.join(dir, "d.raw")
      makeDisk(file, ["random"])
      yield* backup(client, { scsi0: file }, { backupTime: T0 })
      const older = yield* Effect.flip(backup(client, { scsi0: file }, { backupTime: T0 - 1 }))
      assert.strictEqual(older._tag, "PbsHttpError")
      assert.strictEqual((older as { text: string }).text, "backup timestamp is older than last backup.")
      assert.strictEqual(older.message, "GET /api2/json/backup: HTTP 400: backup timestamp is older than last backup.")
      const misuse = yield* Effect.flip(Effect.scoped(Effect.gen(function*() {
        const writer = yield* PbsSnapshotWriter.open(client, { backupId: "100", backupTime: T0 + 10 })
        const drive = yield* writer.openDrive("scsi0", CS + 5)
        yield* drive.write(PbsSnapshotWriter.data(Buffer.alloc(10)))
      })))
      assert.strictEqual(misuse._tag, "PbsClientError")
    }), { timeout: 60_000 })

  it.scopedLive("restore verifies the index against the manifest and each chunk against its digest", () =>
    Effect.gen(function*() {
      const { dir, server, store } = yield* startServer()
      const client = yield* makeClient(server)
      const file = path.join(dir, "d.raw")
      makeDisk(file, ["random", "random"])
      yield* backup(client, { scsi0: file }, { backupTime: T0 })
      yield* settle(server)
      const snap = path.join(store, "vm", "100", "2024-06-05T12:00:00Z")
      const indexFile = path.join(snap, "drive-scsi0.img.fidx")
      const original = fs.readFileSync(indexFile)
      const index = yield* FixedIndex.decode(original)
      const victim = Buffer.from(FixedIndex.digestAt(index, 1)).toString("hex")
      const chunkFile = path.join(store, ".chunks", victim.slice(0, 4), victim)
      const chunk = fs.readFileSync(chunkFile)
      const other = crypto.randomBytes(CS)
      fs.writeFileSync(chunkFile, Either.getOrThrow(DataBlob.encodeSync(other)))
      const digest = yield* Effect.flip(restore(client, path.join(dir, "r1"), { backupTime: T0 }))
      assert.strictEqual(digest._tag, "DataBlobError")
      assert.strictEqual((digest as { reason: string }).reason, "DigestMismatch")
      fs.writeFileSync(chunkFile, chunk)
      const swapped = Buffer.from(original)
      original.copy(swapped, 4096, 4096 + 32, 4096 + 64)
      original.copy(swapped, 4096 + 32, 4096, 4096 + 32)
      fs.writeFileSync(indexFile, swapped)
      const csum = yield* Effect.flip(restore(client, path.join(dir, "r2"), { backupTime: T0 }))
      assert.strictEqual(csum._tag, "ManifestError")
      assert.strictEqual((csum as { reason: string }).reason, "FileMismatch")
    }), { timeout: 60_000 })

  it.scopedLive("namespaces: create, back up into one and restore from it", () =>
    Effect.gen(function*() {
      const { dir, server, store } = yield* startServer()
      const client = yield* makeClient(server)
      yield* client.createNamespace("prod")
      yield* client.createNamespace("prod/vms")
      const file = path.join(dir, "d.raw")
      makeDisk(file, ["hole", "half"])
      yield* backup(client, { scsi0: file }, { backupTime: T0, ns: "prod/vms" })
      yield* settle(server)
      assert.isTrue(fs.existsSync(path.join(store, "ns", "prod", "ns", "vms", "vm", "100", "2024-06-05T12:00:00Z", "index.json.blob")))
      const restored = yield* restore(client, path.join(dir, "r"), { backupTime: T0, ns: "prod/vms" })
      assert.strictEqual(sha256File(restored.drives[0]!.path), sha256File(file))
      const missing = yield* Effect.flip(backup(client, { scsi0: file }, { backupTime: T0, ns: "nope" }))
      assert.deepStrictEqual([(missing as { status: number }).status, (missing as { text: string }).text], [404, "namespace not found"])
    }), { timeout: 60_000 })

  it.scopedLive("identical chunks in flight are uploaded once and restored everywhere", () =>
    Effect.gen(function*() {
      const { dir, server } = yield* startServer()
      const client = yield* makeClient(server)
      const file = path.join(dir, "twins.raw")
      const twin = crypto.randomBytes(CS)
      fs.writeFileSync(file, Buffer.concat([twin, twin, twin, Buffer.alloc(CS), twin.subarray(0, 5000)]))
      const { drives } = yield* backup(client, { scsi0: file }, { backupTime: T0, uploadConcurrency: 4 })
      assert.strictEqual(drives[0]!.uploadedChunks, 3, "twin, zero chunk, short tail")
      assert.strictEqual(drives[0]!.knownChunks, 2)
      assert.strictEqual((yield* server.stats).chunkUploads, 3)
      const restored = yield* restore(client, path.join(dir, "r"), { backupTime: T0 })
      assert.strictEqual(sha256File(restored.drives[0]!.path), sha256File(file))
      assert.strictEqual(restored.drives[0]!.downloadedChunks, 2)
    }), { timeout: 60_000 })

  it.scopedLive("write waits while the upload window is full (back-pressure)", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      const real = yield* makeClient(server)
      const gate = yield* Deferred.make<void>()
      let inFlight = 0
      let maxInFlight = 0
      const gated = wrapUploads(real, (upload) => (wid, chunk) =>
        Effect.sync(() => {
          inFlight += 1
          maxInFlight = Math.max(maxInFlight, inFlight)
        }).pipe(
          Effect.zipRight(Deferred.await(gate)),
          Effect.zipRight(upload(wid, chunk)),
          Effect.ensuring(Effect.sync(() => {
            inFlight -= 1
          }))
        ))
      const writer = yield* PbsSnapshotWriter.open(gated, { backupId: "100", backupTime: T0, uploadConcurrency: 2 })
      const drive = yield* writer.openDrive("scsi0", 5 * CS)
      let accepted = 0
      const feeder = yield* Effect.fork(Effect.gen(function*() {
        for (let i = 0; i < 5; i++) {
          yield* drive.write(PbsSnapshotWriter.data(crypto.randomBytes(CS)))
          accepted += 1
        }
      }))
      yield* Effect.sleep("300 millis")
      assert.strictEqual(inFlight, 2)
      assert.strictEqual(accepted, 2, "the third write waits for a free slot")
      yield* Deferred.succeed(gate, undefined)
      yield* Fiber.join(feeder)
      const result = yield* drive.close
      assert.strictEqual(result.uploadedChunks, 5)
      assert.strictEqual(maxInFlight, 2)
      yield* writer.addConfig("memory: 512\n")
      yield* writer.finish
    }), { timeout: 60_000 })

  it.scopedLive("sends data slots without copying them and reads them no longer than `retention` bytes", () =>
    Effect.gen(function*() {
      const { dir, server } = yield* startServer()
      const real = yield* makeClient(server)
      const first = Array.from({ length: 6 }, () => crypto.randomBytes(CS))
      yield* Effect.scoped(Effect.gen(function*() {
        const writer = yield* PbsSnapshotWriter.open(real, { backupId: "100", backupTime: T0 })
        const drive = yield* writer.openDrive("scsi0", 6 * CS)
        for (const bytes of first) yield* drive.write(PbsSnapshotWriter.data(bytes))
        yield* drive.close
        yield* writer.addConfig("memory: 512\n")
        yield* writer.finish
      }))

      let uploadsDone = 0
      // uploads start late: a writer that let go of a slot too early would send bytes changed meanwhile
      const slow = wrapUploads(real, (upload) => (wid, chunk) =>
        Effect.sleep("150 millis").pipe(
          Effect.zipRight(upload(wid, chunk)),
          Effect.tap(() => Effect.sync(() => uploadsDone++))
        ))
      const writer = yield* PbsSnapshotWriter.open(slow, { backupId: "100", backupTime: T0 + 60, uploadConcurrency: 2 })
      const drive = yield* writer.openDrive("scsi0", 6 * CS)
      assert.isTrue(drive.incremental)
      assert.strictEqual(drive.retention, 2 * CS)
      // slots 1 and 2 are unchanged (reused: their writes return at once), the others new
      const expected = first.map((bytes, slot) => slot === 1 || slot === 2 ? bytes : crypto.randomBytes(CS))
      // one buffer per slot, each overwritten as soon as the contract allows it
      const buffers = expected.map((bytes) => Buffer.from(bytes))
      for (let slot = 0; slot < 6; slot++) {
        yield* drive.write(
          slot === 1 || slot === 2 ? PbsSnapshotWriter.reuse(slot) : PbsSnapshotWriter.data(buffers[slot]!)
        )
        const free = slot - drive.retention / CS
        if (free >= 0) buffers[free]!.fill(0xee)
      }
      assert.isAtLeast(uploadsDone, 2, "the last write waited for the uploads of slots 0 and 3")
      const result = yield* drive.close
      assert.deepStrictEqual([result.uploadedChunks, result.reusedChunks], [4, 2])
      yield* writer.addConfig("memory: 512\n")
      yield* writer.finish
      const restored = yield* Effect.scoped(Effect.flatMap(
        PbsRestore.open(real, { backupId: "100", backupTime: T0 + 60 }),
        (reader) => reader.restoreImage("drive-scsi0.img.fidx", path.join(dir, "restored.raw"))
      ))
      assert.strictEqual(restored.size, 6 * CS)
      assert.isTrue(fs.readFileSync(path.join(dir, "restored.raw")).equals(Buffer.concat(expected)))
    }), { timeout: 60_000 })
})
