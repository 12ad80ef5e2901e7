/**
 * One backup connection of the test server (`proxmox-backup-protocol-v1`, spec §6.5): writers,
 * the known-chunk set, the checks and error texts of PBS, the manifest rewrite on `finish`, and
 * removal of the snapshot when the connection ends without a successful `finish`.
 */
import * as fs from "node:fs"
import * as path from "node:path"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as DataBlob from "../../DataBlob.js"
import * as FixedIndex from "../../FixedIndex.js"
import * as Manifest from "../../Manifest.js"
import type { SnapshotId } from "../../Snapshot.js"
import * as Blob from "../blob.js"
import { type ApiError, attempt, bail, parameterError } from "./apiError.js"
import type { Identity } from "./auth.js"
import * as Datastore from "./datastore.js"
import * as DynamicIndex from "./dynamicIndex.js"
import * as H2 from "./h2.js"
import * as Params from "./params.js"
import type { ServerState } from "./state.js"

export interface BackupEnv {
  readonly store: Datastore.Datastore
  readonly identity: Identity
  readonly snapshot: SnapshotId
  readonly dir: string
  readonly groupLock: string
  readonly lastBackup: Datastore.SnapshotInfo | undefined
  readonly benchmark: boolean
}

interface UploadStat {
  count: number
  size: number
  compressed_size: number
  duplicates: number
}

const emptyStat = (): UploadStat => ({ count: 0, size: 0, compressed_size: 0, duplicates: 0 })

interface FixedWriter {
  readonly name: string
  readonly size: number
  readonly chunkSize: number
  readonly digests: Buffer
  readonly incremental: boolean
  readonly tmpPath: string
  readonly finalPath: string
  readonly ctime: number
  chunkCount: number
  smallChunkCount: number
  closed: boolean
  readonly stat: UploadStat
}

interface DynamicWriter {
  readonly name: string
  readonly tmpPath: string
  readonly finalPath: string
  readonly entries: Array<DynamicIndex.DynamicEntry>
  offset: number
  chunkCount: number
  closed: boolean
  readonly stat: UploadStat
}

const MAX_CHUNK = 16 * 1024 * 1024
const SUBDIRS = [
  "blob",
  "dynamic_chunk",
  "dynamic_close",
  "dynamic_index",
  "finish",
  "fixed_chunk",
  "fixed_close",
  "fixed_index",
  "previous",
  "previous_backup_time",
  "speedtest"
]

const parseCsum = (name: string, value: string): Effect.Effect<Buffer, ApiError> =>
  /^[0-9a-fA-F]{64}$/.test(value) ? Effect.succeed(Buffer.from(value, "hex")) : bail(
    value.length !== 64 ? "Invalid string length" : `Invalid character in '${name}'`
  )

const tmpName = (finalPath: string, ext: "fidx" | "didx") => finalPath.replace(new RegExp(`\\.${ext}$`), `.tmp_${ext}`)

export interface BackupSession {
  readonly route: (request: H2.H2Request) => Effect.Effect<H2.Reply, ApiError>
  /** The connection ended: keep the snapshot only if `finish` succeeded. */
  readonly close: () => void
  readonly finished: () => boolean
}

