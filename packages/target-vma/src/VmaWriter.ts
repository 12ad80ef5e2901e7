/**
 * Streaming VMA writer, byte-compatible with Proxmox's (QEMU's) writer.
 *
 * Configs and devices are declared up front; clusters may then arrive in any order (as copy-before-write
 * produces them). Each 4 KiB block is stored only if non-zero; an all-zero cluster becomes a mask-0 entry
 * without data (`writeZeros` never materialises zeros), the last partial block is zero-padded, and extents
 * hold 58 clusters like QEMU's. `finish` fails if any cluster of any device was never written, so nothing is
 * lost silently; a second write of a cluster is rejected.
 *
 * Memory is bounded by one extent (≤ 3.8 MB) of pending block slices: every write waits until the extents
 * it completed have been accepted by the {@link VmaOutput}. The writer keeps references to the `data`
 * buffers passed in until their extent is written, so callers must not modify them afterwards. With
 * `writeBehind`, one more write may be in flight when a call returns (see {@link VmaWriterOptions}).
 *
 * @since 0.1.0
 */
import { randomUUID } from "node:crypto"
import * as Clock from "effect/Clock"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Sink from "effect/Sink"
import * as Stream from "effect/Stream"
import { Encoder } from "./internal/encoder.js"
import * as F from "./internal/format.js"
import { VmaWriterError } from "./VmaError.js"
import type { VmaOutput, VmaOutputError } from "./VmaOutput.js"

/**
 * A configuration file stored in the archive header (at most 65 535 bytes). Only the base name of `name`
 * is kept, as QEMU does.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaConfigInput {
  readonly name: string
  readonly data: Uint8Array | string
}

/**
 * A device (disk) to declare: its name, e.g. `drive-scsi0`, and its size in bytes.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaDeviceInput {
  readonly name: string
  readonly size: number
}

/**
 * What the writer needs to know before any data.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaArchiveOptions {
  /** Configs in header order, typically `qemu-server.conf` and optionally `qemu-server.fw`. */
  readonly configs?: ReadonlyArray<VmaConfigInput> | undefined
  /** Up to 254 devices; they get ids 1, 2, … in this order. */
  readonly devices?: ReadonlyArray<VmaDeviceInput> | undefined
  /** Archive UUID (default: a random v4 UUID). */
  readonly uuid?: string | Uint8Array | undefined
  /** Creation time, seconds since the epoch or a Date (default: now). */
  readonly ctime?: number | Date | undefined
  /** Clusters per extent, 1..59 (default 58, as QEMU writes). */
  readonly clustersPerExtent?: number | undefined
}

/**
 * Options of {@link make} and {@link sink}.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaWriterOptions extends VmaArchiveOptions {
  readonly output: VmaOutput
  /**
   * Let output writes run behind the caller (default false, `true` is 1): a write call returns once the
   * output has accepted the write `writeBehind` calls before it, so the output never waits for the caller.
   * On an output whose writes may run at the same time ({@link VmaOutput.begin}: an uncompressed file) up
   * to `writeBehind` writes run at once, so the file is written without pauses; other outputs (pipes,
   * compressors) take one write at a time, the next starting as soon as the previous one finishes. In
   * exchange the caller may reuse a `data` buffer only after `writeBehind` more write calls have returned
   * (the CLI's ring of read buffers allows for it). A failed write fails a later call or `finish`.
   */
  readonly writeBehind?: boolean | number | undefined
}

/**
 * A declared device.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaDevice {
  readonly id: number
  readonly name: string
  readonly size: number
  /** Number of 64 KiB clusters, `ceil(size / 65536)`. */
  readonly clusters: number
}

/**
 * Per-device progress, counted like QEMU's writer: `transferred` reaches `size` when complete; `zeroBytes`
 * counts zero 4 KiB blocks (and whole zero clusters) that were not stored.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaDeviceStats extends VmaDevice {
  readonly written: number
  readonly transferred: number
  readonly zeroBytes: number
}

/**
 * Writer progress and totals.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaWriterStats {
  readonly uuid: string
  readonly ctime: number
  readonly headerSize: number
  /** Archive bytes produced (before compression). */
  readonly bytes: number
  readonly extents: number
  readonly devices: ReadonlyArray<VmaDeviceStats>
}

/**
 * One write operation, for the Sink and Stream variants.
 *
 * @since 0.1.0
 * @category models
 */
export type VmaWrite =
  | { readonly _tag: "Data"; readonly device: number; readonly offset: number; readonly data: Uint8Array }
  | { readonly _tag: "Zeros"; readonly device: number; readonly offset: number; readonly length: number }
  | { readonly _tag: "Cluster"; readonly device: number; readonly cluster: number; readonly data: Uint8Array | null }

/**
 * Data at a cluster-aligned offset; its length is a multiple of 64 KiB unless it ends at the device end.
 *
 * @since 0.1.0
 * @category constructors
 */
