/**
 * Byte sources for the VMA reader: a file, a file descriptor (stdin, a FIFO), a Node `Readable` or an
 * Effect `Stream`. Reading never seeks, so pipes work.
 *
 * Files and descriptors are recognised by their first bytes: a zstd, gzip, lzop or bzip2 stream is piped
 * through the matching decompressor (`zstd -d`, `pigz -d`/`gzip -d`, `lzop -d`, `bzip2 -d`), whose exit
 * status is checked when its output ends.
 *
 * @since 0.1.0
 */
import { constants } from "node:fs"
import type { Readable } from "node:stream"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"
import type * as Scope from "effect/Scope"
import * as Stream from "effect/Stream"
import * as io from "./internal/io.js"
import { decompressorCommand, detect, DETECT_BYTES, type DetectedFormat } from "./VmaCompression.js"
import type { VmaIoError, VmaProcessError } from "./VmaError.js"

/**
 * Errors of file and process inputs.
 *
 * @since 0.1.0
 * @category models
 */
export type VmaInputError = VmaIoError | VmaProcessError

/**
 * A sequential byte source.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaInput<E = VmaInputError> {
  /** A name for messages (path, `-`, …). */
  readonly name: string
  /** The format recognised from the first bytes (`vma` when not compressed or not recognised as compressed). */
  readonly format: DetectedFormat
  /** Reads `size` bytes; fewer only at the end of the stream, an empty array after it. */
  readonly read: (size: number) => Effect.Effect<Uint8Array, E>
  /** Fills `target` like `read` (lets readers reuse buffers); returns the number of bytes read. */
  readonly readInto: (target: Uint8Array) => Effect.Effect<number, E>
}

/**
 * Builds an input from a `read` function (`readInto` copies).
 *
 * @since 0.1.0
 * @category constructors
 */
export const make = <E>(
  name: string,
  format: DetectedFormat,
  read: (size: number) => Effect.Effect<Uint8Array, E>
): VmaInput<E> => ({
  name,
  format,
  read,
  readInto: (target) =>
    Effect.map(read(target.length), (bytes) => {
      target.set(bytes)
      return bytes.length
    })
})

/**
 * Options for file and descriptor inputs.
 *
 * @since 0.1.0
 * @category models
 */
export interface InputOptions {
  /** `auto` (default) recognises compressed streams; `none` reads the bytes as they are. */
  readonly decompress?: "auto" | "none" | undefined
}

const isCompressed = (f: DetectedFormat): f is "zstd" | "gzip" | "lzo" | "bzip2" =>
  f === "zstd" || f === "gzip" || f === "lzo" || f === "bzip2"

const concat = (a: Uint8Array, b: Uint8Array): Uint8Array => {
  if (a.length === 0) return b
  if (b.length === 0) return a
  const out = Buffer.allocUnsafe(a.length + b.length)
  out.set(a, 0)
  out.set(b, a.length)
  return out
}

/** Reads from an fd (current offset), serving `pushback` first. */
const fdInput = (fd: number, name: string, pushback: Uint8Array): VmaInput => {
  let pending = pushback
  const readInto = (target: Uint8Array): Effect.Effect<number, VmaIoError> =>
    Effect.suspend(() => {
      if (pending.length === 0) return io.readInto(fd, target, null, name)
      const k = Math.min(pending.length, target.length)
      target.set(pending.subarray(0, k))
      pending = pending.subarray(k)
      if (k === target.length) return Effect.succeed(k)
      return Effect.map(io.readInto(fd, target.subarray(k), null, name), (n) => n + k)
    })
  return {
    name,
    format: "vma",
    readInto,
    read: (size) =>
      Effect.suspend(() => {
        const buf = Buffer.allocUnsafe(size)
        return Effect.map(readInto(buf), (n) => n === size ? buf : buf.subarray(0, n))
      })
  }
}

const PUMP_CHUNK = 4 << 20

