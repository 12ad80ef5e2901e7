/**
 * Where a VMA writer sends its bytes: a new file (optionally compressed, optionally under a temporary name),
 * a file descriptor (stdout, a FIFO), a shell command (`exec:`), or any Node `Writable`.
 *
 * Outputs apply back-pressure: `write` completes once the bytes are handed to the kernel (or the stream has
 * drained, or zstd has taken them). zstd runs in this process (its worker threads, see
 * {@link Compression}); gzip and lzo are child processes reading a pipe and writing to the target file,
 * whose exit status is checked by `close`, and a compressor dying early fails the next `write` with its
 * status.
 *
 * @since 0.1.0
 */
import { constants } from "node:fs"
import type { Writable } from "node:stream"
import * as VzdumpNames from "@vzdump/core/VzdumpNames"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as io from "./internal/io.js"
import type { Compression } from "./VmaCompression.js"
import * as zstd from "./internal/zstd.js"
import { compressorCommand } from "./VmaCompression.js"
import type { VmaIoError, VmaProcessError } from "./VmaError.js"

/**
 * Errors an output can fail with.
 *
 * @since 0.1.0
 * @category models
 */
export type VmaOutputError = VmaIoError | VmaProcessError

/**
 * A byte sink for a VMA writer.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaOutput {
  /** Writes the chunks in order; completes when they are accepted (back-pressure). */
  readonly write: (chunks: ReadonlyArray<Uint8Array>) => Effect.Effect<void, VmaOutputError>
  /**
   * Present where writes may run at the same time (an uncompressed file: each write has its own position,
   * taken in call order). Starts writing the chunks and returns, without waiting, the effect that awaits
   * this write. The chunks must stay unchanged until it completes. `close` waits for every started write.
   */
  readonly begin?: ((chunks: ReadonlyArray<Uint8Array>) => Effect.Effect<Effect.Effect<void, VmaOutputError>>) | undefined
  /** Flushes, waits for a compressor or command to exit successfully, and commits the output. */
  readonly close: Effect.Effect<void, VmaOutputError>
}

/**
 * Options of {@link file} and {@link fd}.
 *
 * @since 0.1.0
 * @category models
 */
export interface FileOptions {
  /** Pipe the archive through this compressor (as vzdump does). */
  readonly compression?: Compression | undefined
  /** Fail if the file exists (default true, like `vma create`). */
  readonly exclusive?: boolean | undefined
  /** Write under this name and rename to the final path on `close` (vzdump's `.dat` file). */
  readonly temporaryPath?: string | undefined
}

/** Reports the child's exit status when writing to it failed (it died), else the write error. */
const failedChild = (child: io.Child) => (e: VmaIoError | VmaProcessError) =>
  child.exited.pipe(
    Effect.timeout("5 seconds"),
    Effect.flatMap((status) => Effect.fail(status.code === 0 ? e : child.error(status))),
    Effect.catchTag("TimeoutException", () => Effect.fail(e))
  )

/** Feeds a child process's stdin through a blocking pipe; `close` waits for its exit status. */
const viaChild = (
  command: string,
  args: ReadonlyArray<string>,
  stdout: number | "inherit",
  name: string
): Effect.Effect<VmaOutput, VmaOutputError, Scope.Scope> =>
  Effect.gen(function*() {
    const pipe = yield* io.makePipe
    const child = yield* Effect.acquireRelease(
      io.spawnChild(command, args, [pipe.readFd, stdout, "pipe"]),
      (c) => c.kill
    )
    yield* pipe.closeRead
    const failed = failedChild(child)
    return {
      write: (chunks) => io.writeAll(pipe.writeFd, chunks, null, name).pipe(Effect.catchAll(failed)),
      close: pipe.closeWrite.pipe(Effect.catchAll(failed), Effect.zipRight(child.check))
    }
  })

/** zstd in this process (see {@link Compression}); gzip and lzo through the tools' binaries. */
const viaCompressor = (
  fd: number,
  compression: Compression,
  path: string
): Effect.Effect<VmaOutput, VmaOutputError, Scope.Scope> => {
  if (compression.format === "zstd") {
    return Effect.map(
      zstd.make(fd, path, { level: compression.level ?? 0, threads: VzdumpNames.zstdThreads({ zstd: compression.threads }) }),
      (z): VmaOutput => ({ write: z.write, close: z.end })
    )
  }
  const { args, command } = compressorCommand(compression)
  return viaChild(command, args, fd, `${path} (via ${command})`)
}

