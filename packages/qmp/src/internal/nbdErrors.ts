/**
 * Error classes of the NBD client; re-exported (with docs) by `NbdClient.ts`.
 *
 * @internal
 */
import * as Schema from "effect/Schema"

const causeText = (cause: unknown): string =>
  cause instanceof Error ? cause.message : cause === undefined ? "unknown error" : String(cause)

export class NbdConnectError extends Schema.TaggedError<NbdConnectError>("@vzdump/qmp/NbdConnectError")(
  "NbdConnectError",
  {
    address: Schema.String,
    reason: Schema.Literal("Connect", "Timeout"),
    cause: Schema.optional(Schema.Defect)
  }
) {
  override get message(): string {
    return this.reason === "Timeout"
      ? `NBD connection to ${this.address} timed out (connect and handshake)`
      : `cannot connect to NBD server at ${this.address}: ${causeText(this.cause)}`
  }
}

export class NbdExportNotFoundError
  extends Schema.TaggedError<NbdExportNotFoundError>("@vzdump/qmp/NbdExportNotFoundError")(
    "NbdExportNotFoundError",
    {
      exportName: Schema.String,
      option: Schema.String,
      detail: Schema.String
    }
  )
{
  override get message(): string {
    return `NBD export "${this.exportName}" not found (${this.option}: NBD_REP_ERR_UNKNOWN${
      this.detail === "" ? "" : `: ${this.detail}`
    })`
  }
}

export class NbdOptionError extends Schema.TaggedError<NbdOptionError>("@vzdump/qmp/NbdOptionError")(
  "NbdOptionError",
  {
    exportName: Schema.String,
    option: Schema.String,
    reply: Schema.String,
    detail: Schema.String
  }
) {
  override get message(): string {
    return `NBD ${this.option} for export "${this.exportName}" failed: ${this.reply}${
      this.detail === "" ? "" : `: ${this.detail}`
    }`
  }
}

export class NbdProtocolError extends Schema.TaggedError<NbdProtocolError>("@vzdump/qmp/NbdProtocolError")(
  "NbdProtocolError",
  {
    phase: Schema.Literal("Handshake", "Transmission"),
    detail: Schema.String
  }
) {
  override get message(): string {
    return `NBD protocol error during ${this.phase.toLowerCase()}: ${this.detail}`
  }
}

export class NbdCommandError extends Schema.TaggedError<NbdCommandError>("@vzdump/qmp/NbdCommandError")(
  "NbdCommandError",
  {
    command: Schema.String,
    offset: Schema.Number,
    length: Schema.Number,
    errno: Schema.Number,
    code: Schema.String,
    errorOffset: Schema.optional(Schema.Number),
    detail: Schema.String
  }
) {
  override get message(): string {
    const at = this.errorOffset === undefined ? "" : ` at ${this.errorOffset}`
    return `${this.command} offset=${this.offset} length=${this.length} failed${at}: ${this.code}${
      this.detail === "" ? "" : `: ${this.detail}`
    }`
  }
}

export class NbdClosedError extends Schema.TaggedError<NbdClosedError>("@vzdump/qmp/NbdClosedError")(
  "NbdClosedError",
  {
    reason: Schema.Literal("ServerClosed", "SocketError", "ClientClosed"),
    pending: Schema.Number,
    cause: Schema.optional(Schema.Defect)
  }
) {
  override get message(): string {
    const what = this.reason === "ClientClosed"
      ? "NBD connection closed by the client"
      : this.reason === "SocketError"
      ? `NBD connection failed: ${causeText(this.cause)}`
      : "NBD server closed the connection"
    return this.pending > 0 ? `${what} with ${this.pending} request(s) pending` : what
  }
}

export class NbdRequestError extends Schema.TaggedError<NbdRequestError>("@vzdump/qmp/NbdRequestError")(
  "NbdRequestError",
  {
    reason: Schema.Literal("OutOfRange", "InvalidArgument", "NoMetaContext"),
    detail: Schema.String
  }
) {
  override get message(): string {
    return `invalid NBD request (${this.reason}): ${this.detail}`
  }
}

export type NbdError =
  | NbdConnectError
  | NbdExportNotFoundError
  | NbdOptionError
  | NbdProtocolError
  | NbdCommandError
  | NbdClosedError
  | NbdRequestError

/** Errors a request can fail with once the connection is established. */
export type NbdRequestFailure = NbdProtocolError | NbdCommandError | NbdClosedError | NbdRequestError
