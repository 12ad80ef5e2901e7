/**
 * One NBD connection: a Node socket, the fixed-newstyle handshake and the transmission phase with a
 * reply parser that correlates replies to pending requests by cookie. Incoming bytes are copied once,
 * straight from the socket's chunks into each request's result buffer.
 *
 * @internal
 */
import * as Effect from "effect/Effect"
import * as Net from "node:net"
import type { BlockSize, Extent, ExportInfo, ReadPiece, ReadResult } from "../NbdClient.js"
import {
  NbdClosedError,
  NbdCommandError,
  NbdConnectError,
  NbdExportNotFoundError,
  NbdOptionError,
  NbdProtocolError,
  NbdRequestError
} from "./nbdErrors.js"
import type { NbdRequestFailure } from "./nbdErrors.js"
import * as P from "./nbdProtocol.js"

/** Largest option reply payload accepted during the handshake. */
const MAX_OPTION_REPLY = 1024 * 1024
/** Largest non-data structured reply payload (block status, errors). */
const MAX_CHUNK_PAYLOAD = 64 * 1024 * 1024
/** Size of the socket's reusable read buffer. */
const READ_BUFFER_SIZE = 256 * 1024
/** Payload bytes still expected from which a read goes straight into the result buffer. */
const DIRECT_READ_MIN = 32 * 1024
/** Largest length of one NBD_CMD_BLOCK_STATUS request. */
const MAX_STATUS_REQUEST = 0x80000000

/**
 * Completion callback of a request: `(failure)` or `(undefined, value)` with a `ReadResult` (read),
 * extents per context (block status) or `undefined`. Called at most once, never synchronously from
 * {@link Connection.request}'s caller stack unless the connection is already closed.
 */
export type Done = (failure: NbdRequestFailure | undefined, value?: unknown) => void

/** A request: queued (waiting for an in-flight slot) or sent (waiting for its reply). */
export interface Pending {
  readonly owner: Connection
  cookie: number
  readonly command: number
  readonly offset: number
  readonly length: number
  done: Done | undefined
  sent: boolean
  buffer: Buffer | undefined
  pieces: Array<ReadPiece>
  extents: Map<string, Array<Extent>> | undefined
  error: NbdCommandError | undefined
}

const ST_MAGIC = 0
const ST_SIMPLE = 1
const ST_STRUCT = 2
const ST_DATA_OFFSET = 3
const ST_DATA = 4
const ST_PAYLOAD = 5
const ST_SIMPLE_DATA = 6

const PHASE_CONNECTING = 0
const PHASE_HANDSHAKE = 1
const PHASE_TRANSMISSION = 2
const PHASE_CLOSED = 3

/** Backing buffers of read results built by the client, so `toBuffer` may zero holes in place. */
export const backing = new WeakMap<ReadResult, Buffer>()

const protocolError = (phase: "Handshake" | "Transmission", detail: string) => new NbdProtocolError({ phase, detail })

export interface ConnectionOptions {
  readonly address: string
  readonly socket: Net.NetConnectOpts
  readonly maxInFlight: number
}

export class Connection {
  readonly socket: Net.Socket
  readonly address: string
  private phase = PHASE_CONNECTING
  private connectWaiter: ((error: NbdConnectError | undefined) => void) | undefined
  private socketError: unknown = undefined
  private closeWaiters: Array<() => void> = []
  private fatal: NbdProtocolError | NbdClosedError | undefined = undefined
  private clientClosing = false

  // handshake input
  private hs: Buffer = Buffer.alloc(0)
  private hsWaiter: (() => boolean) | undefined = undefined

  // transmission state
  private readonly pending = new Map<number, Pending>()
  private readonly queue: Array<Pending> = []
  private readonly maxInFlight: number
  private corked = false
  private nextCookie = 1
  structured = false
  contexts = new Map<number, string>()

  // receive buffers
  private readonly readBuffer = Buffer.allocUnsafe(READ_BUFFER_SIZE)
  private directView: Buffer | undefined = undefined

  // parser state
  private state = ST_MAGIC
  private readonly header = Buffer.alloc(20)
  private readonly scratch = Buffer.alloc(8)
  private tBuf: Buffer = this.header
  private tPos = 0
  private tEnd = 4
  private current: Pending | undefined = undefined
  private chunkFlags = 0
  private chunkType = 0
  private chunkLength = 0
  private dataOffset = 0

