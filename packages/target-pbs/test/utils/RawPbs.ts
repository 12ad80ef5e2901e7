/**
 * A deliberately small protocol driver for testing the PBS test server without the package's own
 * client: raw `https` requests and the upgrade, then raw `http2` requests on the same socket.
 */
import { Effect } from "effect"
import * as http2 from "node:http2"
import * as https from "node:https"
import * as tls from "node:tls"

export interface Reply {
  readonly status: number
  readonly body: Buffer
  readonly text: string
  readonly json: any
}

const toReply = (status: number, body: Buffer): Reply => {
  const text = body.toString("utf8")
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    json = undefined
  }
  return { status, body, text, json }
}

export const connectTls = (port: number) =>
  Effect.async<tls.TLSSocket, Error>((resume) => {
    const socket = tls.connect({ host: "127.0.0.1", port, rejectUnauthorized: false })
    socket.once("secureConnect", () => resume(Effect.succeed(socket)))
    socket.once("error", (e) => resume(Effect.fail(e)))
  })

export const apiRequest = (
  port: number,
  method: string,
  path: string,
  headers: Record<string, string>,
  body?: Buffer | string
) =>
  Effect.flatMap(connectTls(port), (socket) =>
    Effect.async<Reply, Error>((resume) => {
      const req = https.request({ method, path, headers, createConnection: () => socket })
      req.on("response", (res) => {
        const chunks: Array<Buffer> = []
        res.on("data", (c: Buffer) => chunks.push(c))
        res.on("end", () => {
          socket.destroy()
          resume(Effect.succeed(toReply(res.statusCode ?? 0, Buffer.concat(chunks))))
        })
      })
      req.on("error", (e) => resume(Effect.fail(e)))
      req.end(body)
    }))

export interface Session {
  readonly call: (method: string, path: string, body?: Buffer | string, headers?: Record<string, string>) => Effect.Effect<Reply, Error>
  readonly close: Effect.Effect<void>
  readonly closed: Effect.Effect<void>
}

/** Upgrades; fails with the HTTP status and text when the server refuses. */
export const upgrade = (port: number, path: string, protocol: string, headers: Record<string, string>) =>
  Effect.flatMap(connectTls(port), (socket) =>
    Effect.async<Session | Reply, Error>((resume) => {
      const req = https.request({
        method: "GET",
        path,
        headers: { ...headers, Connection: "Upgrade", Upgrade: protocol },
        createConnection: () => socket
      })
      req.on("response", (res) => {
        const chunks: Array<Buffer> = []
        res.on("data", (c: Buffer) => chunks.push(c))
        res.on("end", () => {
          socket.destroy()
          resume(Effect.succeed(toReply(res.statusCode ?? 0, Buffer.concat(chunks))))
        })
      })
      req.on("upgrade", (_res, upgraded, head) => {
        if (head.length > 0) upgraded.unshift(head)
        const client = http2.connect("https://localhost:8007", {
          createConnection: () => upgraded,
          settings: { initialWindowSize: 2 ** 31 - 1, maxFrameSize: 4 * 1024 * 1024 }
        })
        client.on("error", () => {})
        const closedPromise = new Promise<void>((r) => client.once("close", () => r()))
        resume(Effect.succeed({
          call: (method, p, body, extra) =>
            Effect.async<Reply, Error>((done) => {
              const stream = client.request({ ":method": method, ":path": p, ...extra })
              const chunks: Array<Buffer> = []
              let status = 0
              stream.on("response", (h) => {
                status = Number(h[":status"])
              })
              stream.on("data", (c: Buffer) => chunks.push(c))
              stream.on("end", () => done(Effect.succeed(toReply(status, Buffer.concat(chunks)))))
              stream.on("error", (e) => done(Effect.fail(e)))
              stream.end(body)
            }),
          close: Effect.async<void>((done) => {
            if (client.closed || client.destroyed) done(Effect.void)
            else client.close(() => done(Effect.void))
            upgraded.end()
          }),
          closed: Effect.promise(() => closedPromise)
        }))
      })
      req.on("error", (e) => resume(Effect.fail(e)))
      req.end()
    }))
