/**
 * Typed errors of the VMA writer, reader, inputs and outputs.
 *
 * Every violation of the format that the reader detects has its own error class, named after the check
 * and carrying where it happened (the byte offset in the uncompressed VMA stream, the device and the
 * cluster). Messages start with the text Proxmox's `vma` tool prints for the same problem (including its
 * spelling), followed by the location.
 *
 * @since 0.1.0
 */
import * as Schema from "effect/Schema"

const at = (offset: number) => `at offset ${offset}`

// ---------------------------------------------------------------------------------------------------------------
// main header
// ---------------------------------------------------------------------------------------------------------------

/**
 * The stream ended inside the main header.
 *
 * @since 0.1.0
 * @category header errors
 */
export class VmaHeaderTruncated extends Schema.TaggedError<VmaHeaderTruncated>(
  "@vzdump/target-vma/VmaHeaderTruncated"
)("VmaHeaderTruncated", { expected: Schema.Number, actual: Schema.Number }) {
  override get message(): string {
    return `can't read vma header - got EOF (${this.actual} of ${this.expected} header bytes)`
  }
}

/**
 * The first four bytes are not `VMA\0`.
 *
 * @since 0.1.0
 * @category header errors
 */
export class VmaBadMagic extends Schema.TaggedError<VmaBadMagic>("@vzdump/target-vma/VmaBadMagic")(
  "VmaBadMagic",
  { found: Schema.String }
) {
  override get message(): string {
    return `not a vma file - wrong magic number (${at(0)}: ${this.found})`
  }
}

/**
 * `header_size` leaves no room for a blob buffer (it must be larger than 12 288 bytes).
 *
 * @since 0.1.0
 * @category header errors
 */
export class VmaBadHeaderSize extends Schema.TaggedError<VmaBadHeaderSize>("@vzdump/target-vma/VmaBadHeaderSize")(
  "VmaBadHeaderSize",
  { headerSize: Schema.Number }
) {
  override get message(): string {
    return `wrong vma header size ${this.headerSize} (${at(56)})`
  }
}

/**
 * The MD5 digest stored in the main header does not match its contents.
 *
 * @since 0.1.0
 * @category header errors
 */
export class VmaHeaderChecksumMismatch extends Schema.TaggedError<VmaHeaderChecksumMismatch>(
  "@vzdump/target-vma/VmaHeaderChecksumMismatch"
)("VmaHeaderChecksumMismatch", { stored: Schema.String, computed: Schema.String }) {
  override get message(): string {
    return `wrong vma header chechsum (${at(32)}: stored ${this.stored}, computed ${this.computed})`
  }
}

/**
 * The header's version field is not 1.
 *
 * @since 0.1.0
 * @category header errors
 */
export class VmaUnsupportedVersion extends Schema.TaggedError<VmaUnsupportedVersion>(
  "@vzdump/target-vma/VmaUnsupportedVersion"
)("VmaUnsupportedVersion", { version: Schema.Number }) {
  override get message(): string {
    return `wrong vma version ${this.version} (${at(4)})`
  }
}

/**
 * `blob_buffer_offset` points into the fixed header part, or the blob buffer extends past `header_size`.
 *
 * @since 0.1.0
 * @category header errors
 */
export class VmaBadBlobBuffer extends Schema.TaggedError<VmaBadBlobBuffer>("@vzdump/target-vma/VmaBadBlobBuffer")(
  "VmaBadBlobBuffer",
  {
    reason: Schema.Literal("Offset", "Size"),
    blobBufferOffset: Schema.Number,
    blobBufferSize: Schema.Number,
    headerSize: Schema.Number
  }
) {
  override get message(): string {
    return this.reason === "Offset"
      ? `wrong vma blob buffer offset ${this.blobBufferOffset} (${at(48)})`
      : `wrong vma blob buffer size ${this.blobBufferOffset}/${this.blobBufferSize} ` +
        `(${at(52)}: ends past header size ${this.headerSize})`
  }
}

