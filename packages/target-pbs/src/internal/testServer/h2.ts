/**
 * HTTP plumbing of the test server: serving HTTP/2 on an upgraded socket (once the `101` answer is
 * written: handing over a socket with a write in progress aborts Node 20), collecting bodies with
 * a limit (chunk bodies into reused buffers), parameter extraction and replies (JSON `{"data": …}`
 * or raw bytes; errors as a status with a plain-text body and a JSON content type, as PBS does).
 */
import * as http2 from "node:http2"
import type * as tls from "node:tls"
import * as Effect from "effect/Effect"
import { ApiError, bail } from "./apiError.js"
import * as Params from "./params.js"

export const JSON_CONTENT_TYPE = "application/json;charset=UTF-8"

export type Reply =
  | { readonly _tag: "Json"; readonly data: unknown }
  | { readonly _tag: "Bytes"; readonly data: Uint8Array }

/** Handlers of one path, by method. */
export type Routes = Partial<Record<string, (request: H2Request) => Effect.Effect<Reply, ApiError>>>

/** Runs the handler of a request's path and method; 404 and 405 with PBS's texts otherwise. */
export const dispatch = (
  routes: Readonly<Record<string, Routes>>,
  request: H2Request
): Effect.Effect<Reply, ApiError> => {
  const methods = routes[request.path]
  if (methods === undefined) return bail(`Path '${request.path}' not found.`, 404)
  const handler = methods[request.method]
  if (handler === undefined) return bail(`Method '${request.method}' not allowed.`, 405)
  return handler(request)
}

export const json = (data: unknown): Reply => ({ _tag: "Json", data })
export const bytes = (data: Uint8Array): Reply => ({ _tag: "Bytes", data })

export interface H2Request {
  readonly method: string
  readonly path: string
  readonly query: URLSearchParams
  readonly contentType: string | undefined
  /** Collects the body; fails with `tooLarge` (400) once it exceeds `limit` bytes. */
  readonly body: (limit: number, tooLarge: string) => Effect.Effect<Buffer, ApiError>
  /**
   * Collects a body of announced size like `body`, into one buffer of `limit` bytes (lent from a
   * pool for chunk-sized limits); `release` gives it back (after it, `data` may change).
   */
  readonly lentBody: (limit: number, tooLarge: string) => Effect.Effect<LentBody, ApiError>
}

export interface LentBody {
  readonly data: Buffer
  readonly release: () => void
}

/**
 * Bodies of large chunks, up to a 4 MiB chunk's largest blob, are collected in reused buffers (no
 * fresh memory per chunk); small and larger ones in buffers of their own.
 */
const LENT_CAPACITY = 4 * 1024 * 1024 + 44
const lendable: Array<Buffer> = []
const lend = (limit: number): Buffer =>
  limit > 1024 * 1024 && limit <= LENT_CAPACITY
    ? lendable.pop() ?? Buffer.allocUnsafe(LENT_CAPACITY)
    : Buffer.allocUnsafe(limit)
const giveBack = (buffer: Buffer): void => {
  if (buffer.length === LENT_CAPACITY && lendable.length < 16) lendable.push(buffer)
}

/** Where a body's chunks go while it is received. */
interface BodySink<A> {
  /** Takes a chunk; `false` when it takes the body past its limit. */
  readonly data: (chunk: Buffer) => boolean
  readonly end: () => A
  /** The body was refused or the stream dropped: give up what was collected. */
  readonly drop: () => void
}

/** Receives a request body into `sink`; fails with `tooLarge` past the limit, or when the stream drops. */
const receive = <A>(stream: http2.ServerHttp2Stream, tooLarge: string, sink: BodySink<A>) =>
  Effect.async<A, ApiError>((resume) => {
    let done = false
    const finish = (effect: Effect.Effect<A, ApiError>) => {
      if (done) return
      done = true
      cleanup()
      resume(effect)
    }
    const onData = (chunk: Buffer) => {
      if (sink.data(chunk)) return
      sink.drop()
      finish(bail(tooLarge))
    }
    const onEnd = () => finish(Effect.sync(sink.end))
    const onClose = () => {
      sink.drop()
      finish(bail("connection closed while receiving the request body"))
    }
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
    return Effect.sync(() => {
      if (!done) sink.drop()
      cleanup()
    })
  })

const collectLent = (stream: http2.ServerHttp2Stream, limit: number, tooLarge: string) =>
  Effect.suspend(() => {
    let target: Buffer | undefined
    let total = 0
    return receive<LentBody>(stream, tooLarge, {
      data: (chunk) => {
        if (total + chunk.length > limit) return false
        target ??= lend(limit)
        target.set(chunk, total)
        total += chunk.length
        return true
      },
      end: () => {
        const lent = target
        let released = false
        return {
          data: (lent ?? Buffer.alloc(0)).subarray(0, total),
          release: () => {
            if (released) return
            released = true
            if (lent !== undefined) giveBack(lent)
          }
        }
      },
      drop: () => {
        if (target !== undefined) giveBack(target)
        target = undefined
      }
    })
  })

const collect = (stream: http2.ServerHttp2Stream, limit: number, tooLarge: string) =>
  Effect.suspend(() => {
    const chunks: Array<Buffer> = []
    let total = 0
    return receive(stream, tooLarge, {
      data: (chunk) => {
        total += chunk.length
        if (total > limit) return false
        chunks.push(chunk)
        return true
      },
      end: () => Buffer.concat(chunks, total),
      drop: () => {
        chunks.length = 0
      }
    })
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

const WINDOW = 32 * 1024 * 1024
const SETTINGS: http2.Settings = { initialWindowSize: WINDOW, maxFrameSize: 4 * 1024 * 1024 }

/**
 * Serves HTTP/2 (prior knowledge) on an upgraded connection with PBS's window and frame sizes.
 * Call it once the `101` answer has been written (its write callback): Node 20 aborts when HTTP/2
 * takes over a socket with a write in progress. The session reads the socket's own handle (TLS
 * records decrypted straight into HTTP/2, no JavaScript stream in between); bytes that came with
 * the upgrade request go back into the socket first.
 */
export const serve = (socket: tls.TLSSocket, head: Buffer, options: ServeOptions): http2.ServerHttp2Session => {
  if (head.length > 0) socket.unshift(head)
  const session = http2.performServerHandshake(socket, { settings: SETTINGS, maxSessionMemory: 512 })
  let closed = false
  const close = () => {
    if (closed) return
    closed = true
    options.onClose()
  }
  session.on("error", () => {})
  session.on("close", close)
  socket.on("close", close)
  session.once("localSettings", () => {
    try {
      session.setLocalWindowSize(WINDOW)
    } catch {
      // session already gone
    }
  })
  session.on("stream", (stream, headers) => {
    stream.on("error", () => {})
    const url = new URL(String(headers[":path"] ?? "/"), "http://localhost")
    const contentType = headers["content-type"]
    options.onStream(stream, {
      method: String(headers[":method"] ?? "GET"),
      path: url.pathname,
      query: url.searchParams,
      contentType: typeof contentType === "string" ? contentType : undefined,
      body: (limit, tooLarge) => collect(stream, limit, tooLarge),
      lentBody: (limit, tooLarge) => collectLent(stream, limit, tooLarge)
    })
  })
  return session
}
