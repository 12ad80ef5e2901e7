/**
 * The Proxmox Backup Server target: a `BackupTarget` that writes each backup as a PBS snapshot
 * `vm/<vmid>/<UTC backup time>` (in an optional namespace), the way vzdump's PBS storage does:
 *
 * - `qemu-server.conf.blob` (the assembled config with its `#qmdump#map` lines), `fw.conf.blob`;
 * - one `drive-<dev>.img.fidx` per disk, cut into 4 MiB chunks; the engine's writes (in order per
 *   device, any piece size) are gathered into whole chunks; zero chunks are not sent, and chunks
 *   the server already has in the group's previous snapshot are referenced, not uploaded;
 * - optional client-side encryption with a key (file or loaded) and an RSA master key;
 * - dirty-bitmap incrementals with engines that track changes (the stock engine): the session names
 *   per disk the bitmap `vzdump-<target id>-<backup time of the group's latest snapshot>`, offered
 *   only when that snapshot has the disk with a verified index of the same size and crypt mode;
 *   unchanged chunks are then taken from its index (`reuse-csum`) without being read or sent;
 * - vzdump's log lines: `creating Proxmox Backup Server archive 'vm/<vmid>/<time>'`,
 *   `enabling encryption [with master key feature]`; the bytes not sent are reported to the engine
 *   (`reused`, hence `backup was done incrementally, reused X (P%)`), and the server's finish runs
 *   as the last step of the job (`complete`).
 *
 * The per-guest log goes to the snapshot as `client.log.blob` after a successful backup (vzdump's
 * `upload-log`; the workflow calls the session's `uploadLog`, `PbsTarget.uploadLog` does it by
 * hand). Closing the session's scope without `commit` closes the backup connection, and the server
 * discards the unfinished snapshot.
 *
 * @since 0.1.0
 */
import * as Config from "effect/Config"
import type * as ConfigError from "effect/ConfigError"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import type * as Redacted from "effect/Redacted"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import { BackupTarget, BackupTargetError } from "@vzdump/core/BackupTarget"
import type { ArchiveIncremental, ArchiveSession, BackupTargetService } from "@vzdump/core/BackupTarget"
import * as VzdumpLog from "@vzdump/core/VzdumpLog"
import * as CryptConfig from "./CryptConfig.js"
import * as FixedIndex from "./FixedIndex.js"
import * as KeyConfig from "./KeyConfig.js"
import * as PbsClient from "./PbsClient.js"
import { PbsClientError, type PbsError } from "./PbsError.js"
import * as PbsSnapshotWriter from "./PbsSnapshotWriter.js"
import * as Snapshot from "./Snapshot.js"

/**
 * What the target adds to a client connection.
 *
 * @since 0.1.0
 * @category models
 */
export interface PbsTargetOptions {
  /** Namespace of the snapshots (`a/b`); the root namespace when absent. */
  readonly namespace?: string | undefined
  /**
   * Encrypt with this key: a key file path (PVE keeps `/etc/pve/priv/storage/<id>.enc`) or a loaded key.
   */
  readonly encryptionKey?: string | CryptConfig.CryptConfig | undefined
  /** Passphrase of a key file whose key is protected by a KDF. */
  readonly keyPassphrase?: Redacted.Redacted<string> | undefined
  /** RSA master public key (PEM) or the path of a PEM file: adds `rsa-encrypted.key.blob`. */
  readonly masterPublicKey?: string | undefined
  /**
   * Chunk uploads in flight per disk. Default 8. Chunks are sent from the engine's read buffers, so
   * this many chunks of them stay in use (`bufferRetention`).
   */
  readonly uploadConcurrency?: number | undefined
  /** Deduplicate against the group's previous snapshot. Default true. */
  readonly usePrevious?: boolean | undefined
  /** Offer dirty-bitmap incrementals to the engine. Default true (needs `usePrevious`). */
  readonly dirtyBitmaps?: boolean | undefined
  /**
   * The target's id in bitmap names (`vzdump-<id>-<time>`), like a PVE storage id; letters, digits,
   * `_`, `.`, `-`. Default: derived from the server, datastore, namespace and key fingerprint.
   */
  readonly id?: string | undefined
}

