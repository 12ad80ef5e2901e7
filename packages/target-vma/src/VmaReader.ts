/**
 * Streaming VMA reader: validates everything Proxmox's restore path checks, plus more, and extracts disks
 * into sparse raw files.
 *
 * `open` reads and checks the main header (magic, size, MD5, version, blob buffer, blob pointers,
 * NUL-terminated names, device entries). The archive's `extents` stream then checks every extent (magic,
 * reserved field, MD5, UUID, truncation, `block_count` against the masks) and every slot (device id,
 * cluster range, duplicates, blocks past the device end), and at the end of the stream that every cluster
 * of every device was seen — which Proxmox's `vma verify` does not check. Each violation is its own error
 * class from {@link VmaFormatError}, carrying the offset, device and cluster.
 *
 * @since 0.1.0
 */
import * as path from "node:path"
import { constants } from "node:fs"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Option from "effect/Option"
import * as Stream from "effect/Stream"
import { ClusterBitmap } from "./internal/bitmap.js"
import * as F from "./internal/format.js"
import * as io from "./internal/io.js"
import * as Err from "./VmaError.js"
import type { VmaFormatError, VmaIoError } from "./VmaError.js"
import type { VmaInput } from "./VmaInput.js"
import type { VmaDevice } from "./VmaWriter.js"

/**
 * A configuration file from the header.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaConfig {
  readonly name: string
  readonly data: Uint8Array
}

/**
 * The decoded main header.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaHeader {
  readonly uuid: string
  /** Seconds since the epoch. */
  readonly ctime: number
  readonly headerSize: number
  readonly configs: ReadonlyArray<VmaConfig>
  /** Devices in id order. */
  readonly devices: ReadonlyArray<VmaDevice>
}

/**
 * One cluster entry of an extent. `data` holds the stored blocks back to back (4 KiB per set mask bit,
 * bit 0 first); unset bits are zeros.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaCluster {
  readonly device: number
  readonly cluster: number
  readonly mask: number
  readonly data: Uint8Array
}

/**
 * A validated extent.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaExtent {
  /** Offset of the extent header in the (uncompressed) archive. */
  readonly offset: number
  readonly clusters: ReadonlyArray<VmaCluster>
}

/**
 * Reading statistics, counted as Proxmox's reader counts them (`zeroBytes` and `partialZeroBytes` in
 * 512-byte sectors up to the device end).
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaReadStats {
  /** Archive bytes read (uncompressed). */
  readonly bytes: number
  readonly extents: number
  /** Cluster entries read. */
  readonly clusters: number
  /** Σ floor(size / 64 KiB) over the devices: the denominator of Proxmox's progress percentage. */
  readonly clusterTotal: number
  /** Bytes of zero blocks not stored. */
  readonly zeroBytes: number
  /** Bytes of zero blocks inside clusters that also store data. */
  readonly partialZeroBytes: number
}

/**
 * An archive whose header has been read. `extents` can be consumed once.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaArchive<E> {
  readonly name: string
  readonly header: VmaHeader
  /** The validated extents; fails with `VmaMissingCluster` at the end if a cluster never appeared. */
  readonly extents: Stream.Stream<VmaExtent, VmaFormatError | E>
  /** A snapshot of the statistics so far. */
  readonly stats: Effect.Effect<VmaReadStats>
}

interface DeviceState {
  readonly device: VmaDevice
  readonly bitmap: ClusterBitmap
  /** floor(size / 512), Proxmox's sector bound. */
  readonly maxSector: number
}

/**
 * Reads and validates the main header.
 *
 * @since 0.1.0
 * @category constructors
 */
