/**
 * usocket's socket and server, made safe to close.
 *
 * The native `usocket` addon keeps each socket's libuv poll handle inside the C++ object behind a JavaScript
 * wrapper (`_wrap`). Closing it (`destroy`, `close`, or the addon's own close after an error such as a reset by
 * the peer) hands the handle to `uv_close` and drops the wrapper at once. libuv finishes closing a handle only
 * at the end of the event-loop turn; a garbage collection in between frees the C++ object first, and libuv then
 * aborts the whole process (`uv__finish_close: Assertion 'handle->flags & UV_HANDLE_CLOSING' failed`).
 *
 * `SafeUSocket` and `SafeUServer` keep every wrapper they close reachable for two more turns of the loop, by
 * which time libuv is done with its handle. `SafeUServer`'s connections are `SafeUSocket`s.
 * `FdQmpTransport` uses them; so should anything else that serves or connects through usocket.
 *
 * @since 0.1.0
 */
import { UServer, USocket } from "usocket"

const closing = new Set<object>()

// Two turns: a handle closed while libuv runs its close callbacks is finished only in the turn after that.
const keepThroughClose = (wrap: object | null | undefined): void => {
  if (wrap === null || wrap === undefined || closing.has(wrap)) return
  closing.add(wrap)
  setImmediate(() => setImmediate(() => closing.delete(wrap)))
}

/**
 * The number of native wrappers kept alive while libuv closes their handles (for tests).
 *
 * @since 0.1.0
 * @category diagnostics
 */
export const closingCount = (): number => closing.size

/**
 * A usocket `USocket` whose native wrapper outlives its close.
 *
 * @since 0.1.0
 * @category models
 */
export class SafeUSocket extends USocket {
  override destroy(): this {
    keepThroughClose(this._wrap)
    return super.destroy()
  }

  // The addon closes the socket itself on an error, before any listener runs.
  override _wrapEvent(event: string, a0?: unknown, a1?: unknown): void {
    if (event === "error") keepThroughClose(this._wrap)
    super._wrapEvent(event, a0, a1)
  }
}

/**
 * A usocket `UServer` whose native wrapper outlives its close, and whose connections are `SafeUSocket`s.
 *
 * @since 0.1.0
 * @category models
 */
export class SafeUServer extends UServer {
  override close(): void {
    keepThroughClose(this._wrap)
    super.close()
  }

  override _wrapEvent(event: string, a0?: unknown, a1?: unknown): void {
    if (event === "accept" && typeof a0 === "number") {
      this.emit("connection", new SafeUSocket({ fd: a0 }))
      return
    }
    if (event === "error") keepThroughClose(this._wrap)
    super._wrapEvent(event, a0, a1)
  }
}