/**
 * Connection and target options in one record, as a PBS storage entry holds them.
 *
 * @since 0.1.0
 * @category models
 */
export interface PbsTargetConfig extends PbsClient.PbsClientOptions, PbsTargetOptions {}

/**
 * What one committed backup left on the server.
 *
 * @since 0.1.0
 * @category models
 */
export interface CommittedSnapshot {
  readonly snapshot: Snapshot.SnapshotId
  /** `vm/100/2024-06-05T12:00:00Z` (with `ns/…/` in a namespace): the `ArchiveResult` location. */
  readonly path: string
  readonly encrypted: boolean
  readonly drives: ReadonlyArray<PbsSnapshotWriter.DriveResult>
  /** Σ of the disk sizes. */
  readonly total: number
  /** Image bytes not sent (known chunks, the zero chunk, reused slots). */
  readonly reused: number
}

/**
 * The PBS side of the target, beside its `BackupTarget` face.
 *
 * @since 0.1.0
 * @category models
 */
export interface PbsTargetService extends BackupTargetService {
  readonly client: PbsClient.PbsClientService
  /** The key backups are encrypted with, if any. */
  readonly crypt: CryptConfig.CryptConfig | undefined
  /** Snapshots committed through this target, oldest first. */
  readonly committed: Effect.Effect<ReadonlyArray<CommittedSnapshot>>
  /**
   * Uploads a backup's task log as `client.log.blob` of the snapshot at `location` (an
   * `ArchiveResult.location` of this target), encrypted like the backup.
   */
  readonly uploadLog: (location: string, lines: ReadonlyArray<string>) => Effect.Effect<void, BackupTargetError>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class PbsTarget extends Context.Tag("@vzdump/target-pbs/PbsTarget")<PbsTarget, PbsTargetService>() {}

const NAME = "pbs"

const targetError = (reason: BackupTargetError["reason"]) => (error: { readonly message: string }) =>
  new BackupTargetError({ target: NAME, reason, detail: error.message })

const readText = (path: string, what: string) =>
  Effect.tryPromise({
    try: () => fs.promises.readFile(path, "utf8"),
    catch: (cause) =>
      new PbsClientError({
        reason: "Io",
        detail: `cannot read ${what} ${path}: ${cause instanceof Error ? cause.message : String(cause)}`
      })
  })

/**
 * The archive name of a device as the workflow names it (`drive-scsi0` → `drive-scsi0.img.fidx`).
 *
 * @since 0.1.0
 * @category names
 */
export const archiveNameOf = (device: string): string => Snapshot.driveArchiveName(device.replace(/^drive-/, ""))

/**
 * The blob a config of the request is stored as: `qemu-server.conf.blob`, `fw.conf.blob`, else `<name>.blob`.
 *
 * @since 0.1.0
 * @category names
 */
export const blobNameOf = (config: string): string =>
  config === "qemu-server.fw" || config === "fw.conf" ? "fw.conf.blob" : `${config}.blob`

/**
 * The default target id: 12 hex digits of a hash of what makes snapshots comparable (server,
 * datastore, namespace, key).
 *
 * @since 0.1.0
 * @category names
 */
export const defaultId = (
  client: Pick<PbsClient.PbsClientService, "host" | "port" | "datastore">,
  options: { readonly namespace?: string | undefined; readonly keyFingerprint?: string | undefined }
): string =>
  crypto.createHash("sha256")
    .update(
      `pbs\n${client.host}\n${client.port}\n${client.datastore}\n${options.namespace ?? ""}\n${
        options.keyFingerprint ?? ""
      }`
    )
    .digest("hex")
    .slice(0, 12)

/**
 * The bitmap that records a disk's changes since snapshot `backupTime` of this target.
 *
 * @since 0.1.0
 * @category names
 */
export const bitmapName = (id: string, backupTime: number): string => `vzdump-${id}-${backupTime}`

/** One device of an open session: the drive writer and the chunk being gathered. */
interface DeviceState {
  readonly name: string
  readonly drive: PbsSnapshotWriter.DriveWriter
  readonly size: number
  /** Bytes accepted so far (the next offset expected). */
  position: number
  /** The chunk being gathered when pieces arrive smaller than a chunk. */
  pending: Buffer | undefined
  filled: number
  pendingHasData: boolean
  /** Gathered chunks handed to the writer, with their slots: reusable once it no longer reads them. */
  readonly handed: Array<{ readonly buffer: Buffer; readonly slot: number }>
}

const CS = FixedIndex.CHUNK_SIZE

/**
 * Builds the target over a connected client; loads the key files once.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = Effect.fn("PbsTarget.make")(function*(
  client: PbsClient.PbsClientService,
  options: PbsTargetOptions = {}
): Effect.fn.Return<PbsTargetService, PbsError> {
  const crypt = options.encryptionKey === undefined
    ? undefined
    : CryptConfig.isCryptConfig(options.encryptionKey)
    ? options.encryptionKey
    : yield* Effect.flatMap(
      readText(options.encryptionKey, "key file"),
      (json) => KeyConfig.load(json, options.keyPassphrase)
    )
  const master = options.masterPublicKey
  const masterPublicKeyPem = master === undefined
    ? undefined
    : master.includes("-----BEGIN")
    ? master
    : yield* readText(master, "master public key")
  if (masterPublicKeyPem !== undefined && crypt === undefined) {
    return yield* new PbsClientError({ reason: "InvalidInput", detail: "a master key needs an encryption key" })
  }
  if (options.namespace !== undefined && Snapshot.parseNamespace(options.namespace) === undefined) {
    return yield* new PbsClientError({ reason: "InvalidInput", detail: `invalid namespace '${options.namespace}'` })
  }
  if (options.id !== undefined && !Snapshot.isSafeId(options.id)) {
    return yield* new PbsClientError({ reason: "InvalidInput", detail: `invalid target id '${options.id}'` })
  }
  const id = options.id ?? defaultId(client, { namespace: options.namespace, keyFingerprint: crypt?.fingerprint })
  const bitmaps = (options.dirtyBitmaps ?? true) && (options.usePrevious ?? true)
  const committed: Array<CommittedSnapshot> = []

  const open: BackupTargetService["open"] = (request) =>
    Effect.gen(function*() {
      const backupTime = Math.floor(request.startTime.getTime() / 1000)
      const writer = yield* PbsSnapshotWriter.open(client, {
        backupId: String(request.vmid),
        backupTime,
        ns: options.namespace,
        crypt,
        masterPublicKeyPem,
        ...(options.uploadConcurrency !== undefined ? { uploadConcurrency: options.uploadConcurrency } : {}),
        ...(options.usePrevious !== undefined ? { usePrevious: options.usePrevious } : {})
      }).pipe(Effect.mapError(targetError("Open")))
      for (const config of request.configs) {
        yield* Effect.mapError(writer.addBlob(blobNameOf(config.name), config.data), targetError("Open"))
      }
      const devices: Array<DeviceState> = []
      for (const device of request.devices) {
        const drive = yield* Effect.mapError(
          writer.openDrive(device.name.replace(/^drive-/, ""), device.size),
          targetError("Open")
        )
        devices.push({
          name: device.name,
          drive,
          size: device.size,
          position: 0,
          pending: undefined,
          filled: 0,
          pendingHasData: false,
          handed: []
        })
      }

      // the bitmap a disk needs for an incremental: the one of the group's latest snapshot, when that
      // snapshot has the disk with a verified index this archive can build on
      const previousTime = writer.previousManifest?.["backup-time"]
      const incremental: ArchiveIncremental | undefined = bitmaps
        ? {
          chunkSize: CS,
          prefix: `vzdump-${id}-`,
          next: bitmapName(id, backupTime),
          base: devices.map((state) =>
            previousTime !== undefined && state.drive.incremental ? bitmapName(id, previousTime) : undefined
          )
        }
        : undefined

      const stateOf = (device: number, offset: number, length: number) => {
        const state = devices[device]
        if (state === undefined) {
          return Effect.fail(new BackupTargetError({ target: NAME, reason: "Invalid", detail: `no device ${device}` }))
        }
        if (offset !== state.position) {
          return Effect.fail(
            new BackupTargetError({
              target: NAME,
              reason: "Invalid",
              detail: `${state.name}: write at ${offset}, expected ${state.position} (archives are written in order)`
            })
          )
        }
        if (length < 0 || offset + length > state.size) {
          return Effect.fail(
            new BackupTargetError({
              target: NAME,
              reason: "Invalid",
              detail: `${state.name}: write past the end of the device: ${offset}+${length} > ${state.size}`
            })
          )
        }
        return Effect.succeed(state)
      }

      /**
       * A zeroed buffer to gather chunk `slot` in: one handed to the writer `retention` chunks or
       * more before, or a new one.
       */
      const gatherBuffer = (state: DeviceState, slot: number, length: number): Buffer => {
        const slots = Math.ceil(state.drive.retention / CS)
        const free = state.handed.findIndex((entry) =>
          entry.buffer.length === length && slot - 1 >= entry.slot + slots
        )
        if (free < 0) {
          if (state.handed.length > slots + 1) state.handed.shift()
          return Buffer.alloc(length)
        }
        const [entry] = state.handed.splice(free, 1)
        return entry!.buffer.fill(0)
      }

