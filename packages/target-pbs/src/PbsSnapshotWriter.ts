/**
 * The VM-snapshot writer a backup engine drives (spec §6.6): open a snapshot (`vm/<id>/<time>`,
 * optionally in a namespace) on one backup connection, add config blobs, write each drive as
 * `drive-<dev>.img.fidx` from 4 MiB chunks in order — data, "zero", or "reuse chunk *i* of the
 * previous snapshot" for dirty-bitmap incrementals — then `finish`. Chunks the server already knows
 * on the connection (uploaded earlier, the zero chunk, digests of the previous index) are not sent
 * again; uploads run with bounded concurrency and `write` waits when the window is full. With a
 * key, chunks and blobs are encrypted, digests keyed, the manifest signed, and an optional RSA
 * master-key blob added. Closing the scope without `finish` makes the server drop the snapshot.
 *
 * @since 0.1.0
 */
import * as fs from "node:fs"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import * as Exit from "effect/Exit"
import * as FiberSet from "effect/FiberSet"
import type * as Scope from "effect/Scope"
import type { CryptConfig } from "./CryptConfig.js"
import * as DataBlob from "./DataBlob.js"
import * as FixedIndex from "./FixedIndex.js"
import * as Blob from "./internal/blob.js"
import * as Bytes from "./internal/bytes.js"
import * as Zstd from "./internal/zstd.js"
import * as KeyConfig from "./KeyConfig.js"
import * as Manifest from "./Manifest.js"
import type { BackupProtocol, PbsClientService } from "./PbsClient.js"
import { PbsClientError, type PbsError } from "./PbsError.js"
import * as Snapshot from "./Snapshot.js"

/**
 * One 4 MiB slot of a drive, in order.
 *
 * @since 0.1.0
 * @category models
 */
export type ChunkInput =
  | { readonly _tag: "Data"; readonly data: Uint8Array }
  | { readonly _tag: "Zero" }
  | { readonly _tag: "Reuse"; readonly index: number }

/**
 * The slot's bytes (its length must be the slot's length; an all-zero full chunk becomes the zero chunk).
 * The writer reads them until the writes of the following `DriveWriter.retention` bytes have returned
 * (it sends them without copying): leave them unchanged until then.
 *
 * @since 0.1.0
 * @category constructors
 */
export const data = (bytes: Uint8Array): ChunkInput => ({ _tag: "Data", data: bytes })

/**
 * The slot is all zeros.
 *
 * @since 0.1.0
 * @category constructors
 */
export const zero: ChunkInput = { _tag: "Zero" }

/**
 * The slot is unchanged since the previous snapshot's chunk `index` (normally the same slot).
 *
 * @since 0.1.0
 * @category constructors
 */
export const reuse = (index: number): ChunkInput => ({ _tag: "Reuse", index })

/**
 * @since 0.1.0
 * @category models
 */
export interface SnapshotWriterOptions {
  /** Default `vm`. */
  readonly backupType?: Snapshot.BackupType
  /** The VMID for VMs. */
  readonly backupId: string
  /** Epoch seconds; must be newer than the group's last snapshot. */
  readonly backupTime: number
  readonly ns?: string | undefined
  /** Encrypt (or only sign, with `cryptMode: "sign-only"`) with this key. */
  readonly crypt?: CryptConfig | undefined
  /** Default `encrypt` when `crypt` is set. */
  readonly cryptMode?: "encrypt" | "sign-only"
  /** RSA public key (PEM): adds `rsa-encrypted.key.blob` (encrypt mode only). */
  readonly masterPublicKeyPem?: string | undefined
  /** Creation time of the key, recorded in the master-key blob (default now). */
  readonly keyCreated?: number
  /** zstd level 1 where it helps. Default true. */
  readonly compress?: boolean
  /** Chunk uploads in flight per drive (and slots a `data` buffer stays in use: `retention`). Default 8. */
  readonly uploadConcurrency?: number
  /** Deduplicate against the previous snapshot of the group. Default true. */
  readonly usePrevious?: boolean
  /** Digests per `PUT fixed_index`. Default 128. */
  readonly appendBatchSize?: number
}