  constructor(options: ConnectionOptions) {
    this.address = options.address
    this.maxInFlight = Math.max(1, options.maxInFlight)
    // Zero-copy receive: Node asks `buffer()` for the memory of the next socket read. While a large
    // data payload is expected, that is the unfilled part of the request's result buffer itself, so
    // the kernel writes the bytes where they belong; headers and small payloads go through one
    // reusable scratch buffer and are copied out. No per-read allocation either way.
    const socket = Net.createConnection({
      ...options.socket,
      onread: {
        buffer: () => this.nextReadBuffer(),
        callback: (n: number, buf: Uint8Array) => {
          this.onRead(n, buf)
          return true
        }
      }
    })
    this.socket = socket
    socket.on("connect", () => {
      this.phase = PHASE_HANDSHAKE
      if ("port" in options.socket) socket.setNoDelay(true)
      const waiter = this.connectWaiter
      this.connectWaiter = undefined
      waiter?.(undefined)
    })
    socket.on("error", (error) => {
      this.socketError ??= error
    })
    socket.on("close", () => this.onClose())
  }

  // ---------------------------------------------------------------------------------------------
  // connection lifecycle

  /** Completes once the socket is connected. */
  readonly awaitConnect: Effect.Effect<void, NbdConnectError> = Effect.async((resume) => {
    if (this.phase !== PHASE_CONNECTING) {
      resume(
        this.phase === PHASE_CLOSED
          ? Effect.fail(new NbdConnectError({ address: this.address, reason: "Connect", cause: this.socketError }))
          : Effect.void
      )
      return
    }
    this.connectWaiter = (error) => resume(error === undefined ? Effect.void : Effect.fail(error))
    return Effect.sync(() => {
      this.connectWaiter = undefined
    })
  })

  private onClose(): void {
    const wasPhase = this.phase
    this.phase = PHASE_CLOSED
    const waiter = this.connectWaiter
    this.connectWaiter = undefined
    if (waiter !== undefined && wasPhase === PHASE_CONNECTING) {
      waiter(new NbdConnectError({ address: this.address, reason: "Connect", cause: this.socketError }))
    }
    this.failAll(
      new NbdClosedError({
        reason: this.clientClosing ? "ClientClosed" : this.socketError !== undefined ? "SocketError" : "ServerClosed",
        pending: this.pending.size,
        cause: this.socketError
      }),
      false
    )
    const waiters = this.closeWaiters
    this.closeWaiters = []
    for (const w of waiters) w()
  }

  /** Fails every pending request and the handshake reader; optionally destroys the socket. */
  private failAll(error: NbdProtocolError | NbdClosedError, destroy: boolean): void {
    if (this.fatal === undefined) this.fatal = error
    const failure = this.fatal
    const pending = [...this.pending.values(), ...this.queue]
    this.pending.clear()
    this.queue.length = 0
    for (const p of pending) {
      const done = p.done
      p.done = undefined
      done?.(failure)
    }
    const hsWaiter = this.hsWaiter
    if (hsWaiter !== undefined && hsWaiter()) this.hsWaiter = undefined
    if (destroy) this.socket.destroy()
  }

  /**
   * Finalizer: sends NBD_CMD_DISC (transmission) or NBD_OPT_ABORT (handshake), half-closes, waits
   * for the server to close (bounded), then destroys the socket.
   */
  readonly close: Effect.Effect<void> = Effect.suspend(() => {
    if (this.phase === PHASE_CLOSED) return Effect.void
    this.clientClosing = true
    if (this.phase === PHASE_CONNECTING || this.fatal !== undefined) {
      return Effect.sync(() => this.socket.destroy())
    }
    if (this.phase === PHASE_HANDSHAKE) {
      // handshake failed or was interrupted: abort politely, without waiting for the server
      return Effect.sync(() => {
        this.socket.end(P.encodeOption(P.OPT_ABORT))
        this.socket.destroySoon()
      })
    }
    return Effect.async<void>((resume) => {
      if (this.phase === PHASE_CLOSED) return resume(Effect.void)
      this.closeWaiters.push(() => resume(Effect.void))
      this.socket.end(P.encodeRequest(P.CMD_DISC, 0, 0, 0, 0))
    }).pipe(
      Effect.timeout("2 seconds"),
      Effect.ignore,
      Effect.ensuring(Effect.sync(() => this.socket.destroy()))
    )
  })

  // ---------------------------------------------------------------------------------------------
  // handshake

  private write(buf: Buffer): void {
    this.socket.write(buf)
  }

