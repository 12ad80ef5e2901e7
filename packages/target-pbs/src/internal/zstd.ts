/**
 * zstd through the native `zstd-napi` binding: level-1 compression with one reusable context (the
 * frame is the same as a fresh compressor's: default parameters, level 1, content size recorded) and
 * a decompressor that refuses output beyond a limit (a hostile frame cannot make it allocate more).
 */
import binding from "zstd-napi/binding.js"

let cctx: binding.CCtx | undefined
let dctx: binding.DCtx | undefined

const context = (): binding.CCtx => {
  if (cctx === undefined) {
    cctx = new binding.CCtx()
    cctx.setParameter(binding.CParameter.compressionLevel, 1)
  }
  return cctx
}

/** The largest frame level 1 can produce for `length` input bytes. */
export const compressBound = (length: number): number => binding.compressBound(length)

/**
 * Compresses `data` into `dst` (at least `compressBound(data.length)` bytes) as one zstd frame at
 * level 1; returns the frame's length.
 */
export const compressLevel1Into = (dst: Uint8Array, data: Uint8Array): number => context().compress2(dst, data)

/** One zstd frame at level 1, as the reference client writes. */
export const compressLevel1 = (data: Uint8Array): Buffer => {
  const dst = Buffer.allocUnsafe(compressBound(data.length))
  const length = compressLevel1Into(dst, data)
  return length < dst.length * 0.75 ? Buffer.from(dst.subarray(0, length)) : dst.subarray(0, length)
}

/** Result of a bounded decompression: the data, or why it failed. */
export type DecompressResult =
  | { readonly _tag: "Ok"; readonly data: Buffer }
  | { readonly _tag: "TooLarge" }
  | { readonly _tag: "Invalid"; readonly detail: string }

/**
 * Decompresses one or more zstd frames, producing at most `limit` bytes.
 */
export const decompressBounded = (input: Uint8Array, limit: number): DecompressResult => {
  dctx ??= new binding.DCtx()
  const chunks: Array<Buffer> = []
  let total = 0
  let src = input
  let lastReturn = 0
  const step = Math.max(binding.dStreamOutSize(), 1 << 20)
  try {
    dctx.reset(binding.ResetDirective.sessionOnly)
    // the frame header usually records the size: then one buffer takes it all (one byte more shows
    // whether anything follows)
    let announced: number | null = null
    try {
      announced = binding.getFrameContentSize(input)
    } catch {
      announced = null
    }
    let next = announced !== null && announced < limit ? announced + 1 : step
    while (src.length > 0 || lastReturn !== 0) {
      const out = Buffer.allocUnsafe(Math.min(next, limit - total + 1))
      next = step
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
