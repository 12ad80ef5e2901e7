/**
 * The synchronous heart of the writer: turns cluster writes into header and extent bytes.
 *
 * Each operation validates everything first and changes no state on failure, then returns the byte
 * chunks to emit next (possibly none). Chunks are slices of the caller's buffers where possible
 * (adjacent non-zero blocks of one buffer are coalesced into one slice), so they must not be modified
 * after being passed in.
 */
import { basename } from "node:path"
import * as Err from "../VmaError.js"
import { ClusterBitmap } from "./bitmap.js"
import * as F from "./format.js"

export interface EncoderDevice {
  readonly id: number
  readonly name: string
  readonly size: number
  readonly clusters: number
  readonly bitmap: ClusterBitmap
  zeroBytes: number
  transferred: number
}

export interface EncoderOptions {
  readonly uuid: Uint8Array
  readonly ctime: number
  readonly configs: ReadonlyArray<F.ConfigSpec>
  readonly devices: ReadonlyArray<F.DeviceSpec>
  readonly clustersPerExtent: number
}

const ZERO_BLOCK = Buffer.alloc(F.BLOCK_SIZE)

/**
 * Whether `src[start, start + length)` is all zero, without allocating: a few leading bytes decide almost
 * every block of real data in JavaScript; only blocks that start with 16 zero bytes are compared in native
 * code against a shared zero page.
 */
const isZeroAt = (src: Uint8Array, start: number, length: number): boolean => {
  const head = Math.min(16, length)
  for (let i = 0; i < head; i++) if (src[start + i] !== 0) return false
  return ZERO_BLOCK.compare(src, start, start + length, 0, length) === 0
}

const fail = (
  reason: Err.VmaWriterError["reason"],
  detail: string,
  device?: string,
  cluster?: number
): Err.VmaWriterError =>
  new Err.VmaWriterError({
    reason,
    detail,
    ...(device === undefined ? {} : { device }),
    ...(cluster === undefined ? {} : { cluster })
  })

export class Encoder {
  readonly devices: ReadonlyArray<EncoderDevice>
  private pendingHeader: Uint8Array | undefined
  private count = 0
  private readonly devs = new Uint8Array(F.SLOTS_PER_EXTENT)
  private readonly clusterNums = new Uint32Array(F.SLOTS_PER_EXTENT)
  private readonly masks = new Uint16Array(F.SLOTS_PER_EXTENT)
  private parts: Array<Uint8Array> = []
  private runSrc: Uint8Array | undefined = undefined
  private runStart = 0
  private runEnd = 0
  private blockCount = 0
  private out: Array<Uint8Array> = []
  /** Bytes of archive produced so far. */
  bytesOut = 0
  /** Extents produced so far. */
  extents = 0
  finished = false
  /** Size of the main header in bytes. */
  readonly headerSize: number

  private constructor(
    readonly uuid: Uint8Array,
    readonly ctime: number,
    header: Uint8Array,
    devices: ReadonlyArray<EncoderDevice>,
    private readonly perExtent: number
  ) {
    this.pendingHeader = header
    this.headerSize = header.length
    this.devices = devices
  }

  static make(options: EncoderOptions): Encoder | Err.VmaWriterError {
    const per = options.clustersPerExtent
    if (!Number.isInteger(per) || per < 1 || per > F.SLOTS_PER_EXTENT) {
      return fail("InvalidOption", `clustersPerExtent must be 1..${F.SLOTS_PER_EXTENT}, got ${per}`)
    }
    const configNames = new Set<string>()
    const configs: Array<F.ConfigSpec> = []
    for (const config of options.configs) {
      const name = basename(config.name)
      if (name.length === 0 || name === "." || name === ".." || name.includes("\0")) {
        return fail("InvalidConfig", `invalid config name '${config.name}'`)
      }
      if (configNames.has(name)) return fail("InvalidConfig", `duplicate config name '${name}'`)
      configNames.add(name)
      configs.push({ name, data: config.data })
    }
    const deviceNames = new Set<string>()
    const devices: Array<EncoderDevice> = []
    for (const device of options.devices) {
      if (device.name.length === 0 || device.name.includes("\0")) {
        return fail("InvalidDevice", `invalid device name '${device.name}'`)
      }
      if (device.name === "vmstate") return fail("InvalidDevice", "device name 'vmstate' is reserved", device.name)
      if (deviceNames.has(device.name)) return fail("InvalidDevice", "duplicate device name", device.name)
      if (!Number.isSafeInteger(device.size) || device.size <= 0 || device.size > F.MAX_DEVICE_SIZE) {
        return fail("InvalidDevice", `invalid device size ${device.size}`, device.name)
      }
      deviceNames.add(device.name)
      const clusters = F.clusterCount(device.size)
      devices.push({
        id: devices.length + 1,
        name: device.name,
        size: device.size,
        clusters,
        bitmap: new ClusterBitmap(clusters),
        zeroBytes: 0,
        transferred: 0
      })
    }
    const header = F.encodeHeader({ uuid: options.uuid, ctime: options.ctime, configs, devices: options.devices })
    if (header instanceof Err.VmaWriterError) return header
    return new Encoder(options.uuid, options.ctime, header, devices, per)
  }


