/**
 * Compression of VMA archives the way vzdump does it: the whole byte stream is piped through `zstd`,
 * `gzip`/`pigz` or `lzop`, with vzdump's options and file extensions; reading recognises the compressed
 * formats by their magic bytes.
 *
 * The tools' own binaries are used rather than an in-process binding: they run in a separate process
 * (on another core) and measured faster here (see the package's bench).
 *
 * @since 0.1.0
 */
import { availableParallelism } from "node:os"
import { which } from "./internal/io.js"

/**
 * A compressor and its vzdump options.
 *
 * - `zstd`: `threads` as vzdump's `zstd` option (default 1; 0 = half of the CPUs); `level` is passed as
 *   `-<level>` when given (vzdump leaves zstd's default, 3).
 * - `gzip`: `pigz` as vzdump's `pigz` option: 0 (default) uses `gzip --rsyncable`, 1 uses `pigz` with half
 *   of the CPUs, N > 1 uses `pigz -p N`.
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

const halfCpus = () => Math.max(1, Math.floor(availableParallelism() / 2))

/**
 * The compressor vzdump runs for a `compress` option value (`0`, `1`, `gzip`, `lzo`, `zstd`), or
 * `undefined` for no compression.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fromVzdumpOption = (
  compress: string | boolean | number | undefined,
  options: { readonly zstd?: number | undefined; readonly pigz?: number | undefined } = {}
): Compression | undefined => {
  switch (String(compress ?? "0")) {
    case "0":
    case "false":
      return undefined
    case "1":
    case "true":
    case "lzo":
      return { format: "lzo" }
    case "gzip":
      return { format: "gzip", pigz: options.pigz }
    case "zstd":
      return { format: "zstd", threads: options.zstd }
    default:
      return undefined
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
 * The compressor command vzdump runs (stdin → stdout).
 *
 * @since 0.1.0
 * @category utils
 */
export const compressorCommand = (compression: Compression): Command => {
  switch (compression.format) {
    case "zstd": {
      const threads = compression.threads === undefined
        ? 1
        : compression.threads === 0
        ? halfCpus()
        : compression.threads
      const level = compression.level === undefined
        ? []
        : compression.level > 19
        ? ["--ultra", `-${compression.level}`]
        : [`-${compression.level}`]
      return { command: "zstd", args: [...level, `--threads=${threads}`] }
    }
    case "gzip": {
      const pigz = compression.pigz ?? 0
      return pigz > 0
        ? { command: "pigz", args: ["-p", String(pigz === 1 ? halfCpus() : pigz), "--rsyncable"] }
        : { command: "gzip", args: ["--rsyncable"] }
    }
    case "lzo":
      return { command: "lzop", args: [] }
  }
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