  private readExact(n: number): Effect.Effect<Buffer, NbdProtocolError | NbdClosedError> {
    return Effect.async((resume) => {
      const attempt = (): boolean => {
        if (this.hs.length >= n) {
          const out = this.hs.subarray(0, n)
          this.hs = this.hs.subarray(n)
          resume(Effect.succeed(out))
          return true
        }
        if (this.fatal !== undefined) {
          resume(Effect.fail(this.fatal))
          return true
        }
        return false
      }
      if (attempt()) return
      this.hsWaiter = attempt
      return Effect.sync(() => {
        this.hsWaiter = undefined
      })
    })
  }

  private readOptionReply(option: number) {
    return Effect.gen(this, function*() {
      const h = yield* this.readExact(20)
      if (h.readUInt32BE(0) !== P.OPT_REPLY_MAGIC_HI || h.readUInt32BE(4) !== P.OPT_REPLY_MAGIC_LO) {
        return yield* Effect.fail(
          protocolError("Handshake", `bad option reply magic 0x${h.subarray(0, 8).toString("hex")}`)
        )
      }
      const echoed = h.readUInt32BE(8)
      if (echoed !== option) {
        return yield* Effect.fail(
          protocolError(
            "Handshake",
            `reply for ${P.optionName(echoed)} while waiting for ${P.optionName(option)}`
          )
        )
      }
      const type = h.readUInt32BE(12)
      const length = h.readUInt32BE(16)
      if (length > MAX_OPTION_REPLY) {
        return yield* Effect.fail(protocolError("Handshake", `option reply of ${length} bytes is too large`))
      }
      const data = length === 0 ? Buffer.alloc(0) : yield* this.readExact(length)
      return { type, data }
    })
  }

