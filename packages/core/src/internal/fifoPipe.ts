/**
 * A kernel pipe for Node, which cannot call pipe(2): a FIFO made with `mkfifo` (through
 * `HostCommand`) in a private temporary directory, both ends opened in blocking mode. Both
 * descriptors are close-on-exec (libuv opens with `O_CLOEXEC`), so only the children they are
 * handed to explicitly hold them.
 */
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as NodePath from "node:path"
import type { CommandError, HostCommandService } from "../HostCommand.js"

export interface FifoPipe {
  /** The FIFO's path while `removePath` has not run. */
  readonly path: string
  readonly readFd: number
  readonly writeFd: number
  /** Closes our read end. Idempotent. */
  readonly closeRead: Effect.Effect<void>
  /** Closes our write end. Idempotent. */
  readonly closeWrite: Effect.Effect<void>
  /** Removes the FIFO's name (the pipe lives on). Idempotent. */
  readonly removePath: Effect.Effect<void>
}

export class PipeError extends Error {
  constructor(readonly detail: string) {
    super(detail)
  }
}

const openFd = (path: string, flags: number): Effect.Effect<number, PipeError> =>
  Effect.async<number, PipeError>((resume) => {
    Fs.open(path, flags, (error, fd) => {
      resume(error === null ? Effect.succeed(fd) : Effect.fail(new PipeError(`open ${path}: ${error.message}`)))
    })
  })

const closeQuietly = (fd: number) =>
  Effect.async<void>((resume) => {
    Fs.close(fd, () => resume(Effect.void))
  })

/** Creates the pipe; everything is closed and removed when the scope closes. */
export const make = (
  command: HostCommandService,
  name = "pipe"
): Effect.Effect<FifoPipe, PipeError | CommandError, Scope.Scope> =>
  Effect.gen(function*() {
    const dir = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => Fs.promises.mkdtemp(NodePath.join(Os.tmpdir(), "vzdump-fifo-")),
        catch: (error) => new PipeError(`cannot create a temporary directory: ${(error as Error).message}`)
      }),
      (dir) => Effect.promise(() => Fs.promises.rm(dir, { recursive: true, force: true }))
    )
    const path = NodePath.join(dir, name)
    yield* command.run("mkfifo", ["-m", "600", path])
    // No open may block (a blocked open holds a libuv pool thread): a non-blocking reader first, so
    // the writer's open returns at once, then the real (blocking) reader, which finds the writer.
    const [readFd, writeFd] = yield* Effect.uninterruptible(Effect.gen(function*() {
      const probe = yield* openFd(path, Fs.constants.O_RDONLY | Fs.constants.O_NONBLOCK)
      const ends = yield* Effect.flatMap(
        openFd(path, Fs.constants.O_WRONLY),
        (writeFd) =>
          openFd(path, Fs.constants.O_RDONLY).pipe(
            Effect.map((readFd) => [readFd, writeFd] as const),
            Effect.tapError(() => closeQuietly(writeFd))
          )
      ).pipe(Effect.ensuring(closeQuietly(probe)))
      return ends
    }))
    const open = { read: true, write: true, path: true }
    const closeRead = Effect.suspend(() => {
      if (!open.read) return Effect.void
      open.read = false
      return closeQuietly(readFd)
    })
    const closeWrite = Effect.suspend(() => {
      if (!open.write) return Effect.void
      open.write = false
      return closeQuietly(writeFd)
    })
    const removePath = Effect.suspend(() => {
      if (!open.path) return Effect.void
      open.path = false
      return Effect.promise(() => Fs.promises.rm(path, { force: true }))
    })
    yield* Effect.addFinalizer(() => Effect.all([closeRead, closeWrite, removePath], { discard: true }))
    return { path, readFd, writeFd, closeRead, closeWrite, removePath }
  })
