/**
 * The error every test-server handler fails with: an HTTP status and the plain-text message a
 * real PBS would send.
 */
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"

export class ApiError extends Data.TaggedError("ApiError")<{ readonly status: number; readonly text: string }> {
  override get message(): string {
    return `${this.status} ${this.text}`
  }
}

/** A 400 (what `bail!` produces upstream) or another status. */
export const bail = (text: string, status = 400): Effect.Effect<never, ApiError> =>
  Effect.fail(new ApiError({ status, text }))

/** Runs a synchronous step (file-system work), turning exceptions into a 400 with `what - cause`. */
export const attempt = <A>(what: string, f: () => A): Effect.Effect<A, ApiError> =>
  Effect.try({
    try: f,
    catch: (cause) => new ApiError({ status: 400, text: `${what} - ${describe(cause)}` })
  })

/** The message of an exception, with its errno code when there is one. */
export const describe = (cause: unknown): string => {
  if (cause instanceof Error) {
    const code = (cause as NodeJS.ErrnoException).code
    return code !== undefined && !cause.message.includes(code) ? `${cause.message} (${code})` : cause.message
  }
  return String(cause)
}

/** The error text of a schema violation, in the format of `proxmox-schema`. */
export const parameterError = (name: string, why: string): ApiError =>
  new ApiError({ status: 400, text: `parameter verification errors\n\nparameter '${name}': ${why}` })
