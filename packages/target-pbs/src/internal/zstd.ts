/**
 * zstd through the native `zstd-napi` binding: level-1 compression and a decompressor that refuses
 * output beyond a limit (a hostile frame cannot make it allocate more).
 */
import { compress } from "zstd-napi"
import binding from "zstd-napi/binding.js"

/** One zstd frame at level 1, as the reference client writes. */
export const compressLevel1 = (data: Uint8Array): Buffer => compress(data, { compressionLevel: 1 })

/** Result of a bounded decompression: the data, or why it failed. */
export type DecompressResult =
  | { readonly _tag: "Ok"; readonly data: Buffer }
  | { readonly _tag: "TooLarge" }
  | { readonly _tag: "Invalid"; readonly detail: string }

/**
 * Decompresses one or more zstd frames, producing at most `limit` bytes.
 */
export const decompressBounded = (input: Uint8Array, limit: number): DecompressResult => {
  const dctx = new binding.DCtx()
  const chunks: Array<Buffer> = []
  let total = 0
  let src = input
  let lastReturn = 0
  const step = Math.max(binding.dStreamOutSize(), 1 << 20)
  try {
    while (src.length > 0 || lastReturn !== 0) {
      const out = Buffer.allocUnsafe(Math.min(step, limit - total + 1))
      const [ret, produced, consumed] = dctx.decompressStream(out, src)
      lastReturn = ret
      src = src.subarray(consumed)
      if (produced > 0) {
        total += produced
        if (total > limit) return { _tag: "TooLarge" }
        chunks.push(out.subarray(0, produced))
      }
      if (produced === 0 && consumed === 0) {
        return { _tag: "Invalid", detail: "truncated zstd frame" }
      }
    }
  } catch (cause) {
    return { _tag: "Invalid", detail: cause instanceof Error ? cause.message : String(cause) }
  }
  return { _tag: "Ok", data: chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, total) }
}
