/**
 * The test server's datastore on disk, in PBS's layout (spec §5.1): `.chunks/<4 hex>/<digest>`,
 * `[ns/<a>/[ns/<b>/…]]<type>/<id>/owner`, `<type>/<id>/<RFC 3339 time>/<archives>`. Chunk prefix
 * directories are created when first needed (PBS creates all 65536 up front). Files are written
 * to a temporary name and renamed.
 */
import * as fs from "node:fs"
import * as path from "node:path"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as DataBlob from "../../DataBlob.js"
import * as FixedIndex from "../../FixedIndex.js"
import * as Manifest from "../../Manifest.js"
import * as Snapshot from "../../Snapshot.js"
import { type ApiError, attempt, bail, describe } from "./apiError.js"
import * as DynamicIndex from "./dynamicIndex.js"

export interface Datastore {
  readonly name: string
  readonly path: string
}

/** Creates the datastore directory, `.chunks` (0750) and `.lock` (0644). */
export const init = (store: Datastore): Effect.Effect<void, ApiError> =>
  attempt(`unable to create datastore '${store.name}'`, () => {
    fs.mkdirSync(path.join(store.path, ".chunks"), { recursive: true, mode: 0o750 })
    const lock = path.join(store.path, ".lock")
    if (!fs.existsSync(lock)) fs.writeFileSync(lock, "", { mode: 0o644 })
  })

/** Writes a file atomically (temporary name, then rename). */
export const writeAtomic = (file: string, data: Uint8Array): void => {
  const tmp = `${file}.tmp_${process.pid}_${Math.random().toString(36).slice(2)}`
  fs.writeFileSync(tmp, data)
  fs.renameSync(tmp, file)
}

export const chunkPath = (store: Datastore, digestHex: string): string =>
  path.join(store.path, ".chunks", digestHex.slice(0, 4), digestHex)

/**
 * Inserts a chunk (spec §5.2): same encoded size → duplicate (atime bumped); otherwise an
 * encrypted upload never replaces a plain chunk, an uncompressed encrypted chunk is never
 * replaced, and else the smaller encoding wins.
 */
export const insertChunk = (
  store: Datastore,
  digestHex: string,
  blob: Buffer,
  kind: DataBlob.BlobKind
): Effect.Effect<{ readonly duplicate: boolean; readonly compressedSize: number }, ApiError> =>
  attempt(`inserting chunk ${digestHex} failed`, () => {
    const file = chunkPath(store, digestHex)
    const existing = fs.statSync(file, { throwIfNoEntry: false })
    if (existing !== undefined) {
      const now = new Date()
      if (existing.size === blob.length) {
        fs.utimesSync(file, now, existing.mtime)
        return { duplicate: true, compressedSize: blob.length }
      }
      const head = Buffer.alloc(8)
      const fd = fs.openSync(file, "r")
      try {
        fs.readSync(fd, head, 0, 8, 0)
      } finally {
        fs.closeSync(fd)
      }
      const oldKind = Either.getOrUndefined(DataBlob.kindOf(Buffer.concat([head, Buffer.alloc(44)])))
      const newEncrypted = DataBlob.isEncryptedKind(kind)
      const keepOld = (newEncrypted && oldKind !== undefined && !DataBlob.isEncryptedKind(oldKind)) ||
        oldKind === "encrypted" || blob.length >= existing.size
      if (keepOld) {
        fs.utimesSync(file, now, existing.mtime)
        return { duplicate: true, compressedSize: blob.length }
      }
    }
    try {
      writeAtomic(file, blob)
    } catch (error) {
      // the prefix directory is made when its first chunk arrives (not checked before every chunk)
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error
      fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o750 })
      writeAtomic(file, blob)
    }
    return { duplicate: false, compressedSize: blob.length }
  })

export const namespaceDir = (store: Datastore, ns: ReadonlyArray<string>): string =>
  path.join(store.path, ...ns.flatMap((part) => ["ns", part]))

export const groupDir = (store: Datastore, ns: ReadonlyArray<string>, type: string, id: string): string =>
  path.join(namespaceDir(store, ns), type, id)

export const snapshotDir = (store: Datastore, id: Snapshot.SnapshotId): string =>
  path.join(store.path, Snapshot.snapshotPath(id))

/** The relative `type/id/time` form PBS prints. */
export const snapshotName = (id: Snapshot.SnapshotId): string =>
  `${id.backupType}/${id.backupId}/${Snapshot.formatBackupTime(id.backupTime)}`