  /** Runs the fixed-newstyle handshake: structured replies, meta contexts, NBD_OPT_GO. */
  handshake(options: {
    readonly exportName: string
    readonly structuredReplies: boolean
    readonly metaContexts: ReadonlyArray<string>
    readonly maxRequestSize: number
  }): Effect.Effect<
    ExportInfo,
    NbdProtocolError | NbdClosedError | NbdOptionError | NbdExportNotFoundError
  > {
    const exportName = options.exportName
    const optionFailure = (option: number, reply: { type: number; data: Buffer }) => {
      const detail = reply.data.toString("utf8")
      return reply.type === P.REP_ERR_UNKNOWN
        ? new NbdExportNotFoundError({ exportName, option: P.optionName(option), detail })
        : new NbdOptionError({ exportName, option: P.optionName(option), reply: P.replyName(reply.type), detail })
    }
    const unexpected = (option: number, type: number) =>
      protocolError("Handshake", `unexpected reply ${P.replyName(type)} to ${P.optionName(option)}`)

    return Effect.gen(this, function*() {
      const greeting = yield* this.readExact(18)
      if (greeting.readUInt32BE(0) !== P.NBDMAGIC_HI || greeting.readUInt32BE(4) !== P.NBDMAGIC_LO) {
        return yield* Effect.fail(
          protocolError("Handshake", `bad server magic 0x${greeting.subarray(0, 8).toString("hex")}`)
        )
      }
      const hi = greeting.readUInt32BE(8)
      const lo = greeting.readUInt32BE(12)
      if (hi === P.OLDSTYLE_HI && lo === P.OLDSTYLE_LO) {
        return yield* Effect.fail(protocolError("Handshake", "old-style negotiation is not supported"))
      }
      if (hi !== P.IHAVEOPT_HI || lo !== P.IHAVEOPT_LO) {
        return yield* Effect.fail(
          protocolError("Handshake", `bad newstyle magic 0x${greeting.subarray(8, 16).toString("hex")}`)
        )
      }
      const serverFlags = greeting.readUInt16BE(16)
      if ((serverFlags & P.FLAG_FIXED_NEWSTYLE) === 0) {
        return yield* Effect.fail(protocolError("Handshake", "server does not offer fixed newstyle negotiation"))
      }
      const clientFlags = Buffer.alloc(4)
      clientFlags.writeUInt32BE(
        P.FLAG_C_FIXED_NEWSTYLE | ((serverFlags & P.FLAG_NO_ZEROES) !== 0 ? P.FLAG_C_NO_ZEROES : 0)
      )
      this.write(clientFlags)

      // structured replies
      let structured = false
      if (options.structuredReplies) {
        this.write(P.encodeOption(P.OPT_STRUCTURED_REPLY))
        const reply = yield* this.readOptionReply(P.OPT_STRUCTURED_REPLY)
        if (reply.type === P.REP_ACK) structured = true
        else if ((reply.type & P.REP_ERR_BIT) === 0) {
          return yield* Effect.fail(unexpected(P.OPT_STRUCTURED_REPLY, reply.type))
        }
      }

      // meta contexts (need structured replies)
      const contexts = new Map<number, string>()
      if (structured && options.metaContexts.length > 0) {
        this.write(P.encodeSetMetaContext(exportName, options.metaContexts))
        while (true) {
          const reply = yield* this.readOptionReply(P.OPT_SET_META_CONTEXT)
          if (reply.type === P.REP_META_CONTEXT) {
            if (reply.data.length < 4) {
              return yield* Effect.fail(protocolError("Handshake", "short NBD_REP_META_CONTEXT"))
            }
            contexts.set(reply.data.readUInt32BE(0), reply.data.toString("utf8", 4))
          } else if (reply.type === P.REP_ACK) {
            break
          } else if (reply.type === P.REP_ERR_UNKNOWN) {
            return yield* Effect.fail(optionFailure(P.OPT_SET_META_CONTEXT, reply))
          } else if ((reply.type & P.REP_ERR_BIT) !== 0) {
            contexts.clear() // no metadata for this export; reads still work
            break
          } else {
            return yield* Effect.fail(unexpected(P.OPT_SET_META_CONTEXT, reply.type))
          }
        }
      }

      // NBD_OPT_GO with NBD_INFO_BLOCK_SIZE
      this.write(P.encodeGo(exportName, [P.INFO_BLOCK_SIZE]))
      let size = -1
      let flags = 0
      let blockSize: BlockSize | undefined
      while (true) {
        const reply = yield* this.readOptionReply(P.OPT_GO)
        if (reply.type === P.REP_ACK) break
        if (reply.type === P.REP_INFO) {
          const data = reply.data
          if (data.length < 2) return yield* Effect.fail(protocolError("Handshake", "short NBD_REP_INFO"))
          const info = data.readUInt16BE(0)
          if (info === P.INFO_EXPORT) {
            if (data.length < 12) return yield* Effect.fail(protocolError("Handshake", "short NBD_INFO_EXPORT"))
            size = P.readU64(data, 2)
            if (size < 0) return yield* Effect.fail(protocolError("Handshake", "export size exceeds 2^53"))
            flags = data.readUInt16BE(10)
          } else if (info === P.INFO_BLOCK_SIZE) {
            if (data.length < 14) return yield* Effect.fail(protocolError("Handshake", "short NBD_INFO_BLOCK_SIZE"))
            blockSize = {
              minimum: data.readUInt32BE(2),
              preferred: data.readUInt32BE(6),
              maximum: data.readUInt32BE(10)
            }
          }
          continue
        }
        if ((reply.type & P.REP_ERR_BIT) !== 0) return yield* Effect.fail(optionFailure(P.OPT_GO, reply))
        return yield* Effect.fail(unexpected(P.OPT_GO, reply.type))
      }
      if (size < 0) return yield* Effect.fail(protocolError("Handshake", "server sent no NBD_INFO_EXPORT"))
      if (blockSize !== undefined) {
        const { maximum, minimum, preferred } = blockSize
        if (minimum < 1 || minimum > 65536 || (minimum & (minimum - 1)) !== 0 || maximum < minimum) {
          return yield* Effect.fail(
            protocolError("Handshake", `invalid block sizes min=${minimum} preferred=${preferred} max=${maximum}`)
          )
        }
      }
      const effective: BlockSize = blockSize ?? { minimum: 1, preferred: 4096, maximum: P.DEFAULT_MAX_BLOCK }

      this.structured = structured
      this.contexts = contexts
      this.maxRequest = Math.max(
        effective.minimum,
        Math.floor(Math.min(effective.maximum, options.maxRequestSize) / effective.minimum) * effective.minimum
      )
      this.minBlock = effective.minimum
      this.size = size
      this.phase = PHASE_TRANSMISSION
      const rest = this.hs
      this.hs = Buffer.alloc(0)
      if (rest.length > 0) this.onData(rest, rest.length)
      return {
        exportName,
        size,
        flags,
        readOnly: (flags & P.TFLAG_READ_ONLY) !== 0,
        blockSize: effective,
        advertisedBlockSize: blockSize !== undefined,
        structuredReplies: structured,
        metaContexts: Array.from(contexts.values()),
        canMultiConn: (flags & P.TFLAG_CAN_MULTI_CONN) !== 0,
        connections: 1
      }
    })
  }

