/**
 * Thin Effect wrappers over node:fs and child processes, tuned for large sequential I/O: vectored writes,
 * exact-size reads, EAGAIN retries on non-blocking pipes, and child processes whose exit status is checked.
 */
import { type ChildProcess, spawn, type StdioOptions } from "node:child_process"
import * as fs from "node:fs"
import { constants } from "node:fs"
import type { Readable, Writable } from "node:stream"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import { VmaIoError, VmaProcessError } from "../VmaError.js"

const ERRNO_TEXT: Record<string, string> = {
  ENOENT: "No such file or directory",
  EEXIST: "File exists",
  EACCES: "Permission denied",
  EPERM: "Operation not permitted",
  ENOSPC: "No space left on device",
  EISDIR: "Is a directory",
  ENOTDIR: "Not a directory",
  EPIPE: "Broken pipe",
  EIO: "Input/output error",
  EROFS: "Read-only file system",
  EBADF: "Bad file descriptor",
  EINVAL: "Invalid argument",
  ESPIPE: "Illegal seek",
  EFBIG: "File too large",
  EDQUOT: "Disk quota exceeded"
}

/** Errno text like `g_strerror` gives it. */
export const describeError = (e: unknown): string => {
  const err = e as NodeJS.ErrnoException
  if (typeof err?.code === "string" && ERRNO_TEXT[err.code] !== undefined) return ERRNO_TEXT[err.code]!
  return err instanceof Error ? err.message : String(e)
}

export const ioError = (operation: string, path: string, e: unknown): VmaIoError => {
  const code = (e as NodeJS.ErrnoException)?.code
  return new VmaIoError({
    operation,
    path,
    detail: describeError(e),
    ...(typeof code === "string" ? { code } : {})
  })
}

const call = <A>(
  operation: string,
  path: string,
  f: (cb: (err: NodeJS.ErrnoException | null, a: A) => void) => void
): Effect.Effect<A, VmaIoError> =>
  Effect.async<A, VmaIoError>((resume) => {
    f((err, a) => resume(err ? Effect.fail(ioError(operation, path, err)) : Effect.succeed(a)))
  })

export const open = (path: string, flags: number | string, mode = 0o644): Effect.Effect<number, VmaIoError> =>
  call("open", path, (cb) => fs.open(path, flags, mode, cb))

export const close = (fd: number, path: string): Effect.Effect<void, VmaIoError> =>
  call("close", path, (cb) => fs.close(fd, (err) => cb(err, undefined)))

export const closeQuietly = (fd: number): Effect.Effect<void> =>
  Effect.async<void>((resume) => fs.close(fd, () => resume(Effect.void)))

export const fstat = (fd: number, path: string): Effect.Effect<fs.Stats, VmaIoError> =>
  call("stat", path, (cb) => fs.fstat(fd, cb))

export const stat = (path: string): Effect.Effect<fs.Stats, VmaIoError> => call("stat", path, (cb) => fs.stat(path, cb))

export const ftruncate = (fd: number, size: number, path: string): Effect.Effect<void, VmaIoError> =>
  call("truncate", path, (cb) => fs.ftruncate(fd, size, (err) => cb(err, undefined)))

export const rename = (from: string, to: string): Effect.Effect<void, VmaIoError> =>
  call("rename", `${from} to ${to}`, (cb) => fs.rename(from, to, (err) => cb(err, undefined)))

export const unlinkQuietly = (path: string): Effect.Effect<void> =>
  Effect.async<void>((resume) => fs.unlink(path, () => resume(Effect.void)))

export const mkdir = (path: string): Effect.Effect<void, VmaIoError> =>
  call("create directory", path, (cb) => fs.mkdir(path, { mode: 0o777 }, (err) => cb(err, undefined)))

export const writeFileExclusive = (path: string, data: Uint8Array): Effect.Effect<void, VmaIoError> =>
  call("write", path, (cb) => fs.writeFile(path, data, { flag: "wx", mode: 0o644 }, (err) => cb(err, undefined)))

export const readFile = (path: string): Effect.Effect<Buffer, VmaIoError> =>
  call("read", path, (cb) => fs.readFile(path, cb))

const MAX_IOV = 1024

const again = (e: NodeJS.ErrnoException | null) => e !== null && (e.code === "EAGAIN" || e.code === "EWOULDBLOCK")

export const byteLength = (parts: ReadonlyArray<Uint8Array>) => {
  let n = 0
  for (const p of parts) n += p.byteLength
  return n
}