export const data = (device: number, offset: number, data: Uint8Array): VmaWrite => ({
  _tag: "Data",
  device,
  offset,
  data
})

/**
 * A cluster-aligned range that reads as zeros (a hole): recorded without reading or allocating data.
 *
 * @since 0.1.0
 * @category constructors
 */
export const zeros = (device: number, offset: number, length: number): VmaWrite => ({
  _tag: "Zeros",
  device,
  offset,
  length
})

/**
 * One cluster by number: 64 KiB of data (the last cluster may be shorter), or `null` if all zero.
 *
 * @since 0.1.0
 * @category constructors
 */
export const cluster = (device: number, cluster: number, data: Uint8Array | null): VmaWrite => ({
  _tag: "Cluster",
  device,
  cluster,
  data
})

/**
 * A writer bound to an output.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaWriter {
  readonly uuid: string
  readonly ctime: number
  readonly devices: ReadonlyArray<VmaDevice>
  /** Data at a cluster-aligned offset (see {@link data}). */
  readonly writeData: (
    device: number,
    offset: number,
    data: Uint8Array
  ) => Effect.Effect<void, VmaWriterError | VmaOutputError>
  /** A hole: mask-0 entries for every cluster of the cluster-aligned range. */
  readonly writeZeros: (
    device: number,
    offset: number,
    length: number
  ) => Effect.Effect<void, VmaWriterError | VmaOutputError>
  /** One cluster, `null` when all zero. */
  readonly writeCluster: (
    device: number,
    cluster: number,
    data: Uint8Array | null
  ) => Effect.Effect<void, VmaWriterError | VmaOutputError>
  readonly write: (op: VmaWrite) => Effect.Effect<void, VmaWriterError | VmaOutputError>
  readonly stats: Effect.Effect<VmaWriterStats>
  /**
   * Fails with `MissingCluster` if a cluster was never written (the writer stays usable to fill it);
   * otherwise writes the last extent and closes the output (a compressor's exit status is checked).
   */
  readonly finish: Effect.Effect<VmaWriterStats, VmaWriterError | VmaOutputError>
}

const textEncoder = new TextEncoder()

const makeEncoder = (options: VmaArchiveOptions): Effect.Effect<Encoder, VmaWriterError> =>
  Effect.gen(function*() {
    const uuid = options.uuid === undefined
      ? F.uuidFromString(randomUUID())
      : typeof options.uuid === "string"
      ? F.uuidFromString(options.uuid)
      : options.uuid
    if (uuid === undefined || uuid.length !== 16) {
      return yield* Effect.fail(new VmaWriterError({ reason: "InvalidUuid", detail: `invalid uuid ${options.uuid}` }))
    }
    const ctime = options.ctime === undefined
      ? Math.floor((yield* Clock.currentTimeMillis) / 1000)
      : options.ctime instanceof Date
      ? Math.floor(options.ctime.getTime() / 1000)
      : Math.trunc(options.ctime)
    const encoder = Encoder.make({
      uuid,
      ctime,
      configs: (options.configs ?? []).map((c) => ({
        name: c.name,
        data: typeof c.data === "string" ? textEncoder.encode(c.data) : c.data
      })),
      devices: options.devices ?? [],
      clustersPerExtent: options.clustersPerExtent ?? F.QEMU_CLUSTERS_PER_EXTENT
    })
    if (encoder instanceof VmaWriterError) return yield* Effect.fail(encoder)
    return encoder
  })

const statsOf = (encoder: Encoder): VmaWriterStats => ({
  uuid: F.uuidToString(encoder.uuid),
  ctime: encoder.ctime,
  headerSize: encoder.headerSize,
  bytes: encoder.bytesOut,
  extents: encoder.extents,
  devices: encoder.devices.map((d) => ({
    id: d.id,
    name: d.name,
    size: d.size,
    clusters: d.clusters,
    written: d.bitmap.count,
    transferred: d.transferred,
    zeroBytes: d.zeroBytes
  }))
})

const apply = (encoder: Encoder, op: VmaWrite): Array<Uint8Array> | VmaWriterError => {
  switch (op._tag) {
    case "Data":
      return encoder.data(op.device, op.offset, op.data)
    case "Zeros":
      return encoder.zeros(op.device, op.offset, op.length)
    case "Cluster":
      return encoder.cluster(op.device, op.cluster, op.data)
  }
}