/**
 * Pipes through a decompressor whose output we read from a blocking pipe. With `source.fd` the child reads
 * the descriptor directly; with `source.pump` we feed it the pushed-back prefix and then the rest of the
 * descriptor through a second pipe.
 */
const decompressing = (
  format: "zstd" | "gzip" | "lzo" | "bzip2",
  name: string,
  source: { readonly fd: number } | { readonly pump: number; readonly prefix: Uint8Array }
): Effect.Effect<VmaInput, VmaInputError, Scope.Scope> =>
  Effect.gen(function*() {
    const { args, command } = decompressorCommand(format)
    const output = yield* io.makePipe
    const input = "fd" in source ? undefined : yield* io.makePipe
    const stdin = input === undefined ? (source as { readonly fd: number }).fd : input.readFd
    const child = yield* Effect.acquireRelease(
      io.spawnChild(command, args, [stdin, output.writeFd, "pipe"]),
      (c) => c.kill
    )
    yield* output.closeWrite
    const pumpFailure = yield* Deferred.make<never, VmaIoError>()
    if (input !== undefined && "pump" in source) {
      yield* input.closeRead
      const pump = Effect.gen(function*() {
        yield* io.writeAll(input.writeFd, [source.prefix], null, `${command} stdin`)
        const buffer = Buffer.allocUnsafe(PUMP_CHUNK)
        while (true) {
          const n = yield* io.readInto(source.pump, buffer, null, name)
          if (n === 0) break
          yield* io.writeAll(input.writeFd, [buffer.subarray(0, n)], null, `${command} stdin`)
        }
        yield* input.closeWrite
      })
      yield* pump.pipe(
        // A decompressor that stops reading (EPIPE) reports through its exit status; read errors are ours.
        Effect.catchAll((e) => e.operation === "read" ? Deferred.fail(pumpFailure, e) : Effect.void),
        Effect.ensuring(Effect.ignore(input.closeWrite)),
        Effect.forkScoped
      )
    }
    const raw = fdInput(output.readFd, `${name} (via ${command})`, new Uint8Array(0))
    let done = false
    const atEnd = <A>(n: number, size: number, a: A) => {
      if (n === size || done) return Effect.succeed(a)
      done = true
      return Deferred.poll(pumpFailure).pipe(
        Effect.flatMap(Option.match({ onNone: () => Effect.void, onSome: (failed) => failed })),
        Effect.zipRight(child.check),
        Effect.as(a)
      )
    }
    return {
      name,
      format,
      read: (size) => Effect.flatMap(raw.read(size), (buf) => atEnd(buf.length, size, buf)),
      readInto: (target) => Effect.flatMap(raw.readInto(target), (n) => atEnd(n, target.length, n))
    } satisfies VmaInput
  })

const fromDescriptor = (
  fd: number,
  name: string,
  seekable: boolean,
  options: InputOptions
): Effect.Effect<VmaInput, VmaInputError, Scope.Scope> =>
  Effect.gen(function*() {
    if (options.decompress === "none") return fdInput(fd, name, new Uint8Array(0))
    if (seekable) {
      // pread leaves the file offset at 0 for us or for a decompressor sharing the descriptor.
      const prefix = yield* io.readUpTo(fd, DETECT_BYTES, 0, name).pipe(
        Effect.map(Option.some),
        Effect.catchIf((e) => e.code === "ESPIPE", () => Effect.succeed(Option.none()))
      )
      if (Option.isSome(prefix)) {
        const format = detect(prefix.value)
        return isCompressed(format)
          ? yield* decompressing(format, name, { fd })
          : fdInput(fd, name, new Uint8Array(0))
      }
    }
    // A pipe: read the first bytes, then serve them before the rest.
    let prefix: Uint8Array = new Uint8Array(0)
    while (prefix.length < DETECT_BYTES) {
      const more = yield* io.readUpTo(fd, DETECT_BYTES - prefix.length, null, name)
      if (more.length === 0) break
      prefix = concat(prefix, more)
    }
    const format = detect(prefix)
    return isCompressed(format)
      ? yield* decompressing(format, name, { pump: fd, prefix })
      : fdInput(fd, name, prefix)
  })

