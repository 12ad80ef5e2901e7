/**
 * The engine shared by the QMP and guest-agent clients: one socket from a `QmpTransport`, a reader fiber that
 * frames lines and hands parsed JSON to a dispatcher in arrival order, serialized writes, requests matched by
 * numeric id, per-request timeouts, and one terminal error that fails every pending and later request.
 * @internal
 */
import * as Socket from "@effect/platform/Socket"
import * as Cause from "effect/Cause"
import * as Deferred from "effect/Deferred"
import type * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Fiber from "effect/Fiber"
import * as Mailbox from "effect/Mailbox"
import * as Option from "effect/Option"
import type * as Scope from "effect/Scope"
import { QmpClosedError, QmpConnectError, QmpProtocolError, QmpTransportError } from "../QmpError.js"
import type { QmpAddress, QmpTransportService } from "../QmpTransport.js"
import { formatAddress } from "../QmpTransport.js"
import { LineFramer } from "./lineFramer.js"
import type { Token } from "./lineFramer.js"

/** Why the connection ended. @internal */
export type Terminal = QmpConnectError | QmpClosedError | QmpProtocolError

/** What the reader hands to the dispatcher: a complete line (without its end) or a `0xFF` delimiter. @internal */
export type Incoming = Token

/** @internal */
export interface StartOptions<E> {
  readonly address: QmpAddress
  readonly openTimeout: Duration.Duration
  readonly delimiter0xFF: boolean
  readonly maxLineBytes: number
  /** Runs for every message, one at a time, in arrival order. A failure breaks the connection. */
  readonly dispatch: (message: Incoming, connection: JsonConnection<E>) => Effect.Effect<void, QmpProtocolError>
  /** Runs once, when the connection ends. */
  readonly onTerminate: (error: Terminal) => Effect.Effect<void>
}

/** @internal */
export interface RequestOptions<TE> {
  readonly command: string
  readonly encode: (id: number) => Uint8Array
  readonly fds?: ReadonlyArray<number> | undefined
  readonly timeout: Duration.Duration
  readonly onTimeout: () => TE
}

/** @internal */
export interface JsonConnection<E> {
  /** Succeeds once the socket is connected; fails with the terminal error if it never is. */
  readonly awaitOpen: Effect.Effect<void, Terminal>
  /** Fails with the terminal error once the connection has ended. */
  readonly terminated: Effect.Effect<never, Terminal>
  readonly send: (bytes: Uint8Array, fds?: ReadonlyArray<number>) => Effect.Effect<void, Terminal | QmpTransportError>
  readonly request: <TE>(options: RequestOptions<TE>) => Effect.Effect<unknown, E | Terminal | QmpTransportError | TE>
  /** Completes the pending request `id` (if any) with the exit built from its command name. */
  readonly complete: (id: unknown, exit: (command: string) => Exit.Exit<unknown, E>) => Effect.Effect<boolean>
  /** Completes the only pending request, if exactly one waits (for peers that do not echo ids). */
  readonly completeSole: (exit: (command: string) => Exit.Exit<unknown, E>) => Effect.Effect<boolean>
}

const encoder = new TextEncoder()

/** JSON text plus `\n`, as bytes. @internal */
export const encodeLine = (message: unknown, prefix?: number): Uint8Array => {
  const body = encoder.encode(JSON.stringify(message))
  const extra = prefix === undefined ? 0 : 1
  const bytes = new Uint8Array(body.length + extra + 1)
  if (prefix !== undefined) bytes[0] = prefix
  bytes.set(body, extra)
  bytes[bytes.length - 1] = 0x0a
  return bytes
}

/** Parses one line; invalid JSON is a `MalformedJson` protocol error. @internal */
export const parseLine = (text: string): Effect.Effect<unknown, QmpProtocolError> =>
  Effect.try({
    try: () => JSON.parse(text) as unknown,
    catch: (cause) =>
      new QmpProtocolError({
        reason: "MalformedJson",
        detail: `${describe(cause)} in line ${JSON.stringify(text.slice(0, 120))}`
      })
  })

