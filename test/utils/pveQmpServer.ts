/**
 * The QMP side of the Proxmox-QEMU emulator (`pveQemu.ts`): a Unix-socket QMP server that speaks
 * the protocol as QEMU does — greeting first, capabilities negotiation (`qmp_capabilities`), replies
 * carrying the command's `id`, events to negotiated clients — and receives file descriptors sent
 * with `SCM_RIGHTS` (through usocket's `UServer`, as `SafeUServer`), for `getfd`.
 *
 * Received descriptors are re-opened at once through `/proc/self/fd` so that the copy we keep is
 * close-on-exec (descriptors arriving by `recvmsg` are not, and would leak into every child process
 * spawned later — a leaked pipe write end keeps a compressor from ever seeing end of file).
 *
 * This is test infrastructure: it emulates, it is not Proxmox's code.
 */
import { Effect } from "effect"
import type { Scope } from "effect"
import * as Fs from "node:fs"
import { SafeUServer } from "@vzdump/qmp/Usocket"
import type { SafeUSocket } from "@vzdump/qmp/Usocket"

/** An error reply: QEMU's `{"error": {"class", "desc"}}`. */
export class QmpReplyError extends Error {
  constructor(readonly errorClass: string, readonly desc: string) {
    super(desc)
  }
}

/** A generic error (`GenericError`), the class of almost every QEMU error. */
export const genericError = (desc: string) => new QmpReplyError("GenericError", desc)

/** One client connection. */
export interface FrontConnection {
  readonly id: number
  /** Takes the oldest received descriptor not yet claimed (ours now: close it when done). */
  readonly takeFd: () => number | undefined
}

export interface QmpServerHandlers {
  readonly greeting: () => unknown
  /** Runs a command after negotiation; throws `QmpReplyError` (or rejects with one) for an error reply. */
  readonly command: (connection: FrontConnection, name: string, args: Record<string, unknown> | undefined) => Promise<unknown>
}

export interface QmpServer {
  readonly path: string
  /** Sends an event to every negotiated client. */
  readonly broadcast: (event: unknown) => void
  /** Closes every client connection (as QEMU does when it exits). */
  readonly closeAll: () => void
}

const reopenCloexec = (fd: number): number => {
  // O_NONBLOCK: opening a FIFO for writing must not wait; the writer retries EAGAIN
  let flags = Fs.constants.O_WRONLY | Fs.constants.O_NONBLOCK
  try {
    const mode = Fs.fstatSync(fd)
    if (!mode.isFIFO()) flags = Fs.constants.O_WRONLY
  } catch {
    return fd
  }
  try {
    const copy = Fs.openSync(`/proc/self/fd/${fd}`, flags)
    Fs.closeSync(fd)
    return copy
  } catch {
    return fd
  }
}

/** Starts the server; it stops (and every connection is closed) when the scope closes. */
export const startQmpServer = (path: string, handlers: QmpServerHandlers): Effect.Effect<QmpServer, never, Scope.Scope> =>
  Effect.gen(function*() {
    Fs.rmSync(path, { force: true })
    const server = new SafeUServer()
    const clients = new Map<number, { socket: SafeUSocket; negotiated: boolean; fds: Array<number> }>()
    let nextId = 0

    const send = (socket: SafeUSocket, message: unknown) => {
      try {
        socket.write(Buffer.from(`${JSON.stringify(message)}\r\n`))
      } catch {
        // the client went away
      }
    }

    const drop = (id: number) => {
      const client = clients.get(id)
      if (client === undefined) return
      clients.delete(id)
      for (const fd of client.fds) Fs.close(fd, () => {})
      client.socket.destroy()
    }

    server.on("connection", (socket: SafeUSocket) => {
      const id = ++nextId
      const client = { socket, negotiated: false, fds: [] as Array<number> }
      clients.set(id, client)
      const connection: FrontConnection = { id, takeFd: () => client.fds.shift() }
      let buffered = ""
      let queue: Promise<void> = Promise.resolve()

      const handleLine = async (line: string) => {
        let message: unknown
        try {
          message = JSON.parse(line)
        } catch {
          send(socket, { error: { class: "GenericError", desc: "JSON parse error, invalid literal" } })
          return
        }
        if (typeof message !== "object" || message === null || Array.isArray(message)) {
          send(socket, { error: { class: "GenericError", desc: "QMP input must be a JSON object" } })
          return
        }
        const request = message as Record<string, unknown>
        const withId = (reply: Record<string, unknown>) => "id" in request ? { ...reply, id: request.id } : reply
        const name = request.execute
        if (typeof name !== "string") {
          send(socket, withId({ error: { class: "GenericError", desc: "QMP input lacks member 'execute'" } }))
          return
        }
        const args = request.arguments
        if (args !== undefined && (typeof args !== "object" || args === null || Array.isArray(args))) {
          send(socket, withId({ error: { class: "GenericError", desc: "QMP input member 'arguments' must be an object" } }))
          return
        }
        if (!client.negotiated) {
          if (name === "qmp_capabilities") {
            client.negotiated = true
            send(socket, withId({ return: {} }))
          } else {
            send(
              socket,
              withId({
                error: { class: "CommandNotFound", desc: "Expecting capabilities negotiation with 'qmp_capabilities'" }
              })
            )
          }
          return
        }
        if (name === "qmp_capabilities") {
          send(
            socket,
            withId({
              error: { class: "CommandNotFound", desc: "Capabilities negotiation is already complete, command ignored" }
            })
          )
          return
        }
        try {
          const result = await handlers.command(connection, name, args as Record<string, unknown> | undefined)
          send(socket, withId({ return: result ?? {} }))
        } catch (error) {
          const reply = error instanceof QmpReplyError
            ? { class: error.errorClass, desc: error.desc }
            : { class: "GenericError", desc: error instanceof Error ? error.message : String(error) }
          send(socket, withId({ error: reply }))
        }
      }

      socket.on("fds", (fds: Array<number>) => {
        for (const fd of fds) client.fds.push(reopenCloexec(fd))
      })
      socket.on("data", (chunk: Buffer) => {
        buffered += chunk.toString("utf8")
        let newline = buffered.indexOf("\n")
        while (newline >= 0) {
          const line = buffered.slice(0, newline).trim()
          buffered = buffered.slice(newline + 1)
          if (line.length > 0) queue = queue.then(() => handleLine(line))
          newline = buffered.indexOf("\n")
        }
      })
      socket.on("end", () => {
        queue = queue.then(() => drop(id))
      })
      socket.on("error", () => drop(id))
      send(socket, handlers.greeting())
    })

    yield* Effect.async<void>((resume) => {
      server.listen(path, 16, () => resume(Effect.void))
    })
    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        for (const id of [...clients.keys()]) drop(id)
        server.close()
        Fs.rmSync(path, { force: true })
      })
    )
    return {
      path,
      broadcast: (event) => {
        for (const client of clients.values()) if (client.negotiated) send(client.socket, event)
      },
      closeAll: () => {
        for (const id of [...clients.keys()]) drop(id)
      }
    }
  })
