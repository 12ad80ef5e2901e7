/**
 * Restore through the reader protocol (spec §6.9): download and verify the manifest (signature and
 * key fingerprint when a key is given), download indexes (their csum and size checked against the
 * manifest, which also authorises their chunks), download each distinct chunk once and decode it
 * (CRC, decryption, digest, length, and the crypt mode the manifest declares), and write raw images
 * — zero chunks are left as holes — plus the VM config.
 *
 * @since 0.1.0
 */
import * as fs from "node:fs"
import * as path from "node:path"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import type * as Scope from "effect/Scope"
import type { CryptConfig } from "./CryptConfig.js"
import * as DataBlob from "./DataBlob.js"
import * as FixedIndex from "./FixedIndex.js"
import * as Bytes from "./internal/bytes.js"
import * as Manifest from "./Manifest.js"
import type { PbsClientService } from "./PbsClient.js"
import { DataBlobError, PbsClientError, type PbsError } from "./PbsError.js"
import * as Snapshot from "./Snapshot.js"

/**
 * @since 0.1.0
 * @category models
 */
export interface RestoreOptions {
  /** Default `vm`. */
  readonly backupType?: Snapshot.BackupType
  readonly backupId: string
  readonly backupTime: number
  readonly ns?: string | undefined
  /** Needed for encrypted snapshots; with it the manifest signature is verified. */
  readonly crypt?: CryptConfig | undefined
  /** Chunk downloads in flight. Default 4. */
  readonly concurrency?: number
}

/**
 * @since 0.1.0
 * @category models
 */
export interface ImageResult {
  readonly archive: string
  readonly path: string
  readonly size: number
  readonly chunks: number
  /** Distinct chunks downloaded. */
  readonly downloadedChunks: number
  /** Slots left as holes (zero chunk or all-zero data). */
  readonly holeChunks: number
}

/**
 * @since 0.1.0
 * @category models
 */
export interface VmRestoreResult {
  /** `qemu-server.conf` content (with its `#qmdump#map` lines). */
  readonly config: string
  /** `fw.conf` content, when the snapshot has one. */
  readonly firewall: string | undefined
  readonly drives: ReadonlyArray<ImageResult & { readonly device: string }>
}

/**
 * @since 0.1.0
 * @category models
 */
export interface SnapshotReader {
  readonly snapshot: Snapshot.SnapshotId
  /** The verified manifest. */
  readonly manifest: Manifest.Manifest
  /** A blob's content, its size and csum checked against the manifest. */
  readonly readBlob: (fileName: string) => Effect.Effect<Buffer, PbsError>
  /** A fixed index, its size and csum checked against the manifest. */
  readonly readIndex: (archive: string) => Effect.Effect<FixedIndex.FixedIndex, PbsError>
  /** A decoded chunk (CRC, decryption, digest and length checked). */
  readonly readChunk: (
    digest: Uint8Array,
    expectedLength: number,
    cryptMode: Manifest.CryptMode
  ) => Effect.Effect<Buffer, PbsError>
  /** Writes a drive archive as a raw image file (created or truncated; sparse). */
  readonly restoreImage: (archive: string, target: string) => Effect.Effect<ImageResult, PbsError>
  /** Config, firewall config and every `drive-*.img.fidx` (as `<dir>/<device>.raw`, or where `target` says). */
  readonly restoreVm: (target: string | ((device: string) => string)) => Effect.Effect<VmRestoreResult, PbsError>
}

const io = (detail: string) => (cause: unknown) =>
  new PbsClientError({ reason: "Io", detail: `${detail}: ${cause instanceof Error ? cause.message : String(cause)}` })

/**
 * Opens a reader connection on a snapshot and verifies its manifest.
 *
 * @since 0.1.0
 * @category constructors
 */
