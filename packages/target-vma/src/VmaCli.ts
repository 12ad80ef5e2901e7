/**
 * The `vma` command line, compatible in arguments and output with Proxmox's `vma` tool:
 *
 * ```text
 * vma list <filename>
 * vma config <filename> [-c <config>]
 * vma create <filename> [-v] [-c <config>]... [-d format=raw:<device name>=<path>]...
 * vma extract <filename> [-v] [-d <drive-list>] <targetdir>
 * vma verify <filename> [-v]
 * ```
 *
 * `<filename>` may be `-` (stdin) for reading commands, and compressed archives (`.zst`, `.gz`, `.lzo`) are
 * read directly. `create` compresses by the archive's extension (or `--compress`, `--zstd`, `--pigz`,
 * `--zstd-level` as vzdump's options); its archive may also be `exec:<command>` or an existing FIFO, never an
 * existing file, and it leaves no partial archive behind on failure. Errors are one line on stderr with a
 * non-zero exit status. A thin layer over {@link VmaReader} and {@link VmaWriter}.
 *
 * @since 0.1.0
 */
import * as fs from "node:fs"
import * as path from "node:path"
import * as Cause from "effect/Cause"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as io from "./internal/io.js"
import { ctime, formatG } from "./internal/text.js"
import * as VmaCompression from "./VmaCompression.js"
import type { VmaIoError } from "./VmaError.js"
import * as VmaInput from "./VmaInput.js"
import * as VmaOutput from "./VmaOutput.js"
import * as VmaReader from "./VmaReader.js"
import * as VmaWriter from "./VmaWriter.js"

/**
 * Where the CLI writes and reads.
 *
 * @since 0.1.0
 * @category models
 */
export interface CliIo {
  readonly stdout: (data: string | Uint8Array) => Effect.Effect<void>
  readonly stderr: (data: string) => Effect.Effect<void>
}

const writeTo = (stream: NodeJS.WriteStream) => (data: string | Uint8Array): Effect.Effect<void> =>
  Effect.async<void>((resume) => {
    stream.write(data, () => resume(Effect.void))
  })

/**
 * The process's stdout and stderr.
 *
 * @since 0.1.0
 * @category constructors
 */
export const processIo: CliIo = {
  stdout: writeTo(process.stdout),
  stderr: writeTo(process.stderr)
}

class CliError extends Data.TaggedError("CliError")<{ readonly message: string; readonly code: number }> {}

const failWith = (message: string, code = 1) => Effect.fail(new CliError({ message, code }))

const HELP = "usage: vma command [command options]\n" +
  "\n" +
  "vma list <filename>\n" +
  "vma config <filename> [-c <config>]\n" +
  "vma create <filename> [-v] [-c <config>] [-d format=<format>:<device name>=<path> [-d ...]]\n" +
  "vma extract <filename> [-v] [-d <drive-list>] <targetdir>\n" +
  "vma verify <filename> [-v]\n"

interface Parsed {
  readonly options: ReadonlyArray<{ readonly name: string; readonly value: string }>
  readonly operands: ReadonlyArray<string>
}

/** GNU getopt with argument permutation, plus `--name[=value]` long options. */
const getopt = (
  args: ReadonlyArray<string>,
  short: string,
  long: ReadonlyArray<string> = []
): Parsed | string => {
  const options: Array<{ name: string; value: string }> = []
  const operands: Array<string> = []
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!
    if (a === "--") {
      operands.push(...args.slice(i + 1))
      break
    }
    if (a.startsWith("--")) {
      const eq = a.indexOf("=")
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq)
      if (!long.includes(name)) return `unrecognized option '${a}'`
      if (eq >= 0) options.push({ name, value: a.slice(eq + 1) })
      else if (i + 1 < args.length) options.push({ name, value: args[++i]! })
      else return `option '--${name}' requires an argument`
      continue
    }
    if (a.startsWith("-") && a.length > 1) {
      for (let k = 1; k < a.length; k++) {
        const c = a[k]!
        const at = short.indexOf(c)
        if (at < 0 || c === ":") return `invalid option -- '${c}'`
        if (short[at + 1] !== ":") {
          options.push({ name: c, value: "" })
          continue
        }
        if (k + 1 < a.length) options.push({ name: c, value: a.slice(k + 1) })
        else if (i + 1 < args.length) options.push({ name: c, value: args[++i]! })
        else return `option requires an argument -- '${c}'`
        break
      }
      continue
    }
    operands.push(a)
  }
  return { options, operands }
}

