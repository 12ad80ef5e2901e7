/**
 * Restores a VM snapshot from a Proxmox Backup Server into a directory, for users outside PVE:
 * the config as stored (`qemu-server.conf`, with its `#qmdump#map` lines; `fw.conf` when the
 * snapshot has one) and one image per disk, named after the disk's config key (`scsi0.raw`,
 * `virtio1.qcow2`). Raw images are sparse (zero chunks are holes); qcow2 images are converted from
 * the sparse raw with `qemu-img convert`, which keeps holes unallocated.
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import { execFile } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import type { CryptConfig } from "./CryptConfig.js"
import type { PbsClientService } from "./PbsClient.js"
import { PbsClientError, type PbsError } from "./PbsError.js"
import * as PbsRestore from "./PbsRestore.js"
import * as Snapshot from "./Snapshot.js"

/**
 * @since 0.1.0
 * @category models
 */
export interface RestoreVmOptions {
  /** The backup id: the VMID. */
  readonly vmid: number | string
  /** Epoch seconds of the snapshot; the group's newest snapshot when absent. */
  readonly backupTime?: number | undefined
  readonly namespace?: string | undefined
  /** Created if missing; existing files of the same names are replaced. */
  readonly directory: string
  /** Image format. Default `raw`. */
  readonly format?: "raw" | "qcow2" | undefined
  /** The key of an encrypted snapshot (also verifies the manifest signature). */
  readonly crypt?: CryptConfig | undefined
  /** Chunk downloads in flight. Default 4. */
  readonly concurrency?: number | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface RestoredDisk {
  /** Config key: `scsi0`. */
  readonly virtdev: string
  /** `drive-scsi0.img.fidx`. */
  readonly archive: string
  readonly path: string
  readonly format: "raw" | "qcow2"
  /** Disk size in bytes. */
  readonly size: number
  readonly chunks: number
  readonly downloadedChunks: number
  readonly holeChunks: number
}

/**
 * @since 0.1.0
 * @category models
 */
export interface RestoredVm {
  readonly snapshot: Snapshot.SnapshotId
  /** `vm/100/2024-06-05T12:00:00Z`. */
  readonly snapshotPath: string
  /** The stored config text. */
  readonly config: string
  readonly configPath: string
  readonly firewallPath: string | undefined
  readonly disks: ReadonlyArray<RestoredDisk>
}

const io = (detail: string) => (cause: unknown) =>
  new PbsClientError({ reason: "Io", detail: `${detail}: ${cause instanceof Error ? cause.message : String(cause)}` })

const MAP_LINE = /^#qmdump#map:([^:]+):([^:]+):([^:]*):([^:]*):$/

/**
 * The `#qmdump#map` lines of a config: archive device name (`drive-scsi0`) → config key (`scsi0`).
 *
 * @since 0.1.0
 * @category parsing
 */
export const deviceMap = (config: string): ReadonlyMap<string, string> => {
  const map = new Map<string, string>()
  for (const line of config.split("\n")) {
    const m = MAP_LINE.exec(line.trim())
    if (m !== null) map.set(m[2]!, m[1]!)
  }
  return map
}

/**
 * The newest snapshot of a VM's group; `undefined` when it has none.
 *
 * @since 0.1.0
 * @category restore
 */
export const latestSnapshot = (
  client: PbsClientService,
  options: { readonly vmid: number | string; readonly namespace?: string | undefined }
): Effect.Effect<Snapshot.SnapshotId | undefined, PbsError> =>
  Effect.map(
    client.listSnapshots({
      backupType: "vm",
      backupId: String(options.vmid),
      ...(options.namespace !== undefined ? { ns: options.namespace } : {})
    }),
    (items) => {
      const newest = items.reduce<number | undefined>((max, item) =>
        max === undefined || item.backupTime > max ? item.backupTime : max, undefined)
      return newest === undefined ? undefined : {
        backupType: "vm",
        backupId: String(options.vmid),
        backupTime: newest,
        ns: options.namespace
      }
    }
  )

const qemuImgConvert = (source: string, target: string) =>
  Effect.async<void, PbsClientError>((resume) => {
    const child = execFile(
      "qemu-img",
      ["convert", "-f", "raw", "-O", "qcow2", source, target],
      (error, _stdout, stderr) => {
        if (error === null) resume(Effect.void)
        else resume(Effect.fail(io(`qemu-img convert to ${target}`)(new Error(String(stderr).trim() || error.message))))
      }
    )
    return Effect.sync(() => child.kill("SIGTERM"))
  })

/**
 * Restores a VM snapshot into `directory`.
 *
 * @since 0.1.0
 * @category restore
 */
export const restoreVm = (
  client: PbsClientService,
  options: RestoreVmOptions
): Effect.Effect<RestoredVm, PbsError> =>
  Effect.scoped(Effect.gen(function*() {
    const format = options.format ?? "raw"
    const backupTime = options.backupTime ?? (yield* latestSnapshot(client, options))?.backupTime
    if (backupTime === undefined) {
      return yield* new PbsClientError({ reason: "InvalidInput", detail: `no snapshot of VM ${options.vmid}` })
    }
    const reader = yield* PbsRestore.open(client, {
      backupId: String(options.vmid),
      backupTime,
      ns: options.namespace,
      crypt: options.crypt,
      ...(options.concurrency !== undefined ? { concurrency: options.concurrency } : {})
    })
    const dir = options.directory
    yield* Effect.tryPromise({
      try: () => fs.promises.mkdir(dir, { recursive: true }),
      catch: io(`cannot create ${dir}`)
    })
    const write = (file: string, text: string) =>
      Effect.tryPromise({ try: () => fs.promises.writeFile(file, text), catch: io(`cannot write ${file}`) })

    const config = (yield* reader.readBlob("qemu-server.conf.blob")).toString("utf8")
    const configPath = path.join(dir, "qemu-server.conf")
    yield* write(configPath, config)
    let firewallPath: string | undefined
    if (reader.manifest.files.some((f) => f.filename === "fw.conf.blob")) {
      firewallPath = path.join(dir, "fw.conf")
      yield* write(firewallPath, (yield* reader.readBlob("fw.conf.blob")).toString("utf8"))
    }

    const map = deviceMap(config)
    const disks: Array<RestoredDisk> = []
    for (const file of reader.manifest.files) {
      const m = /^(drive-.+)\.img\.fidx$/.exec(file.filename)
      if (m === null) continue
      const device = m[1]!
      const virtdev = map.get(device) ?? device.replace(/^drive-/, "")
      const target = path.join(dir, `${virtdev}.${format}`)
      const rawPath = format === "raw" ? target : path.join(dir, `.${virtdev}.raw.partial`)
      const image = yield* Effect.acquireUseRelease(
        Effect.void,
        () =>
          Effect.gen(function*() {
            const image = yield* reader.restoreImage(file.filename, rawPath)
            if (format === "qcow2") {
              yield* Effect.tryPromise({
                try: () => fs.promises.rm(target, { force: true }),
                catch: io(`cannot remove ${target}`)
              })
              yield* qemuImgConvert(rawPath, target)
            }
            return image
          }),
        () => format === "raw" ? Effect.void : Effect.promise(() => fs.promises.rm(rawPath, { force: true }))
      )
      disks.push({
        virtdev,
        archive: file.filename,
        path: target,
        format,
        size: image.size,
        chunks: image.chunks,
        downloadedChunks: image.downloadedChunks,
        holeChunks: image.holeChunks
      })
    }
    const snapshot = reader.snapshot
    return { snapshot, snapshotPath: Snapshot.snapshotPath(snapshot), config, configPath, firewallPath, disks }
  })).pipe(Effect.withSpan("PbsVmRestore.restoreVm", { attributes: { vmid: String(options.vmid) } }))