/**
 * A drive's counters so far.
 *
 * @since 0.1.0
 * @category models
 */
export interface DriveStats {
  /** Chunks sent over the network. */
  readonly uploadedChunks: number
  /** Encoded bytes sent. */
  readonly uploadedBytes: number
  /** Slots that referenced a chunk the server already knew (no upload). */
  readonly knownChunks: number
  /** Full-size zero slots. */
  readonly zeroChunks: number
  /** Slots given as `reuse`. */
  readonly reusedChunks: number
  /**
   * Image bytes whose chunk was not sent (slots reused from the previous index, or whose chunk the
   * server already knew, the zero chunk included): Proxmox's `reused` counter.
   */
  readonly reusedBytes: number
}

/**
 * @since 0.1.0
 * @category models
 */
export interface DriveResult extends DriveStats {
  readonly archive: string
  readonly size: number
  /** Hex SHA-256 of the digest array. */
  readonly csum: string
  readonly chunks: number
  /** Whether the index was created with `reuse-csum` from the previous snapshot. */
  readonly incremental: boolean
}

/**
 * @since 0.1.0
 * @category models
 */
export interface SnapshotResult {
  readonly snapshot: Snapshot.SnapshotId
  /** `vm/100/2024-06-05T12:00:00Z` (with `ns/…/` in a namespace). */
  readonly path: string
  readonly manifest: Manifest.Manifest
  readonly drives: ReadonlyArray<DriveResult>
}

/**
 * @since 0.1.0
 * @category models
 */
export interface DriveWriter {
  readonly archive: string
  readonly size: number
  readonly chunkCount: number
  /** Whether `reuse` inputs are possible (the previous snapshot has this drive, verified). */
  readonly hasPrevious: boolean
  readonly incremental: boolean
  /**
   * How many bytes of later slots must have been written (their `write` returned) before the writer
   * no longer reads the bytes of a `data` slot: `uploadConcurrency` chunks.
   */
  readonly retention: number
  /** Feeds the next slot; waits while the upload window is full. */
  readonly write: (chunk: ChunkInput) => Effect.Effect<void, PbsError>
  /** The counters so far. */
  readonly stats: Effect.Effect<DriveStats>
  /** Waits for the uploads, registers the rest and closes the index. */
  readonly close: Effect.Effect<DriveResult, PbsError>
}

/**
 * @since 0.1.0
 * @category models
 */
export interface SnapshotWriter {
  readonly snapshot: Snapshot.SnapshotId
  readonly cryptMode: Manifest.CryptMode
  /** The previous snapshot's manifest, when it is usable as a base (same key). */
  readonly previousManifest: Manifest.Manifest | undefined
  /** Uploads a `*.blob` (compressed; encrypted in encrypt mode). */
  readonly addBlob: (fileName: string, data: Uint8Array) => Effect.Effect<Manifest.FileInfo, PbsError>
  /** `qemu-server.conf.blob`. */
  readonly addConfig: (config: string) => Effect.Effect<Manifest.FileInfo, PbsError>
  /** `fw.conf.blob`. */
  readonly addFirewallConfig: (config: string) => Effect.Effect<Manifest.FileInfo, PbsError>
  /** Opens `drive-<device>.img.fidx`. */
  readonly openDrive: (device: string, size: number) => Effect.Effect<DriveWriter, PbsError>
  /** Master-key blob, signed manifest, `finish`, then closes the connection. */
  readonly finish: Effect.Effect<SnapshotResult, PbsError>
}

const invalid = (detail: string) => new PbsClientError({ reason: "InvalidInput", detail })
const badState = (detail: string) => new PbsClientError({ reason: "InvalidState", detail })

/**
 * Opens a backup connection for a new snapshot.
 *
 * @since 0.1.0
 * @category constructors
 */
