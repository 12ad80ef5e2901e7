/**
 * vzdump's file names and compressors: `vzdump-qemu-<vmid>-YYYY_MM_DD-HH_MM_SS.vma[.zst|.gz|.lzo]`
 * (backup start, local time), the temporary `.dat` name, the `.log`/`.notes`/`.protected` side
 * files, PBS snapshot names, and the `compress` option → extension and compressor command line.
 *
 * @since 0.1.0
 */
import * as Schema from "effect/Schema"
import * as Os from "node:os"
import * as perl from "./internal/perlFormat.js"

/**
 * The `compress` option after normalisation (`1` is `lzo`, `0` is `none`).
 *
 * @since 0.1.0
 * @category models
 */
export type Compression = "none" | "lzo" | "gzip" | "zstd"

/**
 * The archive extension a compression adds.
 *
 * @since 0.1.0
 * @category models
 */
export type CompressionExtension = "lzo" | "gz" | "zst"

/**
 * A VMID as vzdump and pve-storage accept it: `[1-9][0-9]{2,8}` (100 … 999999999).
 *
 * @since 0.1.0
 * @category schemas
 */
export const Vmid = Schema.Int.pipe(Schema.between(100, 999_999_999), Schema.brand("@vzdump/core/Vmid"))

/**
 * @since 0.1.0
 * @category models
 */
export type Vmid = typeof Vmid.Type

/**
 * The `compress` option as vzdump accepts it: `0`, `1`, `gzip`, `lzo`, `zstd` (booleans too), decoded
 * to a `Compression`.
 *
 * @since 0.1.0
 * @category schemas
 */
export const CompressOption = Schema.transform(
  Schema.Union(Schema.Literal("0", "1", "gzip", "lzo", "zstd"), Schema.Boolean, Schema.Literal(0, 1)),
  Schema.Literal("none", "lzo", "gzip", "zstd"),
  {
    strict: true,
    decode: (value) =>
      value === "0" || value === 0 || value === false
        ? "none" as const
        : value === "1" || value === 1 || value === true || value === "lzo"
        ? "lzo" as const
        : value,
    encode: (compression) => compression === "none" ? "0" as const : compression
  }
)

/**
 * Options that pick the compressor command (vzdump's `compress`, `zstd`, `pigz`).
 *
 * @since 0.1.0
 * @category models
 */
export interface CompressorOptions {
  readonly compress: Compression
  /** zstd threads, default 1; `0` = half the CPUs. */
  readonly zstd?: number | undefined
  /** `> 0`: pigz instead of gzip; `1` = half the CPUs, `N > 1` = N threads. Default 0. */
  readonly pigz?: number | undefined
  /** CPU count for the "half the CPUs" cases; defaults to the host's. */
  readonly cpus?: number | undefined
}

/**
 * The compressor vzdump forks (stdin → stdout) and the extension it adds.
 *
 * @since 0.1.0
 * @category models
 */
export interface Compressor {
  /** `zstd --threads=1`, as vzdump logs and execs it. */
  readonly commandLine: string
  /** The same as an argument vector: program first. */
  readonly argv: ReadonlyArray<string>
  readonly extension: CompressionExtension
}

const halfTheCpus = (cpus: number | undefined): number => perl.int(((cpus ?? Os.availableParallelism()) + 1) / 2)

/**
 * The zstd thread count vzdump uses for its `zstd` option: default 1, `0` = half the CPUs.
 *
 * @since 0.1.0
 * @category utils
 */
export const zstdThreads = (options: Pick<CompressorOptions, "zstd" | "cpus">): number => {
  const zstd = options.zstd ?? 1
  return zstd === 0 ? halfTheCpus(options.cpus) : zstd
}

/**
 * vzdump's `compressor_info`: `lzop`; `gzip --rsyncable` or `pigz -p N --rsyncable`;
 * `zstd --threads=N`. `undefined` for no compression.
 *
 * @since 0.1.0
 * @category constructors
 */
export const compressor = (options: CompressorOptions): Compressor | undefined => {
  const make = (commandLine: string, extension: CompressionExtension): Compressor => ({
    commandLine,
    argv: commandLine.split(" "),
    extension
  })
  switch (options.compress) {
    case "none":
      return undefined
    case "lzo":
      return make("lzop", "lzo")
    case "gzip": {
      const pigz = options.pigz ?? 0
      if (pigz > 0) return make(`pigz -p ${pigz === 1 ? halfTheCpus(options.cpus) : pigz} --rsyncable`, "gz")
      return make("gzip --rsyncable", "gz")
    }
    case "zstd":
      return make(`zstd --threads=${zstdThreads(options)}`, "zst")
  }
}

/**
 * The restore-side decompressor for an archive extension (`zst`, `gz`, `lzo`, `bz2`).
 *
 * @since 0.1.0
 * @category constructors
 */
export const decompressor = (extension: string): ReadonlyArray<string> | undefined => {
  switch (extension) {
    case "zst":
      return ["zstd", "-q", "-d", "-c"]
    case "gz":
      return ["zcat"]
    case "lzo":
      return ["lzop", "-d", "-c"]
    case "bz2":
      return ["bzcat", "-q"]
    default:
      return undefined
  }
}

/**
 * `-YYYY_MM_DD-HH_MM_SS` of `at` in local time (`timeZone`: an IANA zone; the process's when omitted).
 *
 * @since 0.1.0
 * @category names
 */