/**
 * A configuration slot points to something that is not a blob, or its name blob is not NUL-terminated.
 *
 * @since 0.1.0
 * @category header errors
 */
export class VmaInvalidConfigPointer extends Schema.TaggedError<VmaInvalidConfigPointer>(
  "@vzdump/target-vma/VmaInvalidConfigPointer"
)("VmaInvalidConfigPointer", { slot: Schema.Number, namePointer: Schema.Number, dataPointer: Schema.Number }) {
  override get message(): string {
    return `vma contains invalid data pointers (config slot ${this.slot} ${at(2044 + 4 * this.slot)}: ` +
      `name ${this.namePointer}, data ${this.dataPointer})`
  }
}

/**
 * A device slot with a non-zero size whose name pointer does not resolve to a NUL-terminated blob, a
 * device in slot 255 (writers use 1..254), or a size beyond what 2^32 clusters can address.
 *
 * @since 0.1.0
 * @category header errors
 */
export class VmaInvalidDeviceEntry extends Schema.TaggedError<VmaInvalidDeviceEntry>(
  "@vzdump/target-vma/VmaInvalidDeviceEntry"
)("VmaInvalidDeviceEntry", {
  reason: Schema.Literal("InvalidName", "ReservedId", "InvalidSize"),
  devId: Schema.Number,
  namePointer: Schema.Number,
  size: Schema.Number
}) {
  override get message(): string {
    const where = `device ${this.devId} ${at(4096 + 32 * this.devId)}`
    return this.reason === "InvalidName"
      ? `vma contains invalid device name pointer ${this.namePointer} (${where})`
      : this.reason === "ReservedId"
      ? `vma uses reserved device id ${this.devId} (${where})`
      : `vma device size ${this.size} too large (${where})`
  }
}

// ---------------------------------------------------------------------------------------------------------------
// extents
// ---------------------------------------------------------------------------------------------------------------