const usage = (cli: CliIo, problem?: string) =>
  Effect.zipRight(
    problem === undefined ? Effect.void : cli.stderr(`vma: ${problem}\n`),
    Effect.as(cli.stdout(HELP), 1)
  )

const parse = (
  cli: CliIo,
  args: ReadonlyArray<string>,
  short: string,
  operands: number,
  long?: ReadonlyArray<string>
) =>
  Effect.suspend(() => {
    const parsed = getopt(args, short, long)
    if (typeof parsed === "string") return Effect.flatMap(usage(cli, parsed), (code) => failWith("", code))
    if (parsed.options.some((o) => o.name === "h")) return Effect.flatMap(usage(cli), (code) => failWith("", code))
    if (operands >= 0 && parsed.operands.length !== operands) {
      return Effect.flatMap(usage(cli), (code) => failWith("", code))
    }
    return Effect.succeed(parsed)
  })

const has = (p: Parsed, name: string) => p.options.some((o) => o.name === name)
const values = (p: Parsed, name: string) => p.options.filter((o) => o.name === name).map((o) => o.value)

// ---------------------------------------------------------------------------------------------------------------
// reading commands
// ---------------------------------------------------------------------------------------------------------------

const openArchive = (file: string) =>
  VmaInput.file(file).pipe(
    Effect.mapError((e) =>
      e._tag === "VmaIoError" && (e.operation === "open" || e.operation === "stat")
        ? new CliError({ message: `can't open file ${file} - ${e.detail}`, code: 1 })
        : new CliError({ message: e.message, code: 1 })
    ),
    Effect.flatMap((input) =>
      Effect.mapError(VmaReader.open(input), (e) => new CliError({ message: e.message, code: 1 }))
    )
  )

const content = (header: VmaReader.VmaHeader): string => {
  let out = ""
  for (const c of header.configs) out += `CFG: size: ${c.data.length} name: ${c.name}\n`
  for (const d of header.devices) {
    out += d.name === "vmstate"
      ? `VMSTATE: dev_id=${d.id} memory: ${d.size}\n`
      : `DEV: dev_id=${d.id} size: ${d.size} devname: ${d.name}\n`
  }
  return `${out}CTIME: ${ctime(header.ctime)}`
}

/** Proxmox's reader prints progress per cluster whenever the percentage changes. */
const progressPrinter = (cli: CliIo) => {
  const start = Date.now()
  let last = 0
  let n = 0
  return (extent: VmaReader.VmaExtent, stats: VmaReader.VmaReadStats): Effect.Effect<void> => {
    if (stats.clusterTotal === 0) return Effect.void
    let out = ""
    const duration = Math.floor((Date.now() - start) / 1000)
    for (let i = 0; i < extent.clusters.length; i++) {
      n++
      const percent = Math.floor((n * 100) / stats.clusterTotal)
      if (percent !== last) {
        out += `progress ${percent}% (read ${n * 65536} bytes, duration ${duration} sec)\n`
        last = percent
      }
    }
    return out.length === 0 ? Effect.void : cli.stdout(out)
  }
}

const summary = (stats: VmaReader.VmaReadStats): string => {
  if (stats.clusters === 0) return "vma archive contains no image data\n"
  const total = stats.clusters * 65536
  const sparse = formatG((100 * stats.zeroBytes) / total)
  let out = `total bytes read ${total}, sparse bytes ${stats.zeroBytes} (${sparse}%)\n`
  const data = total - stats.zeroBytes
  if (data !== 0) out += `space reduction due to 4K zero blocks ${formatG((100 * stats.partialZeroBytes) / data)}%\n`
  return out
}

const list = (cli: CliIo, args: ReadonlyArray<string>) =>
  Effect.scoped(Effect.gen(function*() {
    const p = yield* parse(cli, args, "h", 1)
    const archive = yield* openArchive(p.operands[0]!)
    yield* cli.stdout(content(archive.header))
    return 0
  }))

const config = (cli: CliIo, args: ReadonlyArray<string>) =>
  Effect.scoped(Effect.gen(function*() {
    const p = yield* parse(cli, args, "hc:", 1)
    const name = values(p, "c").pop() ?? "qemu-server.conf"
    const archive = yield* openArchive(p.operands[0]!)
    const found = archive.header.configs.find((c) => c.name === name)
    if (found === undefined) return yield* failWith(`unable to find configuration data '${name}'`, 255)
    yield* cli.stdout(found.data)
    return 0
  }))