/**
 * Creates a writer on an output. Nothing is written before the first extent is complete (the header goes
 * out with it). Calls are serialised, so several fibers may write concurrently.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = (options: VmaWriterOptions): Effect.Effect<VmaWriter, VmaWriterError> =>
  Effect.gen(function*() {
    const encoder = yield* makeEncoder(options)
    const output = options.output
    const lock = yield* Effect.makeSemaphore(1)
    const depth = options.writeBehind === true ? 1 : options.writeBehind === false ? 0 : options.writeBehind ?? 0
    if (!Number.isSafeInteger(depth) || depth < 0) {
      return yield* new VmaWriterError({
        reason: "InvalidOption",
        detail: `writeBehind must be a boolean or a count of writes, got ${options.writeBehind}`
      })
    }
    const writeBehind = depth > 0
    // overlapping writes: the completions of the started writes not awaited yet, oldest first
    const overlapping = writeBehind && output.begin !== undefined ? output.begin : undefined
    const started: Array<Effect.Effect<void, VmaOutputError>> = []
    let broken: VmaOutputError | undefined
    // With write-behind: the last write started, which the next one waits for before it starts.
    let behind: Fiber.Fiber<void, VmaOutputError> | undefined
    const markBroken = (e: VmaOutputError) =>
      Effect.sync(() => {
        broken ??= e
      })
    const settle = Effect.suspend((): Effect.Effect<void, VmaOutputError> => {
      if (started.length > 0) return Effect.zipRight(Effect.all(started.splice(0), { discard: true }), settle)
      const last = behind
      behind = undefined
      if (last !== undefined) return Effect.tapError(Fiber.join(last), markBroken)
      return broken === undefined ? Effect.void : Effect.fail(broken)
    })
    const run = (f: () => Array<Uint8Array> | VmaWriterError): Effect.Effect<void, VmaWriterError | VmaOutputError> =>
      lock.withPermits(1)(Effect.suspend((): Effect.Effect<void, VmaWriterError | VmaOutputError> => {
        if (broken !== undefined) return Effect.fail(broken)
        const out = f()
        if (out instanceof VmaWriterError) return Effect.fail(out)
        if (out.length === 0) return Effect.void
        if (!writeBehind) return Effect.tapError(output.write(out), markBroken)
        if (overlapping !== undefined) {
          return Effect.flatMap(overlapping(out), (done) => {
            started.push(Effect.tapError(done, markBroken))
            return started.length > depth ? started.shift()! : Effect.void
          })
        }
        const previous = behind
        const next = previous === undefined
          ? output.write(out)
          : Effect.zipRight(Fiber.join(previous), output.write(out))
        return Effect.flatMap(Effect.forkDaemon(Effect.tapError(next, markBroken)), (fiber) => {
          behind = fiber
          if (previous === undefined) return Effect.void
          return Effect.zipRight(
            Fiber.await(previous),
            Effect.suspend(() => broken === undefined ? Effect.void : Effect.fail(broken))
          )
        })
      }))
    const write = (op: VmaWrite) => run(() => apply(encoder, op))
    return {
      uuid: F.uuidToString(encoder.uuid),
      ctime: encoder.ctime,
      devices: encoder.devices.map((d) => ({ id: d.id, name: d.name, size: d.size, clusters: d.clusters })),
      writeData: (device, offset, bytes) => run(() => encoder.data(device, offset, bytes)),
      writeZeros: (device, offset, length) => run(() => encoder.zeros(device, offset, length)),
      writeCluster: (device, n, bytes) => run(() => encoder.cluster(device, n, bytes)),
      write,
      stats: Effect.sync(() => statsOf(encoder)),
      finish: Effect.zipRight(
        run(() => encoder.finish()),
        lock.withPermits(1)(Effect.zipRight(settle, output.close))
      ).pipe(Effect.map(() => statsOf(encoder)))
    } satisfies VmaWriter
  })

/**
 * A Sink that writes every {@link VmaWrite} it receives and finishes the archive when the stream ends.
 *
 * @since 0.1.0
 * @category constructors
 */
export const sink = (
  options: VmaWriterOptions
): Sink.Sink<VmaWriterStats, VmaWrite, never, VmaWriterError | VmaOutputError> =>
  Sink.unwrap(Effect.map(make(options), (writer) =>
    Sink.forEach((op: VmaWrite) => writer.write(op)).pipe(Sink.mapEffect(() => writer.finish))))

/**
 * Encodes a stream of writes into the archive's bytes (header, then extents; the last extent when the
 * input ends). Fails with `MissingCluster` if the input ends before every cluster was written.
 *
 * @since 0.1.0
 * @category constructors
 */
export const encode = <E, R>(
  ops: Stream.Stream<VmaWrite, E, R>,
  options: VmaArchiveOptions
): Stream.Stream<Uint8Array, E | VmaWriterError, R> =>
  Stream.unwrap(Effect.map(makeEncoder(options), (encoder) => {
    const step = (out: Array<Uint8Array> | VmaWriterError) =>
      out instanceof VmaWriterError ? Effect.fail(out) : Effect.succeed(out)
    return ops.pipe(
      Stream.mapConcatEffect((op) => Effect.suspend(() => step(apply(encoder, op)))),
      Stream.concat(Stream.fromIterableEffect(Effect.suspend(() => step(encoder.finish()))))
    )
  }))