/**
 * The stream ended inside an extent header or inside an extent's block data.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaTruncatedExtent extends Schema.TaggedError<VmaTruncatedExtent>(
  "@vzdump/target-vma/VmaTruncatedExtent"
)("VmaTruncatedExtent", { offset: Schema.Number, expected: Schema.Number, actual: Schema.Number }) {
  override get message(): string {
    return this.expected === 512
      ? `read short extent (${this.actual} bytes) (extent ${at(this.offset)})`
      : `short vma extent (${this.actual} < ${this.expected}) (extent ${at(this.offset)})`
  }
}

/**
 * An extent header does not start with `VMAE`, or its reserved field is not zero.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaBadExtentMagic extends Schema.TaggedError<VmaBadExtentMagic>("@vzdump/target-vma/VmaBadExtentMagic")(
  "VmaBadExtentMagic",
  { reason: Schema.Literal("Magic", "Reserved"), offset: Schema.Number }
) {
  override get message(): string {
    return `wrong vma extent header magic (extent ${at(this.offset)}${
      this.reason === "Reserved" ? ": reserved field not zero" : ""
    })`
  }
}

/**
 * The MD5 digest of an extent header does not match.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaExtentChecksumMismatch extends Schema.TaggedError<VmaExtentChecksumMismatch>(
  "@vzdump/target-vma/VmaExtentChecksumMismatch"
)("VmaExtentChecksumMismatch", { offset: Schema.Number }) {
  override get message(): string {
    return `wrong vma extent header chechsum (extent ${at(this.offset)})`
  }
}

/**
 * An extent carries a UUID different from the main header's.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaExtentUuidMismatch extends Schema.TaggedError<VmaExtentUuidMismatch>(
  "@vzdump/target-vma/VmaExtentUuidMismatch"
)("VmaExtentUuidMismatch", { offset: Schema.Number, expected: Schema.String, found: Schema.String }) {
  override get message(): string {
    return `wrong vma extent uuid (extent ${at(this.offset)}: ${this.found}, header ${this.expected})`
  }
}

/**
 * An extent's `block_count` differs from the number of set bits in its cluster masks.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaBlockCountMismatch extends Schema.TaggedError<VmaBlockCountMismatch>(
  "@vzdump/target-vma/VmaBlockCountMismatch"
)("VmaBlockCountMismatch", { offset: Schema.Number, blockCount: Schema.Number, maskBlocks: Schema.Number }) {
  override get message(): string {
    const text = this.maskBlocks > this.blockCount
      ? "short vma extent - too many blocks"
      : "vma extent error - missing blocks"
    return `${text} (extent ${at(this.offset)}: block_count ${this.blockCount}, masks ${this.maskBlocks})`
  }
}

/**
 * A blockinfo slot names a device id that the header does not declare.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaUnknownDevice extends Schema.TaggedError<VmaUnknownDevice>("@vzdump/target-vma/VmaUnknownDevice")(
  "VmaUnknownDevice",
  { offset: Schema.Number, slot: Schema.Number, devId: Schema.Number, cluster: Schema.Number }
) {
  override get message(): string {
    return `got wrong dev id ${this.devId} (extent ${at(this.offset)}, slot ${this.slot}, cluster ${this.cluster})`
  }
}

/**
 * A blockinfo slot names a cluster number at or past the end of its device.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaClusterOutOfRange extends Schema.TaggedError<VmaClusterOutOfRange>(
  "@vzdump/target-vma/VmaClusterOutOfRange"
)("VmaClusterOutOfRange", {
  offset: Schema.Number,
  devId: Schema.Number,
  device: Schema.String,
  cluster: Schema.Number,
  clusterCount: Schema.Number
}) {
  override get message(): string {
    return `cluster ${this.cluster} out of range for stream ${this.device} ` +
      `(extent ${at(this.offset)}, device has ${this.clusterCount} clusters)`
  }
}

/**
 * The same cluster of a device appears a second time.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaDuplicateCluster extends Schema.TaggedError<VmaDuplicateCluster>(
  "@vzdump/target-vma/VmaDuplicateCluster"
)("VmaDuplicateCluster", {
  offset: Schema.Number,
  devId: Schema.Number,
  device: Schema.String,
  cluster: Schema.Number
}) {
  override get message(): string {
    return `found duplicated cluster ${this.cluster} for stream ${this.device} (extent ${at(this.offset)})`
  }
}

/**
 * A mask bit is set for a 4 KiB block that starts at or past the end of its device.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaWriteBeyondEnd extends Schema.TaggedError<VmaWriteBeyondEnd>("@vzdump/target-vma/VmaWriteBeyondEnd")(
  "VmaWriteBeyondEnd",
  {
    offset: Schema.Number,
    devId: Schema.Number,
    device: Schema.String,
    cluster: Schema.Number,
    block: Schema.Number
  }
) {
  override get message(): string {
    return `got wrong block address - write beyond end (extent ${at(this.offset)}, stream ${this.device}, ` +
      `cluster ${this.cluster}, block ${this.block})`
  }
}

/**
 * After the end of the stream, a cluster of a device was never seen.
 *
 * @since 0.1.0
 * @category extent errors
 */
export class VmaMissingCluster extends Schema.TaggedError<VmaMissingCluster>("@vzdump/target-vma/VmaMissingCluster")(
  "VmaMissingCluster",
  { offset: Schema.Number, devId: Schema.Number, device: Schema.String, cluster: Schema.Number, missing: Schema.Number }
) {
  override get message(): string {
    return `detected missing cluster ${this.cluster} for stream ${this.device} ` +
      `(${this.missing} missing in total, stream ended ${at(this.offset)})`
  }
}

/**
 * Any violation of the VMA format found by the reader.
 *
 * @since 0.1.0
 * @category models
 */