export const make = (env: BackupEnv, server: ServerState): BackupSession => {
  let state: "active" | "finishing" | "finished" = "active"
  let uid = 0
  let fileCounter = 0
  let backupSize = 0
  const backupStat = emptyStat()
  const fixedWriters = new Map<number, FixedWriter>()
  const dynamicWriters = new Map<number, DynamicWriter>()
  const knownChunks = new Map<string, number>()
  let closed = false

  const ensureUnfinished = (): Effect.Effect<void, ApiError> =>
    state === "active"
      ? Effect.void
      : bail(
        state === "finishing" ? "backup is already in the process of finishing." : "backup already marked as finished."
      )

  const nextUid = () => ++uid

  const snapshotFile = (name: string) => path.join(env.dir, name)

  // ---- fixed index -------------------------------------------------------------------------

  const createFixedIndex = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const params = yield* H2.params(request)
      const name = yield* Params.archiveName(params, "archive-name")
      const size = yield* Params.integer(params, "size", { min: 1 })
      const reuseCsum = yield* Params.optionalString(params, "reuse-csum")
      if (!name.endsWith(".fidx")) return yield* bail(`wrong archive extension: '${name}'`)
      const chunkSize = FixedIndex.CHUNK_SIZE
      const count = FixedIndex.chunkCount(size, chunkSize)
      const digests = Buffer.alloc(count * 32)
      let incremental = false
      if (reuseCsum !== undefined) {
        incremental = true
        if (env.lastBackup === undefined) return yield* bail("cannot reuse index - no valid previous backup exists")
        const bytes = yield* Effect.orElse(
          attempt("open", () => fs.readFileSync(path.join(env.lastBackup!.dir, name))),
          () => bail("cannot reuse index - no previous backup exists for archive")
        )
        const decoded = FixedIndex.decodeSync(bytes)
        if (Either.isLeft(decoded)) return yield* bail("cannot reuse index - no previous backup exists for archive")
        const oldCsum = Buffer.from(FixedIndex.csum(decoded.right)).toString("hex")
        if (oldCsum !== reuseCsum) {
          return yield* bail(
            `expected csum (${reuseCsum}) doesn't match last backup's (${oldCsum}), cannot do incremental backup`
          )
        }
        if (decoded.right.digests.length !== digests.length) {
          return yield* bail("clone_data_from failed - index sizes not equal")
        }
        digests.set(decoded.right.digests)
      }
      yield* ensureUnfinished()
      const finalPath = snapshotFile(name)
      const tmpPath = tmpName(finalPath, "fidx")
      const ctime = server.now()
      yield* attempt(`unable to create fixed index ${JSON.stringify(tmpPath)}`, () => {
        const initial = Either.getOrThrow(FixedIndex.encode({ size, digests, ctime }))
        initial.fill(0, 32, 64)
        fs.writeFileSync(tmpPath, initial)
      })
      const wid = nextUid()
      fixedWriters.set(wid, {
        name,
        size,
        chunkSize,
        digests,
        incremental,
        tmpPath,
        finalPath,
        ctime,
        chunkCount: 0,
        smallChunkCount: 0,
        closed: false,
        stat: emptyStat()
      })
      return H2.json(wid)
    })

  const lookupFixed = (wid: number) =>
    Effect.suspend(() => {
      const writer = fixedWriters.get(wid)
      return writer === undefined ? bail(`fixed writer '${wid}' not registered`) : Effect.succeed(writer)
    })

  const checkChunkAlignment = (writer: FixedWriter, end: number, length: number): Effect.Effect<number, ApiError> => {
    if (end < length) return bail(`got chunk with small offset (${end} < ${length}`)
    const pos = end - length
    if (end > writer.size) return bail(`chunk data exceeds size (${end} >= ${writer.size})`)
    if ((end !== writer.size && length !== writer.chunkSize) || length > writer.chunkSize || length === 0) {
      return bail(`chunk with unexpected length (${length} != ${writer.chunkSize}`)
    }
    if (pos % writer.chunkSize !== 0) return bail(`got unaligned chunk (pos = ${pos})`)
    return Effect.succeed(pos / writer.chunkSize)
  }

  const appendLists = (params: Params.Params) =>
    Effect.gen(function*() {
      const wid = yield* Params.integer(params, "wid", { min: 1, max: 256 })
      const digestList = yield* Params.array(params, "digest-list")
      const offsetList = yield* Params.array(params, "offset-list")
      for (const digest of digestList) {
        if (typeof digest !== "string" || !Params.DIGEST.test(digest)) {
          return yield* Effect.fail(parameterError("digest-list", "value does not match the regex pattern"))
        }
      }
      const offsets: Array<number> = []
      for (const offset of offsetList) {
        const n = typeof offset === "number"
          ? offset
          : typeof offset === "string" && /^\d+$/.test(offset)
          ? Number(offset)
          : NaN
        if (!Number.isSafeInteger(n) || n < 0) {
          return yield* Effect.fail(parameterError("offset-list", "Expected integer value."))
        }
        offsets.push(n)
      }
      if (offsets.length !== digestList.length) {
        return yield* bail(`offset list has wrong length (${offsets.length} != ${digestList.length})`)
      }
      return { wid, digests: digestList as ReadonlyArray<string>, offsets }
    })

  const fixedAppend = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const { digests, offsets, wid } = yield* appendLists(yield* H2.params(request))
      for (let i = 0; i < digests.length; i++) {
        const digest = digests[i]!
        const length = knownChunks.get(digest)
        if (length === undefined) return yield* bail(`no such chunk ${digest}`)
        yield* ensureUnfinished()
        const writer = yield* lookupFixed(wid)
        if (writer.closed) return yield* bail(`fixed writer '${writer.name}' append chunk failed - already closed`)
        const slot = yield* checkChunkAlignment(writer, offsets[i]! + length, length)
        writer.chunkCount += 1
        if (slot * 32 >= writer.digests.length) return yield* bail("add digest failed - index out of range")
        writer.digests.set(Buffer.from(digest, "hex"), slot * 32)
      }
      return H2.json(null)
    })

  const receiveChunk = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const params = Params.fromSearch(request.query)
      const wid = yield* Params.integer(params, "wid", { min: 1, max: 256 })
      const digest = yield* Params.string(params, "digest", Params.DIGEST)
      const size = yield* Params.integer(params, "size", { min: 1, max: MAX_CHUNK })
      const encodedSize = yield* Params.integer(params, "encoded-size", {
        min: DataBlob.PLAIN_HEADER_SIZE + 1,
        max: MAX_CHUNK + DataBlob.ENCRYPTED_HEADER_SIZE
      })
      // the body lands in a reused buffer: checked, stored, then given back
      const body = yield* request.lentBody(encodedSize, "uploaded chunk is larger than announced.")
      const inserted = yield* Effect.ensuring(
        Effect.suspend(() => {
          const blob = body.data
          if (blob.length !== encodedSize) return bail("uploaded chunk has unexpected size.")
          const kind = Blob.kindOf(blob)
          if (Either.isLeft(kind)) return bail(kind.left.detail)
          if (!Blob.isEncryptedKind(kind.right)) {
            // decoded once, checked against the digest and the size (a view of the body when uncompressed)
            const verified = Blob.decodeView(blob, {
              skipCrc: true,
              digest: Buffer.from(digest, "hex"),
              maxSize: MAX_CHUNK
            })
            if (Either.isLeft(verified)) return bail(verified.left.detail)
            const length = verified.right.data.length
            if (length !== size) return bail(`detected chunk with wrong length (${size} != ${length})`)
          }
          DataBlob.fixCrc(blob, kind.right)
          return Datastore.insertChunk(env.store, digest, blob, kind.right)
        }),
        Effect.sync(body.release)
      )
      return { wid, digest, size, inserted }
    })

  const recordUpload = (stat: UploadStat, size: number, inserted: { duplicate: boolean; compressedSize: number }) => {
    stat.count += 1
    stat.size += size
    stat.compressed_size += inserted.compressedSize
    if (inserted.duplicate) stat.duplicates += 1
    server.stats.chunkUploads += 1
    server.stats.chunkUploadBytes += inserted.compressedSize
    if (inserted.duplicate) server.stats.duplicateChunks += 1
  }

  const uploadFixedChunk = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const { digest, inserted, size, wid } = yield* receiveChunk(request)
      yield* ensureUnfinished()
      const writer = yield* lookupFixed(wid)
      if (writer.closed) return yield* bail(`fixed writer '${writer.name}' register chunk failed - already closed`)
      if (size > writer.chunkSize) {
        return yield* bail(`fixed writer '${writer.name}' - got large chunk (${size} > ${writer.chunkSize}`)
      }
      if (size < writer.chunkSize) {
        writer.smallChunkCount += 1
        if (writer.smallChunkCount > 1) {
          return yield* bail(`fixed writer '${wid}' - detected multiple end chunks (chunk size too small)`)
        }
      }
      recordUpload(writer.stat, size, inserted)
      knownChunks.set(digest, size)
      return H2.json(digest)
    })

  const closeFixedIndex = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const params = yield* H2.params(request)
      const wid = yield* Params.integer(params, "wid", { min: 1, max: 256 })
      const chunkCount = yield* Params.integer(params, "chunk-count", { min: 0 })
      const size = yield* Params.integer(params, "size", { min: 0 })
      const csum = yield* parseCsum("csum", yield* Params.string(params, "csum"))
      yield* ensureUnfinished()
      const writer = yield* lookupFixed(wid)
      if (writer.closed) return yield* bail(`fixed writer '${writer.name}' close failed - already closed`)
      if (writer.chunkCount !== chunkCount) {
        return yield* bail(
          `fixed writer '${writer.name}' close failed - received wrong number of chunk (${writer.chunkCount} != ${
            chunkCount
          })`
        )
      }
      if (!writer.incremental) {
        const expected = FixedIndex.chunkCount(writer.size, writer.chunkSize)
        if (chunkCount !== expected) {
          return yield* bail(
            `fixed writer '${writer.name}' close failed - unexpected chunk count (${expected} != ${chunkCount})`
          )
        }
        if (size !== writer.size) {
          return yield* bail(
            `fixed writer '${writer.name}' close failed - unexpected file size (${writer.size} != ${size})`
          )
        }
      }
      const bytes = Either.getOrThrow(
        FixedIndex.encode({ size: writer.size, digests: writer.digests, ctime: writer.ctime })
      )
      yield* attempt(`Atomic rename file ${JSON.stringify(writer.finalPath)} failed`, () => {
        fs.writeFileSync(writer.tmpPath, bytes)
        fs.renameSync(writer.tmpPath, writer.finalPath)
      })
      writer.closed = true
      if (!Buffer.from(FixedIndex.computeCsum(writer.digests)).equals(csum)) {
        return yield* bail(`fixed writer '${writer.name}' close failed - got unexpected checksum`)
      }
      fileCounter += 1
      backupSize += size
      addStat(writer.stat)
      fixedWriters.delete(wid)
      return H2.json(null)
    })

  const addStat = (stat: UploadStat) => {
    backupStat.count += stat.count
    backupStat.size += stat.size
    backupStat.compressed_size += stat.compressed_size
    backupStat.duplicates += stat.duplicates
  }

  // ---- dynamic index -----------------------------------------------------------------------

  const createDynamicIndex = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const params = yield* H2.params(request)
      const name = yield* Params.archiveName(params, "archive-name")
      if (!name.endsWith(".didx")) return yield* bail(`wrong archive extension: '${name}'`)
      yield* ensureUnfinished()
      const finalPath = snapshotFile(name)
      const tmpPath = tmpName(finalPath, "didx")
      yield* attempt(`unable to create dynamic index ${JSON.stringify(tmpPath)}`, () =>
        fs.writeFileSync(tmpPath, DynamicIndex.encode([], server.now())))
      const wid = nextUid()
      dynamicWriters.set(wid, {
        name,
        tmpPath,
        finalPath,
        entries: [],
        offset: 0,
        chunkCount: 0,
        closed: false,
        stat: emptyStat()
      })
      return H2.json(wid)
    })

  const lookupDynamic = (wid: number) =>
    Effect.suspend(() => {
      const writer = dynamicWriters.get(wid)
      return writer === undefined ? bail(`dynamic writer '${wid}' not registered`) : Effect.succeed(writer)
    })

  const dynamicAppend = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const { digests, offsets, wid } = yield* appendLists(yield* H2.params(request))
      for (let i = 0; i < digests.length; i++) {
        const digest = digests[i]!
        const length = knownChunks.get(digest)
        if (length === undefined) return yield* bail(`no such chunk ${digest}`)
        yield* ensureUnfinished()
        const writer = yield* lookupDynamic(wid)
        if (writer.closed) return yield* bail(`dynamic writer '${writer.name}' append chunk failed - already closed`)
        if (writer.offset !== offsets[i]) {
          return yield* bail(
            `dynamic writer '${writer.name}' append chunk failed - got strange chunk offset (${writer.offset} != ${
              offsets[i]
            })`
          )
        }
        writer.offset += length
        writer.chunkCount += 1
        writer.entries.push({ end: writer.offset, digest: Buffer.from(digest, "hex") })
      }
      return H2.json(null)
    })

  const uploadDynamicChunk = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const { digest, inserted, size, wid } = yield* receiveChunk(request)
      yield* ensureUnfinished()
      const writer = yield* lookupDynamic(wid)
      if (writer.closed) return yield* bail(`dynamic writer '${writer.name}' register chunk failed - already closed`)
      recordUpload(writer.stat, size, inserted)
      knownChunks.set(digest, size)
      return H2.json(digest)
    })

  const closeDynamicIndex = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const params = yield* H2.params(request)
      const wid = yield* Params.integer(params, "wid", { min: 1, max: 256 })
      const chunkCount = yield* Params.integer(params, "chunk-count", { min: 1 })
      const size = yield* Params.integer(params, "size", { min: 1 })
      const csum = yield* parseCsum("csum", yield* Params.string(params, "csum"))
      yield* ensureUnfinished()
      const writer = yield* lookupDynamic(wid)
      if (writer.closed) return yield* bail(`dynamic writer '${writer.name}' close failed - already closed`)
      if (writer.chunkCount !== chunkCount) {
        return yield* bail(
          `dynamic writer '${writer.name}' close failed - unexpected chunk count (${writer.chunkCount} != ${
            chunkCount
          })`
        )
      }
      if (writer.offset !== size) {
        return yield* bail(
          `dynamic writer '${writer.name}' close failed - unexpected file size (${writer.offset} != ${size})`
        )
      }
      yield* attempt(`Atomic rename file ${JSON.stringify(writer.finalPath)} failed`, () => {
        fs.writeFileSync(writer.tmpPath, DynamicIndex.encode(writer.entries, server.now()))
        fs.renameSync(writer.tmpPath, writer.finalPath)
      })
      writer.closed = true
      if (!DynamicIndex.computeCsum(writer.entries).equals(csum)) {
        return yield* bail(`dynamic writer '${writer.name}' close failed - got unexpected checksum`)
      }
      fileCounter += 1
      backupSize += size
      addStat(writer.stat)
      dynamicWriters.delete(wid)
      return H2.json(null)
    })

  // ---- blobs, previous, finish -------------------------------------------------------------

  const uploadBlob = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const params = Params.fromSearch(request.query)
      const name = yield* Params.archiveName(params, "file-name")
      const encodedSize = yield* Params.integer(params, "encoded-size", {
        min: DataBlob.PLAIN_HEADER_SIZE,
        max: MAX_CHUNK + DataBlob.ENCRYPTED_HEADER_SIZE
      })
      if (!name.endsWith(".blob")) return yield* bail(`wrong blob file extension: '${name}'`)
      const data = yield* request.body(MAX_CHUNK + DataBlob.ENCRYPTED_HEADER_SIZE + 1, "blob too large")
      if (data.length !== encodedSize) {
        return yield* bail(`got blob with unexpected length (${encodedSize} != ${data.length})`)
      }
      const verified = DataBlob.verify(data)
      if (Either.isLeft(verified)) return yield* bail(verified.left.detail)
      const file = snapshotFile(name)
      yield* attempt(`unable to replace file ${JSON.stringify(file)}`, () => Datastore.writeAtomic(file, data))
      fileCounter += 1
      backupSize += data.length
      backupStat.size += data.length
      server.stats.blobUploads += 1
      return H2.json(null)
    })

  const downloadPrevious = (request: H2.H2Request) =>
    Effect.gen(function*() {
      const params = Params.fromSearch(request.query)
      const name = yield* Params.archiveName(params, "archive-name")
      const last = env.lastBackup
      if (last === undefined) return yield* bail("no valid previous backup")
      const file = path.join(last.dir, name)
      if (name.endsWith(".fidx") || name.endsWith(".didx")) {
        const chunks = yield* Datastore.readIndexChunks(file, name)
        for (const chunk of chunks) {
          yield* ensureUnfinished()
          knownChunks.set(chunk.digest, chunk.length)
        }
      }
      return H2.bytes(yield* Datastore.readForDownload(file))
    })

  const finish = (request: H2.H2Request) =>
    Effect.gen(function*() {
      yield* H2.params(request)
      yield* ensureUnfinished()
      if (fixedWriters.size > 0 || dynamicWriters.size > 0) {
        return yield* bail("found open index writer - unable to finish backup")
      }
      if (fileCounter === 0) return yield* bail("backup does not contain valid files (file count == 0)")
      if (env.lastBackup !== undefined && !fs.existsSync(env.lastBackup.dir)) {
        return yield* bail(
          `base snapshot ${
            path.basename(env.lastBackup.dir)
          } was removed during backup, cannot finish as chunks might be missing`
        )
      }
      state = "finishing"
      const manifest = yield* Datastore.loadManifest(env.dir).pipe(
        Effect.catchAll((error) => bail(`unable to update manifest blob - ${error.text}`))
      )
      const updated: Manifest.Manifest = {
        ...manifest,
        unprotected: { ...manifest.unprotected, chunk_upload_stats: { ...backupStat } }
      }
      const blob = yield* Manifest.encodeBlob(updated).pipe(
        Effect.catchAll((error) => bail(`unable to update manifest blob - ${error.detail}`))
      )
      yield* attempt("unable to update manifest blob", () =>
        Datastore.writeAtomic(path.join(env.dir, Manifest.MANIFEST_BLOB_NAME), blob))
      state = "finished"
      return H2.json(null)
    })

  const speedtest = (request: H2.H2Request) =>
    Effect.as(request.body(Number.MAX_SAFE_INTEGER, "too large"), H2.json(null))

  const routes: Record<string, H2.Routes> = {
    "/": { GET: () => Effect.succeed(H2.json(SUBDIRS.map((subdir) => ({ subdir })))) },
    "/blob": { POST: uploadBlob },
    "/dynamic_chunk": { POST: uploadDynamicChunk },
    "/dynamic_close": { POST: closeDynamicIndex },
    "/dynamic_index": { POST: createDynamicIndex, PUT: dynamicAppend },
    "/finish": { POST: finish },
    "/fixed_chunk": { POST: uploadFixedChunk },
    "/fixed_close": { POST: closeFixedIndex },
    "/fixed_index": { POST: createFixedIndex, PUT: fixedAppend },
    "/previous": { GET: downloadPrevious },
    "/previous_backup_time": { GET: () => Effect.succeed(H2.json(env.lastBackup?.time ?? null)) },
    "/speedtest": { POST: speedtest }
  }

  return {
    route: (request) => H2.dispatch(routes, request),
    finished: () => state === "finished",
    close: () => {
      if (closed) return
      closed = true
      if (state !== "finished" || env.benchmark) {
        Datastore.removeSnapshot(env.dir)
        server.stats.removedSnapshots += 1
      } else {
        server.stats.finishedSnapshots += 1
      }
      server.groupLocks.delete(env.groupLock)
      server.snapshotLocks.delete(env.dir)
      if (env.lastBackup !== undefined) {
        const readers = (server.snapshotLocks.get(env.lastBackup.dir) ?? 1) - 1
        if (readers > 0) server.snapshotLocks.set(env.lastBackup.dir, readers)
        else server.snapshotLocks.delete(env.lastBackup.dir)
      }
    }
  }
}