/**
 * A new file. It is removed again if the scope closes before a successful `close` (failure or
 * interruption), so no partial archive is left behind.
 *
 * @since 0.1.0
 * @category constructors
 */
export const file = (path: string, options: FileOptions = {}): Effect.Effect<VmaOutput, VmaOutputError, Scope.Scope> =>
  Effect.gen(function*() {
    const target = options.temporaryPath ?? path
    const flags = constants.O_WRONLY | constants.O_CREAT |
      (options.exclusive === false ? constants.O_TRUNC : constants.O_EXCL)
    const state: { committed: boolean; fdClosed: boolean; writes: io.PositionalWrites | undefined } = {
      committed: false,
      fdClosed: false,
      writes: undefined
    }
    const fd = yield* Effect.acquireRelease(io.open(target, flags), (fd) =>
      Effect.zipRight(
        // no write may run when the descriptor is closed
        state.writes?.drain ?? Effect.void,
        Effect.zipRight(
          state.fdClosed ? Effect.void : io.closeQuietly(fd),
          state.committed ? Effect.void : io.unlinkQuietly(target)
        )
      ))
    let inner: VmaOutput
    if (options.compression === undefined && !(yield* io.fstat(fd, target)).isFile()) {
      // a device or a pipe: written in order at its current position
      inner = { write: (chunks) => io.writeAll(fd, chunks, null, target), close: Effect.void }
    } else if (options.compression === undefined) {
      // a regular file: positional writes, started without waiting for the earlier ones
      const writes = new io.PositionalWrites(fd, target)
      state.writes = writes
      let position = 0
      const begin = (chunks: ReadonlyArray<Uint8Array>) =>
        Effect.sync(() => {
          const at = position
          position += io.byteLength(chunks)
          return writes.start(chunks, at)
        })
      inner = {
        write: (chunks) => Effect.flatten(begin(chunks)),
        begin,
        close: Effect.zipRight(
          writes.drain,
          Effect.suspend(() => writes.failure === undefined ? Effect.void : Effect.fail(writes.failure))
        )
      }
    } else {
      inner = yield* viaCompressor(fd, options.compression, target)
    }
    return {
      write: inner.write,
      begin: inner.begin,
      close: Effect.gen(function*() {
        yield* inner.close
        state.fdClosed = true
        yield* io.close(fd, target)
        if (options.temporaryPath !== undefined && options.temporaryPath !== path) {
          yield* io.rename(options.temporaryPath, path)
        }
        state.committed = true
      })
    } satisfies VmaOutput
  })

/**
 * An open file descriptor (stdout, a FIFO, a pipe from QEMU's `getfd`), optionally through a compressor.
 * The descriptor is not closed unless `closeFd` is set.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fd = (
  fd: number,
  options: { readonly compression?: Compression | undefined; readonly closeFd?: boolean | undefined } = {}
): Effect.Effect<VmaOutput, VmaOutputError, Scope.Scope> =>
  Effect.gen(function*() {
    const name = `fd ${fd}`
    const inner = options.compression === undefined
      ? { write: (chunks: ReadonlyArray<Uint8Array>) => io.writeAll(fd, chunks, null, name), close: Effect.void }
      : yield* viaCompressor(fd, options.compression, name)
    return {
      write: inner.write,
      close: options.closeFd === true ? Effect.zipRight(inner.close, io.close(fd, name)) : inner.close
    } satisfies VmaOutput
  })

/**
 * A shell command reading the archive on its stdin, like `vma create exec:<command>` (run with `sh -c`;
 * its stdout is ours). `close` fails unless the command exits with status 0.
 *
 * @since 0.1.0
 * @category constructors
 */
export const command = (shellCommand: string): Effect.Effect<VmaOutput, VmaOutputError, Scope.Scope> =>
  viaChild("sh", ["-c", shellCommand], "inherit", `exec:${shellCommand}`)

/**
 * Any Node `Writable` (back-pressure through `drain`). `close` ends it unless `end` is false.
 *
 * @since 0.1.0
 * @category constructors
 */
export const fromWritable = (
  writable: Writable,
  options: { readonly end?: boolean | undefined } = {}
): VmaOutput => {
  const onError = (e: unknown) => io.ioError("write", "stream", e)
  return {
    write: (chunks) => io.writeStream(writable, chunks, onError),
    close: options.end === false ? Effect.void : io.endStream(writable, onError)
  }
}