  private device(devId: number): EncoderDevice | Err.VmaWriterError {
    if (this.finished) return fail("Finished", "writer already finished")
    const dev = Number.isInteger(devId) ? this.devices[devId - 1] : undefined
    return dev ?? fail("UnknownDevice", `no such device id ${devId}`)
  }

  private checkRange(dev: EncoderDevice, offset: number, length: number): Err.VmaWriterError | undefined {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset % F.CLUSTER_SIZE !== 0) {
      return fail("Unaligned", `offset ${offset} is not a multiple of 64 KiB`, dev.name)
    }
    if (!Number.isSafeInteger(length) || length < 0 || offset + length > dev.size) {
      return fail("InvalidLength", `range ${offset}+${length} exceeds device size ${dev.size}`, dev.name)
    }
    if (length % F.CLUSTER_SIZE !== 0 && offset + length !== dev.size) {
      return fail(
        "Unaligned",
        `length ${length} is not a multiple of 64 KiB and does not end at the device end`,
        dev.name
      )
    }
    const first = offset / F.CLUSTER_SIZE
    const last = Math.ceil((offset + length) / F.CLUSTER_SIZE)
    for (let c = first; c < last; c++) {
      if (dev.bitmap.has(c)) return fail("DuplicateCluster", "cluster written twice", dev.name, c)
    }
    return undefined
  }

  /** Data for a cluster-aligned range (the length may end unaligned only at the device end). */
  data(devId: number, offset: number, data: Uint8Array): Array<Uint8Array> | Err.VmaWriterError {
    const dev = this.device(devId)
    if (dev instanceof Err.VmaWriterError) return dev
    const error = this.checkRange(dev, offset, data.length)
    if (error !== undefined) return error
    const first = offset / F.CLUSTER_SIZE
    for (let off = 0; off < data.length; off += F.CLUSTER_SIZE) {
      this.addCluster(dev, first + off / F.CLUSTER_SIZE, data, off, Math.min(F.CLUSTER_SIZE, data.length - off))
    }
    return this.take()
  }

  /** A cluster-aligned range that reads as zeros: mask-0 entries, no data. */
  zeros(devId: number, offset: number, length: number): Array<Uint8Array> | Err.VmaWriterError {
    const dev = this.device(devId)
    if (dev instanceof Err.VmaWriterError) return dev
    const error = this.checkRange(dev, offset, length)
    if (error !== undefined) return error
    const first = offset / F.CLUSTER_SIZE
    const last = Math.ceil((offset + length) / F.CLUSTER_SIZE)
    for (let c = first; c < last; c++) this.addCluster(dev, c, null, 0, 0)
    return this.take()
  }

  /** One cluster; `null` for an all-zero cluster. */
  cluster(devId: number, cluster: number, data: Uint8Array | null): Array<Uint8Array> | Err.VmaWriterError {
    const dev = this.device(devId)
    if (dev instanceof Err.VmaWriterError) return dev
    if (!Number.isInteger(cluster) || cluster < 0 || cluster >= dev.clusters) {
      return fail("ClusterOutOfRange", `cluster out of range (device has ${dev.clusters})`, dev.name, cluster)
    }
    const base = cluster * F.CLUSTER_SIZE
    if (
      data !== null && data.length !== F.CLUSTER_SIZE &&
      !(cluster === dev.clusters - 1 && data.length === dev.size - base)
    ) {
      return fail("InvalidLength", `cluster data must be 64 KiB, got ${data.length}`, dev.name, cluster)
    }
    if (dev.bitmap.has(cluster)) return fail("DuplicateCluster", "cluster written twice", dev.name, cluster)
    this.addCluster(dev, cluster, data, 0, data === null ? 0 : data.length)
    return this.take()
  }

  /** Checks that every cluster was written and flushes the last extent (diskless: one empty extent). */
  finish(): Array<Uint8Array> | Err.VmaWriterError {
    if (this.finished) return fail("Finished", "writer already finished")
    for (const dev of this.devices) {
      if (!dev.bitmap.complete) {
        const missing = dev.bitmap.firstMissing()
        return fail(
          "MissingCluster",
          `cluster never written (${dev.clusters - dev.bitmap.count} of ${dev.clusters} missing)`,
          dev.name,
          missing
        )
      }
    }
    if (this.count > 0 || this.extents === 0) this.flush()
    this.finished = true
    return this.take()
  }

  private addCluster(dev: EncoderDevice, cluster: number, src: Uint8Array | null, srcOff: number, len: number) {
    dev.bitmap.set(cluster)
    const base = cluster * F.CLUSTER_SIZE
    let mask = 0
    if (src === null) {
      dev.zeroBytes += F.CLUSTER_SIZE
    } else {
      for (let j = 0; j < F.BLOCKS_PER_CLUSTER; j++) {
        const inCluster = j * F.BLOCK_SIZE
        const start = base + inCluster
        if (start >= dev.size || inCluster >= len) {
          dev.zeroBytes += F.BLOCK_SIZE
          continue
        }
        const avail = Math.min(F.BLOCK_SIZE, len - inCluster, dev.size - start)
        const from = srcOff + inCluster
        if (isZeroAt(src, from, avail)) {
          dev.zeroBytes += F.BLOCK_SIZE
          continue
        }
        mask |= 1 << j
        if (avail < F.BLOCK_SIZE) {
          const padded = new Uint8Array(F.BLOCK_SIZE)
          padded.set(src.subarray(from, from + avail))
          this.pushPadded(padded)
        } else {
          this.pushRange(src, from)
        }
        this.blockCount++
      }
    }
    dev.transferred += Math.min(F.CLUSTER_SIZE, dev.size - base)
    const i = this.count++
    this.devs[i] = dev.id
    this.clusterNums[i] = cluster
    this.masks[i] = mask
    if (this.count >= this.perExtent) this.flush()
  }

  /** Extends the current run of adjacent blocks of one source buffer, or starts a new run. */
  private pushRange(src: Uint8Array, from: number) {
    if (this.runSrc === src && this.runEnd === from) {
      this.runEnd = from + F.BLOCK_SIZE
      return
    }
    this.closeRun()
    this.runSrc = src
    this.runStart = from
    this.runEnd = from + F.BLOCK_SIZE
  }

  private pushPadded(block: Uint8Array) {
    this.closeRun()
    this.parts.push(block)
  }

  /** Turns the open run into one slice of its source buffer. */
  private closeRun() {
    if (this.runSrc === undefined) return
    this.parts.push(this.runSrc.subarray(this.runStart, this.runEnd))
    this.runSrc = undefined
  }

  private flush() {
    if (this.pendingHeader !== undefined) {
      this.out.push(this.pendingHeader)
      this.bytesOut += this.pendingHeader.length
      this.pendingHeader = undefined
    }
    this.closeRun()
    const header = F.encodeExtentHeader(this.uuid, this.count, this.devs, this.clusterNums, this.masks, this.blockCount)
    this.out.push(header)
    for (const part of this.parts) this.out.push(part)
    this.bytesOut += F.EXTENT_HEADER_SIZE + this.blockCount * F.BLOCK_SIZE
    this.extents++
    this.count = 0
    this.parts = []
    this.blockCount = 0
  }

  private take(): Array<Uint8Array> {
    const out = this.out
    this.out = []
    return out
  }
}
