/**
 * DataBlob, the container of every chunk and `*.blob` file (spec §1): an 8-byte magic, a CRC-32 of
 * the stored bytes after the header, for encrypted kinds a 16-byte IV and 16-byte GCM tag, then the
 * payload (raw, a zstd frame, AES-256-GCM ciphertext, or the ciphertext of a zstd frame).
 *
 * @since 0.1.0
 */
import * as crypto from "node:crypto"
import * as zlib from "node:zlib"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import type { CryptConfig } from "./CryptConfig.js"
import * as Bytes from "./internal/bytes.js"
import * as Zstd from "./internal/zstd.js"
import { DataBlobError } from "./PbsError.js"

const magicOf = (label: string): Buffer => Bytes.sha256(Buffer.from(label)).subarray(0, 8)

/**
 * The four blob magics (first 8 bytes of SHA-256 of their labels).
 *
 * @since 0.1.0
 * @category constants
 */
export const Magic = {
  uncompressed: magicOf("Proxmox Backup uncompressed blob v1.0"),
  compressed: magicOf("Proxmox Backup zstd compressed blob v1.0"),
  encrypted: magicOf("Proxmox Backup encrypted blob v1.0"),
  encryptedCompressed: magicOf("Proxmox Backup zstd compressed encrypted blob v1.0")
} as const

/**
 * @since 0.1.0
 * @category models
 */
export type BlobKind = "uncompressed" | "compressed" | "encrypted" | "encrypted-compressed"

/**
 * Header length of plain blobs (magic + CRC).
 *
 * @since 0.1.0
 * @category constants
 */
export const PLAIN_HEADER_SIZE = 12

/**
 * Header length of encrypted blobs (magic + CRC + IV + tag).
 *
 * @since 0.1.0
 * @category constants
 */
export const ENCRYPTED_HEADER_SIZE = 44

/**
 * Largest plaintext the encoder accepts (128 MiB).
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_BLOB_SIZE = 128 * 1024 * 1024

const fail = (reason: DataBlobError["reason"], detail: string) => Either.left(new DataBlobError({ reason, detail }))

/**
 * The kind a blob declares by its magic.
 *
 * @since 0.1.0
 * @category getters
 */
export const kindOf = (blob: Uint8Array): Either.Either<BlobKind, DataBlobError> => {
  if (blob.length < PLAIN_HEADER_SIZE) return fail("TooSmall", `blob too small (${blob.length} bytes).`)
  const magic = Bytes.asBuffer(blob).subarray(0, 8)
  const kind: BlobKind | undefined = magic.equals(Magic.uncompressed)
    ? "uncompressed"
    : magic.equals(Magic.compressed)
    ? "compressed"
    : magic.equals(Magic.encrypted)
    ? "encrypted"
    : magic.equals(Magic.encryptedCompressed)
    ? "encrypted-compressed"
    : undefined
  if (kind === undefined) return fail("BadMagic", "unable to parse raw blob - wrong magic")
  if (isEncryptedKind(kind) && blob.length < ENCRYPTED_HEADER_SIZE) {
    return fail("TooSmall", `encrypted blob too small (${blob.length} bytes).`)
  }
  return Either.right(kind)
}

/**
 * @since 0.1.0
 * @category getters
 */
export const isEncryptedKind = (kind: BlobKind): boolean => kind === "encrypted" || kind === "encrypted-compressed"

/**
 * Header length of a blob kind.
 *
 * @since 0.1.0
 * @category getters
 */
export const headerSize = (kind: BlobKind): number => isEncryptedKind(kind) ? ENCRYPTED_HEADER_SIZE : PLAIN_HEADER_SIZE

/**
 * CRC-32 over the stored bytes after the header.
 *
 * @since 0.1.0
 * @category getters
 */
export const computeCrc = (blob: Uint8Array, kind: BlobKind): number =>
  zlib.crc32(Bytes.asBuffer(blob).subarray(headerSize(kind)))

/**
 * The CRC stored in the header.
 *
 * @since 0.1.0
 * @category getters
 */
export const storedCrc = (blob: Uint8Array): number => Bytes.asBuffer(blob).readUInt32LE(8)

/**
 * Writes the correct CRC into the header, in place (what the server does with uploaded chunks).
 *
 * @since 0.1.0
 * @category mutations
 */
export const fixCrc = (blob: Uint8Array, kind: BlobKind): void => {
  Bytes.asBuffer(blob).writeUInt32LE(computeCrc(blob, kind), 8)
}

/**
 * Checks magic, minimum length and CRC; returns the kind.
 *
 * @since 0.1.0
 * @category validation
 */
export const verify = (blob: Uint8Array): Either.Either<BlobKind, DataBlobError> =>
  Either.flatMap(kindOf(blob), (kind) =>
    computeCrc(blob, kind) === storedCrc(blob)
      ? Either.right(kind)
      : fail("CrcMismatch", "Data blob has wrong CRC checksum."))

/**
 * Options of {@link encode}.
 *
 * @since 0.1.0
 * @category models
 */
export interface EncodeOptions {
  /** zstd level 1, kept only when it is smaller than the input. Default true. */
  readonly compress?: boolean
  /** Encrypt with this key (compress first). */
  readonly crypt?: CryptConfig | undefined
  /** A fixed IV, for known-answer tests only; random otherwise. */
  readonly iv?: Uint8Array
}

/**
 * Encodes data into a blob, synchronously.
 *
 * @since 0.1.0
 * @category encoding
 */
