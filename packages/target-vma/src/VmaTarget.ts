/**
 * The VMA target: archives in a dump directory with vzdump's file conventions.
 *
 * - name `vzdump-qemu-<vmid>-YYYY_MM_DD-HH_MM_SS.vma[.zst|.gz|.lzo]` (backup start, local time);
 * - written as the temp `.dat` name through the compressor (`zstd --threads=N`, `gzip --rsyncable` or
 *   `pigz`, `lzop`), renamed on success, removed on failure or interruption;
 * - the per-guest log `<basename>.log` beside it (written by the workflow);
 * - `archive file size: …` logged after the commit.
 *
 * @since 0.1.0
 */
import * as Config from "effect/Config"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Fs from "node:fs/promises"
import * as NodePath from "node:path"
import { BackupTarget, BackupTargetError } from "@vzdump/core/BackupTarget"
import type { ArchiveSession, BackupTargetService } from "@vzdump/core/BackupTarget"
import * as VzdumpLog from "@vzdump/core/VzdumpLog"
import * as VzdumpNames from "@vzdump/core/VzdumpNames"
import * as VmaCompression from "./VmaCompression.js"
import * as VmaOutput from "./VmaOutput.js"
import * as VmaWriter from "./VmaWriter.js"

/**
 * @since 0.1.0
 * @category models
 */
export interface VmaTargetOptions {
  /** The dump directory (vzdump's `dumpdir`). */
  readonly dumpdir: string
  /** vzdump's `compress`: `0` (default), `1`/`lzo`, `gzip`, `zstd`. */
  readonly compress?: "0" | "1" | "lzo" | "gzip" | "zstd" | undefined
  /** zstd threads (vzdump's `zstd` option; 0 = half of the CPUs). Default 1. */
  readonly zstd?: number | undefined
  /** pigz threads (vzdump's `pigz` option; 0 = use gzip). Default 0. */
  readonly pigz?: number | undefined
  /** IANA time zone of the archive name's time stamp; default the process's. */
  readonly timeZone?: string | undefined
}

const NAME = "vma"
const VMA_EXTENT_BYTES = 59 * 64 * 1024

const extensionOf = (compression: VmaCompression.Compression | undefined): VzdumpNames.CompressionExtension | undefined =>
  compression === undefined ? undefined : compression.format === "zstd" ? "zst" : compression.format === "gzip" ? "gz" : "lzo"

/**
 * Builds the target.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (options: VmaTargetOptions): BackupTargetService => {
  const compression = VmaCompression.fromVzdumpOption(options.compress ?? "0", {
    zstd: options.zstd ?? 1,
    pigz: options.pigz ?? 0
  })
  const fail = (reason: BackupTargetError["reason"]) => (error: { readonly message: string }) =>
    new BackupTargetError({ target: NAME, reason, detail: error.message })
  return {
    name: NAME,
    open: (request) =>
      Effect.gen(function*() {
        const names = VzdumpNames.backupNames({
          vmid: request.vmid,
          at: request.startTime,
          compression: extensionOf(compression),
          timeZone: options.timeZone
        })
        const archivePath = NodePath.join(options.dumpdir, names.archive)
        const tempPath = NodePath.join(options.dumpdir, names.temp)
        yield* Effect.tryPromise({
          try: () => Fs.mkdir(options.dumpdir, { recursive: true }),
          catch: (cause) =>
            new BackupTargetError({ target: NAME, reason: "Open", detail: `${options.dumpdir}: ${(cause as Error).message}` })
        })
        const output = yield* VmaOutput.file(archivePath, { compression, temporaryPath: tempPath }).pipe(
          Effect.mapError(fail("Open"))
        )
        const writer = yield* VmaWriter.make({
          output,
          configs: request.configs,
          devices: request.devices,
          ctime: request.startTime
        }).pipe(Effect.mapError(fail("Open")))
        const session: ArchiveSession = {
          openedLine: VzdumpLog.Messages.creatingVzdumpArchive(archivePath),
          logPath: NodePath.join(options.dumpdir, names.log),
          // the writer keeps views of the clusters of its unfinished extent (at most 58 × 64 KiB) until
          // the extent is complete and written out (no write-behind here: in the engine benchmark it
          // measured no faster and took more buffers)
          bufferRetention: VMA_EXTENT_BYTES,
          // the session's devices are indexes into the request; VMA device ids start at 1
          writeData: (device, offset, data) =>
            Effect.mapError(writer.writeData(device + 1, offset, data), fail("Write")),
          writeZeros: (device, offset, length) =>
            Effect.mapError(writer.writeZeros(device + 1, offset, length), fail("Write")),
          commit: Effect.gen(function*() {
            yield* Effect.mapError(writer.finish, fail("Commit"))
            const size = yield* Effect.tryPromise({
              try: () => Fs.stat(archivePath).then((stat) => stat.size),
              catch: (cause) =>
                new BackupTargetError({ target: NAME, reason: "Commit", detail: (cause as Error).message })
            })
            return { location: archivePath, size, logLines: [VzdumpLog.Messages.archiveFileSize(size)] }
          })
        }
        return session
      })
  }
}

/**
 * @since 0.1.0
 * @category layers
 */
export const layer = (options: VmaTargetOptions): Layer.Layer<BackupTarget> => Layer.succeed(BackupTarget, make(options))

/**
 * Reads `DUMPDIR`, `COMPRESS`, `ZSTD`, `PIGZ` (nested as the caller chooses, e.g. `Config.nested("VMA")`).
 *
 * @since 0.1.0
 * @category layers
 */
export const layerConfig = (config: Config.Config.Wrap<VmaTargetOptions>): Layer.Layer<BackupTarget, unknown> =>
  Layer.effect(BackupTarget, Effect.map(Config.unwrap(config), make))
