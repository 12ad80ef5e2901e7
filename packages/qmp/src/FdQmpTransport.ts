/**
 * `QmpTransport` that can pass file descriptors (`SCM_RIGHTS`), for QMP `getfd` and `add-fd`.
 *
 * Node's `net` module has no way to attach descriptors to a write, so this transport uses the native `usocket`
 * addon (a Unix stream socket whose `write({ data, fds })` is one `sendmsg`), as a `SafeUSocket` (see
 * `Usocket`: closing a plain one can abort the process). The socket is adapted to the platform `Socket` with
 * `NodeSocket.fromDuplex`, so the clients read and write it exactly like the plain transport; `writeWithFds`
 * writes the line and its descriptors through the same stream, keeping the order of writes. QEMU takes the
 * descriptor that arrives with a command's bytes, hence one line per `sendmsg`.
 *
 * Only Unix sockets are supported: a TCP address fails with `QmpConnectError` (`Unsupported`).
 *
 * @since 0.1.0
 */
import * as NodeSocket from "@effect/platform-node/NodeSocket"
import * as Socket from "@effect/platform/Socket"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Fs from "node:fs"
import { QmpConnectError, QmpTransportError } from "./QmpError.js"
import { formatAddress, QmpTransport } from "./QmpTransport.js"
import type { QmpConnection, QmpTransportService } from "./QmpTransport.js"
import { SafeUSocket } from "./Usocket.js"

const toBuffer = (chunk: unknown): unknown =>
  typeof chunk === "string"
    ? Buffer.from(chunk)
    : chunk instanceof Uint8Array && !Buffer.isBuffer(chunk)
    ? Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength)
    : chunk

// Reads what is still queued on a non-blocking socket: until EOF, a reset, or nothing more for now.
const drain = (fd: number): { readonly chunks: Array<Buffer>; readonly ended: boolean } => {
  const chunks: Array<Buffer> = []
  for (;;) {
    const buffer = Buffer.allocUnsafe(64 * 1024)
    let read: number
    try {
      read = Fs.readSync(fd, buffer, 0, buffer.length, null)
    } catch (error) {
      const code = typeof error === "object" && error !== null && "code" in error ? error.code : undefined
      return { chunks, ended: code === "ECONNRESET" || code === "EPIPE" }
    }
    if (read === 0) return { chunks, ended: true }
    chunks.push(buffer.subarray(0, read))
  }
}

const isPollError = (u: unknown): boolean =>
  typeof u === "object" && u !== null && "syscall" in u && u.syscall === "poll"

class FdSocket extends SafeUSocket {
  // usocket's `_write` accepts only a Buffer, an array of fds or `{ data, fds }`; the platform socket writes
  // Uint8Arrays, so convert them first.
  override _write(chunk: unknown, encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    super._write(toBuffer(chunk), encoding, callback)
  }

  // When the peer goes away with bytes of ours still unread (QEMU after `quit`), the socket gets an error
  // condition and libuv reports its poll handle as failed (EBADF) *before* the data queued for us, which usocket
  // would then drop: QEMU's last reply would be lost. Read that data first; a reset after it is the end of the
  // stream, as Node's own sockets see it.
  override _wrapEvent(event: string, a0?: unknown, a1?: unknown): void {
    if (event === "error" && isPollError(a0) && typeof this.fd === "number") {
      const { chunks, ended } = drain(this.fd)
      for (const chunk of chunks) super._wrapEvent("data", chunk)
      if (ended) return super._wrapEvent("data")
    }
    super._wrapEvent(event, a0, a1)
  }
}

const connect = (path: string): Effect.Effect<FdSocket, Socket.SocketError> =>
  Effect.async<FdSocket, Socket.SocketError>((resume) => {
    const socket = new FdSocket()
    // A permanent listener: usocket may report an error after the platform socket removed its own listeners,
    // and an unhandled `error` event would crash the process. The platform socket still sees every error.
    socket.on("error", () => {})
    const onError = (cause: unknown) => {
      socket.off("connected", onConnected)
      resume(Effect.fail(new Socket.SocketGenericError({ reason: "Open", cause })))
    }
    // Reading before `connected` aborts inside the addon; fromDuplex attaches its `data` listener only after this.
    const onConnected = () => {
      socket.off("error", onError)
      resume(Effect.succeed(socket))
    }
    socket.once("error", onError)
    socket.once("connected", onConnected)
    try {
      socket.connect(path)
    } catch (cause) {
      onError(cause)
    }
    return Effect.sync(() => socket.destroy())
  })

/**
 * The transport value.
 *
 * @since 0.1.0
 * @category constructors
 */
export const transport: QmpTransportService = QmpTransport.of({
  name: "usocket",
  supportsFds: true,
  open: (address, options) => {
    if (address._tag !== "Unix") {
      return Effect.fail(
        new QmpConnectError({
          reason: "Unsupported",
          address: formatAddress(address),
          detail: "FdQmpTransport speaks Unix sockets only (descriptors cannot cross TCP)"
        })
      )
    }
    return Effect.sync(() => {
      let current: FdSocket | undefined
      const open = Effect.acquireRelease(
        Effect.tap(connect(address.path), (socket) => {
          current = socket
        }),
        (socket) =>
          Effect.sync(() => {
            if (current === socket) current = undefined
            socket.destroy()
          })
      )
      const writeWithFds = (data: Uint8Array, fds: ReadonlyArray<number>) =>
        Effect.async<void, QmpTransportError>((resume) => {
          const socket = current
          if (socket === undefined) {
            return resume(Effect.fail(new QmpTransportError({ reason: "Write", detail: "socket is not connected" })))
          }
          socket.write({ data: Buffer.from(data), fds: Array.from(fds) }, (error) => {
            resume(
              error
                ? Effect.fail(new QmpTransportError({ reason: "Write", detail: String(error.message ?? error) }))
                : Effect.void
            )
          })
        })
      return Effect.map(
        NodeSocket.fromDuplex(open, { openTimeout: options.openTimeout }),
        (socket): QmpConnection => ({ socket, writeWithFds })
      )
    }).pipe(Effect.flatten)
  }
})

/**
 * @since 0.1.0
 * @category constructors
 */
export const make: Effect.Effect<QmpTransportService> = Effect.succeed(transport)

/**
 * @since 0.1.0
 * @category layers
 */
export const layer: Layer.Layer<QmpTransport> = Layer.succeed(QmpTransport, transport)