  // ---------------------------------------------------------------------------------------------
  // transmission: requests

  size = 0
  minBlock = 1
  maxRequest: number = P.DEFAULT_MAX_BLOCK

  /** Requests sent and not yet answered, plus those queued behind `maxInFlight`. */
  get load(): number {
    return this.pending.size + this.queue.length
  }

  /**
   * Starts a request without an effect: sent at once while fewer than `maxInFlight` are in flight,
   * otherwise queued in order. With `buffer` (exactly `length` bytes) read data lands there; ranges
   * the server reports as holes are left untouched. `done` runs once (synchronously only when the
   * connection is already unusable). The caller must not reuse `buffer` after {@link cancel}: a late
   * reply may still be written into it.
   */
  request(command: number, offset: number, length: number, buffer: Buffer | undefined, done: Done): Pending {
    const entry: Pending = {
      owner: this,
      cookie: 0,
      command,
      offset,
      length,
      done,
      sent: false,
      buffer,
      pieces: [],
      extents: undefined,
      error: undefined
    }
    if (this.fatal !== undefined) {
      entry.done = undefined
      done(this.fatal)
    } else if (this.clientClosing || this.phase !== PHASE_TRANSMISSION) {
      entry.done = undefined
      done(new NbdClosedError({ reason: "ClientClosed", pending: 0 }))
    } else if (this.pending.size < this.maxInFlight) {
      this.send(entry)
    } else {
      this.queue.push(entry)
    }
    return entry
  }

  /** Abandons a request: a queued one is never sent; a sent one's reply is parsed and dropped. */
  cancel(entry: Pending): void {
    entry.done = undefined
    if (!entry.sent) {
      const i = this.queue.indexOf(entry)
      if (i >= 0) this.queue.splice(i, 1)
    }
  }

  private send(entry: Pending): void {
    let cookie = this.nextCookie
    while (this.pending.has(cookie)) cookie = cookie >= 0xffffffff ? 1 : cookie + 1
    this.nextCookie = cookie >= 0xffffffff ? 1 : cookie + 1
    entry.cookie = cookie
    entry.sent = true
    this.pending.set(cookie, entry)
    // requests issued in one turn of the event loop leave in one write
    if (!this.corked) {
      this.corked = true
      this.socket.cork()
      process.nextTick(() => {
        this.corked = false
        this.socket.uncork()
      })
    }
    this.socket.write(P.encodeRequest(entry.command, 0, cookie, entry.offset, entry.length))
  }

  /** Sends queued requests while there is room. */
  private pump(): void {
    while (this.queue.length > 0 && this.pending.size < this.maxInFlight && this.fatal === undefined) {
      this.send(this.queue.shift()!)
    }
  }

  private effect<A>(command: number, offset: number, length: number, buffer: Buffer | undefined) {
    return Effect.async<A, NbdRequestFailure>((resume) => {
      const entry = this.request(command, offset, length, buffer, (failure, value) => {
        resume(failure === undefined ? Effect.succeed(value as A) : Effect.fail(failure))
      })
      // interruption abandons the wait; a sent request's reply is still parsed and dropped
      return Effect.sync(() => this.cancel(entry))
    })
  }

  /**
   * One NBD_CMD_READ (the range must respect the block size limits); see {@link request} for
   * `buffer`.
   */
  readOnce(offset: number, length: number, buffer?: Buffer): Effect.Effect<ReadResult, NbdRequestFailure> {
    return this.effect<ReadResult>(P.CMD_READ, offset, length, buffer)
  }

  /** One NBD_CMD_BLOCK_STATUS; extents per context name, starting at `offset`. */
  blockStatusOnce(
    offset: number,
    length: number
  ): Effect.Effect<Map<string, Array<Extent>>, NbdRequestFailure> {
    return this.effect<Map<string, Array<Extent>>>(P.CMD_BLOCK_STATUS, offset, length, undefined)
  }

  // ---------------------------------------------------------------------------------------------
  // transmission: reply parser