      const put = (state: DeviceState, chunk: PbsSnapshotWriter.ChunkInput) =>
        Effect.mapError(state.drive.write(chunk), targetError("Write"))

      /** Feeds `length` bytes at the device's position: `bytes` or, when undefined, zeros. */
      const feed = (state: DeviceState, bytes: Uint8Array | undefined, length: number) =>
        Effect.gen(function*() {
          let done = 0
          while (done < length) {
            const slot = Math.floor(state.position / CS)
            const slotLength = FixedIndex.chunkLength(state.size, slot)
            const left = length - done
            if (state.filled === 0 && left >= slotLength) {
              // a whole chunk: passed through (the writer copies what it keeps)
              yield* put(
                state,
                bytes === undefined ? PbsSnapshotWriter.zero : PbsSnapshotWriter.data(
                  bytes.subarray(done, done + slotLength)
                )
              )
              done += slotLength
              state.position += slotLength
              continue
            }
            state.pending ??= gatherBuffer(state, slot, slotLength)
            const take = Math.min(left, slotLength - state.filled)
            if (bytes !== undefined) {
              state.pending.set(bytes.subarray(done, done + take), state.filled)
              state.pendingHasData = true
            }
            state.filled += take
            done += take
            state.position += take
            if (state.filled === slotLength) {
              const chunk = state.pending
              const hasData = state.pendingHasData
              yield* put(state, hasData ? PbsSnapshotWriter.data(chunk) : PbsSnapshotWriter.zero)
              state.filled = 0
              state.pendingHasData = false
              if (hasData) {
                // the writer may still send it: a later chunk gathers elsewhere until it no longer does
                state.handed.push({ buffer: chunk, slot })
                state.pending = undefined
              }
              if (FixedIndex.chunkLength(state.size, slot + 1) !== slotLength) state.pending = undefined
            }
          }
        })