const skipBytes = (parts: ReadonlyArray<Uint8Array>, n: number): Array<Uint8Array> => {
  const out: Array<Uint8Array> = []
  for (const p of parts) {
    if (n >= p.byteLength) {
      n -= p.byteLength
      continue
    }
    out.push(n > 0 ? p.subarray(n) : p)
    n = 0
  }
  return out
}

/**
 * Writes all `parts` with vectored writes, at `position` (advancing) or at the current file offset when
 * `position` is null. Retries short writes and EAGAIN; `done` gets the error, if any.
 */
export const writeAllThen = (
  fd: number,
  parts: ReadonlyArray<Uint8Array>,
  position: number | null,
  path: string,
  done: (error: VmaIoError | undefined) => void
): void => {
  let rest = parts.filter((p) => p.byteLength > 0)
  let pos = position
  const step = () => {
    if (rest.length === 0) return done(undefined)
    const batch = rest.length > MAX_IOV ? rest.slice(0, MAX_IOV) : rest
    const cb = (err: NodeJS.ErrnoException | null, written: number) => {
      if (again(err)) return void setTimeout(step, 2)
      if (err) return done(ioError("write", path, err))
      if (pos !== null) pos += written
      rest = written === byteLength(batch) ? rest.slice(batch.length) : skipBytes(rest, written)
      step()
    }
    if (pos === null) fs.writev(fd, batch, cb)
    else fs.writev(fd, batch, pos, cb)
  }
  step()
}

/** {@link writeAllThen} as an effect. */
export const writeAll = (
  fd: number,
  parts: ReadonlyArray<Uint8Array>,
  position: number | null,
  path: string
): Effect.Effect<void, VmaIoError> =>
  Effect.async<void, VmaIoError>((resume) =>
    writeAllThen(fd, parts, position, path, (error) => resume(error === undefined ? Effect.void : Effect.fail(error)))
  )

/**
 * Positional writes to one file that the caller starts without waiting for them, so the file is written
 * without pauses while the caller goes on (concurrent writes to one file wait for its lock in the kernel;
 * for `vma create` this measured a few percent faster than one write at a time). `drain` waits until no
 * write runs, which must happen before the descriptor is closed.
 */
export class PositionalWrites {
  private readonly running = new Set<Promise<VmaIoError | undefined>>()
  /** The first write that failed, if any. */
  failure: VmaIoError | undefined = undefined

  constructor(private readonly fd: number, private readonly path: string) {}

  /** Starts writing `parts` at `position` (they must stay unchanged until written); the effect awaits it. */
  start(parts: ReadonlyArray<Uint8Array>, position: number): Effect.Effect<void, VmaIoError> {
    const done = new Promise<VmaIoError | undefined>((resolve) =>
      writeAllThen(this.fd, parts, position, this.path, resolve)
    )
    this.running.add(done)
    void done.then((error) => {
      this.running.delete(done)
      this.failure ??= error
    })
    return Effect.flatMap(Effect.promise(() => done), (error) => error === undefined ? Effect.void : Effect.fail(error))
  }

  /** Waits until no write runs (whatever their outcome). */
  readonly drain: Effect.Effect<void> = Effect.promise(() => Promise.all(this.running))
}

/**
 * Fills `target` from `fd`, looping over short reads; returns the bytes read (fewer only at end of file).
 * `position` null reads at the current offset (pipes).
 */
export const readInto = (
  fd: number,
  target: Uint8Array,
  position: number | null,
  path: string
): Effect.Effect<number, VmaIoError> =>
  Effect.async<number, VmaIoError>((resume) => {
    const size = target.length
    let got = 0
    const step = () => {
      if (got === size) return resume(Effect.succeed(got))
      fs.read(fd, target, got, size - got, position === null ? null : position + got, (err, n) => {
        if (again(err)) return void setTimeout(step, 2)
        if (err) return resume(Effect.fail(ioError("read", path, err)))
        if (n === 0) return resume(Effect.succeed(got))
        got += n
        step()
      })
    }
    step()
  })

/** Reads up to `size` bytes into a fresh buffer (fewer only at end of file). */
export const readUpTo = (
  fd: number,
  size: number,
  position: number | null,
  path: string
): Effect.Effect<Buffer, VmaIoError> =>
  Effect.suspend(() => {
    const buf = Buffer.allocUnsafe(size)
    return Effect.map(readInto(fd, buf, position, path), (n) => n === size ? buf : buf.subarray(0, n))
  })

// ---------------------------------------------------------------------------------------------------------------
// Node streams
// ---------------------------------------------------------------------------------------------------------------

