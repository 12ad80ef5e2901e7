/**
 * HTTP plumbing of the test server: wrapping an upgraded socket in a JavaScript `Duplex` (handing
 * the socket itself to `node:http2` aborts Node 20), serving HTTP/2 on it, collecting bodies with
 * a limit, parameter extraction and replies (JSON `{"data": …}` or raw bytes; errors as a status
 * with a plain-text body and a JSON content type, as PBS does).
 */
import * as http2 from "node:http2"
import type * as net from "node:net"
import { Duplex } from "node:stream"
import * as Effect from "effect/Effect"
import { ApiError, bail } from "./apiError.js"
import * as Params from "./params.js"

export const JSON_CONTENT_TYPE = "application/json;charset=UTF-8"

/** A `Duplex` over the upgraded socket, with the bytes that arrived with the upgrade pushed back. */
export const wrapSocket = (socket: net.Socket, head: Buffer): Duplex => {
  const duplex = new Duplex({
    read() {
      socket.resume()
    },
    write(chunk, _encoding, callback) {
      socket.write(chunk, callback)
    },
    final(callback) {
      socket.end()
      callback()
    },
    destroy(error, callback) {
      socket.destroy()
      callback(error)
    }
  })
  if (head.length > 0) duplex.push(head)
  socket.on("data", (chunk: Buffer) => {
    if (!duplex.push(chunk)) socket.pause()
  })
  socket.on("end", () => duplex.push(null))
  socket.on("error", (error) => duplex.destroy(error))
  socket.on("close", () => duplex.destroy())
  return duplex
}

export type Reply =
  | { readonly _tag: "Json"; readonly data: unknown }
  | { readonly _tag: "Bytes"; readonly data: Uint8Array }

/** Handlers of one path, by method. */
export type Routes = Partial<Record<string, (request: H2Request) => Effect.Effect<Reply, ApiError>>>

export const json = (data: unknown): Reply => ({ _tag: "Json", data })
export const bytes = (data: Uint8Array): Reply => ({ _tag: "Bytes", data })

export interface H2Request {
  readonly method: string
  readonly path: string
  readonly query: URLSearchParams
  readonly contentType: string | undefined
  /** Collects the body; fails with `tooLarge` (400) once it exceeds `limit` bytes. */
  readonly body: (limit: number, tooLarge: string) => Effect.Effect<Buffer, ApiError>
}

const collect = (stream: http2.ServerHttp2Stream, limit: number, tooLarge: string) =>
  Effect.async<Buffer, ApiError>((resume) => {
    const chunks: Array<Buffer> = []
    let total = 0
    let done = false
    const finish = (effect: Effect.Effect<Buffer, ApiError>) => {
      if (done) return
      done = true
      cleanup()
      resume(effect)
    }
    const onData = (chunk: Buffer) => {
      total += chunk.length
      if (total > limit) finish(bail(tooLarge))
      else chunks.push(chunk)
    }
    const onEnd = () => finish(Effect.succeed(Buffer.concat(chunks, total)))
    const onClose = () => finish(bail("connection closed while receiving the request body"))
    const cleanup = () => {
      stream.off("data", onData)
      stream.off("end", onEnd)
      stream.off("close", onClose)
      stream.off("error", onClose)
      stream.resume()
    }
    stream.on("data", onData)
    stream.on("end", onEnd)
    stream.on("close", onClose)
    stream.on("error", onClose)
    return Effect.sync(cleanup)
  })

/**
 * The parameters of a non-binary endpoint: the whole JSON body with `application/json`, otherwise
 * the query merged with a form body (512 KiB limit).
 */
export const params = (request: H2Request): Effect.Effect<Params.Params, ApiError> =>
  Effect.gen(function*() {
    const type = (request.contentType ?? "").split(";")[0]!.trim().toLowerCase()
    const body = yield* request.body(512 * 1024, "Request body too large")
    if (type === "application/json") return yield* Params.fromJson(body)
    if (type === "" || type === "application/x-www-form-urlencoded") {
      const merged = Params.fromSearch(request.query)
      return Params.fromSearch(new URLSearchParams(body.toString("utf8")), merged)
    }
    return yield* bail(`unsupported content type '${type}'`)
  })

/** Writes a reply or an error on a stream that may already be gone. */
export const respond = (stream: http2.ServerHttp2Stream, result: Reply | ApiError): void => {
  if (stream.destroyed || stream.closed || stream.headersSent) return
  try {
    if (result instanceof ApiError) {
      stream.respond({ ":status": result.status, "content-type": JSON_CONTENT_TYPE })
      stream.end(result.text)
    } else if (result._tag === "Json") {
      stream.respond({ ":status": 200, "content-type": JSON_CONTENT_TYPE })
      stream.end(JSON.stringify({ data: result.data ?? null }))
    } else {
      stream.respond({ ":status": 200, "content-type": "application/octet-stream" })
      stream.end(result.data)
    }
  } catch {
    // the peer went away while we answered
  }
}

export interface ServeOptions {
  readonly onStream: (stream: http2.ServerHttp2Stream, request: H2Request) => void
  readonly onClose: () => void
}

/** Serves HTTP/2 (prior knowledge) on an upgraded connection with PBS's window and frame sizes. */
export const serve = (duplex: Duplex, options: ServeOptions): http2.Http2Server => {
  const window = 32 * 1024 * 1024
  const server = http2.createServer({
    settings: { initialWindowSize: window, maxFrameSize: 4 * 1024 * 1024 },
    maxSessionMemory: 512
  })
  let closed = false
  const close = () => {
    if (closed) return
    closed = true
    options.onClose()
  }
  server.on("session", (session) => {
    session.on("error", () => {})
    session.on("close", close)
    session.once("localSettings", () => {
      try {
        session.setLocalWindowSize(window)
      } catch {
        // session already gone
      }
    })
  })
  server.on("stream", (stream, headers) => {
    stream.on("error", () => {})
    const url = new URL(String(headers[":path"] ?? "/"), "http://localhost")
    const contentType = headers["content-type"]
    options.onStream(stream, {
      method: String(headers[":method"] ?? "GET"),
      path: url.pathname,
      query: url.searchParams,
      contentType: typeof contentType === "string" ? contentType : undefined,
      body: (limit, tooLarge) => collect(stream, limit, tooLarge)
    })
  })
  duplex.on("close", close)
  server.emit("connection", duplex)
  return server
}