  /** Memory for the next socket read: the rest of the current data payload, or the scratch buffer. */
  private nextReadBuffer(): Buffer {
    if (
      this.phase === PHASE_TRANSMISSION && this.fatal === undefined &&
      (this.state === ST_DATA || this.state === ST_SIMPLE_DATA) && this.tEnd - this.tPos >= DIRECT_READ_MIN
    ) {
      this.directView = this.tBuf.subarray(this.tPos, this.tEnd)
      return this.directView
    }
    this.directView = undefined
    return this.readBuffer
  }

  private onRead(n: number, buf: Uint8Array): void {
    if (buf === this.directView && buf !== this.readBuffer) {
      // the bytes are already in place (see nextReadBuffer)
      this.directView = undefined
      if (this.phase !== PHASE_TRANSMISSION || this.fatal !== undefined) return
      this.tPos += n
      while (this.tPos === this.tEnd) {
        if (!this.advance()) return
      }
      return
    }
    this.onData(buf as Buffer, n)
  }

  /** Consumes `chunk[0, n)`; the chunk is reused by the socket afterwards, so nothing may keep it. */
  private onData(chunk: Buffer, n: number): void {
    if (this.phase !== PHASE_TRANSMISSION) {
      if (this.phase === PHASE_CLOSED) return
      const copy = Buffer.from(chunk.subarray(0, n))
      this.hs = this.hs.length === 0 ? copy : Buffer.concat([this.hs, copy])
      const waiter = this.hsWaiter
      if (waiter !== undefined && waiter()) this.hsWaiter = undefined
      return
    }
    if (this.fatal !== undefined) return
    let pos = 0
    while (pos < n) {
      const take = Math.min(this.tEnd - this.tPos, n - pos)
      chunk.copy(this.tBuf, this.tPos, pos, pos + take)
      this.tPos += take
      pos += take
      while (this.tPos === this.tEnd) {
        if (!this.advance()) return
      }
    }
  }

  private target(buf: Buffer, start: number, end: number): void {
    this.tBuf = buf
    this.tPos = start
    this.tEnd = end
  }

  private expectMagic(): void {
    this.state = ST_MAGIC
    this.current = undefined
    this.target(this.header, 0, 4)
  }

  private violation(detail: string): false {
    this.failAll(protocolError("Transmission", detail), true)
    return false
  }

  private lookup(at: number): Pending | undefined {
    const hi = this.header.readUInt32BE(at)
    const lo = this.header.readUInt32BE(at + 4)
    return hi === 0 ? this.pending.get(lo) : undefined
  }

  private cookieText(at: number): string {
    return `0x${this.header.subarray(at, at + 8).toString("hex")}`
  }