/** Writes parts to a Node Writable and waits until it drains (back-pressure); fails if the stream errors. */
export const writeStream = (
  w: Writable,
  parts: ReadonlyArray<Uint8Array>,
  onError: (e: unknown) => VmaIoError | VmaProcessError
): Effect.Effect<void, VmaIoError | VmaProcessError> =>
  Effect.async<void, VmaIoError | VmaProcessError>((resume) => {
    if (w.destroyed || w.writableEnded) return resume(Effect.fail(onError(new Error("stream closed"))))
    let done = false
    const finish = (e?: unknown) => {
      if (done) return
      done = true
      w.off("drain", onDrain)
      w.off("error", onErr)
      w.off("close", onClose)
      resume(e === undefined ? Effect.void : Effect.fail(onError(e)))
    }
    const onDrain = () => finish()
    const onErr = (e: unknown) => finish(e)
    const onClose = () => finish(Object.assign(new Error("Broken pipe"), { code: "EPIPE" }))
    w.on("error", onErr)
    w.on("close", onClose)
    w.on("drain", onDrain)
    w.cork()
    for (const p of parts) if (p.byteLength > 0) w.write(p)
    w.uncork()
    if (!w.writableNeedDrain) finish()
    return Effect.sync(() => {
      done = true
      w.off("drain", onDrain)
      w.off("error", onErr)
      w.off("close", onClose)
    })
  })

/** Ends a Writable and waits for it to finish. */
export const endStream = (
  w: Writable,
  onError: (e: unknown) => VmaIoError | VmaProcessError
): Effect.Effect<void, VmaIoError | VmaProcessError> =>
  Effect.async<void, VmaIoError | VmaProcessError>((resume) => {
    if (w.writableFinished) return resume(Effect.void)
    const onErr = (e: unknown) => {
      w.off("finish", onFinish)
      resume(Effect.fail(onError(e)))
    }
    const onFinish = () => {
      w.off("error", onErr)
      resume(Effect.void)
    }
    w.once("error", onErr)
    w.once("finish", onFinish)
    w.end()
  })

/** Reads exactly `size` bytes from a paused Readable (fewer only at its end). */
export const readStream = (
  r: Readable,
  size: number,
  onError: (e: unknown) => VmaIoError | VmaProcessError
): Effect.Effect<Uint8Array, VmaIoError | VmaProcessError> =>
  Effect.async<Uint8Array, VmaIoError | VmaProcessError>((resume) => {
    let done = false
    const cleanup = () => {
      done = true
      r.off("readable", attempt)
      r.off("end", attempt)
      r.off("error", onErr)
    }
    const onErr = (e: unknown) => {
      if (done) return
      cleanup()
      resume(Effect.fail(onError(e)))
    }
    function attempt() {
      if (done) return
      const chunk: Buffer | null = r.read(size)
      if (chunk !== null) {
        cleanup()
        return resume(Effect.succeed(chunk))
      }
      if (r.readableEnded || (r.readableLength === 0 && (r as unknown as { _readableState: { ended: boolean } })
          ._readableState.ended))
      {
        cleanup()
        return resume(Effect.succeed(new Uint8Array(0)))
      }
      if (r.destroyed) {
        cleanup()
        return resume(Effect.fail(onError(r.errored ?? new Error("stream destroyed"))))
      }
    }
    r.on("readable", attempt)
    r.on("end", attempt)
    r.on("error", onErr)
    attempt()
    return Effect.sync(cleanup)
  })

// ---------------------------------------------------------------------------------------------------------------
// child processes
// ---------------------------------------------------------------------------------------------------------------

export interface ExitStatus {
  readonly code: number | null
  readonly signal: string | null
}

export interface Child {
  readonly process: ChildProcess
  readonly display: string
  readonly exited: Effect.Effect<ExitStatus>
  readonly error: (status: ExitStatus | null) => VmaProcessError
  /** Waits for the exit and fails unless the status is 0. */
  readonly check: Effect.Effect<void, VmaProcessError>
  /** SIGKILL if still running, then wait. */
  readonly kill: Effect.Effect<void>
}

const STDERR_KEEP = 4096

