/**
 * The dynamic index `.didx` (spec §2.3), as far as the test server needs it: write one, and read
 * its entries back to register their chunks.
 */
import * as crypto from "node:crypto"
import * as Either from "effect/Either"
import * as Bytes from "../bytes.js"

export const MAGIC = Bytes.sha256(Buffer.from("Proxmox Backup dynamic sized chunk index v1.0")).subarray(0, 8)
const HEADER_SIZE = 4096

export interface DynamicEntry {
  /** Exclusive end offset of the chunk in the stream. */
  readonly end: number
  readonly digest: Uint8Array
}

/** The `end_le64 ‖ digest` pairs. */
export const entryBytes = (entries: ReadonlyArray<DynamicEntry>): Buffer => {
  const out = Buffer.alloc(entries.length * 40)
  entries.forEach((entry, i) => {
    out.writeBigUInt64LE(BigInt(entry.end), i * 40)
    out.set(entry.digest, i * 40 + 8)
  })
  return out
}

/** SHA-256 over the entry bytes. */
export const computeCsum = (entries: ReadonlyArray<DynamicEntry>): Buffer => Bytes.sha256(entryBytes(entries))

export const encode = (entries: ReadonlyArray<DynamicEntry>, ctime: number): Buffer => {
  const body = entryBytes(entries)
  const out = Buffer.alloc(HEADER_SIZE + body.length)
  out.set(MAGIC, 0)
  out.set(crypto.randomBytes(16), 8)
  out.writeBigInt64LE(BigInt(ctime), 24)
  out.set(Bytes.sha256(body), 32)
  out.set(body, HEADER_SIZE)
  return out
}

export const decode = (bytes: Uint8Array): Either.Either<ReadonlyArray<DynamicEntry>, string> => {
  const buf = Bytes.asBuffer(bytes)
  if (buf.length < HEADER_SIZE || !buf.subarray(0, 8).equals(MAGIC)) return Either.left("got unknown magic number")
  if ((buf.length - HEADER_SIZE) % 40 !== 0) return Either.left("got unexpected file size")
  const entries: Array<DynamicEntry> = []
  for (let offset = HEADER_SIZE; offset < buf.length; offset += 40) {
    entries.push({ end: Number(buf.readBigUInt64LE(offset)), digest: buf.subarray(offset + 8, offset + 40) })
  }
  return Either.right(entries)
}
