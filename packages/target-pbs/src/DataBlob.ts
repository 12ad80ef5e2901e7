/**
 * DataBlob, the container of every chunk and `*.blob` file (spec §1): an 8-byte magic, a CRC-32 of
 * the stored bytes after the header, for encrypted kinds a 16-byte IV and 16-byte GCM tag, then the
 * payload (raw, a zstd frame, AES-256-GCM ciphertext, or the ciphertext of a zstd frame).
 *
 * @since 0.1.0
 */
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import type { CryptConfig } from "./CryptConfig.js"
import * as Blob from "./internal/blob.js"
import * as Bytes from "./internal/bytes.js"
import * as Zstd from "./internal/zstd.js"
import type { DataBlobError } from "./PbsError.js"

/**
 * The four blob magics (first 8 bytes of SHA-256 of their labels).
 *
 * @since 0.1.0
 * @category constants
 */
export const Magic: {
  readonly uncompressed: Buffer
  readonly compressed: Buffer
  readonly encrypted: Buffer
  readonly encryptedCompressed: Buffer
} = Blob.Magic

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
export const PLAIN_HEADER_SIZE = Blob.PLAIN_HEADER_SIZE

/**
 * Header length of encrypted blobs (magic + CRC + IV + tag).
 *
 * @since 0.1.0
 * @category constants
 */
export const ENCRYPTED_HEADER_SIZE = Blob.ENCRYPTED_HEADER_SIZE

/**
 * Largest plaintext the encoder accepts (128 MiB).
 *
 * @since 0.1.0
 * @category constants
 */
export const MAX_BLOB_SIZE = Blob.MAX_BLOB_SIZE

/**
 * The kind a blob declares by its magic.
 *
 * @since 0.1.0
 * @category getters
 */
export const kindOf = (blob: Uint8Array): Either.Either<BlobKind, DataBlobError> => Blob.kindOf(blob)

/**
 * @since 0.1.0
 * @category getters
 */
export const isEncryptedKind = (kind: BlobKind): boolean => Blob.isEncryptedKind(kind)

/**
 * Header length of a blob kind.
 *
 * @since 0.1.0
 * @category getters
 */
export const headerSize = (kind: BlobKind): number => Blob.headerSize(kind)

/**
 * CRC-32 over the stored bytes after the header.
 *
 * @since 0.1.0
 * @category getters
 */
export const computeCrc = (blob: Uint8Array, kind: BlobKind): number => Blob.computeCrc(blob, kind)

/**
 * The CRC stored in the header.
 *
 * @since 0.1.0
 * @category getters
 */
export const storedCrc = (blob: Uint8Array): number => Blob.storedCrc(blob)

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
export const verify = (blob: Uint8Array): Either.Either<BlobKind, DataBlobError> => Blob.verify(blob)

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
export const encodeSync = (data: Uint8Array, options: EncodeOptions = {}): Either.Either<Buffer, DataBlobError> =>
  Either.map(Blob.encodeParts(data, { ...options, scratch: scratchFor(data.length, options) }), Blob.join)

// one compression buffer for the blobs of chunk size or less: the frame is copied out right away
const SCRATCH_LIMIT = 4 * 1024 * 1024
let scratch: Buffer | undefined
const scratchFor = (length: number, options: EncodeOptions): Buffer | undefined => {
  if ((options.compress ?? true) === false || length > SCRATCH_LIMIT) return undefined
  scratch ??= Buffer.allocUnsafe(Zstd.compressBound(SCRATCH_LIMIT))
  return scratch
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
export interface DecodeOptions extends Blob.DecodeOptions {}

/**
 * Decodes a blob synchronously: CRC, decrypt and tag, decompress, digest and length (spec §1.4).
 *
 * @since 0.1.0
 * @category decoding
 */
export const decodeSync = (blob: Uint8Array, options: DecodeOptions = {}): Either.Either<Buffer, DataBlobError> =>
  Either.map(Blob.decodeView(blob, options), (decoded) => decoded.view ? Buffer.from(decoded.data) : decoded.data)

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
