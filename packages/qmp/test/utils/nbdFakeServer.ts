/**
 * A tiny scripted NBD server for the cases real servers cannot produce: a connection dropped in the
 * middle of a reply, malformed replies, replies in a chosen order. It performs a correct fixed-newstyle
 * handshake (structured replies, `base:allocation` as context 1, NBD_OPT_GO with NBD_INFO_EXPORT and
 * NBD_INFO_BLOCK_SIZE), then hands each transmission request to the scenario.
 */
import * as Net from "node:net"
import { Effect } from "effect"
import type { Scope } from "effect"

export interface FakeRequest {
  readonly type: number
  readonly flags: number
  readonly cookie: Buffer
  readonly offset: number
  readonly length: number
}

export interface FakeConnection {
  readonly socket: Net.Socket
  /** Requests received and not yet answered by the scenario. */
  readonly outstanding: Array<FakeRequest>
  /** Every request type received, in order (NBD_CMD_DISC included). */
  readonly received: Array<number>
}

export type Scenario = (request: FakeRequest, connection: FakeConnection) => void

export const CMD_READ = 0
export const CMD_DISC = 2

const optionReply = (option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer => {
  const h = Buffer.alloc(20)
  h.writeUInt32BE(0x0003e889, 0)
  h.writeUInt32BE(0x045565a9, 4)
  h.writeUInt32BE(option, 8)
  h.writeUInt32BE(type, 12)
  h.writeUInt32BE(data.length, 16)
  return Buffer.concat([h, data])
}

/** Structured reply chunk header + payload. */
export const chunk = (cookie: Buffer, flags: number, type: number, payload: Buffer): Buffer => {
  const h = Buffer.alloc(20)
  h.writeUInt32BE(0x668e33ef, 0)
  h.writeUInt16BE(flags, 4)
  h.writeUInt16BE(type, 6)
  cookie.copy(h, 8)
  h.writeUInt32BE(payload.length, 16)
  return Buffer.concat([h, payload])
}

/** NBD_REPLY_TYPE_OFFSET_DATA payload. */
export const offsetData = (offset: number, data: Buffer): Buffer => {
  const p = Buffer.alloc(8 + data.length)
  p.writeBigUInt64BE(BigInt(offset), 0)
  data.copy(p, 8)
  return p
}

/** Deterministic content of the fake export: byte i is (i * 7 + 3) & 0xff. */
export const fakeContent = (offset: number, length: number): Buffer => {
  const b = Buffer.allocUnsafe(length)
  for (let i = 0; i < length; i++) b[i] = ((offset + i) * 7 + 3) & 0xff
  return b
}

export const fakeServer = (
  path: string,
  options: { readonly size: number; readonly scenario: Scenario }
): Effect.Effect<{ readonly connections: Array<FakeConnection> }, Error, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.async<{ server: Net.Server; connections: Array<FakeConnection> }, Error>((resume) => {
      const connections: Array<FakeConnection> = []
      const server = Net.createServer((socket) => {
        const connection: FakeConnection = { socket, outstanding: [], received: [] }
        connections.push(connection)
        socket.on("error", () => {})
        let buf = Buffer.alloc(0)
        let phase: "flags" | "options" | "transmission" = "flags"
        const hello = Buffer.alloc(18)
        hello.write("NBDMAGIC", 0, "latin1")
        hello.write("IHAVEOPT", 8, "latin1")
        hello.writeUInt16BE(3, 16)
        socket.write(hello)
        socket.on("data", (d: Buffer) => {
          buf = Buffer.concat([buf, d])
          while (true) {
            if (phase === "flags") {
              if (buf.length < 4) return
              buf = buf.subarray(4)
              phase = "options"
            } else if (phase === "options") {
              if (buf.length < 16) return
              const option = buf.readUInt32BE(8)
              const length = buf.readUInt32BE(12)
              if (buf.length < 16 + length) return
              buf = buf.subarray(16 + length)
              if (option === 8) {
                socket.write(optionReply(option, 1))
              } else if (option === 10) {
                const ctx = Buffer.alloc(4 + 15)
                ctx.writeUInt32BE(1, 0)
                ctx.write("base:allocation", 4, "latin1")
                socket.write(optionReply(option, 4, ctx))
                socket.write(optionReply(option, 1))
              } else if (option === 7) {
                const exp = Buffer.alloc(12)
                exp.writeUInt16BE(0, 0)
                exp.writeBigUInt64BE(BigInt(options.size), 2)
                exp.writeUInt16BE(1 | 2, 10)
                const bs = Buffer.alloc(14)
                bs.writeUInt16BE(3, 0)
                bs.writeUInt32BE(1, 2)
                bs.writeUInt32BE(4096, 6)
                bs.writeUInt32BE(1024 * 1024, 10)
                socket.write(optionReply(option, 3, exp))
                socket.write(optionReply(option, 3, bs))
                socket.write(optionReply(option, 1))
                phase = "transmission"
              } else if (option === 2) {
                socket.write(optionReply(option, 1))
                socket.end()
                return
              } else {
                socket.write(optionReply(option, 0x80000001))
              }
            } else {
              if (buf.length < 28) return
              const request: FakeRequest = {
                flags: buf.readUInt16BE(4),
                type: buf.readUInt16BE(6),
                cookie: Buffer.from(buf.subarray(8, 16)),
                offset: Number(buf.readBigUInt64BE(16)),
                length: buf.readUInt32BE(24)
              }
              buf = buf.subarray(28)
              connection.received.push(request.type)
              if (request.type === CMD_DISC) {
                socket.end()
                return
              }
              connection.outstanding.push(request)
              options.scenario(request, connection)
            }
          }
        })
      })
      server.once("error", (e) => resume(Effect.fail(e)))
      server.listen(path, () => resume(Effect.succeed({ server, connections })))
    }),
    ({ connections, server }) =>
      Effect.async<void>((resume) => {
        for (const c of connections) c.socket.destroy()
        server.close(() => resume(Effect.void))
      })
  ).pipe(Effect.map(({ connections }) => ({ connections })))
