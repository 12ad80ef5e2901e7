/**
 * Client transport: a TLS connection whose certificate is checked (valid chain, or the pinned
 * SHA-256 fingerprint) before any byte of a request is written; HTTP/1.1 requests on it; the
 * upgrade to a PBS protocol followed by HTTP/2 with prior knowledge on the same socket.
 */
import * as http2 from "node:http2"
import * as https from "node:https"
import * as net from "node:net"
import * as tls from "node:tls"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import type * as Scope from "effect/Scope"
import { PbsAuthError, PbsConnectionError, PbsHttpError, PbsTlsError } from "../PbsError.js"

export interface Endpoint {
  readonly host: string
  readonly port: number
  /** Expected SHA-256 fingerprint of the leaf certificate (colon hex, any case). */
  readonly fingerprint?: string | undefined
  /** Extra trusted CA certificates (PEM). */
  readonly ca?: string | undefined
  readonly connectTimeout: Duration.Duration
}

const normalizeFingerprint = (value: string): string => value.trim().toLowerCase()

/** Opens a TLS connection and accepts it only if the chain validates or the fingerprint matches. */
export const connect = (endpoint: Endpoint): Effect.Effect<tls.TLSSocket, PbsTlsError | PbsConnectionError> =>
  Effect.async<tls.TLSSocket, PbsTlsError | PbsConnectionError>((resume) => {
    const socket = tls.connect({
      host: endpoint.host,
      port: endpoint.port,
      rejectUnauthorized: false,
      ...(net.isIP(endpoint.host) === 0 ? { servername: endpoint.host } : {}),
      ...(endpoint.ca !== undefined ? { ca: endpoint.ca } : {})
    })
    let done = false
    const finish = (effect: Effect.Effect<tls.TLSSocket, PbsTlsError | PbsConnectionError>) => {
      if (done) return
      done = true
      clearTimeout(timer)
      socket.off("error", onError)
      resume(effect)
    }
    const timer = setTimeout(() => {
      socket.destroy()
      finish(Effect.fail(new PbsConnectionError({
        reason: "Timeout",
        detail: `connecting to ${endpoint.host}:${endpoint.port} timed out`
      })))
    }, Duration.toMillis(endpoint.connectTimeout))
    const onError = (error: Error) => {
      socket.destroy()
      finish(Effect.fail(new PbsConnectionError({
        reason: "Connect",
        detail: `connecting to ${endpoint.host}:${endpoint.port} failed: ${error.message}`
      })))
    }
    socket.on("error", onError)
    socket.once("secureConnect", () => {
      if (socket.authorized) {
        finish(Effect.succeed(socket))
        return
      }
      const actual = normalizeFingerprint(socket.getPeerCertificate().fingerprint256 ?? "")
      if (endpoint.fingerprint !== undefined && normalizeFingerprint(endpoint.fingerprint) === actual) {
        finish(Effect.succeed(socket))
        return
      }
      socket.destroy()
      finish(Effect.fail(
        endpoint.fingerprint === undefined
          ? new PbsTlsError({
            reason: "Untrusted",
            detail: `certificate of ${endpoint.host} is not trusted (${
              String(socket.authorizationError)
            }), fingerprint ${actual}`
          })
          : new PbsTlsError({
            reason: "FingerprintMismatch",
            detail: `certificate fingerprint of ${endpoint.host} is ${actual}, expected ${
              normalizeFingerprint(endpoint.fingerprint)
            }`
          })
      ))
    })
    return Effect.sync(() => {
      clearTimeout(timer)
      socket.destroy()
    })
  })

export interface HttpResponse {
  readonly status: number
  readonly body: Buffer
}

const hostHeader = (endpoint: Endpoint) =>
  `${net.isIPv6(endpoint.host) ? `[${endpoint.host}]` : endpoint.host}:${endpoint.port}`

/** The server's error for a non-2xx answer: 401 is an authentication error. */
export const statusError = (
  method: string,
  path: string,
  status: number,
  body: Buffer
): PbsAuthError | PbsHttpError => {
  const text = body.toString("utf8").trim()
  return status === 401
    ? new PbsAuthError({ status, text })
    : new PbsHttpError({ method, path, status, text })
}

