/**
 * Targets for engines that write the archive themselves (the Proxmox-QEMU engine): their sessions
 * describe the destination (`ArchiveDestination`) instead of accepting `writeData`.
 *
 * - `layerVmaDirectory`: VMA files in a dump directory, named, compressed and renamed as vzdump does
 *   (`vzdump-qemu-<vmid>-<time>.vma[.zst|.gz|.lzo]`, written as `….dat`). The assembled configs go to
 *   `<dumpdir>/<basename>.tmp/` (QEMU reads them from there), which is removed afterwards; `commit`
 *   renames the temp file and reports `archive file size: …`; a session closed without `commit`
 *   removes the temp file.
 * - `layerPbs`: a Proxmox Backup Server storage as Proxmox VE configures it (repository, namespace,
 *   fingerprint, password file, `<id>.enc` key and `<id>.master.pem` master key), with vzdump's
 *   encryption checks and messages; configs in `/var/tmp/vzdumptmp<pid>_<vmid>/`.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Redacted from "effect/Redacted"
import * as Fs from "node:fs"
import * as NodePath from "node:path"
import type {
  DestinationMessage,
  DestinationSession,
  PbsDestination,
  VmaFileDestination
} from "./ArchiveDestination.js"
import { BackupTarget, BackupTargetError } from "./BackupTarget.js"
import type { ArchiveRequest, BackupTargetService } from "./BackupTarget.js"
import * as VmArchiveConfig from "./VmArchiveConfig.js"
import * as VzdumpLog from "./VzdumpLog.js"
import * as VzdumpNames from "./VzdumpNames.js"

// ---------------------------------------------------------------------------------------------
// shared
// ---------------------------------------------------------------------------------------------

const notWritable = (target: string) => () =>
  Effect.fail(
    new BackupTargetError({
      target,
      reason: "Invalid",
      detail: "this archive is written by QEMU's backup command (use the Proxmox engine)"
    })
  )

const exists = (path: string): boolean => {
  try {
    Fs.statSync(path)
    return true
  } catch {
    return false
  }
}

/** Writes the request's configs into a fresh directory removed when the scope closes. */
const configDirectory = (target: string, dir: string, request: ArchiveRequest) =>
  Effect.gen(function*() {
    yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: async () => {
          await Fs.promises.rm(dir, { recursive: true, force: true })
          await Fs.promises.mkdir(dir, { recursive: true, mode: 0o700 })
          for (const config of request.configs) {
            if (config.name.includes("/") || config.name.startsWith(".")) {
              throw new Error(`bad config name '${config.name}'`)
            }
            await Fs.promises.writeFile(NodePath.join(dir, config.name), config.data, { mode: 0o600 })
          }
        },
        catch: (error) =>
          new BackupTargetError({
            target,
            reason: "Open",
            detail: `unable to create '${dir}' - ${(error as Error).message}`
          })
      }),
      () => Effect.promise(() => Fs.promises.rm(dir, { recursive: true, force: true }))
    )
    const has = (name: string) => request.configs.some((config) => config.name === name)
    if (!has(VmArchiveConfig.configName)) {
      return yield* new BackupTargetError({
        target,
        reason: "Invalid",
        detail: `no '${VmArchiveConfig.configName}' among the archive's configs`
      })
    }
    return {
      configFile: NodePath.join(dir, VmArchiveConfig.configName),
      firewallFile: has(VmArchiveConfig.firewallName) ? NodePath.join(dir, VmArchiveConfig.firewallName) : undefined
    }
  })

// ---------------------------------------------------------------------------------------------
// VMA files in a dump directory
// ---------------------------------------------------------------------------------------------

/**
 * @since 0.1.0
 * @category models
 */
export interface VmaDirectoryOptions {
  /** The dump directory (`<storage path>/dump` or vzdump's `dumpdir`). */
  readonly dumpDir: string
  /** vzdump's `compress`; default `none`. */
  readonly compress?: VzdumpNames.Compression | undefined
  /** zstd threads (vzdump's `zstd`), default 1; 0 = half the CPUs. */
  readonly zstd?: number | undefined
  /** vzdump's `pigz`, default 0. */
  readonly pigz?: number | undefined
  /** IANA time zone of archive names; default the process's. */
  readonly timeZone?: string | undefined
}

