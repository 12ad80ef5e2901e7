/**
 * Types for the parts of the native `usocket` addon (unix sockets with descriptor passing) that we use.
 * The package ships no types.
 */
declare module "usocket" {
  import { Duplex } from "node:stream"
  import { EventEmitter } from "node:events"

  /** What `USocket#write` accepts besides a `Buffer` or a string. */
  export interface USocketWriteRequest {
    readonly data?: Buffer
    readonly fds?: Array<number>
    readonly callback?: (chunk: unknown) => void
  }

  /** A connected Unix stream socket; a `Duplex` in object mode on the writable side. */
  export class USocket extends Duplex {
    constructor(options?: { readonly path?: string; readonly fd?: number; readonly allowHalfOpen?: boolean })
    /** The socket's file descriptor once connected. */
    fd?: number
    /** Connects; emits `connected` on success, `error` then `close` on failure. */
    connect(pathOrOptions: string | { readonly path?: string; readonly fd?: number }, callback?: () => void): void
    /** With a second argument, returns `{ data, fds }` or `null`. */
    read(size?: number, fdCount?: number | null): any
    override write(
      chunk: Buffer | string | Array<number> | USocketWriteRequest,
      encoding?: BufferEncoding | ((error?: Error | null) => void) | null,
      callback?: (error?: Error | null) => void
    ): boolean
    override destroy(): this
    /** Receives the addon's events (`connect`, `data`, `drain`, `error`); bound once, on `connect`. */
    _wrapEvent(event: string, a0?: unknown, a1?: unknown): void
    /** The native wrapper while the socket is open; `close()` on it hands its poll handle to `uv_close`. */
    _wrap: object | null | undefined
  }

  /** A listening Unix socket whose connections are `USocket`s. */
  export class UServer extends EventEmitter {
    listen(path: string, backlog?: number, callback?: () => void): void
    close(): void
    /** Receives the addon's events (`listening`, `accept`, `error`); bound once, on `listen`. */
    _wrapEvent(event: string, a0?: unknown, a1?: unknown): void
    /** The native wrapper while the server listens. */
    _wrap: object | null | undefined
  }
}
