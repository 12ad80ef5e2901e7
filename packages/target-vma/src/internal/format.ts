/**
 * VMA on-disk layout: constants, main header encoding/decoding, extent header encoding/decoding.
 * Synchronous and allocation-light; failures are returned as values.
 */
import { createHash } from "node:crypto"
import * as Err from "../VmaError.js"

export const BLOCK_SIZE = 4096
export const CLUSTER_SIZE = 65536
export const BLOCKS_PER_CLUSTER = 16
export const HEADER_FIXED_SIZE = 12288
export const EXTENT_HEADER_SIZE = 512
export const SLOTS_PER_EXTENT = 59
/** QEMU's writer flushes an extent once 58 clusters are buffered. */
export const QEMU_CLUSTERS_PER_EXTENT = 58
export const MAX_DEVICES = 254
export const MAX_CONFIGS = 256
export const MAX_BLOB_LENGTH = 65535
/** QEMU's header buffer: 8 clusters. */
export const MAX_HEADER_SIZE = 8 * CLUSTER_SIZE
/**
 * Largest header a reader accepts: every config and device slot with a maximal blob fits in 64 MiB, so
 * anything larger is corrupt (and must not make us allocate gigabytes).
 */
export const MAX_READ_HEADER_SIZE = 64 * 1024 * 1024
/** cluster_num is a u32. */
export const MAX_CLUSTERS = 2 ** 32
export const MAX_DEVICE_SIZE = MAX_CLUSTERS * CLUSTER_SIZE

const OFF_VERSION = 4
const OFF_UUID = 8
const OFF_CTIME = 24
const OFF_MD5 = 32
const OFF_BLOB_OFFSET = 48
const OFF_BLOB_SIZE = 52
const OFF_HEADER_SIZE = 56
const OFF_CONFIG_NAMES = 2044
const OFF_CONFIG_DATA = 3068
const OFF_DEV_INFO = 4096
const DEV_INFO_SIZE = 32

const EXT_OFF_BLOCK_COUNT = 6
const EXT_OFF_UUID = 8
const EXT_OFF_MD5 = 24
const EXT_OFF_BLOCKINFO = 40

export const MAGIC = Uint8Array.of(0x56, 0x4d, 0x41, 0x00)
export const EXTENT_MAGIC = Uint8Array.of(0x56, 0x4d, 0x41, 0x45)

const utf8 = new TextEncoder()
const utf8Decoder = new TextDecoder("utf-8")

export const hex = (bytes: Uint8Array): string =>
  Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).toString("hex")

export const md5 = (bytes: Uint8Array): Buffer => createHash("md5").update(bytes).digest()