      const snapshot = writer.snapshot
      const path = Snapshot.snapshotPath(snapshot)
      let finished: PbsSnapshotWriter.SnapshotResult | undefined
      /** Every byte written: close the indexes, upload the manifest, the server's finish. */
      const complete = Effect.gen(function*() {
        if (finished !== undefined) return
        for (const state of devices) {
          if (state.position !== state.size) {
            return yield* new BackupTargetError({
              target: NAME,
              reason: "Commit",
              detail: `${state.name}: ${state.position} of ${state.size} bytes written`
            })
          }
        }
        for (const state of devices) yield* Effect.mapError(state.drive.close, targetError("Commit"))
        finished = yield* Effect.mapError(writer.finish, targetError("Commit"))
      })
      const session: ArchiveSession = {
        // whole chunks go to the writer as views of the engine's buffers, sent without a copy
        bufferRetention: devices.reduce((most, state) => Math.max(most, state.drive.retention), 0),
        openedLine: [
          VzdumpLog.Messages.creatingPbsArchive(`vm/${request.vmid}/${Snapshot.formatBackupTime(backupTime)}`),
          ...(crypt !== undefined
            ? [masterPublicKeyPem !== undefined ? "enabling encryption with master key feature" : "enabling encryption"]
            : [])
        ].join("\n"),
        writeData: (device, offset, data) =>
          Effect.flatMap(stateOf(device, offset, data.length), (state) => feed(state, data, data.length)),
        writeZeros: (device, offset, length) =>
          Effect.flatMap(stateOf(device, offset, length), (state) => feed(state, undefined, length)),
        incremental,
        writeReused: incremental === undefined ? undefined : (device, offset, length) =>
          Effect.flatMap(stateOf(device, offset, length), (state) =>
            Effect.gen(function*() {
              if (!state.drive.incremental || state.filled !== 0 || offset % CS !== 0) {
                return yield* new BackupTargetError({
                  target: NAME,
                  reason: "Invalid",
                  detail: state.drive.incremental
                    ? `${state.name}: reused range at ${offset} is not a whole chunk`
                    : `${state.name}: no base snapshot to reuse chunks from`
                })
              }
              const end = offset + length
              while (state.position < end) {
                const slot = state.position / CS
                const slotLength = FixedIndex.chunkLength(state.size, slot)
                if (state.position + slotLength > end) {
                  return yield* new BackupTargetError({
                    target: NAME,
                    reason: "Invalid",
                    detail: `${state.name}: reused range ${offset}+${length} ends inside a chunk`
                  })
                }
                yield* put(state, PbsSnapshotWriter.reuse(slot))
                state.position += slotLength
              }
            })),
        reused: Effect.map(
          Effect.forEach(devices, (state) => state.drive.stats),
          (stats) => stats.reduce((sum, s) => sum + s.reusedBytes, 0)
        ),
        complete,
        uploadLog: (text) => uploadLogText(path, text),
        commit: Effect.gen(function*() {
          const result = finished ?? (yield* complete.pipe(Effect.zipRight(Effect.sync(() => finished!))))
          const total = devices.reduce((sum, state) => sum + state.size, 0)
          const reused = result.drives.reduce((sum, drive) => sum + drive.reusedBytes, 0)
          const uploaded = result.drives.reduce((sum, drive) => sum + drive.uploadedBytes, 0)
          committed.push({ snapshot, path, encrypted: crypt !== undefined, drives: result.drives, total, reused })
          yield* Effect.logDebug(
            `${path}: ${result.drives.reduce((sum, drive) => sum + drive.uploadedChunks, 0)} chunks ` +
              `(${uploaded} bytes) uploaded, ${reused} of ${total} bytes reused`
          )
          return { location: path, logLines: [] }
        })
      }
      return session
    }).pipe(Effect.annotateLogs({ package: "@vzdump/target-pbs", module: "PbsTarget" }))

  const uploadLogText = (location: string, text: string) =>
    Effect.gen(function*() {
      const entry = committed.find((c) => c.path === location)
      if (entry === undefined) {
        return yield* new BackupTargetError({
          target: NAME,
          reason: "Invalid",
          detail: `no snapshot '${location}' was committed through this target`
        })
      }
      yield* PbsSnapshotWriter.uploadLog(client, entry.snapshot, text, entry.encrypted ? crypt : undefined).pipe(
        Effect.mapError(targetError("Commit"))
      )
    })

  const uploadLog = (location: string, lines: ReadonlyArray<string>) =>
    uploadLogText(location, lines.length === 0 ? "" : `${lines.join("\n")}\n`)

  return PbsTarget.of({
    name: NAME,
    open,
    client,
    crypt,
    committed: Effect.sync(() => [...committed]),
    uploadLog
  })
})

