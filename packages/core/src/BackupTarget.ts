/**
 * Where an archive goes: one Tag, several Layers (`@vzdump/target-vma` writes VMA files in a dump
 * directory, `@vzdump/target-pbs` uploads to a Proxmox Backup Server, `layerMemory` keeps the data in
 * memory for tests and examples). The workflow and the engines depend only on this tag.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import type { ArchiveDestination } from "./ArchiveDestination.js"

/**
 * @since 0.1.0
 * @category errors
 */
export class BackupTargetError extends Schema.TaggedError<BackupTargetError>("@vzdump/core/BackupTargetError")(
  "BackupTargetError",
  {
    target: Schema.String,
    reason: Schema.Literal("Open", "Write", "Commit", "Invalid"),
    detail: Schema.String
  }
) {
  override get message(): string {
    return `${this.target}: ${this.detail}`
  }
}

/**
 * One disk of the archive. `name` is the QEMU device name stored in the archive (`drive-scsi0`).
 *
 * @since 0.1.0
 * @category models
 */
export interface ArchiveDevice {
  readonly name: string
  readonly size: number
}

/**
 * A config blob stored with the archive (`qemu-server.conf`, `qemu-server.fw`).
 *
 * @since 0.1.0
 * @category models
 */
export interface ArchiveConfig {
  readonly name: string
  readonly data: Uint8Array
}

/**
 * What an archive is opened for.
 *
 * @since 0.1.0
 * @category models
 */
export interface ArchiveRequest {
  readonly vmid: number
  /** The backup's start time: the archive's name and PBS backup-time derive from it. */
  readonly startTime: Date
  readonly configs: ReadonlyArray<ArchiveConfig>
  readonly devices: ReadonlyArray<ArchiveDevice>
}

/**
 * What a committed archive left behind.
 *
 * @since 0.1.0
 * @category models
 */
export interface ArchiveResult {
  /** Final location: a file path or a PBS snapshot path. */
  readonly location: string
  /** Size in bytes of the archive file, when the target has one. */
  readonly size?: number
  /** Lines for the backup log (`archive file size: …`). */
  readonly logLines: ReadonlyArray<string>
}

/**
 * What a target can build on when the engine tracks changes with dirty bitmaps: an archive whose
 * unchanged chunks are taken from an earlier archive (Proxmox Backup Server's `reuse-csum`).
 *
 * Bitmap names say which archive they describe the changes since (e.g.
 * `vzdump-<target id>-<backup time>`), so the engine can tell whether the bitmap it finds on a disk
 * belongs to the archive the target builds on. The engine:
 *
 * - uses `base[i]` for device `i` only when a bitmap of exactly that name exists, is consistent and
 *   recording; it then passes the chunks without dirty bits to `writeReused`;
 * - otherwise reads the whole device (and removes the target's stale bitmaps, those whose names
 *   start with `prefix`);
 * - at the point in time creates the bitmap `next` (persistent on qcow2), which from then on records
 *   the changes since this archive; after a failed backup it merges `next` back into `base[i]`, so
 *   the changes since the base archive stay recorded.
 *
 * @since 0.1.0
 * @category models
 */
export interface ArchiveIncremental {
  /** The target's chunk size (a power of two): `writeReused` takes whole chunks only. */
  readonly chunkSize: number
  /** The names of this target's bitmaps start with it. */
  readonly prefix: string
  /** The bitmap that is to record the changes after this archive's point in time. */
  readonly next: string
  /** Per device (an index into `ArchiveRequest.devices`): the bitmap of the base archive, if any. */
  readonly base: ReadonlyArray<string | undefined>
}

/**
 * An open archive. Device data arrives per device at 64 KiB-aligned offsets (the end of a device
 * may be unaligned), in any order (targets that need order say so, e.g. PBS: ascending offsets);
 * every byte of every device must be written exactly once, either as data, as zeros, or (with
 * `incremental`) as reused. Closing the session's scope without `commit` aborts it: nothing partial
 * is left where a finished archive would be.
 *
 * @since 0.1.0
 * @category models
 */