/** One HTTP/1.1 request on a fresh pinned connection. */
export const request = (
  endpoint: Endpoint,
  options: {
    readonly method: string
    readonly path: string
    readonly headers: Readonly<Record<string, string>>
    readonly body?: Uint8Array | string
  }
): Effect.Effect<HttpResponse, PbsTlsError | PbsConnectionError> =>
  Effect.acquireUseRelease(
    connect(endpoint),
    (socket) =>
      Effect.async<HttpResponse, PbsConnectionError>((resume) => {
        let done = false
        const fail = (detail: string) => {
          if (done) return
          done = true
          resume(Effect.fail(new PbsConnectionError({ reason: "Closed", detail })))
        }
        const req = https.request({
          method: options.method,
          path: options.path,
          headers: {
            Host: hostHeader(endpoint),
            ...options.headers,
            ...(options.body !== undefined ? { "Content-Length": String(Buffer.byteLength(options.body)) } : {})
          },
          createConnection: () => socket
        })
        req.on("response", (res) => {
          const chunks: Array<Buffer> = []
          res.on("data", (chunk: Buffer) => chunks.push(chunk))
          res.on("end", () => {
            if (done) return
            done = true
            resume(Effect.succeed({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }))
          })
          res.on("error", (error) => fail(`${options.method} ${options.path}: ${error.message}`))
        })
        req.on("error", (error) => fail(`${options.method} ${options.path}: ${error.message}`))
        req.end(options.body)
        return Effect.sync(() => req.destroy())
      }),
    (socket) => Effect.sync(() => socket.destroy())
  )

/** Options of an HTTP/2 request on an upgraded connection. */
export interface H2RequestOptions {
  readonly method: "GET" | "POST" | "PUT"
  /** Endpoint name without leading slash, e.g. `fixed_chunk`. */
  readonly endpoint: string
  readonly query?: Readonly<Record<string, string | number | boolean | undefined>>
  /** The body, or its parts in order (written one after the other, without joining them). */
  readonly body?: Uint8Array | ReadonlyArray<Uint8Array>
  readonly json?: unknown
}

export interface H2Connection {
  /** The response body of a 2xx answer. */
  readonly request: (
    options: H2RequestOptions
  ) => Effect.Effect<Buffer, PbsHttpError | PbsAuthError | PbsConnectionError>
  /** Closes the connection (pending requests fail). */
  readonly close: Effect.Effect<void>
  /** Whether the connection has ended. */
  readonly isClosed: () => boolean
}

const queryString = (query: H2RequestOptions["query"]): string => {
  if (query === undefined) return ""
  const params = new URLSearchParams()
  for (const [key, value] of Object.entries(query)) {
    if (value !== undefined) params.append(key, String(value))
  }
  const text = params.toString()
  return text === "" ? "" : `?${text}`
}

const WINDOW = 2 ** 31 - 1

const byteLength = (parts: ReadonlyArray<Uint8Array>): number => {
  let total = 0
  for (const part of parts) total += part.length
  return total
}

/**
 * Upgrades a pinned connection to `protocol` with a GET on `path` and speaks HTTP/2 on the same
 * socket. The connection closes with the scope.
 */