const offer = (service: PbsTargetService) => Context.make(PbsTarget, service).pipe(Context.add(BackupTarget, service))

/**
 * The target over a `PbsClient` from the context.
 *
 * @since 0.1.0
 * @category layers
 */
export const layerWithClient = (
  options: PbsTargetOptions = {}
): Layer.Layer<BackupTarget | PbsTarget, PbsError, PbsClient.PbsClient> =>
  Layer.effectContext(Effect.map(Effect.flatMap(PbsClient.PbsClient, (client) => make(client, options)), offer))

/**
 * Connects (certificate and credentials checked once) and builds the target.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (config: PbsTargetConfig): Layer.Layer<BackupTarget | PbsTarget, PbsError> =>
  Layer.effectContext(
    PbsClient.make(config).pipe(Effect.flatMap((client) => make(client, config)), Effect.map(offer))
  )

/**
 * @since 0.1.0
 * @category layers
 */
export const layerConfig = (
  config: Config.Config.Wrap<PbsTargetConfig>
): Layer.Layer<BackupTarget | PbsTarget, PbsError | ConfigError.ConfigError> =>
  Layer.effectContext(
    Config.unwrap(config).pipe(
      Effect.flatMap((options) => Effect.flatMap(PbsClient.make(options), (client) => make(client, options))),
      Effect.map(offer)
    )
  )