const verify = (cli: CliIo, args: ReadonlyArray<string>) =>
  Effect.scoped(Effect.gen(function*() {
    const p = yield* parse(cli, args, "hv", 1)
    const verbose = has(p, "v")
    const archive = yield* openArchive(p.operands[0]!)
    if (verbose) yield* cli.stdout(content(archive.header))
    const stats = yield* VmaReader.verify(archive, verbose ? { onExtent: progressPrinter(cli) } : {}).pipe(
      Effect.mapError((e) => new CliError({ message: `verify failed - ${e.message}`, code: 1 }))
    )
    if (verbose) yield* cli.stdout(summary(stats))
    return 0
  }))

const extract = (cli: CliIo, args: ReadonlyArray<string>) =>
  Effect.scoped(Effect.gen(function*() {
    const p = yield* parse(cli, args, "hvd:r:", 2)
    if (has(p, "r")) return yield* failWith("option -r (restore map fifo) is not supported")
    const verbose = has(p, "v")
    const drives = values(p, "d")
    const [file, directory] = p.operands as [string, string]
    const archive = yield* openArchive(file)
    const result = yield* VmaReader.extract(archive, {
      directory,
      devices: drives.length === 0 ? undefined : drives.flatMap((d) => d.split(",")).filter((d) => d.length > 0),
      onDevice: (device, file) => cli.stdout(`DEVINFO ${file} ${device.size}\n`),
      onExtent: verbose ? progressPrinter(cli) : undefined
    }).pipe(Effect.mapError((e) =>
      new CliError({
        message: e._tag === "VmaIoError" && e.operation === "create directory"
          ? `unable to create target directory ${directory} - ${e.detail}`
          : `restore failed - ${e.message}`,
        code: 1
      })
    ))
    if (verbose) yield* cli.stdout(summary(result.stats))
    return 0
  }))

// ---------------------------------------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------------------------------------

interface DiskSpec {
  readonly name: string
  readonly path: string
  readonly format: string | undefined
}

/** `[format=<fmt>:]<devname>=<path>`; without `=`, the name is `disk<index>`. */
const parseDisk = (spec: string, index: number): DiskSpec | string => {
  let rest = spec
  let format: string | undefined
  if (rest.startsWith("format=")) {
    const colon = rest.indexOf(":")
    if (colon < 0) return `read map failed - option 'format' not terminated ('${spec}')`
    format = rest.slice("format=".length, colon)
    rest = rest.slice(colon + 1)
  }
  const eq = rest.indexOf("=")
  return eq < 0
    ? { name: `disk${index}`, path: rest, format }
    : { name: rest.slice(0, eq), path: rest.slice(eq + 1), format }
}

const deviceSize = (st: fs.Stats, file: string): Effect.Effect<number, VmaIoError> => {
  if (st.isFile()) return Effect.succeed(st.size)
  if (st.isBlockDevice()) {
    const major = (st.rdev >>> 8) & 0xfff
    const minor = (st.rdev & 0xff) | ((st.rdev >>> 12) & 0xfff00)
    return Effect.map(io.readFile(`/sys/dev/block/${major}:${minor}/size`), (b) => Number(b.toString().trim()) * 512)
  }
  return Effect.fail(io.ioError("open", file, { code: "EINVAL" }))
}

const CHUNK = 4 * 1024 * 1024

const compressionOption = (p: Parsed, archive: string): VmaCompression.Compression | undefined | string => {
  const compress = values(p, "compress").pop()
  const threads = values(p, "zstd").pop()
  const pigz = values(p, "pigz").pop()
  const level = values(p, "zstd-level").pop()
  const base = compress === undefined
    ? VmaCompression.fromPath(archive)
    : VmaCompression.fromVzdumpOption(compress)
  if (compress !== undefined && base === undefined && !["0", "none", "false"].includes(compress)) {
    return `unknown compression '${compress}'`
  }
  for (const [name, v] of [["zstd", threads], ["pigz", pigz], ["zstd-level", level]] as const) {
    if (v !== undefined && !/^\d+$/.test(v)) return `option --${name} needs a number, got '${v}'`
  }
  if (base === undefined) return undefined
  if (base.format === "zstd") {
    return {
      format: "zstd",
      threads: threads === undefined ? undefined : Number(threads),
      level: level === undefined ? undefined : Number(level)
    }
  }
  if (base.format === "gzip") return { format: "gzip", pigz: pigz === undefined ? undefined : Number(pigz) }
  return base
}