  /** Called when the current target is full; returns false after a fatal error. */
  private advance(): boolean {
    switch (this.state) {
      case ST_MAGIC: {
        const magic = this.header.readUInt32BE(0)
        if (magic === P.STRUCTURED_REPLY_MAGIC) {
          if (!this.structured) return this.violation("structured reply although structured replies are off")
          this.state = ST_STRUCT
          this.target(this.header, 4, 20)
        } else if (magic === P.SIMPLE_REPLY_MAGIC) {
          this.state = ST_SIMPLE
          this.target(this.header, 4, 16)
        } else {
          return this.violation(`bad reply magic 0x${magic.toString(16).padStart(8, "0")}`)
        }
        return true
      }
      case ST_SIMPLE: {
        const p = this.lookup(8)
        if (p === undefined) return this.violation(`simple reply for unknown cookie ${this.cookieText(8)}`)
        this.current = p
        const errno = this.header.readUInt32BE(4)
        if (errno !== 0) {
          p.error = this.commandError(p, errno, "", undefined)
          return this.complete(p)
        }
        if (p.command === P.CMD_READ) {
          if (this.structured) return this.violation("simple reply with data to NBD_CMD_READ")
          p.buffer ??= Buffer.allocUnsafe(p.length)
          this.state = ST_SIMPLE_DATA
          this.target(p.buffer, 0, p.length)
          return true
        }
        if (p.command === P.CMD_BLOCK_STATUS) return this.violation("simple reply to NBD_CMD_BLOCK_STATUS")
        return this.complete(p)
      }
      case ST_SIMPLE_DATA: {
        const p = this.current!
        p.pieces.push({ offset: p.offset, data: p.buffer! })
        return this.complete(p)
      }
      case ST_STRUCT: {
        const p = this.lookup(8)
        if (p === undefined) return this.violation(`reply chunk for unknown cookie ${this.cookieText(8)}`)
        this.current = p
        const flags = this.header.readUInt16BE(4)
        const type = this.header.readUInt16BE(6)
        const length = this.header.readUInt32BE(16)
        this.chunkFlags = flags
        this.chunkType = type
        this.chunkLength = length
        switch (type) {
          case P.REPLY_TYPE_NONE: {
            if (length !== 0) return this.violation(`NBD_REPLY_TYPE_NONE with length ${length}`)
            if ((flags & P.REPLY_FLAG_DONE) === 0) return this.violation("NBD_REPLY_TYPE_NONE without DONE flag")
            return this.complete(p)
          }
          case P.REPLY_TYPE_OFFSET_DATA: {
            if (p.command !== P.CMD_READ) return this.violation("NBD_REPLY_TYPE_OFFSET_DATA to a non-read request")
            if (length < 9 || length - 8 > p.length) {
              return this.violation(`NBD_REPLY_TYPE_OFFSET_DATA with bad length ${length}`)
            }
            this.state = ST_DATA_OFFSET
            this.target(this.scratch, 0, 8)
            return true
          }
          case P.REPLY_TYPE_OFFSET_HOLE: {
            if (p.command !== P.CMD_READ) return this.violation("NBD_REPLY_TYPE_OFFSET_HOLE to a non-read request")
            if (length !== 12) return this.violation(`NBD_REPLY_TYPE_OFFSET_HOLE with length ${length}`)
            return this.payload(length)
          }
          case P.REPLY_TYPE_BLOCK_STATUS: {
            if (p.command !== P.CMD_BLOCK_STATUS) {
              return this.violation("NBD_REPLY_TYPE_BLOCK_STATUS to a request other than block status")
            }
            if (length < 12 || (length - 4) % 8 !== 0 || length > MAX_CHUNK_PAYLOAD) {
              return this.violation(`NBD_REPLY_TYPE_BLOCK_STATUS with bad length ${length}`)
            }
            return this.payload(length)
          }
          default: {
            if ((type & P.REPLY_TYPE_ERROR_BIT) === 0) return this.violation(`unknown reply chunk type ${type}`)
            if (length < 6 || length > 65536) return this.violation(`error chunk with bad length ${length}`)
            return this.payload(length)
          }
        }
      }
      case ST_DATA_OFFSET: {
        const p = this.current!
        const offset = P.readU64(this.scratch, 0)
        const dataLength = this.chunkLength - 8
        if (offset < p.offset || offset + dataLength > p.offset + p.length) {
          return this.violation(
            `data chunk ${offset}+${dataLength} outside the request ${p.offset}+${p.length}`
          )
        }
        if (p.buffer === undefined) p.buffer = Buffer.allocUnsafe(p.length)
        const rel = offset - p.offset
        this.dataOffset = offset
        this.state = ST_DATA
        this.target(p.buffer, rel, rel + dataLength)
        return true
      }
      case ST_DATA: {
        const p = this.current!
        const rel = this.dataOffset - p.offset
        p.pieces.push({ offset: this.dataOffset, data: p.buffer!.subarray(rel, rel + this.chunkLength - 8) })
        return this.endChunk(p)
      }
      case ST_PAYLOAD: {
        const p = this.current!
        if (!this.parsePayload(p, this.tBuf)) return false
        return this.endChunk(p)
      }
    }
    return this.violation(`parser in unknown state ${this.state}`)
  }

  private payload(length: number): boolean {
    this.state = ST_PAYLOAD
    this.target(Buffer.allocUnsafe(length), 0, length)
    return true
  }

  private endChunk(p: Pending): boolean {
    if ((this.chunkFlags & P.REPLY_FLAG_DONE) !== 0) return this.complete(p)
    this.expectMagic()
    return true
  }

  private commandError(p: Pending, errno: number, detail: string, errorOffset: number | undefined) {
    return new NbdCommandError({
      command: P.commandName(p.command),
      offset: p.offset,
      length: p.length,
      errno,
      code: P.errnoName(errno),
      detail,
      ...(errorOffset === undefined ? {} : { errorOffset })
    })
  }