/**
 * A VMA-directory target whose sessions carry a `VmaFileDestination`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const makeVmaDirectory = (options: VmaDirectoryOptions): BackupTargetService => {
  const name = "vma-directory"
  return {
    name,
    open: (request) =>
      Effect.gen(function*() {
        const compressor = VzdumpNames.compressor({
          compress: options.compress ?? "none",
          zstd: options.zstd,
          pigz: options.pigz
        })
        const names = VzdumpNames.backupNames({
          vmid: request.vmid,
          at: request.startTime,
          compression: compressor?.extension,
          timeZone: options.timeZone
        })
        const path = NodePath.join(options.dumpDir, names.archive)
        const temporaryPath = NodePath.join(options.dumpDir, names.temp)
        const configs = yield* configDirectory(name, NodePath.join(options.dumpDir, names.tmpDir), request)
        const state = { committed: false }
        yield* Effect.addFinalizer(() =>
          state.committed ? Effect.void : Effect.promise(() => Fs.promises.rm(temporaryPath, { force: true }))
        )
        const destination: VmaFileDestination = {
          _tag: "VmaFile",
          path,
          temporaryPath,
          compressor,
          configFile: configs.configFile,
          firewallFile: configs.firewallFile,
          messages: []
        }
        const commit = Effect.tryPromise({
          try: async () => {
            await Fs.promises.rename(temporaryPath, path)
            state.committed = true
            return (await Fs.promises.stat(path)).size
          },
          catch: () =>
            new BackupTargetError({
              target: name,
              reason: "Commit",
              detail: `unable to rename '${temporaryPath}' to '${path}'`
            })
        }).pipe(Effect.map((size) => ({ location: path, size, logLines: [VzdumpLog.Messages.archiveFileSize(size)] })))
        return {
          openedLine: VzdumpLog.Messages.creatingVzdumpArchive(path),
          logPath: NodePath.join(options.dumpDir, names.log),
          writeData: notWritable(name),
          writeZeros: notWritable(name),
          commit,
          destination
        } satisfies DestinationSession
      })
  }
}

/**
 * @since 0.1.0
 * @category layers
 */
export const layerVmaDirectory = (options: VmaDirectoryOptions): Layer.Layer<BackupTarget> =>
  Layer.succeed(BackupTarget, makeVmaDirectory(options))

// ---------------------------------------------------------------------------------------------
// Proxmox Backup Server
// ---------------------------------------------------------------------------------------------

/**
 * A PBS storage as Proxmox VE configures it (`ProxmoxHost.readPbsStorage` builds it from
 * `/etc/pve/storage.cfg` and `/etc/pve/priv/storage/`).
 *
 * @since 0.1.0
 * @category models
 */