export const uuidToString = (u: Uint8Array): string => {
  const h = hex(u)
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`
}

export const uuidFromString = (s: string): Uint8Array | undefined => {
  const h = s.replace(/-/g, "")
  if (!/^[0-9a-fA-F]{32}$/.test(h)) return undefined
  return Uint8Array.from(Buffer.from(h, "hex"))
}

export const clusterCount = (size: number): number => Math.ceil(size / CLUSTER_SIZE)

export const popcount16 = (m: number): number => {
  m = m - ((m >>> 1) & 0x5555)
  m = (m & 0x3333) + ((m >>> 2) & 0x3333)
  m = (m + (m >>> 4)) & 0x0f0f
  return (m + (m >>> 8)) & 0x1f
}

const equalBytes = (a: Uint8Array, aOff: number, b: Uint8Array): boolean => {
  for (let i = 0; i < b.length; i++) if (a[aOff + i] !== b[i]) return false
  return true
}

// ---------------------------------------------------------------------------------------------------------------
// main header
// ---------------------------------------------------------------------------------------------------------------

export interface ConfigSpec {
  readonly name: string
  readonly data: Uint8Array
}

export interface DeviceSpec {
  readonly name: string
  readonly size: number
}

export interface HeaderSpec {
  readonly uuid: Uint8Array
  readonly ctime: number
  readonly configs: ReadonlyArray<ConfigSpec>
  readonly devices: ReadonlyArray<DeviceSpec>
}

const writerError = (
  reason: Err.VmaWriterError["reason"],
  detail: string,
  device?: string
) => new Err.VmaWriterError(device === undefined ? { reason, detail } : { reason, detail, device })

/**
 * Encodes a main header exactly as QEMU's writer lays it out: blobs in the order config name, config data
 * (per config), then the device names; the blob area grows in 512-byte steps per blob as in QEMU, so the
 * same configs and devices give the same `header_size`.
 */
export const encodeHeader = (spec: HeaderSpec): Uint8Array | Err.VmaWriterError => {
  if (spec.uuid.length !== 16) return writerError("InvalidUuid", "uuid must be 16 bytes")
  if (spec.configs.length > MAX_CONFIGS) {
    return writerError("TooManyConfigs", `too many configs (${spec.configs.length} > ${MAX_CONFIGS})`)
  }
  if (spec.devices.length > MAX_DEVICES) {
    return writerError("TooManyDevices", `too many devices (${spec.devices.length} > ${MAX_DEVICES})`)
  }
  const blobs: Array<{ readonly pos: number; readonly bytes: Uint8Array }> = []
  let tableSize = 0
  let pos = 1
  const allocate = (bytes: Uint8Array): number | undefined => {
    if (bytes.length > MAX_BLOB_LENGTH) return undefined
    const need = pos + bytes.length + 2
    if (tableSize < need) tableSize += Math.ceil((bytes.length + 2) / 512) * 512
    while (tableSize < need) tableSize += 512
    blobs.push({ pos, bytes })
    const at = pos
    pos += bytes.length + 2
    return at
  }
  const cstring = (s: string) => {
    const b = utf8.encode(s)
    const out = new Uint8Array(b.length + 1)
    out.set(b)
    return out
  }
  const configPointers: Array<readonly [number, number]> = []
  for (const config of spec.configs) {
    const nameBlob = allocate(cstring(config.name))
    if (nameBlob === undefined) return writerError("InvalidConfig", `config name too long: ${config.name}`)
    const dataBlob = allocate(config.data)
    if (dataBlob === undefined) {
      return writerError(
        "InvalidConfig",
        `config ${config.name} too large (${config.data.length} > ${MAX_BLOB_LENGTH} bytes)`
      )
    }
    configPointers.push([nameBlob, dataBlob])
  }
  const devicePointers: Array<number> = []
  for (const device of spec.devices) {
    const p = allocate(cstring(device.name))
    if (p === undefined) return writerError("InvalidDevice", "device name too long", device.name)
    devicePointers.push(p)
  }
  const headerSize = HEADER_FIXED_SIZE + tableSize
  if (headerSize > MAX_HEADER_SIZE) {
    return writerError("HeaderTooLarge", `header too large (${headerSize} > ${MAX_HEADER_SIZE} bytes)`)
  }
  const buf = new Uint8Array(headerSize)
  const dv = new DataView(buf.buffer)
  buf.set(MAGIC, 0)
  dv.setUint32(OFF_VERSION, 1)
  buf.set(spec.uuid, OFF_UUID)
  dv.setBigInt64(OFF_CTIME, BigInt(Math.trunc(spec.ctime)))
  dv.setUint32(OFF_BLOB_OFFSET, HEADER_FIXED_SIZE)
  dv.setUint32(OFF_BLOB_SIZE, pos)
  dv.setUint32(OFF_HEADER_SIZE, headerSize)
  configPointers.forEach(([n, d], i) => {
    dv.setUint32(OFF_CONFIG_NAMES + 4 * i, n)
    dv.setUint32(OFF_CONFIG_DATA + 4 * i, d)
  })
  spec.devices.forEach((device, i) => {
    const off = OFF_DEV_INFO + DEV_INFO_SIZE * (i + 1)
    dv.setUint32(off, devicePointers[i]!)
    dv.setBigUint64(off + 8, BigInt(device.size))
  })
  for (const blob of blobs) {
    const at = HEADER_FIXED_SIZE + blob.pos
    buf[at] = blob.bytes.length & 0xff
    buf[at + 1] = blob.bytes.length >>> 8
    buf.set(blob.bytes, at + 2)
  }
  buf.set(md5(buf), OFF_MD5)
  return buf
}

export interface DecodedConfig {
  readonly name: string
  readonly data: Uint8Array
}

export interface DecodedDevice {
  readonly id: number
  readonly name: string
  readonly size: number
}

export interface DecodedHeader {
  readonly uuid: Uint8Array
  readonly ctime: number
  readonly headerSize: number
  readonly configs: ReadonlyArray<DecodedConfig>
  readonly devices: ReadonlyArray<DecodedDevice>
}

/** Checks the first bytes read (up to the fixed part) and returns `header_size`. */
export const checkHeaderPrefix = (
  prefix: Uint8Array
): number | Err.VmaBadMagic | Err.VmaHeaderTruncated | Err.VmaBadHeaderSize => {
  if (prefix.length >= 4 && !equalBytes(prefix, 0, MAGIC)) {
    return new Err.VmaBadMagic({ found: hex(prefix.subarray(0, 4)) })
  }
  if (prefix.length < HEADER_FIXED_SIZE) {
    return new Err.VmaHeaderTruncated({ expected: HEADER_FIXED_SIZE, actual: prefix.length })
  }
  const headerSize = new DataView(prefix.buffer, prefix.byteOffset, prefix.length).getUint32(OFF_HEADER_SIZE)
  if (headerSize <= HEADER_FIXED_SIZE || headerSize > MAX_READ_HEADER_SIZE) {
    return new Err.VmaBadHeaderSize({ headerSize })
  }
  return headerSize
}

type HeaderError =
  | Err.VmaHeaderChecksumMismatch
  | Err.VmaUnsupportedVersion
  | Err.VmaBadBlobBuffer
  | Err.VmaInvalidConfigPointer
  | Err.VmaInvalidDeviceEntry

/** Validates and decodes a complete main header (`header_size` bytes), in the order Proxmox's reader checks. */
export const decodeHeader = (head: Uint8Array): DecodedHeader | HeaderError => {
  const dv = new DataView(head.buffer, head.byteOffset, head.length)
  const headerSize = head.length
  const stored = head.slice(OFF_MD5, OFF_MD5 + 16)
  const copy = Uint8Array.from(head)
  copy.fill(0, OFF_MD5, OFF_MD5 + 16)
  const computed = md5(copy)
  if (!equalBytes(computed, 0, stored)) {
    return new Err.VmaHeaderChecksumMismatch({ stored: hex(stored), computed: hex(computed) })
  }
  const version = dv.getUint32(OFF_VERSION)
  if (version !== 1) return new Err.VmaUnsupportedVersion({ version })
  const blobBufferOffset = dv.getUint32(OFF_BLOB_OFFSET)
  const blobBufferSize = dv.getUint32(OFF_BLOB_SIZE)
  if (blobBufferOffset < HEADER_FIXED_SIZE) {
    return new Err.VmaBadBlobBuffer({ reason: "Offset", blobBufferOffset, blobBufferSize, headerSize })
  }
  const end = blobBufferOffset + blobBufferSize
  if (end > headerSize) {
    return new Err.VmaBadBlobBuffer({ reason: "Size", blobBufferOffset, blobBufferSize, headerSize })
  }
  const blobs = new Map<number, Uint8Array>()
  let p = blobBufferOffset + 1
  while (p + 2 <= end) {
    const len = head[p]! | (head[p + 1]! << 8)
    if (p + len + 2 <= end) blobs.set(p - blobBufferOffset, head.subarray(p + 2, p + 2 + len))
    p += len + 2
  }
  const str = (pointer: number): string | undefined => {
    const blob = blobs.get(pointer)
    if (blob === undefined || blob.length === 0 || blob[blob.length - 1] !== 0) return undefined
    const nul = blob.indexOf(0)
    return utf8Decoder.decode(blob.subarray(0, nul))
  }
  const devices: Array<DecodedDevice> = []
  for (let id = 1; id < 256; id++) {
    const off = OFF_DEV_INFO + DEV_INFO_SIZE * id
    const namePointer = dv.getUint32(off)
    const size = Number(dv.getBigUint64(off + 8))
    if (size === 0) continue
    const name = str(namePointer)
    if (name === undefined) {
      return new Err.VmaInvalidDeviceEntry({ reason: "InvalidName", devId: id, namePointer, size })
    }
    if (id > MAX_DEVICES) return new Err.VmaInvalidDeviceEntry({ reason: "ReservedId", devId: id, namePointer, size })
    if (size > MAX_DEVICE_SIZE) {
      return new Err.VmaInvalidDeviceEntry({ reason: "InvalidSize", devId: id, namePointer, size })
    }
    devices.push({ id, name, size })
  }
  const configs: Array<DecodedConfig> = []
  for (let slot = 0; slot < MAX_CONFIGS; slot++) {
    const namePointer = dv.getUint32(OFF_CONFIG_NAMES + 4 * slot)
    const dataPointer = dv.getUint32(OFF_CONFIG_DATA + 4 * slot)
    if (namePointer === 0 && dataPointer === 0) continue
    const name = namePointer === 0 ? undefined : str(namePointer)
    const data = dataPointer === 0 ? undefined : blobs.get(dataPointer)
    if (name === undefined || data === undefined) {
      return new Err.VmaInvalidConfigPointer({ slot, namePointer, dataPointer })
    }
    configs.push({ name, data: Uint8Array.from(data) })
  }
  return {
    uuid: head.slice(OFF_UUID, OFF_UUID + 16),
    ctime: Number(dv.getBigInt64(OFF_CTIME)),
    headerSize,
    configs,
    devices
  }
}

// ---------------------------------------------------------------------------------------------------------------
// extent header
// ---------------------------------------------------------------------------------------------------------------

/** Builds a 512-byte extent header for the given slots and fills in its MD5. */
export const encodeExtentHeader = (
  uuid: Uint8Array,
  count: number,
  devs: Uint8Array,
  clusters: Uint32Array,
  masks: Uint16Array,
  blockCount: number
): Uint8Array => {
  const h = new Uint8Array(EXTENT_HEADER_SIZE)
  const dv = new DataView(h.buffer)
  h.set(EXTENT_MAGIC, 0)
  dv.setUint16(EXT_OFF_BLOCK_COUNT, blockCount)
  h.set(uuid, EXT_OFF_UUID)
  for (let i = 0; i < count; i++) {
    const off = EXT_OFF_BLOCKINFO + 8 * i
    dv.setUint16(off, masks[i]!)
    h[off + 3] = devs[i]!
    dv.setUint32(off + 4, clusters[i]!)
  }
  h.set(md5(h), EXT_OFF_MD5)
  return h
}

export interface ExtentSlot {
  readonly slot: number
  readonly devId: number
  readonly cluster: number
  readonly mask: number
}

export interface ParsedExtentHeader {
  readonly blockCount: number
  readonly slots: ReadonlyArray<ExtentSlot>
  readonly maskBlocks: number
}

/** Checks magic, MD5 and UUID of an extent header and decodes its slots (dev_id 0 slots are skipped). */
export const parseExtentHeader = (
  h: Uint8Array,
  uuid: Uint8Array,
  offset: number
): ParsedExtentHeader | Err.VmaBadExtentMagic | Err.VmaExtentChecksumMismatch | Err.VmaExtentUuidMismatch => {
  const dv = new DataView(h.buffer, h.byteOffset, EXTENT_HEADER_SIZE)
  if (!equalBytes(h, 0, EXTENT_MAGIC)) return new Err.VmaBadExtentMagic({ reason: "Magic", offset })
  if (dv.getUint16(4) !== 0) return new Err.VmaBadExtentMagic({ reason: "Reserved", offset })
  const copy = Uint8Array.from(h.subarray(0, EXTENT_HEADER_SIZE))
  copy.fill(0, EXT_OFF_MD5, EXT_OFF_MD5 + 16)
  if (!equalBytes(md5(copy), 0, h.subarray(EXT_OFF_MD5, EXT_OFF_MD5 + 16))) {
    return new Err.VmaExtentChecksumMismatch({ offset })
  }
  if (!equalBytes(h, EXT_OFF_UUID, uuid)) {
    return new Err.VmaExtentUuidMismatch({
      offset,
      expected: uuidToString(uuid),
      found: uuidToString(h.subarray(EXT_OFF_UUID, EXT_OFF_UUID + 16))
    })
  }
  const slots: Array<ExtentSlot> = []
  let maskBlocks = 0
  for (let slot = 0; slot < SLOTS_PER_EXTENT; slot++) {
    const off = EXT_OFF_BLOCKINFO + 8 * slot
    const devId = h[off + 3]!
    if (devId === 0) continue
    const mask = dv.getUint16(off)
    maskBlocks += popcount16(mask)
    slots.push({ slot, devId, cluster: dv.getUint32(off + 4), mask })
  }
  return { blockCount: dv.getUint16(EXT_OFF_BLOCK_COUNT), slots, maskBlocks }
}
