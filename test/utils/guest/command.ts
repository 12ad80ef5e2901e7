/**
 * Shared pieces of the test-guest fixture: its error type and a small `execFile` wrapper.
 *
 * @since 0.1.0
 */
import { execFile } from "node:child_process"
import { Data, Effect } from "effect"

/**
 * Everything that can go wrong while building, preparing or booting the test guest.
 *
 * @since 0.1.0
 * @category errors
 */
export class GuestError extends Data.TaggedError("GuestError")<{
  readonly reason: "Build" | "Command" | "Disk" | "Boot" | "Exited" | "Timeout"
  readonly message: string
  readonly cause?: unknown
}> {}

/**
 * Options of {@link run}.
 *
 * @since 0.1.0
 * @category models
 */
export interface RunOptions {
  readonly cwd?: string
  readonly input?: string | Buffer
  readonly env?: NodeJS.ProcessEnv
}

/**
 * Runs a program with `execFile` (no shell) and returns its stdout; a non-zero exit status fails with
 * the program's stderr in the message. Interruption kills the program.
 *
 * @since 0.1.0
 * @category utils
 */
export const run = (
  file: string,
  args: ReadonlyArray<string>,
  options: RunOptions = {}
): Effect.Effect<Buffer, GuestError> =>
  Effect.async<Buffer, GuestError>((resume) => {
    const child = execFile(
      file,
      [...args],
      {
        encoding: "buffer",
        maxBuffer: 512 * 1024 * 1024,
        ...(options.cwd === undefined ? {} : { cwd: options.cwd }),
        ...(options.env === undefined ? {} : { env: options.env })
      },
      (error, stdout, stderr) => {
        if (error) {
          const detail = stderr.toString("utf8").trim()
          resume(Effect.fail(
            new GuestError({
              reason: "Command",
              message: `${file} ${args.join(" ")} failed: ${error.message}${detail ? `: ${detail}` : ""}`,
              cause: error
            })
          ))
        } else {
          resume(Effect.succeed(stdout))
        }
      }
    )
    child.stdin?.on("error", () => {})
    child.stdin?.end(options.input ?? "")
    return Effect.sync(() => {
      child.kill("SIGKILL")
    })
  })

/**
 * Like {@link run} but decodes stdout as UTF-8.
 *
 * @since 0.1.0
 * @category utils
 */
export const runText = (
  file: string,
  args: ReadonlyArray<string>,
  options: RunOptions = {}
): Effect.Effect<string, GuestError> => Effect.map(run(file, args, options), (out) => out.toString("utf8"))

/**
 * Wraps a synchronous filesystem step, turning exceptions into a {@link GuestError}.
 *
 * @since 0.1.0
 * @category utils
 */
export const attempt = <A>(
  reason: GuestError["reason"],
  what: string,
  f: () => A
): Effect.Effect<A, GuestError> =>
  Effect.try({
    try: f,
    catch: (cause) =>
      new GuestError({
        reason,
        message: `${what}: ${cause instanceof Error ? cause.message : String(cause)}`,
        cause
      })
  })
