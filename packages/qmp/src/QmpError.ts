/**
 * Typed failures of the QMP client and its transports.
 *
 * Every error is a `Schema.TaggedError` with a namespaced identifier and a readable `message`; variants of
 * one failure are told apart by a `reason` literal. Recover with `Effect.catchTag("QmpCommandError", …)`.
 *
 * @since 0.1.0
 */
import * as Duration from "effect/Duration"
import * as Schema from "effect/Schema"

/**
 * The connection could not be established, or the QMP handshake did not complete.
 *
 * - `Open`: the socket could not be opened (missing path, connection refused, …).
 * - `Timeout`: no greeting or no `qmp_capabilities` reply within the handshake timeout. QEMU serves one QMP
 *   client per monitor socket, so this is what a second client sees while another one is connected.
 * - `Handshake`: the peer answered, but not like a QMP server (bad greeting, closed early, refused capabilities).
 * - `Unsupported`: the chosen transport cannot reach this kind of address.
 *
 * @since 0.1.0
 * @category errors
 */
export class QmpConnectError extends Schema.TaggedError<QmpConnectError>("@vzdump/qmp/QmpConnectError")(
  "QmpConnectError",
  {
    reason: Schema.Literal("Open", "Timeout", "Handshake", "Unsupported"),
    address: Schema.String,
    detail: Schema.String
  }
) {
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `cannot connect to ${this.address} (${this.reason}): ${this.detail}`
  }
}

/**
 * The peer broke the wire protocol: a line that is not JSON, a message of unknown shape where a reply or a
 * greeting was expected, or a line longer than the client accepts. The connection is closed afterwards and
 * every pending and later command fails with this error.
 *
 * @since 0.1.0
 * @category errors
 */
export class QmpProtocolError extends Schema.TaggedError<QmpProtocolError>("@vzdump/qmp/QmpProtocolError")(
  "QmpProtocolError",
  {
    reason: Schema.Literal("MalformedJson", "InvalidMessage", "LineTooLong"),
    detail: Schema.String
  }
) {
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `QMP protocol error (${this.reason}): ${this.detail}`
  }
}

/**
 * The connection is gone. Every command still waiting for its reply fails with this error, and so does every
 * command issued afterwards.
 *
 * - `PeerClosed`: the peer closed the socket (QEMU quit or was killed).
 * - `ReadFailed` / `WriteFailed`: the socket reported an I/O error.
 * - `ClientClosed`: the scope that owns the client was closed.
 * - `EventStreamEnded`: an event stream ended (the connection closed) before the awaited event came.
 *
 * @since 0.1.0
 * @category errors
 */
export class QmpClosedError extends Schema.TaggedError<QmpClosedError>("@vzdump/qmp/QmpClosedError")(
  "QmpClosedError",
  {
    reason: Schema.Literal("PeerClosed", "ReadFailed", "WriteFailed", "ClientClosed", "EventStreamEnded"),
    detail: Schema.String
  }
) {
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `QMP connection closed (${this.reason}): ${this.detail}`
  }
}

/**
 * QEMU answered a command with `{"error": {"class": …, "desc": …}}`.
 *
 * @since 0.1.0
 * @category errors
 */
export class QmpCommandError extends Schema.TaggedError<QmpCommandError>("@vzdump/qmp/QmpCommandError")(
  "QmpCommandError",
  {
    command: Schema.String,
    errorClass: Schema.String,
    desc: Schema.String
  }
) {
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `${this.command}: ${this.errorClass}: ${this.desc}`
  }
}

/**
 * No reply to a command within its timeout. A reply that arrives later is dropped (replies are matched by id).
 *
 * @since 0.1.0
 * @category errors
 */
export class QmpTimeoutError extends Schema.TaggedError<QmpTimeoutError>("@vzdump/qmp/QmpTimeoutError")(
  "QmpTimeoutError",
  {
    command: Schema.String,
    timeout: Schema.DurationFromSelf
  }
) {
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `${this.command}: no reply within ${Duration.format(this.timeout)}`
  }
}

/**
 * `awaitEvent` saw no matching event within its timeout.
 *
 * @since 0.1.0
 * @category errors
 */
export class QmpEventTimeoutError
  extends Schema.TaggedError<QmpEventTimeoutError>("@vzdump/qmp/QmpEventTimeoutError")("QmpEventTimeoutError", {
    description: Schema.String,
    timeout: Schema.DurationFromSelf
  })
{
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `no ${this.description} within ${Duration.format(this.timeout)}`
  }
}

/**
 * The transport could not carry a message: `FdPassingUnsupported` when file descriptors are to be sent over a
 * transport that cannot send them (use `FdQmpTransport`), `Write` when sending them failed.
 *
 * @since 0.1.0
 * @category errors
 */
export class QmpTransportError extends Schema.TaggedError<QmpTransportError>("@vzdump/qmp/QmpTransportError")(
  "QmpTransportError",
  {
    reason: Schema.Literal("FdPassingUnsupported", "Write"),
    detail: Schema.String
  }
) {
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `QMP transport error (${this.reason}): ${this.detail}`
  }
}

/**
 * A command succeeded but its `return` value did not match the expected schema.
 *
 * @since 0.1.0
 * @category errors
 */
export class QmpDecodeError extends Schema.TaggedError<QmpDecodeError>("@vzdump/qmp/QmpDecodeError")(
  "QmpDecodeError",
  {
    command: Schema.String,
    detail: Schema.String
  }
) {
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `${this.command}: unexpected reply: ${this.detail}`
  }
}

/**
 * Why an established connection ended; pending and later commands fail with it.
 *
 * @since 0.1.0
 * @category errors
 */
export type QmpConnectionError = QmpClosedError | QmpProtocolError

/**
 * Every way `execute` can fail.
 *
 * @since 0.1.0
 * @category errors
 */
export type QmpExecuteError =
  | QmpCommandError
  | QmpTimeoutError
  | QmpClosedError
  | QmpProtocolError
  | QmpTransportError

/**
 * Any error of this module.
 *
 * @since 0.1.0
 * @category errors
 */
export type QmpError =
  | QmpConnectError
  | QmpProtocolError
  | QmpClosedError
  | QmpCommandError
  | QmpTimeoutError
  | QmpEventTimeoutError
  | QmpTransportError
  | QmpDecodeError