export type VmaFormatError =
  | VmaHeaderTruncated
  | VmaBadMagic
  | VmaBadHeaderSize
  | VmaHeaderChecksumMismatch
  | VmaUnsupportedVersion
  | VmaBadBlobBuffer
  | VmaInvalidConfigPointer
  | VmaInvalidDeviceEntry
  | VmaTruncatedExtent
  | VmaBadExtentMagic
  | VmaExtentChecksumMismatch
  | VmaExtentUuidMismatch
  | VmaBlockCountMismatch
  | VmaUnknownDevice
  | VmaClusterOutOfRange
  | VmaDuplicateCluster
  | VmaWriteBeyondEnd
  | VmaMissingCluster

// ---------------------------------------------------------------------------------------------------------------
// writer, I/O, processes
// ---------------------------------------------------------------------------------------------------------------

/**
 * A writer call that would produce an invalid archive (or a call after `finish`).
 *
 * @since 0.1.0
 * @category writer errors
 */
export class VmaWriterError extends Schema.TaggedError<VmaWriterError>("@vzdump/target-vma/VmaWriterError")(
  "VmaWriterError",
  {
    reason: Schema.Literal(
      "InvalidConfig",
      "TooManyConfigs",
      "InvalidDevice",
      "TooManyDevices",
      "HeaderTooLarge",
      "InvalidUuid",
      "InvalidOption",
      "UnknownDevice",
      "Unaligned",
      "InvalidLength",
      "ClusterOutOfRange",
      "DuplicateCluster",
      "MissingCluster",
      "Finished"
    ),
    detail: Schema.String,
    device: Schema.optional(Schema.String),
    cluster: Schema.optional(Schema.Number)
  }
) {
  override get message(): string {
    const where = this.device === undefined
      ? ""
      : this.cluster === undefined
      ? ` (device ${this.device})`
      : ` (device ${this.device}, cluster ${this.cluster})`
    return `${this.detail}${where}`
  }
}

/**
 * A file system operation failed.
 *
 * @since 0.1.0
 * @category io errors
 */
export class VmaIoError extends Schema.TaggedError<VmaIoError>("@vzdump/target-vma/VmaIoError")("VmaIoError", {
  operation: Schema.String,
  path: Schema.String,
  code: Schema.optional(Schema.String),
  detail: Schema.String
}) {
  override get message(): string {
    return `${this.operation} ${this.path} failed - ${this.detail}`
  }
}

/**
 * A compressor, decompressor or `exec:` command failed to start or exited unsuccessfully.
 *
 * @since 0.1.0
 * @category io errors
 */
export class VmaProcessError extends Schema.TaggedError<VmaProcessError>("@vzdump/target-vma/VmaProcessError")(
  "VmaProcessError",
  {
    command: Schema.String,
    exitCode: Schema.NullOr(Schema.Number),
    signal: Schema.NullOr(Schema.String),
    stderr: Schema.String
  }
) {
  override get message(): string {
    const status = this.exitCode !== null
      ? `exit status ${this.exitCode}`
      : this.signal !== null
      ? `signal ${this.signal}`
      : "failed to start"
    const tail = this.stderr.trim().split("\n").filter((l) => l.length > 0).slice(-1)[0]
    return `command '${this.command}' failed: ${status}${tail === undefined ? "" : ` (${tail.trim()})`}`
  }
}

/**
 * `extract` was asked for something it must not do: an unknown device, or an archive whose config or
 * device names would escape the target directory.
 *
 * @since 0.1.0
 * @category io errors
 */
export class VmaExtractError extends Schema.TaggedError<VmaExtractError>("@vzdump/target-vma/VmaExtractError")(
  "VmaExtractError",
  { reason: Schema.Literal("UnknownDevice", "UnsafeName"), name: Schema.String }
) {
  override get message(): string {
    return this.reason === "UnknownDevice"
      ? `no device named '${this.name}' in the archive`
      : `refusing to write a file named '${this.name}' (not a plain file name)`
  }
}