export const open = Effect.fn("PbsSnapshotWriter.open")(function*(
  client: PbsClientService,
  options: SnapshotWriterOptions
): Effect.fn.Return<SnapshotWriter, PbsError, Scope.Scope> {
  const snapshot = Snapshot.make(options)
  yield* Snapshot.validate(snapshot)
  const crypt = options.crypt
  const cryptMode: Manifest.CryptMode = crypt === undefined ? "none" : options.cryptMode ?? "encrypt"
  if (options.masterPublicKeyPem !== undefined && cryptMode !== "encrypt") {
    return yield* Effect.fail(invalid("a master key needs encrypt mode"))
  }
  const encryptWith = cryptMode === "encrypt" ? crypt : undefined
  const compress = options.compress ?? true
  const concurrency = Math.max(1, options.uploadConcurrency ?? 8)
  const batchSize = Math.max(1, options.appendBatchSize ?? 128)

  const protocol = yield* client.openBackup(snapshot)
  const fibers = yield* FiberSet.make<void, never>()

  const previousManifest = options.usePrevious === false ? undefined : yield* loadPreviousManifest(protocol, crypt)

  const files: Array<Manifest.FileInfo> = []
  const drives: Array<DriveResult> = []
  const openArchives = new Set<string>()
  const known = new Map<string, Deferred.Deferred<void, PbsError>>()
  let finished = false
  let failure: PbsError | undefined

  const recordFailure = (error: PbsError) =>
    Effect.sync(() => {
      failure ??= error
    })
  const checkUsable = Effect.suspend(() => {
    if (failure !== undefined) return Effect.fail(failure)
    if (finished) return Effect.fail(badState("the snapshot is already finished"))
    return Effect.void
  })

  const encode = (bytes: Uint8Array) =>
    Effect.suspend(() => DataBlob.encodeSync(bytes, { compress, crypt: encryptWith }))

  const addBlob = (fileName: string, bytes: Uint8Array) =>
    Effect.gen(function*() {
      yield* checkUsable
      const reserved = fileName === Manifest.MANIFEST_BLOB_NAME
      if (!fileName.endsWith(".blob") || !Snapshot.isArchiveName(fileName) || reserved) {
        return yield* Effect.fail(invalid(`invalid blob name '${fileName}'`))
      }
      if (files.some((f) => f.filename === fileName)) {
        return yield* Effect.fail(invalid(`'${fileName}' was already added`))
      }
      const blob = yield* encode(bytes)
      yield* protocol.uploadBlob(fileName, blob)
      const info: Manifest.FileInfo = {
        filename: fileName,
        "crypt-mode": cryptMode,
        size: blob.length,
        csum: Bytes.toHex(Bytes.sha256(blob))
      }
      files.push(info)
      return info
    }).pipe(Effect.tapError(recordFailure))

  const zeroDigest = FixedIndex.zeroChunkDigest(encryptWith)
  let zeroBlob: Buffer | undefined

  // compression buffers of the chunk uploads: one per upload in flight whose frame is kept
  const scratchSize = Zstd.compressBound(FixedIndex.CHUNK_SIZE)
  const spare: Array<Buffer> = []
  const takeScratch = (): Buffer => spare.pop() ?? Buffer.allocUnsafe(scratchSize)
  const giveScratch = (buffer: Buffer) => {
    if (spare.length <= concurrency) spare.push(buffer)
  }
  /** A chunk's blob as header and payload; the payload is the chunk itself when stored uncompressed. */
  const encodeChunk = (bytes: Uint8Array) =>
    Effect.suspend(() => {
      const scratch = takeScratch()
      const parts = Blob.encodeParts(bytes, { compress, crypt: encryptWith, scratch })
      if (Either.isLeft(parts) || !parts.right.usesScratch) giveScratch(scratch)
      return Either.map(parts, (parts) => ({ parts, scratch: parts.usesScratch ? scratch : undefined }))
    })

  const openDrive = (device: string, size: number) =>
    Effect.gen(function*() {
      yield* checkUsable
      const archive = Snapshot.driveArchiveName(device)
      if (!Snapshot.isArchiveName(archive)) return yield* Effect.fail(invalid(`invalid device name '${device}'`))
      if (!Number.isSafeInteger(size) || size < 1) {
        return yield* Effect.fail(invalid(`invalid size ${size} of ${device}`))
      }
      if (openArchives.has(archive) || files.some((f) => f.filename === archive)) {
        return yield* Effect.fail(invalid(`'${archive}' was already added`))
      }
      const previous = yield* loadPreviousIndex(protocol, previousManifest, archive, cryptMode)
      if (previous !== undefined) {
        const count = FixedIndex.chunkCount(previous.size, previous.chunkSize)
        for (let i = 0; i < count; i++) {
          const hex = Bytes.toHex(FixedIndex.digestAt(previous, i))
          if (!known.has(hex)) {
            const done = yield* Deferred.make<void, PbsError>()
            yield* Deferred.succeed(done, undefined)
            known.set(hex, done)
          }
        }
      }
      const incremental = previous !== undefined && previous.size === size &&
        previous.chunkSize === FixedIndex.CHUNK_SIZE
      const count = FixedIndex.chunkCount(size)
      const digests = Buffer.alloc(count * 32)
      if (incremental) digests.set(previous.digests)
      const wid = yield* protocol.createFixedIndex(
        archive,
        size,
        incremental ? Bytes.toHex(FixedIndex.csum(previous)) : undefined
      )
      openArchives.add(archive)

      // uploads (and waits for chunks uploaded by an earlier slot) in flight, in slot order
      const inflight: Array<{ readonly slot: number; readonly done: Deferred.Deferred<void> }> = []
      /**
       * Waits for the oldest work until fewer than `concurrency` are in flight (`room`) and none is
       * older than `concurrency` slots before `slot`: so once `write` of slot s + concurrency has
       * returned, nothing reads the bytes of slot s any more (`retention`).
       */
      const drain = (slot: number, room: boolean) =>
        Effect.gen(function*() {
          for (;;) {
            const head = inflight[0]
            if (head === undefined) return
            if (!(room && inflight.length >= concurrency) && head.slot > slot - concurrency) return
            yield* Deferred.await(head.done)
            if (inflight[0] === head) inflight.shift()
          }
        })
      let nextSlot = 0
      let closed = false
      let appendQueue: Array<{ readonly digest: string; readonly offset: number }> = []
      let appended = 0
      const stats = {
        uploadedChunks: 0,
        uploadedBytes: 0,
        knownChunks: 0,
        zeroChunks: 0,
        reusedChunks: 0,
        reusedBytes: 0
      }

      const flush = Effect.suspend(() => {
        if (appendQueue.length === 0) return Effect.void
        const batch = appendQueue
        appendQueue = []
        appended += batch.length
        return protocol.appendFixedIndex(wid, batch)
      })
      const queueAppend = (entry: { readonly digest: string; readonly offset: number }) =>
        Effect.suspend(() => {
          appendQueue.push(entry)
          return appendQueue.length >= batchSize ? flush : Effect.void
        })

      const write = (chunk: ChunkInput) =>
        Effect.gen(function*() {
          yield* checkUsable
          if (closed) return yield* Effect.fail(badState(`${archive} is closed`))
          const slot = nextSlot
          if (slot >= count) return yield* Effect.fail(invalid(`${archive} has only ${count} chunks`))
          const length = FixedIndex.chunkLength(size, slot)
          let digest: Uint8Array
          let payload: Uint8Array | undefined
          switch (chunk._tag) {
            case "Data": {
              if (chunk.data.length !== length) {
                return yield* Effect.fail(
                  invalid(`chunk ${slot} of ${archive} has ${chunk.data.length} bytes, expected ${length}`)
                )
              }
              if (length === FixedIndex.CHUNK_SIZE && Bytes.isAllZero(chunk.data)) {
                digest = zeroDigest
                stats.zeroChunks += 1
              } else {
                payload = chunk.data
                digest = DataBlob.chunkDigest(chunk.data, encryptWith)
              }
              break
            }
            case "Zero": {
              if (length === FixedIndex.CHUNK_SIZE) {
                digest = zeroDigest
                stats.zeroChunks += 1
              } else {
                payload = Buffer.alloc(length)
                digest = DataBlob.chunkDigest(payload, encryptWith)
              }
              break
            }
            case "Reuse": {
              if (previous === undefined) {
                return yield* Effect.fail(badState(`${archive} has no usable previous index to reuse chunks from`))
              }
              const previousCount = FixedIndex.chunkCount(previous.size, previous.chunkSize)
              if (!Number.isInteger(chunk.index) || chunk.index < 0 || chunk.index >= previousCount) {
                return yield* Effect.fail(invalid(`previous index of ${archive} has no chunk ${chunk.index}`))
              }
              const previousLength = FixedIndex.chunkLength(previous.size, chunk.index, previous.chunkSize)
              if (previousLength !== length) {
                return yield* Effect.fail(
                  invalid(
                    `previous chunk ${chunk.index} of ${archive} has ${previousLength} bytes, slot ${slot} needs ` +
                      `${length}`
                  )
                )
              }
              digest = FixedIndex.digestAt(previous, chunk.index)
              stats.reusedChunks += 1
              break
            }
          }
          nextSlot += 1
          digests.set(digest, slot * 32)
          if (chunk._tag === "Reuse" && incremental && chunk.index === slot) {
            stats.reusedBytes += length
            yield* drain(slot, false)
            return
          }
          const hex = Bytes.toHex(digest)
          const offset = slot * FixedIndex.CHUNK_SIZE
          yield* drain(slot, true)
          let work: Effect.Effect<void, PbsError>
          const pending = known.get(hex)
          if (pending !== undefined) {
            stats.knownChunks += 1
            stats.reusedBytes += length
            work = Deferred.await(pending)
          } else {
            let blob: Uint8Array | ReadonlyArray<Uint8Array>
            let blobLength: number
            let scratch: Buffer | undefined
            if (payload === undefined) {
              zeroBlob ??= yield* encode(Bytes.zeroBuffer(FixedIndex.CHUNK_SIZE))
              blob = zeroBlob
              blobLength = zeroBlob.length
            } else {
              const encoded = yield* encodeChunk(payload)
              blob = [encoded.parts.header, encoded.parts.payload]
              blobLength = encoded.parts.length
              scratch = encoded.scratch
            }
            const done = yield* Deferred.make<void, PbsError>()
            known.set(hex, done)
            const upload = protocol.uploadFixedChunk(wid, { digest: hex, size: payload?.length ?? length, blob })
            stats.uploadedChunks += 1
            stats.uploadedBytes += blobLength
            work = Effect.exit(upload).pipe(
              Effect.tap(() =>
                Effect.sync(() => {
                  // the server has the whole body: the frame's buffer is free
                  if (scratch !== undefined) giveScratch(scratch)
                })
              ),
              Effect.flatMap((exit) => Deferred.done(done, exit)),
              Effect.zipRight(Deferred.await(done))
            )
          }
          const finished = yield* Deferred.make<void>()
          inflight.push({ slot, done: finished })
          yield* FiberSet.run(
            fibers,
            work.pipe(
              Effect.zipRight(queueAppend({ digest: hex, offset })),
              Effect.catchAll(recordFailure),
              Effect.ensuring(Deferred.done(finished, Exit.void))
            )
          )
        }).pipe(Effect.tapError(recordFailure))

      const close = Effect.gen(function*() {
        if (closed) return yield* Effect.fail(badState(`${archive} is closed`))
        closed = true
        yield* drain(Number.POSITIVE_INFINITY, false)
        yield* checkUsable
        if (nextSlot !== count) {
          return yield* Effect.fail(badState(`${archive}: ${nextSlot} of ${count} chunks written`))
        }
        yield* flush
        const csum = Bytes.toHex(FixedIndex.computeCsum(digests))
        yield* protocol.closeFixedIndex(wid, { chunkCount: appended, size, csum })
        openArchives.delete(archive)
        files.push({ filename: archive, "crypt-mode": cryptMode, size, csum })
        const result: DriveResult = { archive, size, csum, chunks: count, incremental, ...stats }
        drives.push(result)
        return result
      }).pipe(
        Effect.tapError(recordFailure),
        Effect.withSpan("PbsSnapshotWriter.closeDrive", { attributes: { archive } })
      )

      return {
        archive,
        size,
        chunkCount: count,
        hasPrevious: previous !== undefined,
        incremental,
        retention: concurrency * FixedIndex.CHUNK_SIZE,
        write,
        stats: Effect.sync((): DriveStats => ({ ...stats })),
        close
      } satisfies DriveWriter
    }).pipe(Effect.tapError(recordFailure))

  const finish = Effect.gen(function*() {
    yield* checkUsable
    if (openArchives.size > 0) {
      return yield* Effect.fail(badState(`drives still open: ${[...openArchives].join(", ")}`))
    }
    if (options.masterPublicKeyPem !== undefined && crypt !== undefined) {
      const blob = yield* KeyConfig.masterKeyBlob(crypt, {
        publicKeyPem: options.masterPublicKeyPem,
        ...(options.keyCreated !== undefined ? { created: options.keyCreated } : {})
      })
      yield* protocol.uploadBlob(KeyConfig.MASTER_KEY_BLOB_NAME, blob)
      files.push({
        filename: KeyConfig.MASTER_KEY_BLOB_NAME,
        "crypt-mode": "encrypt",
        size: blob.length,
        csum: Bytes.toHex(Bytes.sha256(blob))
      })
    }
    let manifest = Manifest.make({
      backupType: snapshot.backupType,
      backupId: snapshot.backupId,
      backupTime: snapshot.backupTime,
      files: [...files]
    })
    if (crypt !== undefined) manifest = yield* Manifest.sign(manifest, crypt)
    const blob = yield* Manifest.encodeBlob(manifest)
    yield* protocol.uploadBlob(Manifest.MANIFEST_BLOB_NAME, blob)
    yield* protocol.finish
    finished = true
    yield* protocol.close
    yield* Effect.logDebug(`snapshot ${Snapshot.snapshotPath(snapshot)} finished`)
    return { snapshot, path: Snapshot.snapshotPath(snapshot), manifest, drives: [...drives] } satisfies SnapshotResult
  }).pipe(Effect.tapError(recordFailure), Effect.withSpan("PbsSnapshotWriter.finish"))

  return {
    snapshot,
    cryptMode,
    previousManifest,
    addBlob,
    addConfig: (config) => addBlob("qemu-server.conf.blob", Buffer.from(config, "utf8")),
    addFirewallConfig: (config) => addBlob("fw.conf.blob", Buffer.from(config, "utf8")),
    openDrive,
    finish
  } satisfies SnapshotWriter
})