export const readOwner = (group: string): string | undefined => {
  try {
    return fs.readFileSync(path.join(group, "owner"), "utf8").trim()
  } catch {
    return undefined
  }
}

export interface SnapshotInfo {
  readonly time: number
  readonly dir: string
  readonly finished: boolean
}

/** The snapshots of a group, oldest first (directories that are not a time are ignored). */
export const listSnapshots = (group: string): ReadonlyArray<SnapshotInfo> => {
  let names: Array<string>
  try {
    names = fs.readdirSync(group)
  } catch {
    return []
  }
  const out: Array<SnapshotInfo> = []
  for (const name of names) {
    const time = Snapshot.parseBackupTime(name)
    if (time === undefined) continue
    const dir = path.join(group, name)
    if (!fs.statSync(dir).isDirectory()) continue
    out.push({ time, dir, finished: fs.existsSync(path.join(dir, Manifest.MANIFEST_BLOB_NAME)) })
  }
  return out.sort((a, b) => a.time - b.time)
}

/** Reads and parses a snapshot's manifest. */
export const loadManifest = (dir: string): Effect.Effect<Manifest.Manifest, ApiError> =>
  Effect.gen(function*() {
    const file = path.join(dir, Manifest.MANIFEST_BLOB_NAME)
    const bytes = yield* attempt(`unable to load blob '${file}'`, () => fs.readFileSync(file))
    const data = yield* DataBlob.decode(bytes, { maxSize: 16 * 1024 * 1024 }).pipe(
      Effect.catchAll((error) => bail(error.detail))
    )
    return yield* Effect.catchAll(Manifest.parseJson(data), (error) => bail(error.detail))
  })

/**
 * The base of an incremental backup: the newest finished snapshot whose manifest does not say
 * `verify_state.state == "failed"`.
 */
export const lastBackup = (group: string): Effect.Effect<SnapshotInfo | undefined, ApiError> =>
  Effect.gen(function*() {
    const finished = listSnapshots(group).filter((s) => s.finished)
    const last = finished[finished.length - 1]
    if (last === undefined) return undefined
    const manifest = yield* loadManifest(last.dir)
    const verify = manifest.unprotected["verify_state"]
    const failed = typeof verify === "object" && verify !== null && (verify as { state?: unknown }).state === "failed"
    return failed ? undefined : last
  })

/** A parsed index file: the chunk lengths to register, by digest. */
export const readIndexChunks = (
  file: string,
  archive: string
): Effect.Effect<ReadonlyArray<{ readonly digest: string; readonly length: number }>, ApiError> =>
  Effect.gen(function*() {
    const fixed = archive.endsWith(".fidx")
    const what = fixed ? "fixed" : "dynamic"
    const bytes = yield* attempt(`unable to open ${what} index ${JSON.stringify(file)}`, () => fs.readFileSync(file))
    if (fixed) {
      const decoded = FixedIndex.decodeSync(bytes)
      if (Either.isLeft(decoded)) {
        return yield* bail(`unable to open fixed index ${JSON.stringify(file)} - ${decoded.left.detail}`)
      }
      const index = decoded.right
      const count = FixedIndex.chunkCount(index.size, index.chunkSize)
      return Array.from({ length: count }, (_, i) => ({
        digest: Buffer.from(FixedIndex.digestAt(index, i)).toString("hex"),
        length: FixedIndex.chunkLength(index.size, i, index.chunkSize)
      }))
    }
    const decoded = DynamicIndex.decode(bytes)
    if (Either.isLeft(decoded)) {
      return yield* bail(`unable to open dynamic index ${JSON.stringify(file)} - ${decoded.left}`)
    }
    let start = 0
    return decoded.right.map((entry) => {
      const length = entry.end - start
      start = entry.end
      return { digest: Buffer.from(entry.digest).toString("hex"), length }
    })
  })

/** Reads a snapshot file for a download response: 404 when it does not exist. */
export const readForDownload = (file: string): Effect.Effect<Buffer, ApiError> =>
  Effect.try({
    try: () => fs.readFileSync(file),
    catch: (cause) =>
      (cause as NodeJS.ErrnoException).code === "ENOENT"
        ? ({ status: 404, text: `open file ${JSON.stringify(file)} failed - not found` })
        : ({ status: 400, text: `open file ${JSON.stringify(file)} failed: ${describe(cause)}` })
  }).pipe(Effect.catchAll((e) => bail(e.text, e.status)))

/** Removes a snapshot directory and everything in it. */
export const removeSnapshot = (dir: string): void => {
  fs.rmSync(dir, { recursive: true, force: true })
}
