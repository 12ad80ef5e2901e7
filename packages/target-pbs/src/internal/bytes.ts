/**
 * Small byte helpers shared by the formats, the client and the test server.
 */
import * as crypto from "node:crypto"

/** Lowercase hex of some bytes. */
export const toHex = (bytes: Uint8Array): string =>
  Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).toString("hex")

/** Bytes of a lowercase or uppercase hex string (no validation beyond Buffer's). */
export const fromHex = (hex: string): Buffer => Buffer.from(hex, "hex")

/** A view of the same memory as a Buffer (no copy). */
export const asBuffer = (bytes: Uint8Array): Buffer =>
  Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length)

/** SHA-256 of the concatenation of the parts. */
export const sha256 = (...parts: ReadonlyArray<Uint8Array>): Buffer => {
  const hash = crypto.createHash("sha256")
  for (const part of parts) hash.update(part)
  return hash.digest()
}

/** `aa:bb:…` lowercase, as PBS prints fingerprints. */
export const colonHex = (bytes: Uint8Array): string => toHex(bytes).replace(/(..)(?!$)/g, "$1:")

/** Constant-time equality of two byte strings (false for different lengths). */
export const bytesEqual = (a: Uint8Array, b: Uint8Array): boolean =>
  a.length === b.length && crypto.timingSafeEqual(a, b)

/** Exactly 64 lowercase hex characters, as chunk digests and csums are written in the API. */
export const isDigestHex = (value: string): boolean => /^[a-f0-9]{64}$/.test(value)

/** Whether every byte is zero. */
export const isAllZero = (bytes: Uint8Array): boolean => {
  const buf = asBuffer(bytes)
  const step = 65536
  const zeros = zeroBuffer(Math.min(step, buf.length))
  for (let offset = 0; offset < buf.length; offset += step) {
    const end = Math.min(buf.length, offset + step)
    if (buf.compare(zeros, 0, end - offset, offset, end) !== 0) return false
  }
  return true
}

const zeroCache = new Map<number, Buffer>()

/** A shared, read-only-by-convention buffer of zeros. */
export const zeroBuffer = (length: number): Buffer => {
  let buf = zeroCache.get(length)
  if (buf === undefined) {
    buf = Buffer.alloc(length)
    if (zeroCache.size < 8) zeroCache.set(length, buf)
  }
  return buf
}
