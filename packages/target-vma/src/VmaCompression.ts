/**
 * Compression of VMA archives the way vzdump does it: the whole byte stream goes through zstd,
 * `gzip`/`pigz` or `lzop`, with vzdump's options and file extensions; reading recognises the compressed
 * formats by their magic bytes.
 *
 * zstd runs in this process through the `zstd-napi` binding: a worker thread drives zstd's multi-threaded
 * mode with vzdump's thread count and writes the compressed stream, while the main thread keeps reading
 * and encoding; data in shared memory (the `vma` CLI's read buffers) is compressed in place. Against
 * piping the stream to a `zstd` process this saves the copy through a 64 KiB pipe and a process; on this
 * project's 2-core machines both measure about the same wall time (bench/vma.ts prints both), with less
 * CPU for the in-process path. gzip (`gzip`/`pigz`) and lzo (`lzop`) run as the tools' own binaries, as
 * vzdump runs them; reading pipes every format through the tool (`zstd -d`, …).
 *
 * @since 0.1.0
 */
import * as VzdumpNames from "@vzdump/core/VzdumpNames"
import * as Option from "effect/Option"
import * as Schema from "effect/Schema"
import { which } from "./internal/io.js"

/**
 * A compressor and its vzdump options.
 *
 * - `zstd`: `threads` as vzdump's `zstd` option (default 1; 0 = half of the CPUs, rounded up as vzdump's
 *   `int((n + 1) / 2)`); `level` when given (vzdump leaves zstd's default, 3). Compressed in this process.
 * - `gzip`: `pigz` as vzdump's `pigz` option: 0 (default) uses `gzip --rsyncable`, 1 uses `pigz` with half
 *   of the CPUs (rounded up likewise), N > 1 uses `pigz -p N`.
 * - `lzo`: `lzop`.
 *
 * @since 0.1.0
 * @category models
 */
export type Compression =
  | { readonly format: "zstd"; readonly threads?: number | undefined; readonly level?: number | undefined }
  | { readonly format: "gzip"; readonly pigz?: number | undefined }
  | { readonly format: "lzo" }

/**
 * Formats recognised when reading.
 *
 * @since 0.1.0
 * @category models
 */
export type DetectedFormat = "vma" | "zstd" | "gzip" | "lzo" | "bzip2" | "unknown"

/**
 * A command line without a shell.
 *
 * @since 0.1.0
 * @category models
 */
export interface Command {
  readonly command: string
  readonly args: ReadonlyArray<string>
}

const decodeCompress = Schema.decodeUnknownOption(VzdumpNames.CompressOption)

/**
 * The compressor vzdump runs for a `compress` option value (`0`, `1`, `gzip`, `lzo`, `zstd`, or a boolean,
 * also as `"true"`/`"false"`),
 * or `undefined` for no compression or an unknown value. Decoded by core's `VzdumpNames.CompressOption`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fromVzdumpOption = (
  compress: string | boolean | number | undefined,
  options: { readonly zstd?: number | undefined; readonly pigz?: number | undefined } = {}
): Compression | undefined => {
  // command lines spell booleans as strings
  const decoded = decodeCompress(compress === "true" ? true : compress === "false" ? false : compress ?? "0")
  if (Option.isNone(decoded)) return undefined
  switch (decoded.value) {
    case "none":
      return undefined
    case "lzo":
      return { format: "lzo" }
    case "gzip":
      return { format: "gzip", pigz: options.pigz }
    case "zstd":
      return { format: "zstd", threads: options.zstd }
  }
}

/**
 * The archive extension vzdump uses: `.zst`, `.gz`, `.lzo`, or `""` without compression.
 *
 * @since 0.1.0
 * @category utils
 */
export const extension = (compression: Compression | undefined): "" | ".zst" | ".gz" | ".lzo" =>
  compression === undefined
    ? ""
    : compression.format === "zstd"
    ? ".zst"
    : compression.format === "gzip"
    ? ".gz"
    : ".lzo"

/**
 * The compression implied by a file name's extension (`.zst`, `.gz`, `.lzo`).
 *
 * @since 0.1.0
 * @category utils
 */
export const fromPath = (path: string): Compression | undefined =>
  path.endsWith(".zst")
    ? { format: "zstd" }
    : path.endsWith(".gz")
    ? { format: "gzip" }
    : path.endsWith(".lzo")
    ? { format: "lzo" }
    : undefined

/**
 * vzdump's temporary name while an archive is written: the last extension replaced by `.dat`
 * (`x.vma.zst` → `x.vma.dat`, `x.vma` → `x.dat`).
 *
 * @since 0.1.0
 * @category utils
 */
export const temporaryPath = (path: string): string => {
  const slash = path.lastIndexOf("/")
  const dot = path.lastIndexOf(".")
  return dot > slash + 1 ? `${path.slice(0, dot)}.dat` : `${path}.dat`
}

/**
 * The compressor command vzdump runs (stdin → stdout), built from core's `VzdumpNames.compressor` (the
 * one copy of vzdump's rules), plus the zstd `level` when one is given.
 *
 * @since 0.1.0
 * @category utils
 */
export const compressorCommand = (compression: Compression): Command => {
  const options: VzdumpNames.CompressorOptions = compression.format === "zstd"
    ? { compress: "zstd", zstd: compression.threads }
    : compression.format === "gzip"
    ? { compress: "gzip", pigz: compression.pigz }
    : { compress: "lzo" }
  // vzdump's command line, from core's single copy of its rules (defined for every compression but "none").
  const argv = VzdumpNames.compressor(options)!.argv
  // Our extra: an explicit zstd level (vzdump leaves zstd's default), placed before vzdump's options.
  const level = compression.format !== "zstd" || compression.level === undefined
    ? []
    : compression.level > 19
    ? ["--ultra", `-${compression.level}`]
    : [`-${compression.level}`]
  return { command: argv[0]!, args: [...level, ...argv.slice(1)] }
}

/**
 * The decompressor for a detected format (stdin → stdout). gzip uses `pigz -d` when installed (several
 * times faster than `zcat` here), else `gzip -d`.
 *
 * @since 0.1.0
 * @category utils
 */
export const decompressorCommand = (format: "zstd" | "gzip" | "lzo" | "bzip2"): Command => {
  switch (format) {
    case "zstd":
      return { command: "zstd", args: ["-q", "-d", "-c"] }
    case "gzip":
      return which("pigz") !== undefined
        ? { command: "pigz", args: ["-d", "-c"] }
        : { command: "gzip", args: ["-d", "-c"] }
    case "lzo":
      return { command: "lzop", args: ["-d", "-c"] }
    case "bzip2":
      return { command: "bzip2", args: ["-q", "-d", "-c"] }
  }
}

const starts = (b: Uint8Array, magic: ReadonlyArray<number>) =>
  b.length >= magic.length && magic.every((v, i) => b[i] === v)

/**
 * The number of leading bytes `detect` needs.
 *
 * @since 0.1.0
 * @category utils
 */
export const DETECT_BYTES = 9

/**
 * Recognises a stream by its first bytes.
 *
 * @since 0.1.0
 * @category utils
 */
export const detect = (prefix: Uint8Array): DetectedFormat =>
  starts(prefix, [0x56, 0x4d, 0x41, 0x00])
    ? "vma"
    : starts(prefix, [0x28, 0xb5, 0x2f, 0xfd])
    ? "zstd"
    : starts(prefix, [0x1f, 0x8b])
    ? "gzip"
    : starts(prefix, [0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a])
    ? "lzo"
    : starts(prefix, [0x42, 0x5a, 0x68])
    ? "bzip2"
    : "unknown"