const loadPreviousManifest = (
  protocol: BackupProtocol,
  crypt: CryptConfig | undefined
): Effect.Effect<Manifest.Manifest | undefined, PbsError> =>
  protocol.downloadPrevious(Manifest.MANIFEST_BLOB_NAME).pipe(
    Effect.flatMap((blob) => Manifest.decodeBlob(blob)),
    Effect.flatMap((manifest) =>
      crypt === undefined
        ? Effect.succeed<Manifest.Manifest | undefined>(manifest)
        : Manifest.verifySignature(manifest, crypt).pipe(
          Effect.as<Manifest.Manifest | undefined>(manifest),
          Effect.catchAll((error) =>
            Effect.as(Effect.logWarning(`previous snapshot not used as base: ${error.message}`), undefined)
          )
        )
    ),
    Effect.catchTags({
      PbsHttpError: (error) =>
        error.status === 400 || error.status === 404
          ? Effect.as(Effect.logDebug(`no previous snapshot: ${error.text}`), undefined)
          : Effect.fail(error),
      DataBlobError: (error) => Effect.as(unreadable(error), undefined),
      ManifestError: (error) => Effect.as(unreadable(error), undefined)
    })
  )

const unreadable = (error: Error) => Effect.logWarning(`previous manifest unreadable: ${error.message}`)