export const open = <E>(input: VmaInput<E>): Effect.Effect<VmaArchive<E>, VmaFormatError | E> =>
  Effect.gen(function*() {
    const prefix = yield* input.read(F.HEADER_FIXED_SIZE)
    const headerSize = F.checkHeaderPrefix(prefix)
    if (typeof headerSize !== "number") return yield* Effect.fail(headerSize)
    const rest = yield* input.read(headerSize - F.HEADER_FIXED_SIZE)
    if (rest.length < headerSize - F.HEADER_FIXED_SIZE) {
      return yield* Effect.fail(
        new Err.VmaHeaderTruncated({ expected: headerSize, actual: F.HEADER_FIXED_SIZE + rest.length })
      )
    }
    const full = new Uint8Array(headerSize)
    full.set(prefix, 0)
    full.set(rest, F.HEADER_FIXED_SIZE)
    const decoded = F.decodeHeader(full)
    if (!("uuid" in decoded)) return yield* Effect.fail(decoded)
    const header: VmaHeader = {
      uuid: F.uuidToString(decoded.uuid),
      ctime: decoded.ctime,
      headerSize,
      configs: decoded.configs,
      devices: decoded.devices.map((d) => ({ ...d, clusters: F.clusterCount(d.size) }))
    }
    const devices = new Map<number, DeviceState>()
    let clusterTotal = 0
    for (const device of header.devices) {
      devices.set(device.id, {
        device,
        bitmap: new ClusterBitmap(device.clusters),
        maxSector: Math.floor(device.size / 512)
      })
      clusterTotal += Math.floor(device.size / F.CLUSTER_SIZE)
    }
    const stats = { bytes: headerSize, extents: 0, clusters: 0, clusterTotal, zeroBytes: 0, partialZeroBytes: 0 }
    const uuid = decoded.uuid
    let ended = false

    const countZeros = (state: DeviceState, cluster: number, mask: number) => {
      if (mask === 0xffff) return
      for (let j = 0; j < F.BLOCKS_PER_CLUSTER; j++) {
        if ((mask & (1 << j)) !== 0) continue
        const sector = (cluster * F.CLUSTER_SIZE + j * F.BLOCK_SIZE) / 512
        const end = Math.min(sector + 8, state.maxSector)
        if (end > sector) {
          stats.zeroBytes += (end - sector) * 512
          if (mask !== 0) stats.partialZeroBytes += (end - sector) * 512
        }
      }
    }

    const atEnd = Effect.suspend(() => {
      ended = true
      for (const state of devices.values()) {
        if (!state.bitmap.complete) {
          return Effect.fail(
            new Err.VmaMissingCluster({
              offset: stats.bytes,
              devId: state.device.id,
              device: state.device.name,
              cluster: state.bitmap.firstMissing(),
              missing: state.bitmap.clusters - state.bitmap.count
            })
          )
        }
      }
      return Effect.void
    })

    const head = new Uint8Array(F.EXTENT_HEADER_SIZE)
    const readExtent = (buffer: Uint8Array | undefined): Effect.Effect<Option.Option<VmaExtent>, VmaFormatError | E> =>
      Effect.gen(function*() {
        if (ended) return Option.none()
        const offset = stats.bytes
        const headLength = yield* input.readInto(head)
        stats.bytes += headLength
        if (headLength === 0) {
          yield* atEnd
          return Option.none()
        }
        if (headLength < F.EXTENT_HEADER_SIZE) {
          return yield* Effect.fail(
            new Err.VmaTruncatedExtent({ offset, expected: F.EXTENT_HEADER_SIZE, actual: headLength })
          )
        }
        const parsed = F.parseExtentHeader(head, uuid, offset)
        if (!("slots" in parsed)) return yield* Effect.fail(parsed)
        if (parsed.maskBlocks !== parsed.blockCount) {
          return yield* Effect.fail(
            new Err.VmaBlockCountMismatch({ offset, blockCount: parsed.blockCount, maskBlocks: parsed.maskBlocks })
          )
        }
        const dataLength = parsed.blockCount * F.BLOCK_SIZE
        const data = dataLength === 0
          ? new Uint8Array(0)
          : buffer === undefined
          ? yield* input.read(dataLength)
          : buffer.subarray(0, yield* input.readInto(buffer.subarray(0, dataLength)))
        stats.bytes += data.length
        if (data.length < dataLength) {
          return yield* Effect.fail(
            new Err.VmaTruncatedExtent({
              offset,
              expected: F.EXTENT_HEADER_SIZE + dataLength,
              actual: F.EXTENT_HEADER_SIZE + data.length
            })
          )
        }
        const clusters: Array<VmaCluster> = []
        let at = 0
        for (const slot of parsed.slots) {
          const state = devices.get(slot.devId)
          if (state === undefined) {
            return yield* Effect.fail(
              new Err.VmaUnknownDevice({ offset, slot: slot.slot, devId: slot.devId, cluster: slot.cluster })
            )
          }
          const dev = state.device
          if (slot.cluster >= dev.clusters) {
            return yield* Effect.fail(
              new Err.VmaClusterOutOfRange({
                offset,
                devId: dev.id,
                device: dev.name,
                cluster: slot.cluster,
                clusterCount: dev.clusters
              })
            )
          }
          if (!state.bitmap.set(slot.cluster)) {
            return yield* Effect.fail(
              new Err.VmaDuplicateCluster({ offset, devId: dev.id, device: dev.name, cluster: slot.cluster })
            )
          }
          const base = slot.cluster * F.CLUSTER_SIZE
          if (base + F.CLUSTER_SIZE > dev.size) {
            for (let j = 0; j < F.BLOCKS_PER_CLUSTER; j++) {
              if ((slot.mask & (1 << j)) !== 0 && base + j * F.BLOCK_SIZE >= dev.size) {
                return yield* Effect.fail(
                  new Err.VmaWriteBeyondEnd({
                    offset,
                    devId: dev.id,
                    device: dev.name,
                    cluster: slot.cluster,
                    block: j
                  })
                )
              }
            }
          }
          const length = F.popcount16(slot.mask) * F.BLOCK_SIZE
          const blocks = data.subarray(at, at + length)
          clusters.push({ device: dev.id, cluster: slot.cluster, mask: slot.mask, data: blocks })
          at += length
          stats.clusters++
          countZeros(state, slot.cluster, slot.mask)
        }
        stats.extents++
        return Option.some({ offset, clusters })
      })

    const archive: VmaArchive<E> = {
      name: input.name,
      header,
      extents: Stream.repeatEffectOption(
        Effect.flatMap(Effect.mapError(readExtent(undefined), Option.some), Option.match({
          onNone: () => Effect.fail(Option.none()),
          onSome: Effect.succeed
        }))
      ),
      stats: Effect.sync(() => ({ ...stats }))
    }
    internals.set(archive, { readExtent })
    return archive
  })

