/**
 * The fixed index `.fidx` (spec §2.1): a 4096-byte header (magic, uuid, ctime, csum, size,
 * chunk size) followed by one 32-byte digest per 4 MiB chunk; the csum is the SHA-256 of the digest
 * array. Also the zero-chunk rules of §2.2.
 *
 * @since 0.1.0
 */
import * as crypto from "node:crypto"
import * as Effect from "effect/Effect"
import * as Either from "effect/Either"
import type { CryptConfig } from "./CryptConfig.js"
import * as Bytes from "./internal/bytes.js"
import { IndexError } from "./PbsError.js"

/**
 * `2f7f41ed91fd0fcd`.
 *
 * @since 0.1.0
 * @category constants
 */
export const MAGIC: Uint8Array = Bytes.sha256(Buffer.from("Proxmox Backup fixed sized chunk index v1.0")).subarray(0, 8)

/**
 * @since 0.1.0
 * @category constants
 */
export const HEADER_SIZE = 4096

/**
 * The fixed chunk size, 4 MiB.
 *
 * @since 0.1.0
 * @category constants
 */
export const CHUNK_SIZE = 4 * 1024 * 1024

/**
 * SHA-256 of 4 MiB of zeros: the zero chunk of unencrypted backups.
 *
 * @since 0.1.0
 * @category constants
 */
export const ZERO_CHUNK_DIGEST_HEX = "bb9f8df61474d25e71fa00722318cd387396ca1736605e1248821cc0de3d3af8"

/**
 * A decoded fixed index.
 *
 * @since 0.1.0
 * @category models
 */
export interface FixedIndex {
  readonly uuid: Uint8Array
  /** Unix seconds. */
  readonly ctime: number
  /** The csum stored in the header (readers recompute it, see {@link csum}). */
  readonly headerCsum: Uint8Array
  /** Image size in bytes. */
  readonly size: number
  readonly chunkSize: number
  /** `count × 32` bytes. */
  readonly digests: Uint8Array
}

/**
 * `ceil(size / chunkSize)`.
 *
 * @since 0.1.0
 * @category getters
 */
export const chunkCount = (size: number, chunkSize: number = CHUNK_SIZE): number => Math.ceil(size / chunkSize)

/**
 * Length of chunk `i` (the last one may be short).
 *
 * @since 0.1.0
 * @category getters
 */
export const chunkLength = (size: number, i: number, chunkSize: number = CHUNK_SIZE): number =>
  Math.min(chunkSize, size - i * chunkSize)

/**
 * Digest `i` of an index (a view, not a copy).
 *
 * @since 0.1.0
 * @category getters
 */
export const digestAt = (index: Pick<FixedIndex, "digests">, i: number): Uint8Array =>
  index.digests.subarray(i * 32, i * 32 + 32)

/**
 * SHA-256 over the digest array: the csum of the protocol and the manifest.
 *
 * @since 0.1.0
 * @category getters
 */
export const computeCsum = (digests: Uint8Array): Uint8Array => Bytes.sha256(digests)

/**
 * The csum of a decoded index, recomputed from its digests.
 *
 * @since 0.1.0
 * @category getters
 */
export const csum = (index: Pick<FixedIndex, "digests">): Uint8Array => computeCsum(index.digests)

const fail = (reason: IndexError["reason"], detail: string) => Either.left(new IndexError({ reason, detail }))

/**
 * Parses an index file: magic, exact length `4096 + 32·N`, positive chunk size.
 *
 * @since 0.1.0
 * @category decoding
 */
export const decodeSync = (bytes: Uint8Array): Either.Either<FixedIndex, IndexError> => {
  const buf = Bytes.asBuffer(bytes)
  if (buf.length < HEADER_SIZE) return fail("BadLength", `index too small (${buf.length} bytes)`)
  if (!buf.subarray(0, 8).equals(MAGIC)) return fail("BadMagic", "got unknown magic number")
  const ctime = buf.readBigInt64LE(24)
  const size = buf.readBigUInt64LE(64)
  const chunkSize = buf.readBigUInt64LE(72)
  if (chunkSize === 0n || chunkSize > BigInt(Number.MAX_SAFE_INTEGER)) {
    return fail("BadHeader", `invalid chunk size ${chunkSize}`)
  }
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) return fail("BadHeader", `invalid size ${size}`)
  const count = chunkCount(Number(size), Number(chunkSize))
  const expected = HEADER_SIZE + 32 * count
  if (buf.length !== expected) {
    return fail("BadLength", `got unexpected file size (${buf.length} != ${expected})`)
  }
  return Either.right({
    uuid: buf.subarray(8, 24),
    ctime: Number(ctime),
    headerCsum: buf.subarray(32, 64),
    size: Number(size),
    chunkSize: Number(chunkSize),
    digests: buf.subarray(HEADER_SIZE)
  })
}

/**
 * Parses an index file.
 *
 * @since 0.1.0
 * @category decoding
 */
export const decode = (bytes: Uint8Array): Effect.Effect<FixedIndex, IndexError> =>
  Effect.suspend(() => decodeSync(bytes))

/**
 * Input of {@link encode}.
 *
 * @since 0.1.0
 * @category models
 */
export interface EncodeInput {
  readonly size: number
  readonly digests: Uint8Array
  readonly ctime?: number
  readonly uuid?: Uint8Array
  readonly chunkSize?: number
}

/**
 * Serialises an index (the header csum is computed from the digests).
 *
 * @since 0.1.0
 * @category encoding
 */
export const encode = (input: EncodeInput): Either.Either<Buffer, IndexError> => {
  const chunkSize = input.chunkSize ?? CHUNK_SIZE
  const count = chunkCount(input.size, chunkSize)
  if (input.digests.length !== count * 32) {
    return fail("BadLength", `digest array has ${input.digests.length} bytes, expected ${count * 32}`)
  }
  const out = Buffer.alloc(HEADER_SIZE + count * 32)
  out.set(MAGIC, 0)
  out.set(input.uuid ?? randomUuid(), 8)
  out.writeBigInt64LE(BigInt(input.ctime ?? Math.floor(Date.now() / 1000)), 24)
  out.set(computeCsum(input.digests), 32)
  out.writeBigUInt64LE(BigInt(input.size), 64)
  out.writeBigUInt64LE(BigInt(chunkSize), 72)
  out.set(input.digests, HEADER_SIZE)
  return Either.right(out)
}

/** 16 random bytes with the version-4 and variant bits of a UUID. */
const randomUuid = (): Buffer => {
  const uuid = crypto.randomBytes(16)
  uuid[6] = (uuid[6]! & 0x0f) | 0x40
  uuid[8] = (uuid[8]! & 0x3f) | 0x80
  return uuid
}

const keyedZeroDigests = new WeakMap<CryptConfig, Uint8Array>()

/**
 * The digest of the full-size zero chunk: {@link ZERO_CHUNK_DIGEST_HEX}, or keyed with a key (§2.2).
 *
 * @since 0.1.0
 * @category digests
 */
export const zeroChunkDigest = (crypt?: CryptConfig): Uint8Array => {
  if (crypt === undefined) return Bytes.fromHex(ZERO_CHUNK_DIGEST_HEX)
  let digest = keyedZeroDigests.get(crypt)
  if (digest === undefined) {
    digest = crypt.computeDigest(Bytes.zeroBuffer(CHUNK_SIZE))
    keyedZeroDigests.set(crypt, digest)
  }
  return digest
}
