import { assert, describe, it } from "@effect/vitest"
import { Effect, Either, Redacted } from "effect"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as DataBlob from "../src/DataBlob.js"
import * as FixedIndex from "../src/FixedIndex.js"
import * as Manifest from "../src/Manifest.js"
import * as PbsTestServer from "../src/testing/PbsTestServer.js"
import * as Raw from "./utils/RawPbs.js"

const TOKEN = { Authorization: "PBSAPIToken=backup@pbs!test:s3cret" }
const OTHER_TOKEN = { Authorization: "PBSAPIToken=other@pbs!t:0ther" }
const T0 = 1717588800
const CS = FixedIndex.CHUNK_SIZE

const tempDir = Effect.acquireRelease(
  Effect.sync(() => fs.mkdtempSync(path.join(os.tmpdir(), "pbs-srv-"))),
  (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
)

const startServer = (options: Partial<PbsTestServer.PbsTestServerOptions> = {}) =>
  Effect.gen(function*() {
    const dir = yield* tempDir
    const server = yield* PbsTestServer.make({
      datastores: [{ name: "store1", path: path.join(dir, "store1") }],
      users: [{ userid: "alice@pbs", password: Redacted.make("password1") }],
      tokens: [
        { tokenid: "backup@pbs!test", secret: Redacted.make("s3cret") },
        { tokenid: "other@pbs!t", secret: Redacted.make("0ther") }
      ],
      namespaces: [{ store: "store1", ns: "a/b" }],
      ...options
    })
    return { server, store: path.join(dir, "store1") }
  })

const backupPath = (time: number, extra = "") =>
  `/api2/json/backup?store=store1&backup-type=vm&backup-id=100&backup-time=${time}${extra}`

const openBackup = (port: number, time: number, headers: Record<string, string> = TOKEN, extra = "") =>
  Effect.flatMap(Raw.upgrade(port, backupPath(time, extra), "proxmox-backup-protocol-v1", headers), (s) =>
    "call" in s ? Effect.succeed(s) : Effect.die(new Error(`upgrade refused: ${s.status} ${s.text}`)))

const refusedUpgrade = (port: number, p: string, protocol: string, headers: Record<string, string>) =>
  Effect.flatMap(Raw.upgrade(port, p, protocol, headers), (s) =>
    "call" in s ? Effect.die(new Error("upgrade unexpectedly accepted")) : Effect.succeed(s))

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex")
const sha = (b: Uint8Array) => crypto.createHash("sha256").update(b).digest("hex")

/** A disk of 2 chunks: one full random chunk, one short tail. */
const disk = (seed: number) => {
  const data = Buffer.alloc(CS + 1000)
  crypto.createHash("sha512").update(String(seed)).digest().copy(data, 0)
  for (let i = 64; i < data.length; i += 4096) data.writeUInt32LE(seed * 7919 + i, i)
  return data
}

const uploadChunk = (session: Raw.Session, wid: number, data: Buffer) =>
  Effect.gen(function*() {
    const digest = hex(DataBlob.chunkDigest(data))
    const blob = Either.getOrThrow(DataBlob.encodeSync(data))
    const reply = yield* session.call(
      "POST",
      `/fixed_chunk?wid=${wid}&digest=${digest}&size=${data.length}&encoded-size=${blob.length}`,
      blob
    )
    return { digest, reply }
  })

const postJson = (session: Raw.Session, method: string, p: string, body: unknown) =>
  session.call(method, p, JSON.stringify(body), { "content-type": "application/json" })

const manifestBlob = (time: number, files: ReadonlyArray<Manifest.FileInfo>) =>
  Effect.runSync(Manifest.encodeBlob(Manifest.make({ backupType: "vm", backupId: "100", backupTime: time, files })))

/** A complete backup of `data` as drive-scsi0 plus a config blob; returns the digests. */
const fullBackup = (port: number, time: number, data: Buffer, headers: Record<string, string> = TOKEN) =>
  Effect.gen(function*() {
    const session = yield* openBackup(port, time, headers)
    const conf = Either.getOrThrow(DataBlob.encodeSync(Buffer.from("memory: 512\n")))
    assert.strictEqual((yield* session.call("POST", `/blob?file-name=qemu-server.conf.blob&encoded-size=${conf.length}`, conf)).status, 200)
    const created = yield* session.call("POST", `/fixed_index?archive-name=drive-scsi0.img.fidx&size=${data.length}`)
    assert.strictEqual(created.status, 200, created.text)
    const wid = created.json.data as number
    const a = yield* uploadChunk(session, wid, data.subarray(0, CS))
    const b = yield* uploadChunk(session, wid, data.subarray(CS))
    assert.strictEqual(a.reply.status, 200, a.reply.text)
    assert.strictEqual(a.reply.json.data, a.digest)
    const appended = yield* postJson(session, "PUT", "/fixed_index", {
      wid,
      "digest-list": [a.digest, b.digest],
      "offset-list": [0, CS]
    })
    assert.strictEqual(appended.status, 200, appended.text)
    const csum = sha(Buffer.from(a.digest + b.digest, "hex"))
    const closed = yield* session.call("POST", `/fixed_close?wid=${wid}&chunk-count=2&size=${data.length}&csum=${csum}`)
    assert.strictEqual(closed.status, 200, closed.text)
    const manifest = manifestBlob(time, [
      { filename: "qemu-server.conf.blob", "crypt-mode": "none", size: conf.length, csum: sha(conf) },
      { filename: "drive-scsi0.img.fidx", "crypt-mode": "none", size: data.length, csum }
    ])
    const up = yield* session.call("POST", `/blob?file-name=index.json.blob&encoded-size=${manifest.length}`, manifest)
    assert.strictEqual(up.status, 200, up.text)
    const finished = yield* session.call("POST", "/finish")
    assert.strictEqual(finished.status, 200, finished.text)
    yield* session.close
    return { digests: [a.digest, b.digest], csum }
  })

const settle = (server: PbsTestServer.PbsTestServerService) =>
  Effect.gen(function*() {
    for (let i = 0; i < 200 && (yield* server.activeSessions) > 0; i++) yield* Effect.sleep("10 millis")
  })

describe("PbsTestServer", () => {
  it.scopedLive("a raw full backup leaves PBS's on-disk layout", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const data = disk(1)
      const { csum, digests } = yield* fullBackup(server.port, T0, data)
      yield* settle(server)
      const group = path.join(store, "vm", "100")
      assert.strictEqual(fs.readFileSync(path.join(group, "owner"), "utf8"), "backup@pbs!test\n")
      const snap = path.join(group, "2024-06-05T12:00:00Z")
      assert.deepStrictEqual(fs.readdirSync(snap).sort(), ["drive-scsi0.img.fidx", "index.json.blob", "qemu-server.conf.blob"])
      const index = yield* FixedIndex.decode(fs.readFileSync(path.join(snap, "drive-scsi0.img.fidx")))
      assert.strictEqual(index.size, data.length)
      assert.strictEqual(hex(index.headerCsum), csum)
      for (const digest of digests) {
        const chunk = fs.readFileSync(path.join(store, ".chunks", digest.slice(0, 4), digest))
        assert.isTrue(Either.isRight(DataBlob.verify(chunk)))
      }
      assert.isTrue(fs.existsSync(path.join(store, ".lock")))
      const manifest = yield* Manifest.decodeBlob(fs.readFileSync(path.join(snap, "index.json.blob")))
      const uploadStats = manifest.unprotected["chunk_upload_stats"] as Record<string, number>
      const conf = fs.statSync(path.join(snap, "qemu-server.conf.blob")).size
      assert.strictEqual(uploadStats["count"], 2)
      assert.strictEqual(uploadStats["duplicates"], 0)
      assert.isAbove(uploadStats["size"]!, data.length + conf, "chunk bytes plus blob bytes, as PBS counts them")
      assert.isBelow(uploadStats["compressed_size"]!, data.length)
      const stats = yield* server.stats
      assert.strictEqual(stats.chunkUploads, 2)
      assert.strictEqual(stats.finishedSnapshots, 1)
    }))

  it.scopedLive("enforces the known-chunk rule even for chunks already on disk", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      const { digests } = yield* fullBackup(server.port, T0, disk(1))
      const session = yield* openBackup(server.port, T0 + 10)
      const wid = (yield* session.call("POST", `/fixed_index?archive-name=drive-scsi0.img.fidx&size=${CS + 1000}`)).json.data
      const unknown = "ab".repeat(32)
      const r1 = yield* postJson(session, "PUT", "/fixed_index", { wid, "digest-list": [unknown], "offset-list": [0] })
      assert.strictEqual(r1.status, 400)
      assert.strictEqual(r1.text, `no such chunk ${unknown}`)
      const r2 = yield* postJson(session, "PUT", "/fixed_index", { wid, "digest-list": [digests[0]], "offset-list": [0] })
      assert.strictEqual(r2.text, `no such chunk ${digests[0]}`)
      const r3 = yield* postJson(session, "PUT", "/fixed_index", { wid, "digest-list": ["AB".repeat(32)], "offset-list": [0] })
      assert.strictEqual(r3.status, 400)
      assert.include(r3.text, "parameter 'digest-list'")
      yield* session.close
    }))

  it.scopedLive("verifies chunk uploads: digest, length, announced size, single short chunk", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      const session = yield* openBackup(server.port, T0)
      const wid = (yield* session.call("POST", `/fixed_index?archive-name=drive-scsi0.img.fidx&size=${3 * CS}`)).json.data
      const data = Buffer.alloc(1000, 1)
      const blob = Either.getOrThrow(DataBlob.encodeSync(data))
      const wrongDigest = yield* session.call(
        "POST",
        `/fixed_chunk?wid=${wid}&digest=${"00".repeat(32)}&size=1000&encoded-size=${blob.length}`,
        blob
      )
      assert.deepStrictEqual([wrongDigest.status, wrongDigest.text], [400, "detected chunk with wrong digest."])
      const digest = hex(DataBlob.chunkDigest(data))
      const wrongLength = yield* session.call(
        "POST",
        `/fixed_chunk?wid=${wid}&digest=${digest}&size=999&encoded-size=${blob.length}`,
        blob
      )
      assert.strictEqual(wrongLength.text, "detected chunk with wrong length (999 != 1000)")
      const shortBody = yield* session.call(
        "POST",
        `/fixed_chunk?wid=${wid}&digest=${digest}&size=1000&encoded-size=${blob.length + 5}`,
        blob
      )
      assert.strictEqual(shortBody.text, "uploaded chunk has unexpected size.")
      const longBody = yield* session.call(
        "POST",
        `/fixed_chunk?wid=${wid}&digest=${digest}&size=1000&encoded-size=${blob.length - 5}`,
        blob
      )
      assert.strictEqual(longBody.text, "uploaded chunk is larger than announced.")
      const badMagic = Buffer.from(blob)
      badMagic[0] = 0
      const magic = yield* session.call(
        "POST",
        `/fixed_chunk?wid=${wid}&digest=${digest}&size=1000&encoded-size=${blob.length}`,
        badMagic
      )
      assert.strictEqual(magic.text, "unable to parse raw blob - wrong magic")
      const badCrc = Buffer.from(blob)
      badCrc.writeUInt32LE(0, 8)
      const crcFixed = yield* session.call(
        "POST",
        `/fixed_chunk?wid=${wid}&digest=${digest}&size=1000&encoded-size=${blob.length}`,
        badCrc
      )
      assert.strictEqual(crcFixed.status, 200, "the server recomputes chunk CRCs")
      const other = Buffer.alloc(2000, 2)
      const otherBlob = Either.getOrThrow(DataBlob.encodeSync(other))
      const second = yield* session.call(
        "POST",
        `/fixed_chunk?wid=${wid}&digest=${hex(DataBlob.chunkDigest(other))}&size=2000&encoded-size=${otherBlob.length}`,
        otherBlob
      )
      assert.strictEqual(second.text, `fixed writer '${wid}' - detected multiple end chunks (chunk size too small)`)
      yield* session.close
    }))

  it.scopedLive("fixed_close checks count, size and csum; finish then refuses; the snapshot is removed", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const session = yield* openBackup(server.port, T0)
      const data = disk(2)
      const wid = (yield* session.call("POST", `/fixed_index?archive-name=drive-scsi0.img.fidx&size=${data.length}`)).json.data
      const a = yield* uploadChunk(session, wid, data.subarray(0, CS))
      const b = yield* uploadChunk(session, wid, data.subarray(CS))
      yield* postJson(session, "PUT", "/fixed_index", { wid, "digest-list": [a.digest, b.digest], "offset-list": [0, CS] })
      const csum = sha(Buffer.from(a.digest + b.digest, "hex"))
      const count = yield* session.call("POST", `/fixed_close?wid=${wid}&chunk-count=1&size=${data.length}&csum=${csum}`)
      assert.strictEqual(count.text, "fixed writer 'drive-scsi0.img.fidx' close failed - received wrong number of chunk (2 != 1)")
      const size = yield* session.call("POST", `/fixed_close?wid=${wid}&chunk-count=2&size=${data.length - 1}&csum=${csum}`)
      assert.strictEqual(
        size.text,
        `fixed writer 'drive-scsi0.img.fidx' close failed - unexpected file size (${data.length} != ${data.length - 1})`
      )
      const wrong = yield* session.call("POST", `/fixed_close?wid=${wid}&chunk-count=2&size=${data.length}&csum=${"00".repeat(32)}`)
      assert.deepStrictEqual([wrong.status, wrong.text], [400, "fixed writer 'drive-scsi0.img.fidx' close failed - got unexpected checksum"])
      const finish = yield* session.call("POST", "/finish")
      assert.strictEqual(finish.text, "found open index writer - unable to finish backup")
      const snap = path.join(store, "vm", "100", "2024-06-05T12:00:00Z")
      assert.isTrue(fs.existsSync(snap))
      yield* session.close
      yield* settle(server)
      assert.isFalse(fs.existsSync(snap))
      assert.strictEqual((yield* server.stats).removedSnapshots, 1)
    }))

  it.scopedLive("verifies blob CRCs and requires a parsable manifest on finish", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const session = yield* openBackup(server.port, T0)
      const conf = Either.getOrThrow(DataBlob.encodeSync(Buffer.from("memory: 512\n")))
      const bad = Buffer.from(conf)
      bad[bad.length - 1]! ^= 1
      const crc = yield* session.call("POST", `/blob?file-name=qemu-server.conf.blob&encoded-size=${bad.length}`, bad)
      assert.deepStrictEqual([crc.status, crc.text], [400, "Data blob has wrong CRC checksum."])
      const ext = yield* session.call("POST", `/blob?file-name=qemu-server.conf&encoded-size=${conf.length}`, conf)
      assert.strictEqual(ext.status, 400)
      const len = yield* session.call("POST", `/blob?file-name=qemu-server.conf.blob&encoded-size=${conf.length + 1}`, conf)
      assert.strictEqual(len.text, `got blob with unexpected length (${conf.length + 1} != ${conf.length})`)
      yield* session.call("POST", `/blob?file-name=qemu-server.conf.blob&encoded-size=${conf.length}`, conf)
      const noManifest = yield* session.call("POST", "/finish")
      assert.strictEqual(noManifest.status, 400)
      assert.match(noManifest.text, /^unable to update manifest blob - /)
      const again = yield* session.call("POST", "/finish")
      assert.strictEqual(again.text, "backup is already in the process of finishing.")
      yield* session.close
      yield* settle(server)
      assert.isFalse(fs.existsSync(path.join(store, "vm", "100", "2024-06-05T12:00:00Z")))

      const second = yield* openBackup(server.port, T0 + 1)
      yield* second.call("POST", `/blob?file-name=qemu-server.conf.blob&encoded-size=${conf.length}`, conf)
      const badManifest = Either.getOrThrow(DataBlob.encodeSync(Buffer.from(JSON.stringify({
        "backup-type": "vm",
        "backup-id": "100",
        "backup-time": T0 + 1,
        files: [{ filename: "qemu-server.conf.blob", size: conf.length, csum: "" }]
      }))))
      yield* second.call("POST", `/blob?file-name=index.json.blob&encoded-size=${badManifest.length}`, badManifest)
      const parse = yield* second.call("POST", "/finish")
      assert.match(parse.text, /^unable to update manifest blob - /)
      yield* second.close
      yield* settle(server)
      assert.deepStrictEqual(fs.readdirSync(path.join(store, "vm", "100")), ["owner"])
    }))

  it.scopedLive("requires strictly newer backup times, a free group and the group owner", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      yield* fullBackup(server.port, T0, disk(1))
      yield* settle(server)
      for (const time of [T0, T0 - 60]) {
        const older = yield* refusedUpgrade(server.port, backupPath(time), "proxmox-backup-protocol-v1", TOKEN)
        assert.deepStrictEqual([older.status, older.text], [400, "backup timestamp is older than last backup."])
      }
      const owner = yield* refusedUpgrade(server.port, backupPath(T0 + 60), "proxmox-backup-protocol-v1", OTHER_TOKEN)
      assert.strictEqual(owner.text, "backup owner check failed (other@pbs!t != backup@pbs!test)")
      const first = yield* openBackup(server.port, T0 + 60)
      const locked = yield* refusedUpgrade(server.port, backupPath(T0 + 120), "proxmox-backup-protocol-v1", TOKEN)
      assert.match(locked.text, /another backup is already running$/)
      yield* first.close
      yield* settle(server)
      const protocol = yield* refusedUpgrade(server.port, backupPath(T0 + 120), "proxmox-backup-protocol-v2", TOKEN)
      assert.strictEqual(protocol.text, "invalid protocol name")
      const badStore = yield* refusedUpgrade(
        server.port,
        backupPath(T0 + 120).replace("store1", "nostore"),
        "proxmox-backup-protocol-v1",
        TOKEN
      )
      assert.strictEqual(badStore.text, "datastore 'nostore' does not exist")
    }))

  it.scopedLive("previous: registers known chunks; reuse-csum pre-fills the index", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const data = disk(3)
      const first = yield* fullBackup(server.port, T0, data)
      yield* settle(server)
      const session = yield* openBackup(server.port, T0 + 100)
      assert.strictEqual((yield* session.call("GET", "/previous_backup_time")).json.data, T0)
      const prevIndex = yield* session.call("GET", "/previous?archive-name=drive-scsi0.img.fidx")
      assert.strictEqual(prevIndex.status, 200)
      assert.isTrue(prevIndex.body.equals(fs.readFileSync(path.join(store, "vm/100/2024-06-05T12:00:00Z/drive-scsi0.img.fidx"))))
      const missingBlob = yield* session.call("GET", "/previous?archive-name=fw.conf.blob")
      assert.strictEqual(missingBlob.status, 404)
      const wrongReuse = yield* session.call(
        "POST",
        `/fixed_index?archive-name=drive-scsi0.img.fidx&size=${data.length}&reuse-csum=${"00".repeat(32)}`
      )
      assert.strictEqual(
        wrongReuse.text,
        `expected csum (${"00".repeat(32)}) doesn't match last backup's (${first.csum}), cannot do incremental backup`
      )
      const wid = (yield* session.call(
        "POST",
        `/fixed_index?archive-name=drive-scsi0.img.fidx&size=${data.length}&reuse-csum=${first.csum}`
      )).json.data
      const close = yield* session.call("POST", `/fixed_close?wid=${wid}&chunk-count=0&size=${data.length}&csum=${first.csum}`)
      assert.strictEqual(close.status, 200, close.text)
      const wid2 = (yield* session.call("POST", `/fixed_index?archive-name=drive-sata0.img.fidx&size=${data.length}`)).json.data
      const reused = yield* postJson(session, "PUT", "/fixed_index", {
        wid: wid2,
        "digest-list": first.digests,
        "offset-list": [0, CS]
      })
      assert.strictEqual(reused.status, 200, reused.text)
      const swapped = yield* postJson(session, "PUT", "/fixed_index", {
        wid: wid2,
        "digest-list": [first.digests[1]],
        "offset-list": [0]
      })
      assert.strictEqual(swapped.text, `chunk with unexpected length (1000 != ${CS}`)
      yield* session.close
      yield* settle(server)
      assert.strictEqual((yield* server.stats).chunkUploads, 2)
    }))

  it.scopedLive("namespaces must exist and nest as ns/<name>", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const missing = yield* refusedUpgrade(server.port, backupPath(T0, "&ns=x"), "proxmox-backup-protocol-v1", TOKEN)
      assert.deepStrictEqual([missing.status, missing.text], [404, "namespace not found"])
      const session = yield* openBackup(server.port, T0, TOKEN, "&ns=a/b")
      yield* session.close
      yield* settle(server)
      assert.isTrue(fs.existsSync(path.join(store, "ns", "a", "ns", "b", "vm", "100", "owner")))
      const created = yield* Raw.apiRequest(
        server.port,
        "POST",
        "/api2/json/admin/datastore/store1/namespace",
        { ...TOKEN, "content-type": "application/json" },
        JSON.stringify({ name: "c", parent: "a" })
      )
      assert.strictEqual(created.status, 200, created.text)
      assert.isTrue(fs.existsSync(path.join(store, "ns", "a", "ns", "c")))
    }))

  it.scopedLive("authenticates tokens and tickets, with CSRF on non-GET requests", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      const none = yield* Raw.apiRequest(server.port, "GET", "/api2/json/version", {})
      assert.deepStrictEqual([none.status, none.text], [401, "authentication failed - no authentication credentials provided."])
      const bad = yield* Raw.apiRequest(server.port, "GET", "/api2/json/version", {
        Authorization: "PBSAPIToken=backup@pbs!test:wrong"
      })
      assert.deepStrictEqual([bad.status, bad.text], [401, "authentication failed - invalid API token"])
      const spaced = yield* Raw.apiRequest(server.port, "GET", "/api2/json/version", {
        Authorization: "PBSAPIToken backup@pbs!test:s3cre%74"
      })
      assert.strictEqual(spaced.status, 200)
      const wrongLogin = yield* Raw.apiRequest(server.port, "POST", "/api2/json/access/ticket", {
        "content-type": "application/x-www-form-urlencoded"
      }, "username=alice%40pbs&password=nope")
      assert.strictEqual(wrongLogin.status, 401)
      const login = yield* Raw.apiRequest(server.port, "POST", "/api2/json/access/ticket", {
        "content-type": "application/json"
      }, JSON.stringify({ username: "alice@pbs", password: "password1" }))
      assert.strictEqual(login.status, 200)
      const { CSRFPreventionToken, ticket } = login.json.data
      assert.match(ticket, /^PBS:alice@pbs:/)
      const cookie = { Cookie: `PBSAuthCookie=${encodeURIComponent(ticket)}` }
      assert.strictEqual((yield* Raw.apiRequest(server.port, "GET", "/api2/json/version", cookie)).status, 200)
      const noCsrf = yield* Raw.apiRequest(server.port, "POST", "/api2/json/admin/datastore/store1/namespace", cookie, "name=z")
      assert.deepStrictEqual([noCsrf.status, noCsrf.text], [401, "authentication failed - invalid CSRF prevention token"])
      const withCsrf = yield* Raw.apiRequest(server.port, "POST", "/api2/json/admin/datastore/store1/namespace", {
        ...cookie,
        CSRFPreventionToken,
        "content-type": "application/x-www-form-urlencoded"
      }, "name=z")
      assert.strictEqual(withCsrf.status, 200, withCsrf.text)
      const renewed = yield* Raw.apiRequest(server.port, "POST", "/api2/json/access/ticket", {
        "content-type": "application/x-www-form-urlencoded"
      }, `username=alice%40pbs&password=${encodeURIComponent(ticket)}`)
      assert.strictEqual(renewed.status, 200)
      const upgrade = yield* refusedUpgrade(server.port, backupPath(T0), "proxmox-backup-protocol-v1", {})
      assert.strictEqual(upgrade.status, 401)
      const log = yield* server.requests
      assert.notInclude(JSON.stringify(log), "password1")
      assert.notInclude(JSON.stringify(log), "s3cret")
    }))

  it.scopedLive("reader: download registers chunks; other chunks are refused", () =>
    Effect.gen(function*() {
      const { server } = yield* startServer()
      const data = disk(4)
      const { digests } = yield* fullBackup(server.port, T0, data)
      yield* settle(server)
      const readerPath = `/api2/json/reader?store=store1&backup-type=vm&backup-id=100&backup-time=${T0}`
      const missing = yield* refusedUpgrade(
        server.port,
        readerPath.replace(String(T0), String(T0 + 1)),
        "proxmox-backup-reader-protocol-v1",
        TOKEN
      )
      assert.strictEqual(missing.text, "snapshot vm/100/2024-06-05T12:00:01Z does not exist.")
      const reader = yield* Effect.flatMap(
        Raw.upgrade(server.port, readerPath, "proxmox-backup-reader-protocol-v1", TOKEN),
        (s) => "call" in s ? Effect.succeed(s) : Effect.die(new Error(s.text))
      )
      const early = yield* reader.call("GET", `/chunk?digest=${digests[0]}`)
      assert.deepStrictEqual([early.status, early.text], [401, `download chunk ${digests[0]} not allowed`])
      const manifest = yield* reader.call("GET", "/download?file-name=index.json.blob")
      const decoded = yield* Manifest.decodeBlob(manifest.body)
      assert.strictEqual(decoded.files.length, 2)
      const index = yield* reader.call("GET", "/download?file-name=drive-scsi0.img.fidx")
      assert.strictEqual(index.status, 200)
      const chunk = yield* reader.call("GET", `/chunk?digest=${digests[1]}`)
      const plain = yield* DataBlob.decode(chunk.body, { digest: Buffer.from(digests[1]!, "hex"), expectedLength: 1000 })
      assert.isTrue(plain.equals(data.subarray(CS)))
      const notThere = yield* reader.call("GET", "/download?file-name=fw.conf.blob")
      assert.strictEqual(notThere.status, 404)
      yield* reader.close
    }))

  it.scopedLive("drops a connection on command and removes the unfinished snapshot", () =>
    Effect.gen(function*() {
      let uploads = 0
      const { server, store } = yield* startServer({
        onRequest: (r) => r.path === "/fixed_chunk" && ++uploads === 2 ? "drop" : undefined
      })
      const session = yield* openBackup(server.port, T0)
      const data = disk(5)
      const wid = (yield* session.call("POST", `/fixed_index?archive-name=drive-scsi0.img.fidx&size=${data.length}`)).json.data
      const a = yield* uploadChunk(session, wid, data.subarray(0, CS))
      assert.strictEqual(a.reply.status, 200)
      const b = yield* Effect.either(uploadChunk(session, wid, data.subarray(CS)))
      assert.isTrue(Either.isLeft(b) || b.right.reply.status === 0)
      yield* settle(server)
      assert.isFalse(fs.existsSync(path.join(store, "vm", "100", "2024-06-05T12:00:00Z")))
      const stats = yield* server.stats
      assert.strictEqual(stats.removedSnapshots, 1)
      assert.strictEqual(stats.finishedSnapshots, 0)
    }))

  it.scopedLive("dynamic index: contiguous offsets, csum over end‖digest", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const session = yield* openBackup(server.port, T0)
      const wid = (yield* session.call("POST", "/dynamic_index?archive-name=root.pxar.didx")).json.data
      const parts = [Buffer.alloc(3000, 1), Buffer.alloc(5000, 2)]
      const digests: Array<string> = []
      for (const part of parts) {
        const blob = Either.getOrThrow(DataBlob.encodeSync(part))
        const digest = hex(DataBlob.chunkDigest(part))
        digests.push(digest)
        const r = yield* session.call("POST", `/dynamic_chunk?wid=${wid}&digest=${digest}&size=${part.length}&encoded-size=${blob.length}`, blob)
        assert.strictEqual(r.status, 200, r.text)
      }
      const gap = yield* postJson(session, "PUT", "/dynamic_index", { wid, "digest-list": [digests[0]], "offset-list": [10] })
      assert.strictEqual(gap.text, "dynamic writer 'root.pxar.didx' append chunk failed - got strange chunk offset (0 != 10)")
      yield* postJson(session, "PUT", "/dynamic_index", { wid, "digest-list": digests, "offset-list": [0, 3000] })
      const pairs = Buffer.alloc(80)
      pairs.writeBigUInt64LE(3000n, 0)
      Buffer.from(digests[0]!, "hex").copy(pairs, 8)
      pairs.writeBigUInt64LE(8000n, 40)
      Buffer.from(digests[1]!, "hex").copy(pairs, 48)
      const close = yield* session.call("POST", `/dynamic_close?wid=${wid}&chunk-count=2&size=8000&csum=${sha(pairs)}`)
      assert.strictEqual(close.status, 200, close.text)
      const didx = fs.readFileSync(path.join(store, "vm/100/2024-06-05T12:00:00Z/root.pxar.didx"))
      assert.strictEqual(didx.subarray(0, 8).toString("hex"), "1c914ea519bab3cd")
      assert.isTrue(didx.subarray(4096).equals(pairs))
      yield* session.close
    }))

  it.scopedLive("upload-backup-log writes client.log.blob once, for the owner", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      yield* fullBackup(server.port, T0, disk(6))
      yield* settle(server)
      const blob = Either.getOrThrow(DataBlob.encodeSync(Buffer.from("INFO: backup finished\n")))
      const url = `/api2/json/admin/datastore/store1/upload-backup-log?backup-type=vm&backup-id=100&backup-time=${T0}`
      const notOwner = yield* Raw.apiRequest(server.port, "POST", url, OTHER_TOKEN, blob)
      assert.strictEqual(notOwner.status, 400)
      const ok = yield* Raw.apiRequest(server.port, "POST", url, TOKEN, blob)
      assert.strictEqual(ok.status, 200, ok.text)
      assert.isTrue(fs.readFileSync(path.join(store, "vm/100/2024-06-05T12:00:00Z/client.log.blob")).equals(blob))
      const twice = yield* Raw.apiRequest(server.port, "POST", url, TOKEN, blob)
      assert.strictEqual(twice.text, "backup already contains a log.")
      const listed = yield* Raw.apiRequest(server.port, "GET", "/api2/json/admin/datastore/store1/snapshots", TOKEN)
      assert.strictEqual(listed.json.data.length, 1)
      assert.strictEqual(listed.json.data[0]["backup-time"], T0)
    }))

  it.scopedLive("dropConnections ends every open session and discards unfinished snapshots", () =>
    Effect.gen(function*() {
      const { server, store } = yield* startServer()
      const session = yield* openBackup(server.port, T0)
      assert.strictEqual(yield* server.activeSessions, 1)
      assert.strictEqual(yield* server.dropConnections, 1)
      yield* session.closed
      yield* settle(server)
      assert.strictEqual(yield* server.activeSessions, 0)
      assert.isFalse(fs.existsSync(path.join(store, "vm", "100", "2024-06-05T12:00:00Z")))
    }))
})