/** Reads the next extent into `buffer` (reused by verify/extract) or a fresh one. */
type ReadExtent = (buffer: Uint8Array | undefined) => Effect.Effect<Option.Option<VmaExtent>, unknown>

const internals = new WeakMap<VmaArchive<any>, { readonly readExtent: ReadExtent }>()

/** Largest extent data: 59 clusters of 16 blocks. */
const MAX_EXTENT_DATA = F.SLOTS_PER_EXTENT * F.CLUSTER_SIZE

const readerOf = <E>(archive: VmaArchive<E>) =>
  internals.get(archive)!.readExtent as (
    buffer: Uint8Array | undefined
  ) => Effect.Effect<Option.Option<VmaExtent>, VmaFormatError | E>

/**
 * Options of {@link verify}.
 *
 * @since 0.1.0
 * @category models
 */
export interface VerifyOptions<R = never> {
  /** Called after each extent (for progress output). */
  readonly onExtent?: ((extent: VmaExtent, stats: VmaReadStats) => Effect.Effect<void, never, R>) | undefined
}

/**
 * Reads the whole archive with all checks, including completeness.
 *
 * @since 0.1.0
 * @category operations
 */
export const verify = <E, R = never>(
  archive: VmaArchive<E>,
  options: VerifyOptions<R> = {}
): Effect.Effect<VmaReadStats, VmaFormatError | E, R> =>
  Effect.gen(function*() {
    const readExtent = readerOf(archive)
    const buffer = Buffer.allocUnsafe(MAX_EXTENT_DATA)
    while (true) {
      const extent = yield* readExtent(buffer)
      if (Option.isNone(extent)) break
      if (options.onExtent !== undefined) yield* options.onExtent(extent.value, yield* archive.stats)
    }
    return yield* archive.stats
  })

/**
 * Options of {@link extract}.
 *
 * @since 0.1.0
 * @category models
 */
export interface ExtractOptions<R = never> {
  /** Directory to create; it must not exist. */
  readonly directory: string
  /** Device names to extract (default: all). Other devices are still validated. */
  readonly devices?: ReadonlyArray<string> | undefined
  /** Called when a device's temporary file has been created (`vma extract` prints `DEVINFO`). */
  readonly onDevice?: ((device: VmaDevice, path: string) => Effect.Effect<void, never, R>) | undefined
  /** Called after each extent has been written. */
  readonly onExtent?: ((extent: VmaExtent, stats: VmaReadStats) => Effect.Effect<void, never, R>) | undefined
}