export const timestampSuffix = (at: Date, timeZone?: string): string => {
  const t = perl.timeParts(at, timeZone)
  return `-${String(t.year).padStart(4, "0")}_${perl.pad2(t.month)}_${perl.pad2(t.day)}-${perl.pad2(t.hour)}_${
    perl.pad2(t.minute)
  }_${perl.pad2(t.second)}`
}

/**
 * All names of one backup.
 *
 * @since 0.1.0
 * @category models
 */
export interface BackupNames {
  /** `vzdump-qemu-100-2026_11_27-10_00_00` */
  readonly basename: string
  /** `vzdump-qemu-100-2026_11_27-10_00_00.vma.zst` */
  readonly archive: string
  /** The name written while the backup runs: the archive's last extension replaced by `.dat`. */
  readonly temp: string
  /** `<basename>.log` */
  readonly log: string
  /** `<archive>.notes` */
  readonly notes: string
  /** `<archive>.protected` */
  readonly protected: string
  /** `<basename>.tmp`: vzdump's temp directory for the config files on a directory storage. */
  readonly tmpDir: string
}

/**
 * `vzdump-qemu-<vmid>` (the prefix of every archive of a guest; prune lists `<prefix>-*`).
 *
 * @since 0.1.0
 * @category names
 */
export const groupPrefix = (vmid: number, type: "qemu" | "lxc" = "qemu"): string => `vzdump-${type}-${vmid}`

/**
 * Replaces the last extension with `.dat`: `….vma.zst` → `….vma.dat`, `….vma` → `….dat`.
 *
 * @since 0.1.0
 * @category names
 */
export const tempName = (archive: string): string => archive.replace(/\.[^.]+$/, ".dat")

/**
 * The names of a VM backup started at `at`.
 *
 * @example
 * backupNames({ vmid: 100, at: new Date("2026-11-27T09:00:00Z"), compression: "zst", timeZone: "Europe/Vienna" })
 * // archive: "vzdump-qemu-100-2026_11_27-10_00_00.vma.zst", temp: "vzdump-qemu-100-2026_11_27-10_00_00.vma.dat"
 *
 * @since 0.1.0
 * @category names
 */
export const backupNames = (options: {
  readonly vmid: number
  readonly at: Date
  /** Extension of the compressor, if any. */
  readonly compression?: CompressionExtension | undefined
  readonly timeZone?: string | undefined
}): BackupNames => {
  const basename = `${groupPrefix(options.vmid)}${timestampSuffix(options.at, options.timeZone)}`
  const archive = `${basename}.vma${options.compression === undefined ? "" : `.${options.compression}`}`
  return {
    basename,
    archive,
    temp: tempName(archive),
    log: `${basename}.log`,
    notes: `${archive}.notes`,
    protected: `${archive}.protected`,
    tmpDir: `${basename}.tmp`
  }
}

/**
 * vzdump's working log of a guest: `/var/log/vzdump/qemu-<vmid>.log` (directory configurable).
 *
 * @since 0.1.0
 * @category names
 */
export const workingLogPath = (vmid: number, logDir = "/var/log/vzdump"): string => `${logDir}/qemu-${vmid}.log`

/**
 * A PBS snapshot name `vm/<vmid>/<UTC time>` (`strftime("%FT%TZ", gmtime)`), e.g.
 * `vm/100/2026-11-27T09:00:00Z`.
 *
 * @since 0.1.0
 * @category names
 */
export const pbsSnapshotName = (vmid: number, at: Date): string =>
  `vm/${vmid}/${perl.timestamp(at, "UTC").replace(" ", "T")}Z`

/**
 * A standard archive name, taken apart (pve-storage's `archive_info`).
 *
 * @since 0.1.0
 * @category models
 */
export interface ArchiveNameInfo {
  readonly type: "qemu" | "lxc" | "openvz"
  readonly vmid: number
  readonly format: "vma" | "tar" | "tgz"
  readonly compression: "gz" | "lzo" | "zst" | "bz2" | undefined
  /** Local wall-clock time from the name. */
  readonly time: perl.TimeParts
}

const archiveNamePattern = new RegExp(
  "^vzdump-(qemu|lxc|openvz)-([1-9][0-9]{2,8})-(\\d{4})_(\\d{2})_(\\d{2})-(\\d{2})_(\\d{2})_(\\d{2})" +
    "\\.(?:(tgz)|(tar|vma)(?:\\.(gz|lzo|zst|bz2))?)$"
)

/**
 * Parses a file name (no directory) that follows vzdump's scheme; `undefined` for any other name
 * (those are never pruned).
 *
 * @since 0.1.0
 * @category parsing
 */
export const parseArchiveName = (name: string): ArchiveNameInfo | undefined => {
  const m = archiveNamePattern.exec(name)
  if (m === null) return undefined
  return {
    type: m[1] as ArchiveNameInfo["type"],
    vmid: Number(m[2]),
    format: m[9] !== undefined ? "tgz" : m[10] as "tar" | "vma",
    compression: m[11] as ArchiveNameInfo["compression"],
    time: {
      year: Number(m[3]),
      month: Number(m[4]),
      day: Number(m[5]),
      hour: Number(m[6]),
      minute: Number(m[7]),
      second: Number(m[8])
    }
  }
}
