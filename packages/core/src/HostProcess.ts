/**
 * Long-running external programs whose standard streams are file descriptors, e.g. vzdump's
 * compressor (`zstd --threads=1` reading the pipe QEMU writes into and writing the `.dat` file).
 * `HostCommand.run` covers programs that run to completion with string input and output; this
 * service covers the streaming ones, so tests can substitute them too.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import type * as Scope from "effect/Scope"
import { spawn } from "node:child_process"
import { constants as OsConstants } from "node:os"
import { CommandError } from "./HostCommand.js"

/**
 * @since 0.1.0
 * @category models
 */
export interface SpawnOptions {
  /** A file descriptor of ours that becomes the program's stdin; default `/dev/null`. */
  readonly stdin?: number | undefined
  /** A file descriptor of ours that becomes the program's stdout; default `/dev/null`. */
  readonly stdout?: number | undefined
  readonly env?: Readonly<Record<string, string>> | undefined
}

/**
 * How a program ended: `code` is its exit status, `signal` the signal that killed it.
 *
 * @since 0.1.0
 * @category models
 */
export interface ProcessExit {
  readonly code: number | null
  readonly signal: string | null
  /** The end of what it printed on stderr. */
  readonly stderr: string
}

/**
 * @since 0.1.0
 * @category models
 */
export interface RunningProcess {
  readonly program: string
  readonly args: ReadonlyArray<string>
  /** The exit, once the program has ended; `undefined` while it runs. */
  readonly poll: Effect.Effect<ProcessExit | undefined>
  /** Waits until the program has ended. */
  readonly exit: Effect.Effect<ProcessExit>
  /** SIGKILL if it still runs, then waits for it. */
  readonly kill: Effect.Effect<void>
}

/**
 * @since 0.1.0
 * @category models
 */
export interface HostProcessService {
  /**
   * Starts `program args…` (no shell) and returns once it runs. The descriptors in `options` are
   * duplicated into the child; the caller may close its copies afterwards. A program still running
   * when the scope closes is killed.
   */
  readonly spawn: (
    program: string,
    args: ReadonlyArray<string>,
    options?: SpawnOptions
  ) => Effect.Effect<RunningProcess, CommandError, Scope.Scope>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class HostProcess extends Context.Tag("@vzdump/core/HostProcess")<HostProcess, HostProcessService>() {}

const STDERR_KEEP = 4096

const spawnNode = (
  program: string,
  args: ReadonlyArray<string>,
  options?: SpawnOptions
): Effect.Effect<RunningProcess, CommandError, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.gen(function*() {
      const exited = yield* Deferred.make<ProcessExit>()
      let stderr = ""
      let done: ProcessExit | undefined
      const child = spawn(program, [...args], {
        stdio: [options?.stdin ?? "ignore", options?.stdout ?? "ignore", "pipe"],
        ...(options?.env !== undefined ? { env: { ...process.env, ...options.env } } : {})
      })
      child.stderr?.on("data", (chunk: Buffer) => {
        stderr = (stderr + chunk.toString("utf8")).slice(-STDERR_KEEP)
      })
      child.on("close", (code, signal) => {
        done = { code, signal, stderr }
        Deferred.unsafeDone(exited, Effect.succeed(done))
      })
      yield* Effect.async<void, CommandError>((resume) => {
        const onSpawn = () => {
          child.off("error", onError)
          resume(Effect.void)
        }
        const onError = (error: Error) => {
          child.off("spawn", onSpawn)
          resume(Effect.fail(
            new CommandError({
              program,
              args: [...args],
              exitCode: null,
              signal: null,
              stderr: error.message,
              reason: "Spawn"
            })
          ))
        }
        child.once("spawn", onSpawn)
        child.once("error", onError)
      })
      const kill = Effect.suspend(() => {
        if (done !== undefined) return Effect.void
        child.kill("SIGKILL")
        return Effect.asVoid(Deferred.await(exited))
      })
      return {
        program,
        args,
        poll: Effect.sync(() => done),
        exit: Deferred.await(exited),
        kill
      } satisfies RunningProcess
    }),
    (running) => running.kill
  )

/**
 * Runs programs with `node:child_process` `spawn`.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer: Layer.Layer<HostProcess> = Layer.succeed(HostProcess, HostProcess.of({ spawn: spawnNode }))

/**
 * vzdump's message for a compressor that ended badly: `zstd --threads=1 failed - wrong exit status 1`
 * (with ` (signal 9)` when it was killed).
 *
 * @since 0.1.0
 * @category utils
 */
export const wrongExitStatus = (commandLine: string, exit: ProcessExit): string | undefined => {
  const signal = exit.signal === null ? 0 : signalNumber(exit.signal)
  const code = exit.code ?? 0
  if (code === 0 && exit.signal === null) return undefined
  return `${commandLine} failed - wrong exit status ${code}${signal !== 0 ? ` (signal ${signal})` : ""}`
}

const signalNumber = (name: string): number =>
  (OsConstants.signals as Readonly<Record<string, number | undefined>>)[name] ?? -1