/**
 * What {@link extract} wrote.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaExtractResult {
  readonly stats: VmaReadStats
  readonly configs: ReadonlyArray<string>
  readonly disks: ReadonlyArray<{ readonly device: VmaDevice; readonly path: string }>
}

const safeName = (name: string) =>
  name.length > 0 && name !== "." && name !== ".." && !name.includes("/") && !name.includes("\0")

interface Target {
  readonly device: VmaDevice
  readonly fd: number
  readonly temporary: string
  readonly final: string
}

const MAX_RUN_PARTS = 1000
const MAX_RUN_BYTES = 16 * 1024 * 1024

/** Positioned, vectored writes of the stored blocks of one extent; adjacent blocks are merged. */
const writeExtent = (extent: VmaExtent, targets: ReadonlyMap<number, Target>): Effect.Effect<void, VmaIoError> =>
  Effect.suspend(() => {
    const writes: Array<Effect.Effect<void, VmaIoError>> = []
    let run: { target: Target; position: number; end: number; parts: Array<Uint8Array> } | undefined
    const flush = () => {
      if (run !== undefined) {
        const { parts, position, target } = run
        writes.push(io.writeAll(target.fd, parts, position, target.temporary))
        run = undefined
      }
    }
    const append = (target: Target, position: number, bytes: Uint8Array) => {
      if (run !== undefined && (run.target !== target || run.end !== position)) flush()
      if (run === undefined) {
        run = { target, position, end: position, parts: [] }
      }
      const parts = run.parts
      const last = parts[parts.length - 1]
      const adjacent = last !== undefined && last.buffer === bytes.buffer &&
        last.byteOffset + last.byteLength === bytes.byteOffset
      if (adjacent) {
        parts[parts.length - 1] = new Uint8Array(last.buffer, last.byteOffset, last.byteLength + bytes.byteLength)
      } else {
        parts.push(bytes)
      }
      run.end += bytes.byteLength
      if (parts.length >= MAX_RUN_PARTS || run.end - run.position >= MAX_RUN_BYTES) flush()
    }
    for (const c of extent.clusters) {
      const target = targets.get(c.device)
      if (target === undefined || c.mask === 0) continue
      const size = target.device.size
      const base = c.cluster * F.CLUSTER_SIZE
      if (c.mask === 0xffff && base + F.CLUSTER_SIZE <= size) {
        append(target, base, c.data)
        continue
      }
      let at = 0
      for (let j = 0; j < F.BLOCKS_PER_CLUSTER; j++) {
        if ((c.mask & (1 << j)) === 0) continue
        const position = base + j * F.BLOCK_SIZE
        const length = Math.min(F.BLOCK_SIZE, size - position)
        append(target, position, c.data.subarray(at, at + length))
        at += F.BLOCK_SIZE
      }
    }
    flush()
    return Effect.all(writes, { discard: true })
  })

/**
 * Extracts like `vma extract`: creates `directory`, writes each config to `<directory>/<name>`, each
 * selected device to a sparse `tmp-disk-<name>.raw` (only stored blocks are written), and after the whole
 * archive has been validated renames them to `disk-<name>.raw`.
 *
 * @since 0.1.0
 * @category operations
 */
export const extract = <E, R = never>(
  archive: VmaArchive<E>,
  options: ExtractOptions<R>
): Effect.Effect<VmaExtractResult, VmaFormatError | E | VmaIoError | Err.VmaExtractError, R> =>
  Effect.scoped(Effect.gen(function*() {
    const header = archive.header
    const wanted = options.devices
    if (wanted !== undefined) {
      for (const name of wanted) {
        if (!header.devices.some((d) => d.name === name)) {
          return yield* Effect.fail(new Err.VmaExtractError({ reason: "UnknownDevice", name }))
        }
      }
    }
    const selected = header.devices.filter((d) => wanted === undefined || wanted.includes(d.name))
    for (const name of [...header.configs.map((c) => c.name), ...selected.map((d) => d.name)]) {
      if (!safeName(name)) return yield* Effect.fail(new Err.VmaExtractError({ reason: "UnsafeName", name }))
    }
    const dir = options.directory
    yield* io.mkdir(dir)
    for (const config of header.configs) {
      yield* io.writeFileExclusive(path.join(dir, config.name), config.data)
    }
    const targets = new Map<number, Target>()
    for (const device of selected) {
      const temporary = path.join(dir, `tmp-disk-${device.name}.raw`)
      const fd = yield* Effect.acquireRelease(
        io.open(temporary, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL),
        (fd) => targets.has(device.id) ? io.closeQuietly(fd) : Effect.void
      )
      targets.set(device.id, { device, fd, temporary, final: path.join(dir, `disk-${device.name}.raw`) })
      if (options.onDevice !== undefined) yield* options.onDevice(device, temporary)
    }
    // Two buffers: the next extent is read while the current one is written.
    const readExtent = readerOf(archive)
    const buffers = [Buffer.allocUnsafe(MAX_EXTENT_DATA), Buffer.allocUnsafe(MAX_EXTENT_DATA)]
    let current = yield* readExtent(buffers[0])
    for (let i = 1; Option.isSome(current); i++) {
      const stats = yield* archive.stats
      const next = yield* Effect.fork(readExtent(buffers[i % 2]))
      yield* writeExtent(current.value, targets).pipe(Effect.onError(() => Fiber.interrupt(next)))
      if (options.onExtent !== undefined) yield* options.onExtent(current.value, stats)
      current = yield* Fiber.join(next)
    }
    const disks: Array<{ device: VmaDevice; path: string }> = []
    for (const target of targets.values()) {
      targets.delete(target.device.id)
      // The size is set at the end: on ext4, writing into a file already truncated to its full (sparse) size
      // is several times slower than extending it.
      yield* io.ftruncate(target.fd, target.device.size, target.temporary)
      yield* io.close(target.fd, target.temporary)
      yield* io.rename(target.temporary, target.final)
      disks.push({ device: target.device, path: target.final })
    }
    return {
      stats: yield* archive.stats,
      configs: header.configs.map((c) => path.join(dir, c.name)),
      disks
    }
  }))