export const encodeSync = (data: Uint8Array, options: EncodeOptions = {}): Either.Either<Buffer, DataBlobError> => {
  if (data.length > MAX_BLOB_SIZE) return fail("TooLarge", `data blob too large (${data.length} bytes).`)
  let payload: Uint8Array = data
  let compressed = false
  if (options.compress ?? true) {
    const packed = Zstd.compressLevel1(data)
    if (packed.length < data.length) {
      payload = packed
      compressed = true
    }
  }
  if (options.crypt !== undefined) {
    const sealed = options.crypt.encrypt(payload, options.iv ?? crypto.randomBytes(16))
    const out = Buffer.allocUnsafe(ENCRYPTED_HEADER_SIZE + sealed.ciphertext.length)
    out.set(compressed ? Magic.encryptedCompressed : Magic.encrypted, 0)
    out.set(sealed.iv, 12)
    out.set(sealed.tag, 28)
    out.set(sealed.ciphertext, ENCRYPTED_HEADER_SIZE)
    fixCrc(out, "encrypted")
    return Either.right(out)
  }
  const out = Buffer.allocUnsafe(PLAIN_HEADER_SIZE + payload.length)
  out.set(compressed ? Magic.compressed : Magic.uncompressed, 0)
  out.set(payload, PLAIN_HEADER_SIZE)
  fixCrc(out, "uncompressed")
  return Either.right(out)
}

/**
 * Encodes data into a blob.
 *
 * @since 0.1.0
 * @category encoding
 */
export const encode = (data: Uint8Array, options?: EncodeOptions): Effect.Effect<Buffer, DataBlobError> =>
  Effect.suspend(() => encodeSync(data, options))

/**
 * Options of {@link decode}.
 *
 * @since 0.1.0
 * @category models
 */
export interface DecodeOptions {
  /** Needed for encrypted kinds. */
  readonly crypt?: CryptConfig | undefined
  /** Check the plaintext against this chunk digest (keyed when `crypt` is set). */
  readonly digest?: Uint8Array | undefined
  /** Check the plaintext length. */
  readonly expectedLength?: number | undefined
  /** Largest plaintext accepted (default 128 MiB). */
  readonly maxSize?: number
  /** Skip the CRC check (the server recomputes chunk CRCs instead). Default false. */
  readonly skipCrc?: boolean
}

/**
 * Decodes a blob synchronously: CRC, decrypt and tag, decompress, digest and length (spec §1.4).
 *
 * @since 0.1.0
 * @category decoding
 */
export const decodeSync = (blob: Uint8Array, options: DecodeOptions = {}): Either.Either<Buffer, DataBlobError> => {
  const checked = options.skipCrc === true ? kindOf(blob) : verify(blob)
  if (Either.isLeft(checked)) return Either.left(checked.left)
  const kind = checked.right
  const buf = Bytes.asBuffer(blob)
  const limit = options.maxSize ?? MAX_BLOB_SIZE
  let payload: Buffer
  if (isEncryptedKind(kind)) {
    if (options.crypt === undefined) return fail("MissingKey", "unable to decrypt blob - missing CryptConfig")
    const plain = options.crypt.decrypt({
      iv: buf.subarray(12, 28),
      tag: buf.subarray(28, 44),
      ciphertext: buf.subarray(ENCRYPTED_HEADER_SIZE)
    })
    if (plain === undefined) return fail("WrongKey", "unable to decrypt blob - wrong key or damaged data")
    payload = Bytes.asBuffer(plain)
  } else {
    payload = buf.subarray(PLAIN_HEADER_SIZE)
  }
  let data: Buffer
  if (kind === "compressed" || kind === "encrypted-compressed") {
    const result = Zstd.decompressBounded(payload, limit)
    if (result._tag === "TooLarge") return fail("TooLarge", `decompressed blob exceeds ${limit} bytes`)
    if (result._tag === "Invalid") return fail("Decompress", `zstd: ${result.detail}`)
    data = result.data
  } else {
    if (payload.length > limit) return fail("TooLarge", `blob payload exceeds ${limit} bytes`)
    data = Buffer.from(payload)
  }
  if (options.expectedLength !== undefined && data.length !== options.expectedLength) {
    return fail("LengthMismatch", `detected chunk with wrong length (${options.expectedLength} != ${data.length})`)
  }
  if (options.digest !== undefined) {
    const digest = options.crypt !== undefined && isEncryptedKind(kind)
      ? options.crypt.computeDigest(data)
      : Bytes.sha256(data)
    if (!Bytes.bytesEqual(digest, options.digest)) return fail("DigestMismatch", "detected chunk with wrong digest.")
  }
  return Either.right(data)
}

/**
 * Decodes a blob: CRC, decrypt and tag, decompress, digest and length (spec §1.4).
 *
 * @since 0.1.0
 * @category decoding
 */
export const decode = (blob: Uint8Array, options?: DecodeOptions): Effect.Effect<Buffer, DataBlobError> =>
  Effect.suspend(() => decodeSync(blob, options))

/**
 * The digest of a chunk's plaintext: SHA-256, or keyed `SHA-256(data ‖ id_key)` with a key (§3.1).
 *
 * @since 0.1.0
 * @category digests
 */
export const chunkDigest = (data: Uint8Array, crypt?: CryptConfig): Uint8Array =>
  crypt === undefined ? Bytes.sha256(data) : crypt.computeDigest(data)
