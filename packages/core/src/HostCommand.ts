/**
 * Every external program the library runs (`qemu-img`, `qm`, `pvesm`, compressors…) goes through
 * this one service, so tests and other host profiles can substitute it and assert each invocation.
 *
 * @since 0.1.0
 */
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Schema from "effect/Schema"
import { execFile } from "node:child_process"

/**
 * A program exited non-zero, was killed, or could not be started.
 *
 * @since 0.1.0
 * @category errors
 */
export class CommandError extends Schema.TaggedError<CommandError>("@vzdump/core/CommandError")("CommandError", {
  program: Schema.String,
  args: Schema.Array(Schema.String),
  exitCode: Schema.NullOr(Schema.Number),
  signal: Schema.NullOr(Schema.String),
  stderr: Schema.String,
  reason: Schema.Literal("Spawn", "ExitStatus", "Timeout")
}) {
  override get message(): string {
    const what = this.reason === "Spawn"
      ? "could not be started"
      : this.reason === "Timeout"
      ? "timed out"
      : this.signal !== null
      ? `was killed by ${this.signal}`
      : `failed with exit code ${this.exitCode}`
    const detail = this.stderr.trim().split("\n").slice(-3).join(" | ")
    return `command '${[this.program, ...this.args].join(" ")}' ${what}${detail.length > 0 ? `: ${detail}` : ""}`
  }
}

/**
 * What a finished program printed.
 *
 * @since 0.1.0
 * @category models
 */
export interface CommandOutput {
  readonly stdout: string
  readonly stderr: string
}

/**
 * @since 0.1.0
 * @category models
 */
export interface RunOptions {
  readonly timeoutMs?: number
  readonly stdin?: string
  readonly env?: Readonly<Record<string, string>>
}

/**
 * @since 0.1.0
 * @category models
 */
export interface HostCommandService {
  /** Runs `program args…` to completion; a non-zero exit is a `CommandError`. */
  readonly run: (
    program: string,
    args: ReadonlyArray<string>,
    options?: RunOptions
  ) => Effect.Effect<CommandOutput, CommandError>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class HostCommand extends Context.Tag("@vzdump/core/HostCommand")<HostCommand, HostCommandService>() {}

const runNode = (
  program: string,
  args: ReadonlyArray<string>,
  options?: RunOptions
): Effect.Effect<CommandOutput, CommandError> =>
  Effect.async<CommandOutput, CommandError>((resume, signal) => {
    const child = execFile(program, args, {
      encoding: "utf8",
      maxBuffer: 64 * 1024 * 1024,
      signal,
      ...(options?.timeoutMs !== undefined ? { timeout: options.timeoutMs } : {}),
      ...(options?.env !== undefined ? { env: { ...process.env, ...options.env } } : {})
    }, (error, stdout, stderr) => {
      if (error === null) {
        resume(Effect.succeed({ stdout, stderr }))
        return
      }
      const code = (error as NodeJS.ErrnoException & { code?: unknown }).code
      const spawnFailed = typeof code === "string"
      const killed = (error as { killed?: boolean }).killed === true
      resume(Effect.fail(
        new CommandError({
          program,
          args: [...args],
          exitCode: typeof code === "number" ? code : null,
          signal: (error as { signal?: string | null }).signal ?? null,
          stderr: spawnFailed ? `${code}: ${error.message}` : stderr,
          reason: spawnFailed ? "Spawn" : killed && options?.timeoutMs !== undefined ? "Timeout" : "ExitStatus"
        })
      ))
    })
    if (options?.stdin !== undefined) child.stdin?.end(options.stdin)
  })

/**
 * Runs programs with `node:child_process` `execFile` (no shell).
 *
 * @since 0.1.0
 * @category layers
 */
export const layer: Layer.Layer<HostCommand> = Layer.succeed(HostCommand, HostCommand.of({ run: runNode }))