const create = (cli: CliIo, args: ReadonlyArray<string>) =>
  Effect.scoped(Effect.gen(function*() {
    const p = yield* parse(cli, args, "hvc:d:", -1, ["compress", "zstd", "pigz", "zstd-level"])
    if (p.operands.length < 1) return yield* usage(cli)
    const verbose = has(p, "v")
    const archive = p.operands[0]!
    const legacy = p.operands.slice(1)
    const dOptions = values(p, "d")
    if (legacy.length > 0 && dOptions.length > 0) {
      return yield* failWith("Unexpected extra argument - specify all devices via '-d'")
    }
    const compression = compressionOption(p, archive)
    if (typeof compression === "string") return yield* failWith(compression)
    const disks: Array<DiskSpec> = []
    for (const spec of legacy.length > 0 ? legacy : dOptions) {
      const disk = parseDisk(spec, disks.length)
      if (typeof disk === "string") return yield* failWith(disk)
      if (disk.format === undefined) {
        if (legacy.length === 0) return yield* failWith(`No format specified for device: '${spec}'`)
        yield* cli.stderr(
          `vma: warning: Specifying a device without a format is deprecated - use '-d format=<format>:${spec}'\n`
        )
      } else if (disk.format !== "raw") {
        return yield* failWith(`bdrv_open '${disk.path}' failed - unsupported format '${disk.format}' (only raw)`)
      }
      disks.push(disk)
    }
    const configs: Array<VmaWriter.VmaConfigInput> = []
    for (const file of values(p, "c")) {
      const data = yield* io.readFile(file).pipe(
        Effect.mapError((e) => new CliError({ message: `Unable to read file: ${file}: ${e.detail}`, code: 1 }))
      )
      configs.push({ name: path.basename(file), data })
    }
    const sources: Array<{ readonly fd: number; readonly size: number; readonly disk: DiskSpec }> = []
    for (const disk of disks) {
      const opened = Effect.acquireRelease(io.open(disk.path, fs.constants.O_RDONLY), io.closeQuietly).pipe(
        Effect.flatMap((fd) =>
          Effect.map(Effect.flatMap(io.fstat(fd, disk.path), (st) => deviceSize(st, disk.path)), (size) => ({
            fd,
            size,
            disk
          }))
        ),
        Effect.mapError((e) => new CliError({ message: `bdrv_open '${disk.path}' failed - ${e.detail}`, code: 1 }))
      )
      sources.push(yield* opened)
    }
    const output = yield* openOutput(archive, compression).pipe(
      Effect.mapError((e) =>
        new CliError({
          message: e._tag === "VmaIoError" ? `can't open file ${archive} - ${e.detail}` : e.message,
          code: 1
        })
      )
    )
    // Up to WRITE_BEHIND archive writes run behind the reads and the encoding: on an uncompressed file at
    // the same time, so the copying into the page cache (the main cost of `create`) goes on without
    // pauses; compressors and pipes take one at a time.
    const WRITE_BEHIND = 4
    const writer = yield* VmaWriter.make({
      output,
      writeBehind: WRITE_BEHIND,
      configs,
      devices: sources.map((s) => ({ name: s.disk.name, size: s.size }))
    })
    let lastPercent = -1
    const progress = Effect.gen(function*() {
      if (!verbose) return
      const stats = yield* writer.stats
      let total = 0
      let transferred = 0
      let zeroBytes = 0
      for (const d of stats.devices) {
        total += d.size
        transferred += d.transferred
        zeroBytes += d.zeroBytes
      }
      const percent = total === 0 ? 100 : Math.floor((transferred * 100) / total)
      if (percent !== lastPercent) {
        lastPercent = percent
        yield* cli.stderr(`progress ${percent}% ${transferred}/${total} ${zeroBytes}\n`)
      }
    })
    // A ring of read buffers for whole chunks: the next READ_AHEAD chunks are read while the current one is
    // encoded and written. A whole 4 MiB chunk (64 clusters) holds more than an extent (58 clusters), so
    // every `writeData` of one completes an extent and starts a write, and the writer's unfinished extent
    // holds clusters of the last whole chunk at most. When the call for whole chunk k returns, the writes
    // still running (write-behind) are at most those started since the call for whole chunk
    // k - WRITE_BEHIND + 1, and they reference whole chunks k - WRITE_BEHIND … k (an extent starts at most
    // one whole chunk before the one completing it), while k + 1 … k + READ_AHEAD are being read: a ring of
    // READ_AHEAD + WRITE_BEHIND + 2 buffers never hands out one still in use. A shorter chunk (the end of a
    // device) gets a buffer of its own: an extent may gather clusters of many of them (small devices).
    // Reusing buffers keeps the garbage collector out of the way.
    const READ_AHEAD = 2
    // Shared memory, so an in-process zstd compresses the chunks in place on its thread (see VmaOutput).
    const ring = Array.from(
      { length: READ_AHEAD + WRITE_BEHIND + 2 },
      () => Buffer.from(new SharedArrayBuffer(CHUNK))
    )
    let turn = 0
    for (const [i, source] of sources.entries()) {
      const readAt = (offset: number) => {
        const length = Math.min(CHUNK, source.size - offset)
        const buffer = length === CHUNK ? ring[turn++ % ring.length]! : Buffer.from(new SharedArrayBuffer(length))
        return io.readInto(source.fd, buffer, offset, source.disk.path).pipe(
          Effect.filterOrFail(
            (n) => n === length,
            () => io.ioError("read", source.disk.path, new Error("unexpected end of file"))
          ),
          Effect.as(buffer)
        )
      }
      const reads: Array<Fiber.Fiber<Buffer, VmaIoError>> = []
      let readOffset = 0
      const readMore = Effect.gen(function*() {
        while (reads.length < READ_AHEAD && readOffset < source.size) {
          reads.push(yield* Effect.fork(readAt(readOffset)))
          readOffset += Math.min(CHUNK, source.size - readOffset)
        }
      })
      let offset = 0
      yield* readMore
      while (offset < source.size) {
        const chunk = yield* Fiber.join(reads.shift()!)
        yield* readMore
        yield* writer.writeData(i + 1, offset, chunk)
        offset += chunk.length
        yield* progress
      }
    }
    const stats = yield* writer.finish
    if (verbose) {
      yield* cli.stderr(stats.devices.map((d) =>
        `image ${d.name}: size=${d.size} zeros=${d.zeroBytes} saved=${d.size - d.zeroBytes}\n`
      ).join(""))
    }
    return 0
  }).pipe(
    Effect.catchIf(
      (e): e is Exclude<typeof e, CliError> => e._tag !== "CliError",
      (e) => failWith(`creating vma archive failed - ${e.message}`)
    )
  ))