const loadPreviousIndex = (
  protocol: BackupProtocol,
  manifest: Manifest.Manifest | undefined,
  archive: string,
  cryptMode: Manifest.CryptMode
): Effect.Effect<FixedIndex.FixedIndex | undefined, PbsError> =>
  Effect.gen(function*() {
    if (manifest === undefined) return undefined
    const entry = manifest.files.find((f) => f.filename === archive)
    if (entry === undefined || entry["crypt-mode"] !== cryptMode) return undefined
    const bytes = yield* protocol.downloadPrevious(archive)
    const decoded = FixedIndex.decodeSync(bytes)
    if (Either.isLeft(decoded)) {
      yield* Effect.logWarning(`previous ${archive} not used: ${decoded.left.message}`)
      return undefined
    }
    const checked = Manifest.checkFile(manifest, archive, {
      size: decoded.right.size,
      csum: FixedIndex.csum(decoded.right)
    })
    if (Either.isLeft(checked)) {
      yield* Effect.logWarning(`previous ${archive} not used: ${checked.left.message}`)
      return undefined
    }
    return decoded.right
  })

/**
 * Writes a raw image file as a drive, chunk by chunk; `reuse(slot)` returning true marks a slot as
 * unchanged since the previous snapshot (a dirty bitmap's clean bits).
 *
 * @since 0.1.0
 * @category helpers
 */