export interface ArchiveSession {
  /** The log line that names the archive (`creating vzdump archive '<path>'`). */
  readonly openedLine: string
  /** Where the per-guest log file goes (`<dumpdir>/<basename>.log`), when the target keeps one. */
  readonly logPath?: string
  /** `device` is an index into `ArchiveRequest.devices`. */
  readonly writeData: (device: number, offset: number, data: Uint8Array) => Effect.Effect<void, BackupTargetError>
  /** Marks a range as zero without data. */
  readonly writeZeros: (device: number, offset: number, length: number) => Effect.Effect<void, BackupTargetError>
  /** Finishes the archive and moves it to its final name. */
  readonly commit: Effect.Effect<ArchiveResult, BackupTargetError>
  /**
   * Where an engine that writes the archive itself (Proxmox's `backup` QMP command) puts it: a VMA
   * file path with its compressor, or a PBS repository. Absent for targets only our code writes to.
   */
  readonly destination?: ArchiveDestination | undefined
  /**
   * How many bytes of later writes (data, zeros or reused ranges) on this session must have returned
   * before it no longer reads a buffer passed to `writeData`. `0`: it copies or writes the data before
   * `writeData` returns. Absent: it may keep the buffer indefinitely, so the caller never reuses it.
   * The stock engine recycles its NBD read buffers only for sessions that say.
   */
  readonly bufferRetention?: number | undefined
  /** Set when the target can take unchanged chunks from a base archive (dirty-bitmap incrementals). */
  readonly incremental?: ArchiveIncremental | undefined
  /**
   * With `incremental`: whole chunks (offset and length multiples of `incremental.chunkSize`, the
   * last chunk of a device may be short) unchanged since the base archive of this device.
   */
  readonly writeReused?:
    | ((device: number, offset: number, length: number) => Effect.Effect<void, BackupTargetError>)
    | undefined
  /** Bytes written so far that the target did not have to store anew (Proxmox's `reused` counter). */
  readonly reused?: Effect.Effect<number> | undefined
  /**
   * Finishes the archive's content after the last write (PBS: closes the indexes, uploads the
   * manifest, the server's finish); engines run it as the last step of the job, while reporting
   * `finishing`, so a job that ends successfully has a complete archive. `commit` runs it if the
   * engine did not.
   */
  readonly complete?: Effect.Effect<void, BackupTargetError> | undefined
  /**
   * Stores the per-guest log (the log file's text) with the archive after a successful backup, for
   * targets without a log file beside the archive (PBS: `client.log.blob`). Called after the
   * session's scope has closed.
   */
  readonly uploadLog?: ((log: string) => Effect.Effect<void, BackupTargetError>) | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface BackupTargetService {
  readonly name: string
  readonly open: (request: ArchiveRequest) => Effect.Effect<ArchiveSession, BackupTargetError, Scope.Scope>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class BackupTarget extends Context.Tag("@vzdump/core/BackupTarget")<BackupTarget, BackupTargetService>() {}

/**
 * A committed in-memory archive.
 *
 * @since 0.1.0
 * @category models
 */
export interface MemoryArchive {
  readonly request: ArchiveRequest
  /** One buffer per device, with the written content (zeros where zeros were written). */
  readonly disks: ReadonlyArray<Uint8Array>
}

/**
 * The archives `layerMemory` committed, in order.
 *
 * @since 0.1.0
 * @category tags
 */
export class MemoryStore extends Context.Tag("@vzdump/core/BackupTarget/MemoryStore")<
  MemoryStore,
  Array<MemoryArchive>
>() {}

const memoryTarget = (store: Array<MemoryArchive>): BackupTargetService => {
  const name = "memory"
  const fail = (reason: BackupTargetError["reason"], detail: string) =>
    Effect.fail(new BackupTargetError({ target: name, reason, detail }))
  return {
    name,
    open: (request) =>
      Effect.sync(() => {
        const disks = request.devices.map((device) => new Uint8Array(device.size))
        const written = request.devices.map(() => 0)
        const check = (device: number, offset: number, length: number) => {
          const disk = disks[device]
          if (disk === undefined) return fail("Invalid", `no device ${device}`)
          if (offset < 0 || offset + length > disk.length) {
            return fail("Invalid", `write past the end of device ${device}: ${offset}+${length}`)
          }
          written[device]! += length
          return Effect.succeed(disk)
        }
        return {
          openedLine: `creating in-memory archive for VM ${request.vmid}`,
          bufferRetention: 0,
          writeData: (device, offset, data) =>
            Effect.map(check(device, offset, data.length), (disk) => disk.set(data, offset)),
          writeZeros: (device, offset, length) =>
            Effect.map(check(device, offset, length), (disk) => disk.fill(0, offset, offset + length)),
          commit: Effect.suspend(() => {
            const incomplete = request.devices.findIndex((device, i) => written[i] !== device.size)
            if (incomplete >= 0) {
              return fail("Commit", `device ${incomplete}: ${written[incomplete]} of ${request.devices[incomplete]!.size} bytes written`)
            }
            store.push({ request, disks })
            return Effect.succeed({ location: `memory:${store.length - 1}`, logLines: [] })
          })
        } satisfies ArchiveSession
      })
  }
}

/**
 * A target that keeps committed archives in memory, readable through `MemoryStore`.
 *
 * @since 0.1.0
 * @category layers
 */
export const layerMemory: Layer.Layer<BackupTarget | MemoryStore> = Layer.effectContext(Effect.sync(() => {
  const store: Array<MemoryArchive> = []
  return Context.make(BackupTarget, memoryTarget(store)).pipe(Context.add(MemoryStore, store))
}))

/**
 * Follows the buffers given to a session's `writeData` until the session no longer reads them (its
 * `bufferRetention`): report every write in order, with the buffer when it carried data, and get back
 * the buffers that may be reused now. The stock engine recycles its NBD read buffers with it.
 *
 * @since 0.1.0
 * @category utils
 */
export class RetainedBuffers<A> {
  private readonly held: Array<{ readonly buffer: A; after: number }> = []

  constructor(readonly retention: number) {}

  /** After a write of `length` bytes (data from `buffer`, or zeros or reused ranges without one). */
  written(length: number, buffer?: A): Array<A> {
    for (const entry of this.held) entry.after += length
    if (buffer !== undefined) this.held.push({ buffer, after: 0 })
    const free: Array<A> = []
    while (this.held.length > 0 && this.held[0]!.after >= this.retention) free.push(this.held.shift()!.buffer)
    return free
  }
}

/**
 * Writes a device image through a session as the stock engine does, for testing targets: pieces of
 * `pieceSize` bytes, all-zero pieces as `writeZeros`, data pieces from a small pool of buffers reused as
 * soon as `bufferRetention` allows, and scribbled over (`0xee`) when they go back to the pool, so a
 * target that reads a buffer later than it declared stores wrong bytes.
 *
 * @since 0.1.0
 * @category utils
 */
export const writeImage = (
  session: ArchiveSession,
  device: number,
  image: Uint8Array,
  pieceSize: number
): Effect.Effect<{ readonly allocated: number; readonly reused: number }, BackupTargetError> =>
  Effect.gen(function*() {
    if (session.bufferRetention === undefined) {
      return yield* new BackupTargetError({
        target: "writeImage",
        reason: "Invalid",
        detail: "the session does not declare a bufferRetention"
      })
    }
    const retained = new RetainedBuffers<Uint8Array>(session.bufferRetention)
    const pool: Array<Uint8Array> = []
    let allocated = 0
    let reused = 0
    for (let offset = 0; offset < image.length; offset += pieceSize) {
      const piece = image.subarray(offset, Math.min(image.length, offset + pieceSize))
      let buffer: Uint8Array | undefined
      if (piece.every((b) => b === 0)) yield* session.writeZeros(device, offset, piece.length)
      else {
        buffer = pool.pop()
        if (buffer === undefined) allocated++
        else reused++
        buffer ??= new Uint8Array(pieceSize)
        buffer.set(piece)
        yield* session.writeData(device, offset, buffer.subarray(0, piece.length))
      }
      for (const free of retained.written(piece.length, buffer)) pool.push(free.fill(0xee))
    }
    return { allocated, reused }
  })
