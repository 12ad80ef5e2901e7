/**
 * The byte transport under the QMP and guest-agent clients, as a swappable service.
 *
 * Two implementations exist:
 *
 * - `NodeQmpTransport` — Unix and TCP sockets through `@effect/platform-node`'s `NodeSocket`. Node's `net`
 *   cannot attach file descriptors to a message, so asking it to send some fails with
 *   `QmpTransportError` (`FdPassingUnsupported`).
 * - `FdQmpTransport` — Unix sockets through the native `usocket` addon, which sends file descriptors with
 *   `SCM_RIGHTS` together with a line; that is what QMP `getfd` and `add-fd` need.
 *
 * A client obtains a {@link QmpConnection} per connection attempt; the socket connects when the client runs it,
 * and is closed when that run ends (the client's scope).
 *
 * @since 0.1.0
 */
import type * as Socket from "@effect/platform/Socket"
import * as Context from "effect/Context"
import type * as Duration from "effect/Duration"
import type * as Effect from "effect/Effect"
import type { QmpConnectError, QmpTransportError } from "./QmpError.js"

/**
 * A Unix domain socket path.
 *
 * @since 0.1.0
 * @category models
 */
export interface UnixAddress {
  readonly _tag: "Unix"
  readonly path: string
}

/**
 * A TCP endpoint (e.g. `-qmp tcp:127.0.0.1:4444,server=on,wait=off`).
 *
 * @since 0.1.0
 * @category models
 */
export interface TcpAddress {
  readonly _tag: "Tcp"
  readonly host: string
  readonly port: number
}

/**
 * Where a QMP monitor or a guest-agent chardev listens.
 *
 * @since 0.1.0
 * @category models
 */
export type QmpAddress = UnixAddress | TcpAddress

/**
 * @since 0.1.0
 * @category constructors
 */
export const unix = (path: string): UnixAddress => ({ _tag: "Unix", path })

/**
 * @since 0.1.0
 * @category constructors
 */
export const tcp = (host: string, port: number): TcpAddress => ({ _tag: "Tcp", host, port })

/**
 * A plain string is a Unix socket path.
 *
 * @since 0.1.0
 * @category constructors
 */
export const toAddress = (address: string | QmpAddress): QmpAddress =>
  typeof address === "string" ? unix(address) : address

/**
 * `unix:<path>` or `tcp:<host>:<port>`, for messages.
 *
 * @since 0.1.0
 * @category utils
 */
export const formatAddress = (address: QmpAddress): string =>
  address._tag === "Unix" ? `unix:${address.path}` : `tcp:${address.host}:${address.port}`

/**
 * One connection: a platform `Socket` for the byte stream (run it once; its run owns the connection), and a
 * way to send bytes with file descriptors attached. Use `socket.writer` for plain writes; `writeWithFds`
 * writes through the same stream, so a caller that serializes its writes keeps their order.
 *
 * @since 0.1.0
 * @category models
 */
export interface QmpConnection {
  readonly socket: Socket.Socket
  /**
   * Sends `data` and `fds` in one `sendmsg` (`SCM_RIGHTS`). The descriptors stay owned by the caller and may
   * be closed once this succeeds. Only valid while `socket` runs.
   */
  readonly writeWithFds: (data: Uint8Array, fds: ReadonlyArray<number>) => Effect.Effect<void, QmpTransportError>
}

/**
 * @since 0.1.0
 * @category models
 */
export interface QmpOpenOptions {
  /** Bound on connecting the socket (TCP may hang; Unix sockets answer at once). */
  readonly openTimeout: Duration.DurationInput
}

/**
 * @since 0.1.0
 * @category models
 */
export interface QmpTransportService {
  /** A short name for logs, e.g. `"node"` or `"usocket"`. */
  readonly name: string
  /** Whether `writeWithFds` can actually pass descriptors. */
  readonly supportsFds: boolean
  /**
   * Prepares a connection to `address`. Fails at once with `QmpConnectError` (`Unsupported`) for addresses
   * this transport cannot reach; errors of the actual connect surface as a `SocketError` with reason `Open`
   * from `socket.run`.
   */
  readonly open: (address: QmpAddress, options: QmpOpenOptions) => Effect.Effect<QmpConnection, QmpConnectError>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class QmpTransport extends Context.Tag("@vzdump/qmp/QmpTransport")<QmpTransport, QmpTransportService>() {}