export interface PbsStorage {
  readonly storeId: string
  /** `user@realm@host[:port]:datastore`. */
  readonly repository: string
  readonly namespace?: string | undefined
  readonly fingerprint?: string | undefined
  /** `/etc/pve/priv/storage/<id>.pw` (its first line is the password). */
  readonly passwordFile: string
  /** `/etc/pve/priv/storage/<id>.enc`; used when it exists. */
  readonly keyFile: string
  /** `/etc/pve/priv/storage/<id>.master.pem`; used with the key when it exists. */
  readonly masterKeyFile: string
  /** The storage's `encryption-key` (key fingerprint) setting, when encryption is configured. */
  readonly encryptionKey?: string | undefined
  /** The storage has a `master-pubkey` setting. */
  readonly masterPubkey?: boolean | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface PbsTargetOptions {
  readonly storage: PbsStorage
  /** Base of vzdump's temp directory `vzdumptmp<pid>_<vmid>`; default `/var/tmp`. */
  readonly tmpDir?: string | undefined
}

/**
 * vzdump's `get_and_check_pbs_encryption_config`: which key files to use, the log lines, or the
 * error.
 *
 * @since 0.1.0
 * @category utils
 */
export const pbsEncryption = (
  storage: PbsStorage,
  fileExists: (path: string) => boolean = exists
):
  | {
    readonly _tag: "Ok"
    readonly keyfile?: string
    readonly masterKeyfile?: string
    readonly messages: Array<DestinationMessage>
  }
  | { readonly _tag: "Error"; readonly message: string } =>
{
  if (fileExists(storage.keyFile)) {
    if (fileExists(storage.masterKeyFile)) {
      return {
        _tag: "Ok",
        keyfile: storage.keyFile,
        masterKeyfile: storage.masterKeyFile,
        messages: [{ level: "info", message: "enabling encryption with master key feature" }]
      }
    }
    if (storage.masterPubkey === true) {
      return { _tag: "Error", message: "master public key configured but no key file found" }
    }
    return { _tag: "Ok", keyfile: storage.keyFile, messages: [{ level: "info", message: "enabling encryption" }] }
  }
  if (storage.encryptionKey !== undefined) {
    return {
      _tag: "Error",
      message: `encryption configured ('${storage.encryptionKey}') but no encryption key file found!`
    }
  }
  if (fileExists(storage.masterKeyFile)) {
    return {
      _tag: "Ok",
      messages: [{
        level: "warn",
        message: "backup target storage is configured with master-key, but no encryption key set! Ignoring master " +
          "key settings and creating unencrypted backup."
      }]
    }
  }
  return { _tag: "Ok", messages: [] }
}

/**
 * A PBS target whose sessions carry a `PbsDestination` (snapshot `vm/<vmid>/<UTC time>`).
 *
 * @since 0.1.0
 * @category constructors
 */
export const makePbs = (options: PbsTargetOptions): BackupTargetService => {
  const storage = options.storage
  const name = `pbs:${storage.storeId}`
  const fail = (reason: BackupTargetError["reason"], detail: string) =>
    new BackupTargetError({ target: name, reason, detail })
  return {
    name,
    open: (request) =>
      Effect.gen(function*() {
        const password = yield* Effect.tryPromise({
          try: () => Fs.promises.readFile(storage.passwordFile, "utf8"),
          catch: (error) =>
            fail("Open", `unable to read password file '${storage.passwordFile}' - ${(error as Error).message}`)
        }).pipe(Effect.map((text) => Redacted.make(text.split("\n")[0]!.replace(/\r$/, ""))))
        const encryption = pbsEncryption(storage)
        if (encryption._tag === "Error") return yield* fail("Open", encryption.message)
        const tmp = NodePath.join(options.tmpDir ?? "/var/tmp", `vzdumptmp${process.pid}_${request.vmid}`)
        const configs = yield* configDirectory(name, tmp, request)
        const snapshot = VzdumpNames.pbsSnapshotName(request.vmid, request.startTime)
        const destination: PbsDestination = {
          _tag: "Pbs",
          repository: storage.repository,
          backupId: String(request.vmid),
          backupTime: Math.floor(request.startTime.getTime() / 1000),
          namespace: storage.namespace,
          password,
          fingerprint: storage.fingerprint,
          keyfile: encryption.keyfile,
          keyPassword: undefined,
          masterKeyfile: encryption.masterKeyfile,
          encrypt: encryption.keyfile !== undefined,
          configFile: configs.configFile,
          firewallFile: configs.firewallFile,
          messages: encryption.messages
        }
        return {
          openedLine: VzdumpLog.Messages.creatingPbsArchive(snapshot),
          writeData: notWritable(name),
          writeZeros: notWritable(name),
          commit: Effect.succeed({ location: `${storage.storeId}:backup/${snapshot}`, logLines: [] }),
          destination
        } satisfies DestinationSession
      })
  }
}

/**
 * @since 0.1.0
 * @category layers
 */
export const layerPbs = (options: PbsTargetOptions): Layer.Layer<BackupTarget> =>
  Layer.succeed(BackupTarget, makePbs(options))
