/**
 * The DataBlob codec without needless copies (spec §1): encoding yields the header and the payload
 * as separate parts (the payload may be the caller's own bytes or a compression buffer the caller
 * lends), decoding may return a view of the blob. `DataBlob` builds its copying API on this; the
 * chunk upload path and the test server use it directly.
 */
import * as crypto from "node:crypto"
import * as zlib from "node:zlib"
import * as Either from "effect/Either"
import type { CryptConfig } from "../CryptConfig.js"
import { DataBlobError } from "../PbsError.js"
import * as Bytes from "./bytes.js"
import * as Zstd from "./zstd.js"

const magicOf = (label: string): Buffer => Bytes.sha256(Buffer.from(label)).subarray(0, 8)

export const Magic = {
  uncompressed: magicOf("Proxmox Backup uncompressed blob v1.0"),
  compressed: magicOf("Proxmox Backup zstd compressed blob v1.0"),
  encrypted: magicOf("Proxmox Backup encrypted blob v1.0"),
  encryptedCompressed: magicOf("Proxmox Backup zstd compressed encrypted blob v1.0")
} as const

export type BlobKind = "uncompressed" | "compressed" | "encrypted" | "encrypted-compressed"

export const PLAIN_HEADER_SIZE = 12
export const ENCRYPTED_HEADER_SIZE = 44
export const MAX_BLOB_SIZE = 128 * 1024 * 1024

export const fail = (reason: DataBlobError["reason"], detail: string) =>
  Either.left(new DataBlobError({ reason, detail }))

export const isEncryptedKind = (kind: BlobKind): boolean => kind === "encrypted" || kind === "encrypted-compressed"

export const headerSize = (kind: BlobKind): number => isEncryptedKind(kind) ? ENCRYPTED_HEADER_SIZE : PLAIN_HEADER_SIZE

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

export const computeCrc = (blob: Uint8Array, kind: BlobKind): number =>
  zlib.crc32(Bytes.asBuffer(blob).subarray(headerSize(kind)))

export const storedCrc = (blob: Uint8Array): number => Bytes.asBuffer(blob).readUInt32LE(8)

export const verify = (blob: Uint8Array): Either.Either<BlobKind, DataBlobError> =>
  Either.flatMap(kindOf(blob), (kind) =>
    computeCrc(blob, kind) === storedCrc(blob)
      ? Either.right(kind)
      : fail("CrcMismatch", "Data blob has wrong CRC checksum."))

/** A blob as two parts: the header (magic, CRC, for encrypted kinds IV and tag) and the payload. */
export interface BlobParts {
  readonly header: Buffer
  readonly payload: Uint8Array
  /** header + payload. */
  readonly length: number
  /** Whether the payload lives in the `scratch` buffer passed to {@link encodeParts}. */
  readonly usesScratch: boolean
}

export interface EncodeOptions {
  readonly compress?: boolean
  readonly crypt?: CryptConfig | undefined
  readonly iv?: Uint8Array
  /**
   * Where zstd may write its frame: at least `Zstd.compressBound(data.length)` bytes. When the result
   * uses it (`usesScratch`), the caller keeps it untouched as long as it uses the parts. Without it,
   * a buffer is allocated when compression is asked for.
   */
  readonly scratch?: Buffer | undefined
}

/**
 * Encodes data into header and payload: zstd level 1 kept only if strictly smaller than the input,
 * then AES-256-GCM with a key. The unencrypted, uncompressed payload is `data` itself (no copy).
 */
export const encodeParts = (data: Uint8Array, options: EncodeOptions = {}): Either.Either<BlobParts, DataBlobError> => {
  if (data.length > MAX_BLOB_SIZE) return fail("TooLarge", `data blob too large (${data.length} bytes).`)
  let payload: Uint8Array = data
  let compressed = false
  let usesScratch = false
  if (options.compress ?? true) {
    const bound = Zstd.compressBound(data.length)
    const scratch = options.scratch !== undefined && options.scratch.length >= bound ? options.scratch : undefined
    const dst = scratch ?? Buffer.allocUnsafe(bound)
    const length = Zstd.compressLevel1Into(dst, data)
    if (length < data.length) {
      payload = dst.subarray(0, length)
      compressed = true
      usesScratch = scratch !== undefined
    }
  }
  if (options.crypt !== undefined) {
    const sealed = options.crypt.encrypt(payload, options.iv ?? crypto.randomBytes(16))
    const header = Buffer.allocUnsafe(ENCRYPTED_HEADER_SIZE)
    header.set(compressed ? Magic.encryptedCompressed : Magic.encrypted, 0)
    header.writeUInt32LE(zlib.crc32(sealed.ciphertext), 8)
    header.set(sealed.iv, 12)
    header.set(sealed.tag, 28)
    return Either.right({
      header,
      payload: sealed.ciphertext,
      length: ENCRYPTED_HEADER_SIZE + sealed.ciphertext.length,
      usesScratch: false
    })
  }
  const header = Buffer.allocUnsafe(PLAIN_HEADER_SIZE)
  header.set(compressed ? Magic.compressed : Magic.uncompressed, 0)
  header.writeUInt32LE(zlib.crc32(payload), 8)
  return Either.right({ header, payload, length: PLAIN_HEADER_SIZE + payload.length, usesScratch })
}

/** The parts in one new buffer. */
export const join = (parts: BlobParts): Buffer => {
  const out = Buffer.allocUnsafe(parts.length)
  out.set(parts.header, 0)
  out.set(parts.payload, parts.header.length)
  return out
}

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

/** The decoded data, and whether it is a view of the blob's own memory. */
export interface Decoded {
  readonly data: Buffer
  readonly view: boolean
}

/**
 * Decodes a blob: CRC, decrypt and tag, decompress, digest and length (spec §1.4). The data of an
 * unencrypted, uncompressed blob is a view of the blob (`view`).
 */
export const decodeView = (blob: Uint8Array, options: DecodeOptions = {}): Either.Either<Decoded, DataBlobError> => {
  const checked = options.skipCrc === true ? kindOf(blob) : verify(blob)
  if (Either.isLeft(checked)) return Either.left(checked.left)
  const kind = checked.right
  const buf = Bytes.asBuffer(blob)
  const limit = options.maxSize ?? MAX_BLOB_SIZE
  let payload: Buffer
  let view = false
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
    view = true
  }
  let data: Buffer
  if (kind === "compressed" || kind === "encrypted-compressed") {
    const result = Zstd.decompressBounded(payload, limit)
    if (result._tag === "TooLarge") return fail("TooLarge", `decompressed blob exceeds ${limit} bytes`)
    if (result._tag === "Invalid") return fail("Decompress", `zstd: ${result.detail}`)
    data = result.data
    view = false
  } else {
    if (payload.length > limit) return fail("TooLarge", `blob payload exceeds ${limit} bytes`)
    data = payload
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
  return Either.right({ data, view })
}