  private parsePayload(p: Pending, data: Buffer): boolean {
    const type = this.chunkType
    if (type === P.REPLY_TYPE_OFFSET_HOLE) {
      const offset = P.readU64(data, 0)
      const size = data.readUInt32BE(8)
      if (size === 0 || offset < p.offset || offset + size > p.offset + p.length) {
        return this.violation(`hole chunk ${offset}+${size} outside the request ${p.offset}+${p.length}`)
      }
      p.pieces.push({ offset, length: size, hole: true })
      return true
    }
    if (type === P.REPLY_TYPE_BLOCK_STATUS) {
      const id = data.readUInt32BE(0)
      const name = this.contexts.get(id)
      if (name === undefined) return this.violation(`block status for unknown meta context id ${id}`)
      const extents = p.extents ?? new Map<string, Array<Extent>>()
      p.extents = extents
      if (extents.has(name)) return this.violation(`two block status chunks for context ${name}`)
      const list: Array<Extent> = []
      let offset = p.offset
      for (let at = 4; at < data.length; at += 8) {
        const length = data.readUInt32BE(at)
        if (length === 0) return this.violation(`zero-length extent for context ${name}`)
        list.push({ offset, length, flags: data.readUInt32BE(at + 4) })
        offset += length
      }
      extents.set(name, list)
      return true
    }
    // error chunks (NBD_REPLY_TYPE_ERROR, _ERROR_OFFSET, unknown types with bit 15)
    const errno = data.readUInt32BE(0)
    const messageLength = data.readUInt16BE(4)
    if (messageLength > data.length - 6) return this.violation("error chunk message longer than the chunk")
    const message = data.toString("utf8", 6, 6 + messageLength)
    let errorOffset: number | undefined
    if (type === P.REPLY_TYPE_ERROR_OFFSET) {
      if (data.length < 6 + messageLength + 8) return this.violation("NBD_REPLY_TYPE_ERROR_OFFSET without offset")
      errorOffset = P.readU64(data, 6 + messageLength)
    }
    if (p.error === undefined) p.error = this.commandError(p, errno, message, errorOffset)
    return true
  }

  private complete(p: Pending): boolean {
    this.pending.delete(p.cookie)
    this.expectMagic()
    const done = p.done
    p.done = undefined
    if (p.error !== undefined) {
      this.pump()
      done?.(p.error)
      return true
    }
    if (p.command === P.CMD_READ) {
      const pieces = p.pieces
      if (pieces.length > 1) pieces.sort((a, b) => a.offset - b.offset)
      let expected = p.offset
      let problem: string | undefined
      for (const piece of pieces) {
        if (piece.offset !== expected) {
          problem = `read reply ${p.offset}+${p.length}: chunk at ${piece.offset}, expected ${expected}` +
            " (gap or overlap)"
          break
        }
        expected += "data" in piece ? piece.data.length : piece.length
      }
      if (problem === undefined && expected !== p.offset + p.length) {
        problem = `read reply ${p.offset}+${p.length} covers only up to ${expected}`
      }
      if (problem !== undefined) {
        const error = protocolError("Transmission", problem)
        done?.(error)
        this.failAll(error, true)
        return false
      }
      const result: ReadResult = { offset: p.offset, length: p.length, pieces }
      if (p.buffer !== undefined) backing.set(result, p.buffer)
      this.pump()
      done?.(undefined, result)
      return true
    }
    this.pump()
    done?.(undefined, p.command === P.CMD_BLOCK_STATUS ? (p.extents ?? new Map()) : undefined)
    return true
  }
}

/**
 * What reads and block status need from the transport: one connection, or several to the same
 * export (see `nbdGroup.ts`).
 */
export interface Link {
  readonly size: number
  readonly minBlock: number
  readonly maxRequest: number
  readonly contexts: ReadonlyMap<number, string>
  /** Callback-level request (no fiber per request), see {@link Connection.request}. */
  readonly request: (command: number, offset: number, length: number, buffer: Buffer | undefined, done: Done) => Pending
  readonly readOnce: (offset: number, length: number, buffer?: Buffer) => Effect.Effect<ReadResult, NbdRequestFailure>
  readonly blockStatusOnce: (
    offset: number,
    length: number
  ) => Effect.Effect<Map<string, Array<Extent>>, NbdRequestFailure>
}

/** Validates `offset`/`length` against the export. */
export const checkRange = (
  conn: { readonly size: number },
  offset: number,
  length: number
): Effect.Effect<void, NbdRequestError> => {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    return Effect.fail(
      new NbdRequestError({ reason: "InvalidArgument", detail: `offset=${offset} length=${length}` })
    )
  }
  if (offset + length > conn.size) {
    return Effect.fail(
      new NbdRequestError({
        reason: "OutOfRange",
        detail: `range ${offset}+${length} exceeds the export size ${conn.size}`
      })
    )
  }
  return Effect.void
}

export { MAX_STATUS_REQUEST }