/**
 * A PBS storage from configuration: `HOST`, `PORT` (8007), `DATASTORE`, `FINGERPRINT`, `NAMESPACE`,
 * either `TOKEN_ID` + `TOKEN_SECRET` or `USERNAME` + `PASSWORD`, `ENCRYPTION_KEY` (key file path),
 * `KEY_PASSPHRASE`, `MASTER_PUBKEY` (PEM file path). Secrets are read as `Redacted`. Nest it as
 * needed, e.g. `Config.nested(PbsTarget.config, "PBS")`.
 *
 * @since 0.1.0
 * @category config
 */
export const config: Config.Config<PbsTargetConfig> = Config.all({
  host: Config.string("HOST"),
  port: Config.integer("PORT").pipe(Config.withDefault(8007)),
  datastore: Config.string("DATASTORE"),
  fingerprint: Config.option(Config.string("FINGERPRINT")),
  namespace: Config.option(Config.string("NAMESPACE")),
  auth: Config.orElse(
    Config.all({ tokenId: Config.string("TOKEN_ID"), secret: Config.redacted("TOKEN_SECRET") }).pipe(
      Config.map(({ secret, tokenId }): PbsClient.PbsAuth => ({ _tag: "ApiToken", tokenId, secret }))
    ),
    () =>
      Config.all({ userid: Config.string("USERNAME"), password: Config.redacted("PASSWORD") }).pipe(
        Config.map(({ password, userid }): PbsClient.PbsAuth => ({ _tag: "Password", userid, password }))
      )
  ),
  encryptionKey: Config.option(Config.string("ENCRYPTION_KEY")),
  keyPassphrase: Config.option(Config.redacted("KEY_PASSPHRASE")),
  masterPublicKey: Config.option(Config.string("MASTER_PUBKEY"))
}).pipe(Config.map((c): PbsTargetConfig => ({
  host: c.host,
  port: c.port,
  datastore: c.datastore,
  auth: c.auth,
  fingerprint: Option.getOrUndefined(c.fingerprint),
  namespace: Option.getOrUndefined(c.namespace),
  encryptionKey: Option.getOrUndefined(c.encryptionKey),
  keyPassphrase: Option.getOrUndefined(c.keyPassphrase),
  masterPublicKey: Option.getOrUndefined(c.masterPublicKey)
})))