export const open = Effect.fn("PbsRestore.open")(function*(
  client: PbsClientService,
  options: RestoreOptions
): Effect.fn.Return<SnapshotReader, PbsError, Scope.Scope> {
  const snapshot = Snapshot.make(options)
  const crypt = options.crypt
  const concurrency = Math.max(1, options.concurrency ?? 4)
  const reader = yield* client.openReader(snapshot)
  const manifestBlob = yield* reader.download(Manifest.MANIFEST_BLOB_NAME)
  const manifest = yield* Manifest.decodeBlob(manifestBlob, crypt)
  if (
    manifest["backup-type"] !== snapshot.backupType || manifest["backup-id"] !== snapshot.backupId ||
    manifest["backup-time"] !== snapshot.backupTime
  ) {
    return yield* Effect.fail(
      new PbsClientError({ reason: "InvalidState", detail: "manifest does not describe the requested snapshot" })
    )
  }

  const keyFor = (mode: Manifest.CryptMode) => (mode === "encrypt" ? crypt : undefined)

  const checkKind = (blob: Uint8Array, mode: Manifest.CryptMode, what: string) =>
    Effect.suspend(() => {
      const kind = DataBlob.kindOf(blob)
      if (Either.isLeft(kind)) return Effect.fail(kind.left)
      if (DataBlob.isEncryptedKind(kind.right) !== (mode === "encrypt")) {
        return Effect.fail(new DataBlobError({
          reason: "BadMagic",
          detail: `${what} is ${kind.right} but the manifest says crypt mode '${mode}'`
        }))
      }
      if (mode === "encrypt" && crypt === undefined) {
        return Effect.fail(
          new DataBlobError({ reason: "MissingKey", detail: `${what} is encrypted and no key was given` })
        )
      }
      return Effect.void
    })

  const readBlob = (fileName: string) =>
    Effect.gen(function*() {
      const entry = yield* Manifest.lookupFile(manifest, fileName)
      const blob = yield* reader.download(fileName)
      yield* Manifest.checkFile(manifest, fileName, { size: blob.length, csum: Bytes.sha256(blob) })
      // the master-key blob is listed as "encrypt" but stored as a plain blob (spec §3.4)
      if (fileName !== "rsa-encrypted.key.blob") yield* checkKind(blob, entry["crypt-mode"], fileName)
      return yield* DataBlob.decode(blob, { crypt: keyFor(entry["crypt-mode"]) })
    })

  const readIndex = (archive: string) =>
    Effect.gen(function*() {
      yield* Manifest.lookupFile(manifest, archive)
      const bytes = yield* reader.download(archive)
      const index = yield* FixedIndex.decode(bytes)
      yield* Manifest.checkFile(manifest, archive, { size: index.size, csum: FixedIndex.csum(index) })
      return index
    })

  const readChunk = (digest: Uint8Array, expectedLength: number, cryptMode: Manifest.CryptMode) =>
    Effect.gen(function*() {
      const hex = Bytes.toHex(digest)
      const blob = yield* reader.chunk(hex)
      yield* checkKind(blob, cryptMode, `chunk ${hex}`)
      return yield* DataBlob.decode(blob, {
        crypt: keyFor(cryptMode),
        digest,
        expectedLength,
        maxSize: 16 * 1024 * 1024
      })
    })

  const restoreImage = (archive: string, target: string) =>
    Effect.gen(function*() {
      const entry = yield* Manifest.lookupFile(manifest, archive)
      const mode = entry["crypt-mode"]
      const index = yield* readIndex(archive)
      const count = FixedIndex.chunkCount(index.size, index.chunkSize)
      const zeroHex = Bytes.toHex(FixedIndex.zeroChunkDigest(keyFor(mode)))
      const slotsByDigest = new Map<string, Array<number>>()
      let holeChunks = 0
      for (let i = 0; i < count; i++) {
        const hex = Bytes.toHex(FixedIndex.digestAt(index, i))
        const length = FixedIndex.chunkLength(index.size, i, index.chunkSize)
        if (hex === zeroHex && length === FixedIndex.CHUNK_SIZE && index.chunkSize === FixedIndex.CHUNK_SIZE) {
          holeChunks += 1
          continue
        }
        const slots = slotsByDigest.get(hex)
        if (slots === undefined) slotsByDigest.set(hex, [i])
        else slots.push(i)
      }
      return yield* Effect.acquireUseRelease(
        Effect.tryPromise({ try: () => fs.promises.open(target, "w"), catch: io(`cannot create ${target}`) }),
        (handle) =>
          Effect.gen(function*() {
            yield* Effect.tryPromise({ try: () => handle.truncate(index.size), catch: io(`cannot size ${target}`) })
            let written = 0
            yield* Effect.forEach(
              slotsByDigest,
              ([hex, slots]) =>
                Effect.gen(function*() {
                  const length = FixedIndex.chunkLength(index.size, slots[0]!, index.chunkSize)
                  for (const slot of slots) {
                    if (FixedIndex.chunkLength(index.size, slot, index.chunkSize) !== length) {
                      return yield* Effect.fail(new DataBlobError({
                        reason: "LengthMismatch",
                        detail: `chunk ${hex} is used for slots of different lengths`
                      }))
                    }
                  }
                  const chunk = yield* readChunk(Bytes.fromHex(hex), length, mode)
                  written += 1
                  if (Bytes.isAllZero(chunk)) {
                    holeChunks += slots.length
                    return
                  }
                  for (const slot of slots) {
                    yield* Effect.tryPromise({
                      try: () => handle.write(chunk, 0, chunk.length, slot * index.chunkSize),
                      catch: io(`cannot write ${target}`)
                    })
                  }
                }),
              { concurrency, discard: true }
            )
            yield* Effect.tryPromise({ try: () => handle.sync(), catch: io(`cannot sync ${target}`) })
            return {
              archive,
              path: target,
              size: index.size,
              chunks: count,
              downloadedChunks: written,
              holeChunks
            } satisfies ImageResult
          }),
        (handle) => Effect.promise(() => handle.close())
      )
    }).pipe(Effect.withSpan("PbsRestore.restoreImage", { attributes: { archive } }))

  const restoreVm = (target: string | ((device: string) => string)) =>
    Effect.gen(function*() {
      const config = (yield* readBlob("qemu-server.conf.blob")).toString("utf8")
      const firewall = manifest.files.some((f) => f.filename === "fw.conf.blob")
        ? (yield* readBlob("fw.conf.blob")).toString("utf8")
        : undefined
      const drives: Array<ImageResult & { readonly device: string }> = []
      for (const file of manifest.files) {
        const m = /^drive-(.+)\.img\.fidx$/.exec(file.filename)
        if (m === null) continue
        const device = m[1]!
        const where = typeof target === "string" ? path.join(target, `${device}.raw`) : target(device)
        drives.push({ device, ...(yield* restoreImage(file.filename, where)) })
      }
      return { config, firewall, drives } satisfies VmRestoreResult
    })

  return {
    snapshot,
    manifest,
    readBlob,
    readIndex,
    readChunk,
    restoreImage,
    restoreVm
  } satisfies SnapshotReader
})
