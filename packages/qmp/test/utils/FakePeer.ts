/**
 * A scripted Unix-socket peer, for protocol-error cases that a real QEMU never produces (malformed JSON, a
 * connection closed in the middle of a reply, a peer that never answers). Each accepted connection gets the
 * `greeting` bytes (if any), then `onLine` runs for every received line and may write or close.
 */
import { Effect } from "effect"
import type { Scope } from "effect"
import * as Net from "node:net"

/** What `onLine` can do with the connection. */
export interface FakeConnection {
  readonly write: (text: string | Uint8Array) => void
  /** Half-closes and then destroys the connection. */
  readonly close: () => void
}

/** The running peer. */
export interface FakePeer {
  readonly path: string
  /** Every line received, over all connections. */
  readonly received: Array<string>
  /** Connections accepted and connections closed so far. */
  readonly stats: { accepted: number; closed: number }
}

/** Listens on `path` until the scope closes. */
export const fakePeer = (
  path: string,
  script: {
    readonly greeting?: string
    readonly onLine?: (line: string, connection: FakeConnection) => void
  }
): Effect.Effect<FakePeer, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.async<{ readonly server: Net.Server; readonly sockets: Set<Net.Socket>; readonly peer: FakePeer }>(
      (resume) => {
        const received: Array<string> = []
        const stats = { accepted: 0, closed: 0 }
        const sockets = new Set<Net.Socket>()
        const server = Net.createServer((socket) => {
          sockets.add(socket)
          stats.accepted++
          socket.on("close", () => {
            stats.closed++
            sockets.delete(socket)
          })
          socket.on("error", () => {})
          const connection: FakeConnection = {
            write: (text) => {
              if (!socket.destroyed) socket.write(text)
            },
            close: () => {
              socket.end()
              socket.destroySoon()
            }
          }
          if (script.greeting !== undefined) socket.write(script.greeting)
          let buffer = ""
          socket.setEncoding("latin1")
          socket.on("data", (data: string) => {
            buffer += data
            let index: number
            while ((index = buffer.indexOf("\n")) >= 0) {
              const line = buffer.slice(0, index)
              buffer = buffer.slice(index + 1)
              received.push(line)
              script.onLine?.(line, connection)
            }
          })
        })
        server.listen(path, () => resume(Effect.succeed({ server, sockets, peer: { path, received, stats } })))
      }
    ),
    ({ server, sockets }) =>
      Effect.async<void>((resume) => {
        for (const socket of sockets) socket.destroy()
        server.close(() => resume(Effect.void))
      })
  ).pipe(Effect.map(({ peer }) => peer))

/** A QEMU 7.2 greeting line. */
export const qemuGreeting = `${
  JSON.stringify({
    QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: "fake" }, capabilities: ["oob"] }
  })
}\r\n`

/** The `id` of a received command line, or undefined. */
export const idOf = (line: string): unknown => {
  try {
    const parsed: unknown = JSON.parse(line.replace(/^\xff/, ""))
    return typeof parsed === "object" && parsed !== null && "id" in parsed ? parsed.id : undefined
  } catch {
    return undefined
  }
}

/** The `execute` of a received command line, or undefined. */
export const commandOf = (line: string): unknown => {
  try {
    const parsed: unknown = JSON.parse(line.replace(/^\xff/, ""))
    return typeof parsed === "object" && parsed !== null && "execute" in parsed ? parsed.execute : undefined
  } catch {
    return undefined
  }
}