/** Spawns a process (no shell) and waits until it has started. stderr is captured when piped. */
export const spawnChild = (
  command: string,
  args: ReadonlyArray<string>,
  stdio: StdioOptions
): Effect.Effect<Child, VmaProcessError> =>
  Effect.gen(function*() {
    const display = [command, ...args].join(" ")
    const exit = yield* Deferred.make<ExitStatus>()
    let stderr = ""
    const proc = spawn(command, args, { stdio })
    proc.stderr?.on("data", (d: Buffer) => {
      stderr = (stderr + d.toString("utf8")).slice(-STDERR_KEEP)
    })
    proc.stdin?.on("error", () => {})
    proc.stdout?.on("error", () => {})
    proc.on("exit", (code, signal) => Deferred.unsafeDone(exit, Effect.succeed({ code, signal })))
    const error = (status: ExitStatus | null) =>
      new VmaProcessError({
        command: display,
        exitCode: status?.code ?? null,
        signal: status?.signal ?? null,
        stderr
      })
    yield* Effect.async<void, VmaProcessError>((resume) => {
      const onSpawn = () => {
        proc.off("error", onError)
        resume(Effect.void)
      }
      const onError = (e: Error) => {
        proc.off("spawn", onSpawn)
        stderr = describeError(e)
        resume(Effect.fail(error(null)))
      }
      proc.once("spawn", onSpawn)
      proc.once("error", onError)
    })
    const exited = Deferred.await(exit)
    // stderr 'data' may arrive after 'exit'; wait for the pipes to close before reporting.
    const closed = Effect.async<void>((resume) => {
      const closed = proc.stdio.every((s) => s === null || s === undefined || s.destroyed)
      if (proc.exitCode !== null && closed) return resume(Effect.void)
      proc.once("close", () => resume(Effect.void))
    }).pipe(Effect.timeout("2 seconds"), Effect.ignore)
    const check = Effect.flatMap(exited, (status) =>
      status.code === 0 ? Effect.void : Effect.zipRight(closed, Effect.suspend(() => Effect.fail(error(status)))))
    const kill = Effect.suspend(() => {
      if (proc.exitCode !== null || proc.signalCode !== null) return Effect.void
      proc.kill("SIGKILL")
      return Effect.asVoid(exited)
    })
    return { process: proc, display, exited, error, check, kill }
  })

/** Finds an executable on PATH. */
export const which = (name: string): string | undefined => {
  for (const dir of (process.env.PATH ?? "/usr/bin:/bin").split(":")) {
    if (dir.length === 0) continue
    const p = `${dir}/${name}`
    try {
      fs.accessSync(p, fs.constants.X_OK)
      return p
    } catch {
      continue
    }
  }
  return undefined
}

// ---------------------------------------------------------------------------------------------------------------
// pipes
// ---------------------------------------------------------------------------------------------------------------

export interface Pipe {
  readonly readFd: number
  readonly writeFd: number
  /** Closes our read end (after handing it to a child). Idempotent. */
  readonly closeRead: Effect.Effect<void>
  /** Closes our write end: the reader sees end of file. Idempotent. */
  readonly closeWrite: Effect.Effect<void, VmaIoError>
}

/**
 * A kernel pipe with both ends in blocking mode (Node cannot call pipe(2), so a FIFO is created with
 * `mkfifo` in a private temporary directory and removed at once). Blocking ends let the libuv thread pool
 * do large writes and reads without waking the event loop per 64 KiB, unlike a Node stream. Both ends are
 * closed when the scope closes.
 */
export const makePipe: Effect.Effect<Pipe, VmaIoError | VmaProcessError, Scope.Scope> = Effect.gen(
  function*() {
    const dir = yield* call<string>(
      "create directory",
      "vma-pipe",
      (cb) => fs.mkdtemp(`${process.env.TMPDIR ?? "/tmp"}/vma-pipe-`, cb)
    )
    const fifo = `${dir}/p`
    const ends = yield* Effect.gen(function*() {
      const mkfifo = yield* spawnChild("mkfifo", ["-m", "600", fifo], ["ignore", "ignore", "pipe"])
      yield* mkfifo.check
      // Opening either end blocks until the other is opened: open both at once (in the thread pool).
      return yield* Effect.all([open(fifo, constants.O_RDONLY), open(fifo, constants.O_WRONLY)], { concurrency: 2 })
    }).pipe(
      Effect.ensuring(
        Effect.async<void>((resume) => fs.rm(dir, { recursive: true, force: true }, () => resume(Effect.void)))
      )
    )
    const [readFd, writeFd] = ends
    const state = { read: true, write: true }
    const closeRead = Effect.suspend(() => {
      if (!state.read) return Effect.void
      state.read = false
      return closeQuietly(readFd)
    })
    const closeWrite = Effect.suspend(() => {
      if (!state.write) return Effect.void
      state.write = false
      return close(writeFd, "pipe")
    })
    yield* Effect.addFinalizer(() => Effect.zipRight(closeRead, Effect.ignore(closeWrite)))
    return { readFd, writeFd, closeRead, closeWrite }
  }
)