export const writeImageFile = (
  writer: SnapshotWriter,
  device: string,
  file: string,
  options: { readonly reuse?: (slot: number) => boolean } = {}
): Effect.Effect<DriveResult, PbsError> =>
  Effect.acquireUseRelease(
    Effect.tryPromise({
      try: () => fs.promises.open(file, "r"),
      catch: (cause) => new PbsClientError({ reason: "Io", detail: `cannot open ${file}: ${String(cause)}` })
    }),
    (handle) =>
      Effect.gen(function*() {
        const stat = yield* Effect.tryPromise({
          try: () => handle.stat(),
          catch: (cause) => new PbsClientError({ reason: "Io", detail: `cannot stat ${file}: ${String(cause)}` })
        })
        const drive = yield* writer.openDrive(device, stat.size)
        for (let slot = 0; slot < drive.chunkCount; slot++) {
          if (options.reuse?.(slot) === true) {
            yield* drive.write(reuse(slot))
            continue
          }
          const length = FixedIndex.chunkLength(stat.size, slot)
          const buffer = Buffer.allocUnsafe(length)
          const { bytesRead } = yield* Effect.tryPromise({
            try: () => handle.read(buffer, 0, length, slot * FixedIndex.CHUNK_SIZE),
            catch: (cause) => new PbsClientError({ reason: "Io", detail: `cannot read ${file}: ${String(cause)}` })
          })
          if (bytesRead !== length) {
            return yield* Effect.fail(
              new PbsClientError({ reason: "Io", detail: `short read of ${file} at chunk ${slot}` })
            )
          }
          yield* drive.write(data(buffer))
        }
        return yield* drive.close
      }),
    (handle) => Effect.promise(() => handle.close())
  )

/**
 * Uploads the task log as `client.log.blob` of a finished snapshot (compressed; encrypted with a key).
 *
 * @since 0.1.0
 * @category helpers
 */
export const uploadLog = (
  client: PbsClientService,
  snapshot: Snapshot.SnapshotId,
  log: string,
  crypt?: CryptConfig
): Effect.Effect<void, PbsError> =>
  Effect.flatMap(DataBlob.encode(Buffer.from(log, "utf8"), { compress: true, crypt }), (blob) =>
    client.uploadBackupLog(snapshot, blob))