const openOutput = (archive: string, compression: VmaCompression.Compression | undefined) =>
  Effect.gen(function*() {
    if (archive.startsWith("exec:")) return yield* VmaOutput.command(archive.slice("exec:".length))
    const isFifo = yield* Effect.sync(() => {
      try {
        return fs.statSync(archive).isFIFO()
      } catch {
        return false
      }
    })
    if (isFifo) {
      const fd = yield* io.open(archive, fs.constants.O_WRONLY)
      return yield* VmaOutput.fd(fd, { compression, closeFd: true })
    }
    return yield* VmaOutput.file(archive, { compression, exclusive: true })
  })

// ---------------------------------------------------------------------------------------------------------------
// entry
// ---------------------------------------------------------------------------------------------------------------

/**
 * Runs `vma <command> …` and returns the exit status: 0 on success, 1 on errors and usage (after printing
 * the help, as Proxmox's tool does), 255 when `config` does not find the config. Errors are printed as
 * one line on stderr; it never fails.
 *
 * @since 0.1.0
 * @category run
 */
export const run = (args: ReadonlyArray<string>, cli: CliIo = processIo): Effect.Effect<number> => {
  const [command, ...rest] = args
  const program = command === "list"
    ? list(cli, rest)
    : command === "config"
    ? config(cli, rest)
    : command === "verify"
    ? verify(cli, rest)
    : command === "extract"
    ? extract(cli, rest)
    : command === "create"
    ? create(cli, rest)
    : usage(cli)
  return program.pipe(
    Effect.catchAllCause((cause) => {
      if (Cause.isInterruptedOnly(cause)) return Effect.succeed(130)
      const error = Cause.squash(cause)
      const failure = error instanceof CliError ? error : new CliError({ message: messageOf(error), code: 1 })
      return failure.message.length === 0
        ? Effect.succeed(failure.code)
        : Effect.as(cli.stderr(`${failure.message.split("\n")[0]}\n`), failure.code)
    })
  )
}

const messageOf = (e: unknown): string =>
  typeof e === "object" && e !== null && "message" in e && typeof e.message === "string" ? e.message : String(e)