export const upgrade = (
  endpoint: Endpoint,
  options: { readonly path: string; readonly protocol: string; readonly headers: Readonly<Record<string, string>> }
): Effect.Effect<H2Connection, PbsTlsError | PbsConnectionError | PbsAuthError | PbsHttpError, Scope.Scope> =>
  Effect.gen(function*() {
    const socket = yield* Effect.acquireRelease(connect(endpoint), (socket) => Effect.sync(() => socket.destroy()))
    const upgraded = yield* Effect.async<tls.TLSSocket, PbsConnectionError | PbsAuthError | PbsHttpError>((resume) => {
      let done = false
      const finish = (effect: Effect.Effect<tls.TLSSocket, PbsConnectionError | PbsAuthError | PbsHttpError>) => {
        if (done) return
        done = true
        resume(effect)
      }
      const req = https.request({
        method: "GET",
        path: options.path,
        headers: { Host: hostHeader(endpoint), ...options.headers, Connection: "Upgrade", Upgrade: options.protocol },
        createConnection: () => socket
      })
      req.on("upgrade", (res, sock, head) => {
        if (res.headers.upgrade !== options.protocol) {
          sock.destroy()
          finish(Effect.fail(new PbsConnectionError({
            reason: "Upgrade",
            detail: `server switched to '${String(res.headers.upgrade)}' instead of '${options.protocol}'`
          })))
          return
        }
        if (head.length > 0) sock.unshift(head)
        finish(Effect.succeed(sock as tls.TLSSocket))
      })
      req.on("response", (res) => {
        const chunks: Array<Buffer> = []
        res.on("data", (chunk: Buffer) => chunks.push(chunk))
        res.on("end", () => {
          const path = options.path.split("?")[0]!
          finish(Effect.fail(statusError("GET", path, res.statusCode ?? 0, Buffer.concat(chunks))))
        })
      })
      req.on("error", (error) =>
        finish(Effect.fail(new PbsConnectionError({ reason: "Upgrade", detail: `upgrade failed: ${error.message}` }))))
      req.end()
      return Effect.sync(() => req.destroy())
    })

    const session = yield* Effect.acquireRelease(
      Effect.sync(() => {
        const client = http2.connect(`https://${hostHeader(endpoint)}`, {
          createConnection: () => upgraded,
          settings: { initialWindowSize: WINDOW, maxFrameSize: 4 * 1024 * 1024 },
          maxSessionMemory: 512
        })
        client.on("error", () => {})
        client.once("connect", () => {
          try {
            client.setLocalWindowSize(WINDOW)
          } catch {
            // closed already
          }
        })
        return client
      }),
      (client) =>
        Effect.async<void>((resume) => {
          if (client.closed || client.destroyed) {
            upgraded.destroy()
            resume(Effect.void)
            return
          }
          const timer = setTimeout(() => {
            client.destroy()
            upgraded.destroy()
            resume(Effect.void)
          }, 2000)
          client.close(() => {
            clearTimeout(timer)
            upgraded.end()
            upgraded.destroy()
            resume(Effect.void)
          })
        })
    )

    let closedReason: string | undefined
    session.once("close", () => {
      closedReason ??= "connection closed"
    })
    session.once("goaway", (code) => {
      closedReason ??= `server sent GOAWAY (${code})`
    })
    upgraded.once("close", () => {
      closedReason ??= "connection closed by peer"
    })

    const h2request = (opts: H2RequestOptions) =>
      Effect.async<Buffer, PbsHttpError | PbsAuthError | PbsConnectionError>((resume) => {
        const method = opts.method
        const path = `/${opts.endpoint}`
        if (session.closed || session.destroyed) {
          resume(Effect.fail(new PbsConnectionError({
            reason: "Closed",
            detail: `${method} ${path}: ${closedReason ?? "connection closed"}`
          })))
          return
        }
        let stream: http2.ClientHttp2Stream
        const body: ReadonlyArray<Uint8Array> | undefined = opts.json !== undefined
          ? [Buffer.from(JSON.stringify(opts.json))]
          : opts.body === undefined
          ? undefined
          : opts.body instanceof Uint8Array
          ? [opts.body]
          : opts.body
        try {
          stream = session.request({
            ":method": method,
            ":path": `${path}${queryString(opts.query)}`,
            ...(opts.json !== undefined ? { "content-type": "application/json" } : {}),
            ...(body !== undefined ? { "content-length": String(byteLength(body)) } : {})
          }, { endStream: body === undefined })
        } catch (error) {
          resume(Effect.fail(new PbsConnectionError({
            reason: "Closed",
            detail: `${method} ${path}: ${error instanceof Error ? error.message : String(error)}`
          })))
          return
        }
        let done = false
        let status = 0
        const chunks: Array<Buffer> = []
        const finish = (effect: Effect.Effect<Buffer, PbsHttpError | PbsAuthError | PbsConnectionError>) => {
          if (done) return
          done = true
          resume(effect)
        }
        stream.on("response", (headers) => {
          status = Number(headers[":status"] ?? 0)
        })
        stream.on("data", (chunk: Buffer) => chunks.push(chunk))
        stream.on("end", () => {
          const data = Buffer.concat(chunks)
          if (status >= 200 && status < 300) finish(Effect.succeed(data))
          else if (status === 0) {
            finish(Effect.fail(
              new PbsConnectionError({ reason: "Protocol", detail: `${method} ${path}: no response status` })
            ))
          } else finish(Effect.fail(statusError(method, path, status, data)))
        })
        const onBroken = (error?: Error) => {
          // every stream closes, most after their answer: build the error only when it is one
          if (done) return
          finish(Effect.fail(
            new PbsConnectionError({
              reason: "Closed",
              detail: `${method} ${path}: ${closedReason ?? error?.message ?? "stream closed before the answer"}`
            })
          ))
        }
        stream.on("error", onBroken)
        stream.on("close", () => onBroken())
        if (body !== undefined) {
          // the parts go out as they are (DATA frames may span them): no joined copy of a chunk;
          // corked, they are handed over together (`end` uncorks)
          if (body.length > 1) stream.cork()
          for (let i = 0; i < body.length - 1; i++) stream.write(body[i]!)
          stream.end(body[body.length - 1])
        }
        return Effect.sync(() => {
          if (!stream.closed) stream.close(http2.constants.NGHTTP2_CANCEL)
        })
      })

    return {
      request: h2request,
      close: Effect.sync(() => {
        session.close()
        upgraded.end()
      }),
      isClosed: () => session.closed || session.destroyed
    }
  })