/**
 * A file (or FIFO), decompressed if needed. `-` means stdin.
 *
 * @since 0.1.0
 * @category constructors
 */
export const file = (path: string, options: InputOptions = {}): Effect.Effect<VmaInput, VmaInputError, Scope.Scope> =>
  path === "-"
    ? stdin(options)
    : Effect.gen(function*() {
      const fd = yield* Effect.acquireRelease(io.open(path, constants.O_RDONLY), io.closeQuietly)
      const st = yield* io.fstat(fd, path)
      if (st.isDirectory()) return yield* Effect.fail(io.ioError("read", path, { code: "EISDIR" }))
      return yield* fromDescriptor(fd, path, st.isFile(), options)
    })

/**
 * An open descriptor; it is not closed.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fd = (
  fd: number,
  options: InputOptions & { readonly name?: string | undefined } = {}
): Effect.Effect<VmaInput, VmaInputError, Scope.Scope> =>
  Effect.flatMap(
    io.fstat(fd, options.name ?? `fd ${fd}`),
    (st) => fromDescriptor(fd, options.name ?? `fd ${fd}`, st.isFile(), options)
  )

/**
 * Standard input (named `-`).
 *
 * @since 0.1.0
 * @category constructors
 */
export const stdin = (options: InputOptions = {}): Effect.Effect<VmaInput, VmaInputError, Scope.Scope> =>
  fd(0, { ...options, name: "-" })

/**
 * A paused Node `Readable` carrying an uncompressed VMA stream.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fromReadable = (readable: Readable, name = "stream"): VmaInput =>
  make(name, "vma", (size) => io.readStream(readable, size, (e) => io.ioError("read", name, e)))

/**
 * An Effect Stream of byte chunks carrying an uncompressed VMA stream. Chunk boundaries are arbitrary.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fromStream = <E, R>(
  stream: Stream.Stream<Uint8Array, E, R>,
  name = "stream"
): Effect.Effect<VmaInput<E>, never, Scope.Scope | R> =>
  Effect.gen(function*() {
    const context = yield* Effect.context<R>()
    const pull = Effect.provide(yield* Stream.toPull(stream), context)
    // Pending chunks from `head` on; consumed entries are dropped in batches.
    let queue: Array<Uint8Array> = []
    let head = 0
    let buffered = 0
    let ended = false
    const fill = (size: number): Effect.Effect<void, E> =>
      Effect.suspend(() =>
        ended || buffered >= size
          ? Effect.void
          : pull.pipe(
            Effect.map((chunk) => {
              if (head > 1024 && head * 2 > queue.length) {
                queue = queue.slice(head)
                head = 0
              }
              for (const c of chunk) {
                if (c.length > 0) {
                  queue.push(c)
                  buffered += c.length
                }
              }
            }),
            Effect.catchAll(Option.match({
              onNone: () =>
                Effect.sync(() => {
                  ended = true
                }),
              onSome: (e) => Effect.fail(e)
            })),
            Effect.zipRight(fill(size))
          )
      )
    const take = (size: number): Uint8Array => {
      const n = Math.min(size, buffered)
      buffered -= n
      const first = queue[head]
      if (first !== undefined && first.length >= n) {
        if (first.length === n) head++
        else queue[head] = first.subarray(n)
        return first.subarray(0, n)
      }
      const out = Buffer.allocUnsafe(n)
      let at = 0
      while (at < n) {
        const c = queue[head]!
        const k = Math.min(c.length, n - at)
        out.set(c.subarray(0, k), at)
        at += k
        if (k === c.length) head++
        else queue[head] = c.subarray(k)
      }
      return out
    }
    return make(name, "vma", (size: number) => Effect.map(fill(size), () => take(size)))
  })