/** @internal */
export const isRecord = (u: unknown): u is Record<string, unknown> =>
  typeof u === "object" && u !== null && !Array.isArray(u)

const describe = (cause: unknown): string =>
  cause instanceof Error ? cause.message : typeof cause === "string" ? cause : JSON.stringify(cause) ?? String(cause)

// A reset by the peer. usocket (FdQmpTransport) surfaces the socket's error condition as libuv reports it for a
// poll handle: `EBADF` from `poll` (libuv maps POLLERR to UV_EBADF), seen when QEMU exits.
const isPeerGone = (cause: unknown): boolean => {
  if (!isRecord(cause)) return false
  const code = cause.code
  return code === "ECONNRESET" || code === "EPIPE" || (code === "EBADF" && cause.syscall === "poll")
}

/** @internal */
export const start = <E>(
  transport: QmpTransportService,
  options: StartOptions<E>
): Effect.Effect<JsonConnection<E>, QmpConnectError, Scope.Scope> =>
  Effect.gen(function*() {
    const address = formatAddress(options.address)
    const connection = yield* transport.open(options.address, { openTimeout: options.openTimeout })
    const opened = yield* Deferred.make<void>()
    const terminated = yield* Deferred.make<never, Terminal>()
    const writeLock = yield* Effect.makeSemaphore(1)
    const pending = new Map<
      number,
      { readonly command: string; readonly reply: Deferred.Deferred<unknown, E | Terminal> }
    >()
    let terminal: Terminal | undefined
    let nextId = 0

    const terminate = (error: Terminal): Effect.Effect<void> =>
      Effect.suspend(() => {
        if (terminal !== undefined) return Effect.void
        terminal = error
        const waiters = Array.from(pending.values())
        pending.clear()
        return Effect.zipRight(
          Effect.forEach(waiters, (waiter) => Deferred.fail(waiter.reply, error), { discard: true }),
          Effect.zipRight(Deferred.fail(terminated, error), options.onTerminate(error))
        )
      })

    // Reader: bytes from the socket into a mailbox, in order. `run` ends (and closes the socket) when this fiber
    // is interrupted.
    const incoming = yield* Mailbox.make<Uint8Array, Socket.SocketError>()
    const reader = yield* connection.socket.runRaw((data) => {
      incoming.unsafeOffer(typeof data === "string" ? encoder.encode(data) : data)
    }, { onOpen: Deferred.complete(opened, Effect.void).pipe(Effect.asVoid) }).pipe(
      Mailbox.into(incoming),
      Effect.interruptible,
      Effect.forkScoped
    )

    const framer = new LineFramer({ delimiter0xFF: options.delimiter0xFF, maxLineBytes: options.maxLineBytes })
    const dispatchLoop: Effect.Effect<void, Socket.SocketError | QmpProtocolError> = Effect.gen(function*() {
      while (true) {
        const [chunks, done] = yield* incoming.takeAll
        for (const chunk of chunks) {
          const result = framer.push(chunk)
          for (const token of result.tokens) {
            yield* options.dispatch(token, self)
          }
          if (result.overflow) {
            return yield* new QmpProtocolError({
              reason: "LineTooLong",
              detail: `no end of line within ${options.maxLineBytes} bytes`
            })
          }
        }
        if (done) return
      }
    })

    const toTerminal = (exit: Exit.Exit<void, Socket.SocketError | QmpProtocolError>): Terminal => {
      if (Exit.isSuccess(exit)) {
        const partial = framer.pendingBytes
        return new QmpClosedError({
          reason: "PeerClosed",
          detail: partial > 0
            ? `the peer closed the connection in the middle of a message (${partial} bytes unterminated)`
            : "the peer closed the connection"
        })
      }
      const failure = Cause.failureOption(exit.cause)
      if (Option.isSome(failure)) {
        const error = failure.value
        if (error._tag === "QmpProtocolError") return error
        if (error.reason === "Open" || error.reason === "OpenTimeout") {
          return new QmpConnectError({
            reason: error.reason === "Open" ? "Open" : "Timeout",
            address,
            detail: describe(error.cause)
          })
        }
        if (error.reason === "Close") {
          return new QmpClosedError({ reason: "PeerClosed", detail: `the socket closed (code ${error.code})` })
        }
        return new QmpClosedError({
          reason: isPeerGone(error.cause) ? "PeerClosed" : "ReadFailed",
          detail: describe(error.cause)
        })
      }
      if (Cause.isInterruptedOnly(exit.cause)) {
        return new QmpClosedError({ reason: "ClientClosed", detail: "the client's scope was closed" })
      }
      return new QmpClosedError({ reason: "ReadFailed", detail: Cause.pretty(exit.cause) })
    }

    const write = yield* connection.socket.writer
    const raceTerminated = <A, X>(effect: Effect.Effect<A, X>): Effect.Effect<A, X | Terminal> =>
      // the loser must stay interruptible even when the caller is not (e.g. inside an acquireRelease
      // acquire): an uninterruptible loser would make the race wait for the connection to end
      Effect.raceFirst(effect, Effect.interruptible(Deferred.await(terminated)))

    const send = (bytes: Uint8Array, fds?: ReadonlyArray<number>) =>
      Effect.suspend((): Effect.Effect<void, Terminal | QmpTransportError> => {
        if (terminal !== undefined) return Effect.fail(terminal)
        const writeOnce: Effect.Effect<void, Terminal | QmpTransportError> = fds !== undefined && fds.length > 0
          ? connection.writeWithFds(bytes, fds)
          : Effect.mapError(write(bytes), (error) =>
            new QmpClosedError({
              reason: "WriteFailed",
              detail: error.reason === "Close" ? error.message : describe(error.cause)
            }))
        return raceTerminated(writeLock.withPermits(1)(writeOnce))
      })

    const request = <TE>(
      request: RequestOptions<TE>
    ): Effect.Effect<unknown, E | Terminal | QmpTransportError | TE> =>
      Effect.acquireUseRelease(
        Effect.flatMap(Deferred.make<unknown, E | Terminal>(), (reply) => {
          if (terminal !== undefined) return Effect.fail(terminal)
          const id = ++nextId
          pending.set(id, { command: request.command, reply })
          return Effect.succeed({ id, reply })
        }),
        ({ id, reply }) => Effect.zipRight(send(request.encode(id), request.fds), Deferred.await(reply)),
        ({ id }) => Effect.sync(() => pending.delete(id))
      ).pipe(
        // interruptible inside the timeout, so the timeout also fires for callers that are not (a
        // finalizer, an acquireRelease acquire): the timed-out wait runs in the timeout's own fiber
        Effect.interruptible,
        Effect.timeoutFail({ duration: request.timeout, onTimeout: request.onTimeout })
      )

    const settle = (
      key: number,
      exit: (command: string) => Exit.Exit<unknown, E>
    ): Effect.Effect<boolean> => {
      const entry = pending.get(key)
      if (entry === undefined) return Effect.succeed(false)
      pending.delete(key)
      return Effect.as(Deferred.done(entry.reply, exit(entry.command)), true)
    }

    const self: JsonConnection<E> = {
      awaitOpen: Effect.raceFirst(Effect.interruptible(Deferred.await(opened)), Effect.interruptible(Deferred.await(terminated))),
      terminated: Deferred.await(terminated),
      send,
      request,
      complete: (id, exit) => typeof id === "number" ? settle(id, exit) : Effect.succeed(false),
      completeSole: (exit) => {
        if (pending.size !== 1) return Effect.succeed(false)
        const [key] = pending.keys()
        return settle(key!, exit)
      }
    }

    yield* dispatchLoop.pipe(
      Effect.onExit((exit) => Effect.zipRight(terminate(toTerminal(exit)), Fiber.interrupt(reader))),
      Effect.ignore,
      // forked fibers inherit the caller's interruptibility: a client made inside an acquire must still close
      Effect.interruptible,
      Effect.forkScoped
    )
    return self
  })
