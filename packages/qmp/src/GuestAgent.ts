/**
 * Client for the QEMU guest agent (qemu-ga) behind a host chardev socket (`-chardev socket,path=…,server=on,
 * wait=off,id=qga0 -device virtio-serial-pci -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`).
 *
 * The guest agent speaks QMP-shaped JSON but is **not** QMP: no greeting, no `qmp_capabilities`, and the
 * channel may hold stale bytes from an earlier client or a restarted agent. So every connection starts with a
 * sync: the client sends `0xFF` (the agent's parser drops any half-read request) and
 * `guest-sync-delimited` with a random id; the agent answers `0xFF` then `{"return": id}`. Everything before
 * the `0xFF` and every reply with another value is discarded. After a call times out the client syncs again
 * before the next call, so a late reply cannot be taken for the next one.
 *
 * Nothing answers when no agent runs in the guest (the socket is QEMU's and accepts connections anyway), so
 * every call, the initial sync included, has a timeout and fails with `GuestAgentTimeoutError`, never hangs.
 * Calls are serialized: the agent handles one request at a time.
 *
 * The byte transport is the same `QmpTransport` service as for QMP (`NodeQmpTransport.layer`).
 *
 * @since 0.1.0
 */
import * as Config from "effect/Config"
import type * as ConfigError from "effect/ConfigError"
import * as Context from "effect/Context"
import * as Deferred from "effect/Deferred"
import * as Duration from "effect/Duration"
import * as Effect from "effect/Effect"
import * as Exit from "effect/Exit"
import * as Layer from "effect/Layer"
import * as ParseResult from "effect/ParseResult"
import * as Random from "effect/Random"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import * as internal from "./internal/jsonConnection.js"
import { QmpClosedError, QmpConnectError, QmpDecodeError, QmpProtocolError } from "./QmpError.js"
import type { QmpTransportError } from "./QmpError.js"
import { QmpErrorBody } from "./QmpSchema.js"
import { formatAddress, QmpTransport, toAddress } from "./QmpTransport.js"
import type { QmpAddress } from "./QmpTransport.js"

/**
 * The agent answered `{"error": {"class": …, "desc": …}}`, e.g. `CommandNotFound` /
 * `Command guest-fsfreeze-freeze has been disabled` for an RPC blocked with `qemu-ga -b`.
 *
 * @since 0.1.0
 * @category errors
 */
export class GuestAgentCommandError
  extends Schema.TaggedError<GuestAgentCommandError>("@vzdump/qmp/GuestAgentCommandError")("GuestAgentCommandError", {
    command: Schema.String,
    errorClass: Schema.String,
    desc: Schema.String
  })
{
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `${this.command}: ${this.errorClass}: ${this.desc}`
  }
}

/**
 * No answer within the timeout: usually no agent runs in the guest (or it is busy, e.g. freezing).
 *
 * @since 0.1.0
 * @category errors
 */
export class GuestAgentTimeoutError
  extends Schema.TaggedError<GuestAgentTimeoutError>("@vzdump/qmp/GuestAgentTimeoutError")("GuestAgentTimeoutError", {
    command: Schema.String,
    timeout: Schema.DurationFromSelf
  })
{
  /**
   * @since 0.1.0
   */
  override get message(): string {
    return `guest agent: no reply to ${this.command} within ${Duration.format(this.timeout)}`
  }
}

/**
 * Every way a guest-agent call can fail.
 *
 * @since 0.1.0
 * @category errors
 */
export type GuestAgentError = GuestAgentCommandError | GuestAgentTimeoutError | QmpClosedError | QmpProtocolError

/**
 * @since 0.1.0
 * @category models
 */
export interface GuestAgentOptions {
  /** The host side of the agent's chardev: a Unix socket path or an address. */
  readonly address: string | QmpAddress
  /** Bound on connecting and on each sync. Default 5 seconds. */
  readonly syncTimeout?: Duration.DurationInput | undefined
  /** Default timeout of every call; a call's own `timeout` overrides it. Default 10 seconds. */
  readonly commandTimeout?: Duration.DurationInput | undefined
  /** Longest accepted line, in bytes. Default 16 MiB. */
  readonly maxLineBytes?: number | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface GuestAgentCallOptions {
  readonly timeout?: Duration.DurationInput | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface GuestAgentService {
  readonly address: QmpAddress
  /**
   * Runs one agent command and returns its `return` value undecoded. Do not use it for the commands that never
   * reply (`guest-shutdown`, `guest-suspend-*`): they would time out.
   */
  readonly execute: (
    command: string,
    args?: object | undefined,
    options?: GuestAgentCallOptions
  ) => Effect.Effect<unknown, GuestAgentError>
  /** Resynchronizes the channel (`0xFF` + `guest-sync-delimited`). `make` already did it once. */
  readonly sync: (options?: GuestAgentCallOptions) => Effect.Effect<void, GuestAgentError>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class GuestAgent extends Context.Tag("@vzdump/qmp/GuestAgent")<GuestAgent, GuestAgentService>() {}

interface SyncState {
  readonly nonce: number
  readonly reply: Deferred.Deferred<void>
  delimiterSeen: boolean
}

const decodeErrorBody = Schema.decodeUnknownEither(QmpErrorBody)

const preview = (value: unknown): string => {
  const text = typeof value === "string" ? value : JSON.stringify(value) ?? String(value)
  return text.length > 200 ? `${text.slice(0, 200)}…` : text
}

const narrow = (error: internal.Terminal | QmpTransportError): QmpClosedError | QmpProtocolError =>
  error._tag === "QmpConnectError"
    ? new QmpClosedError({ reason: "PeerClosed", detail: error.message })
    : error._tag === "QmpTransportError"
    ? new QmpClosedError({ reason: "WriteFailed", detail: error.message })
    : error

/**
 * Connects and syncs. Fails with `GuestAgentTimeoutError` (command `guest-sync-delimited`) when no agent
 * answers within `syncTimeout`, and with `QmpConnectError` when the socket cannot be opened.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make: (
  options: GuestAgentOptions
) => Effect.Effect<GuestAgentService, QmpConnectError | GuestAgentTimeoutError, Scope.Scope | QmpTransport> = Effect
  .fn("GuestAgent.make")(
    function*(options: GuestAgentOptions) {
      const transport = yield* QmpTransport
      const address = toAddress(options.address)
      const addressText = formatAddress(address)
      const syncTimeout = Duration.decode(options.syncTimeout ?? Duration.seconds(5))
      const commandTimeout = Duration.decode(options.commandTimeout ?? Duration.seconds(10))
      const lock = yield* Effect.makeSemaphore(1)
      let syncing: SyncState | undefined
      let needsSync = true

      const dispatch = (
        message: internal.Incoming,
        connection: internal.JsonConnection<GuestAgentCommandError>
      ): Effect.Effect<void, QmpProtocolError> => {
        const state = syncing
        if (message._tag === "Delimiter") {
          if (state !== undefined) state.delimiterSeen = true
          return Effect.void
        }
        if (state !== undefined) {
          // While syncing, anything but the matching reply after the delimiter is stale: drop it unparsed.
          if (!state.delimiterSeen) return Effect.logDebug(`guest agent: discarding ${preview(message.text)}`)
          return Effect.flatMap(Effect.option(internal.parseLine(message.text)), (parsed) => {
            if (parsed._tag === "Some" && internal.isRecord(parsed.value) && parsed.value.return === state.nonce) {
              syncing = undefined
              return Deferred.succeed(state.reply, undefined)
            }
            return Effect.logDebug(`guest agent: discarding ${preview(message.text)}`)
          })
        }
        return Effect.flatMap(internal.parseLine(message.text), (value) => {
          if (!internal.isRecord(value) || !("return" in value || "error" in value)) {
            return Effect.logWarning(`guest agent: dropping unexpected message ${preview(value)}`)
          }
          let exit: (command: string) => Exit.Exit<unknown, GuestAgentCommandError>
          if ("error" in value) {
            const body = decodeErrorBody(value.error)
            if (body._tag === "Left") {
              return Effect.fail(
                new QmpProtocolError({ reason: "InvalidMessage", detail: `bad error reply ${preview(value)}` })
              )
            }
            exit = (command) =>
              Exit.fail(new GuestAgentCommandError({ command, errorClass: body.right.class, desc: body.right.desc }))
          } else {
            exit = () => Exit.succeed(value.return)
          }
          // qemu-ga echoes `id`; an agent that does not gets its reply matched to the one call in flight.
          const settle = "id" in value ? connection.complete(value.id, exit) : connection.completeSole(exit)
          return Effect.flatMap(
            settle,
            (found) => found ? Effect.void : Effect.logDebug(`guest agent: dropping stale reply ${preview(value)}`)
          )
        })
      }

      const connection = yield* internal.start<GuestAgentCommandError>(transport, {
        address,
        openTimeout: syncTimeout,
        delimiter0xFF: true,
        maxLineBytes: options.maxLineBytes ?? 16 * 1024 * 1024,
        dispatch,
        onTerminate: (error) =>
          error._tag === "QmpConnectError" || (error._tag === "QmpClosedError" && error.reason === "ClientClosed")
            ? Effect.logDebug(`guest agent connection ended: ${error.message}`)
            : Effect.logWarning(`guest agent connection ended: ${error.message}`)
      })

      const syncUnlocked = (timeout: Duration.Duration): Effect.Effect<void, GuestAgentError> =>
        Effect.gen(function*() {
          const nonce = yield* Random.nextIntBetween(1, 2 ** 31 - 1)
          const state: SyncState = { nonce, reply: yield* Deferred.make<void>(), delimiterSeen: false }
          syncing = state
          yield* connection.send(
            internal.encodeLine({ execute: "guest-sync-delimited", arguments: { id: nonce } }, 0xff)
          )
          yield* Effect.raceFirst(Effect.interruptible(Deferred.await(state.reply)), Effect.interruptible(connection.terminated))
          needsSync = false
        }).pipe(
          Effect.mapError(narrow),
          Effect.timeoutFail({
            duration: timeout,
            onTimeout: () => new GuestAgentTimeoutError({ command: "guest-sync-delimited", timeout })
          }),
          Effect.ensuring(Effect.sync(() => {
            syncing = undefined
          }))
        )

      const sync = (callOptions?: GuestAgentCallOptions) =>
        lock.withPermits(1)(
          syncUnlocked(callOptions?.timeout !== undefined ? Duration.decode(callOptions.timeout) : syncTimeout)
        ).pipe(Effect.withSpan("GuestAgent.sync"))

      const execute = (
        command: string,
        args?: object | undefined,
        callOptions?: GuestAgentCallOptions
      ): Effect.Effect<unknown, GuestAgentError> => {
        const timeout = callOptions?.timeout !== undefined ? Duration.decode(callOptions.timeout) : commandTimeout
        return lock.withPermits(1)(Effect.gen(function*() {
          if (needsSync) yield* syncUnlocked(syncTimeout)
          return yield* connection.request({
            command,
            encode: (id) =>
              internal.encodeLine(
                args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }
              ),
            timeout,
            onTimeout: () => new GuestAgentTimeoutError({ command, timeout })
          }).pipe(
            Effect.mapError((error) =>
              error._tag === "GuestAgentCommandError" || error._tag === "GuestAgentTimeoutError" ? error : narrow(error)
            ),
            Effect.tapErrorTag("GuestAgentTimeoutError", () =>
              Effect.sync(() => {
                needsSync = true
              }))
          )
        })).pipe(Effect.withSpan("GuestAgent.execute", { attributes: { command } }))
      }

      yield* connection.awaitOpen.pipe(
        Effect.timeoutFail({
          duration: syncTimeout,
          onTimeout: () =>
            new QmpConnectError({
              reason: "Timeout",
              address: addressText,
              detail: `not connected within ${Duration.format(syncTimeout)}`
            })
        }),
        Effect.mapError((error) =>
          error._tag === "QmpConnectError"
            ? error
            : new QmpConnectError({ reason: "Handshake", address: addressText, detail: error.message })
        )
      )
      yield* sync().pipe(
        Effect.catchTags({
          QmpClosedError: (error) =>
            Effect.fail(new QmpConnectError({ reason: "Handshake", address: addressText, detail: error.message })),
          QmpProtocolError: (error) =>
            Effect.fail(new QmpConnectError({ reason: "Handshake", address: addressText, detail: error.message })),
          GuestAgentCommandError: (error) =>
            Effect.fail(new QmpConnectError({ reason: "Handshake", address: addressText, detail: error.message }))
        })
      )
      return GuestAgent.of({ address, execute, sync })
    },
    Effect.annotateLogs({ package: "@vzdump/qmp", module: "GuestAgent" })
  )

/**
 * @since 0.1.0
 * @category layers
 */
export const layer = (
  options: GuestAgentOptions
): Layer.Layer<GuestAgent, QmpConnectError | GuestAgentTimeoutError, QmpTransport> =>
  Layer.scoped(GuestAgent, make(options))

/**
 * Like {@link layer}, with options read from `Config`s.
 *
 * @since 0.1.0
 * @category layers
 */
export const layerConfig = (
  config: Config.Config.Wrap<GuestAgentOptions>
): Layer.Layer<GuestAgent, QmpConnectError | GuestAgentTimeoutError | ConfigError.ConfigError, QmpTransport> =>
  Layer.scoped(GuestAgent, Effect.flatMap(Config.unwrap(config), make))

// ---------------------------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------------------------

/**
 * An entry of `guest-info`'s `supported_commands`.
 *
 * @since 0.1.0
 * @category replies
 */
export const GuestAgentCommandInfo = Schema.Struct({
  name: Schema.String,
  enabled: Schema.Boolean,
  "success-response": Schema.Boolean
})

/**
 * The reply of `guest-info`: the agent's version and which commands it allows.
 *
 * @since 0.1.0
 * @category replies
 */
export const GuestAgentInfo = Schema.Struct({
  version: Schema.String,
  "supported_commands": Schema.Array(GuestAgentCommandInfo)
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface GuestAgentInfo extends Schema.Schema.Type<typeof GuestAgentInfo> {}

/**
 * A disk behind a guest filesystem (`GuestDiskAddress`).
 *
 * @since 0.1.0
 * @category replies
 */
export const GuestDiskAddress = Schema.Struct({
  "pci-controller": Schema.Struct({
    domain: Schema.Number,
    bus: Schema.Number,
    slot: Schema.Number,
    function: Schema.Number
  }),
  "bus-type": Schema.String,
  bus: Schema.Number,
  target: Schema.Number,
  unit: Schema.Number,
  serial: Schema.optional(Schema.String),
  dev: Schema.optional(Schema.String)
})

/**
 * An element of `guest-get-fsinfo`.
 *
 * @since 0.1.0
 * @category replies
 */
export const GuestFilesystemInfo = Schema.Struct({
  name: Schema.String,
  mountpoint: Schema.String,
  type: Schema.String,
  "used-bytes": Schema.optional(Schema.Number),
  "total-bytes": Schema.optional(Schema.Number),
  disk: Schema.Array(GuestDiskAddress)
})

/**
 * @since 0.1.0
 * @category replies
 */
export interface GuestFilesystemInfo extends Schema.Schema.Type<typeof GuestFilesystemInfo> {}

/**
 * `guest-fsfreeze-status`.
 *
 * @since 0.1.0
 * @category replies
 */
export const GuestFsfreezeStatus = Schema.Literal("thawed", "frozen")

/**
 * @since 0.1.0
 * @category replies
 */
export type GuestFsfreezeStatus = Schema.Schema.Type<typeof GuestFsfreezeStatus>

// ---------------------------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------------------------

/**
 * Runs a command with the `GuestAgent` from the context and decodes its reply with `schema`.
 *
 * @since 0.1.0
 * @category commands
 */
export const executeSchema = <A, I, R>(
  command: string,
  args: object | undefined,
  schema: Schema.Schema<A, I, R>,
  options?: GuestAgentCallOptions
): Effect.Effect<A, GuestAgentError | QmpDecodeError, GuestAgent | R> =>
  Effect.flatMap(GuestAgent, (agent) =>
    Effect.flatMap(
      agent.execute(command, args, options),
      (value) =>
        Schema.decodeUnknown(schema)(value).pipe(
          Effect.mapError((error) =>
            new QmpDecodeError({ command, detail: ParseResult.TreeFormatter.formatErrorSync(error) })
          )
        )
    ))

/**
 * `guest-ping`.
 *
 * @since 0.1.0
 * @category commands
 */
export const ping = (options?: GuestAgentCallOptions): Effect.Effect<void, GuestAgentError, GuestAgent> =>
  Effect.flatMap(GuestAgent, (agent) => Effect.asVoid(agent.execute("guest-ping", undefined, options)))

/**
 * `guest-info`.
 *
 * @since 0.1.0
 * @category commands
 */
export const info = (
  options?: GuestAgentCallOptions
): Effect.Effect<GuestAgentInfo, GuestAgentError | QmpDecodeError, GuestAgent> =>
  executeSchema("guest-info", undefined, GuestAgentInfo, options)

/**
 * `guest-get-fsinfo`: the guest's mounted filesystems and their disks.
 *
 * @since 0.1.0
 * @category commands
 */
export const getFsinfo = (
  options?: GuestAgentCallOptions
): Effect.Effect<ReadonlyArray<GuestFilesystemInfo>, GuestAgentError | QmpDecodeError, GuestAgent> =>
  executeSchema("guest-get-fsinfo", undefined, Schema.Array(GuestFilesystemInfo), options)

/**
 * `guest-fsfreeze-status`.
 *
 * @since 0.1.0
 * @category commands
 */
export const fsfreezeStatus = (
  options?: GuestAgentCallOptions
): Effect.Effect<GuestFsfreezeStatus, GuestAgentError | QmpDecodeError, GuestAgent> =>
  executeSchema("guest-fsfreeze-status", undefined, GuestFsfreezeStatus, options)

/**
 * `guest-fsfreeze-freeze`: freezes the guest's filesystems and returns how many. Always pair it with
 * {@link fsfreezeThaw} (e.g. in `Effect.acquireRelease`). Freezing can take long in a busy guest; pass a
 * `timeout` suited to it.
 *
 * @since 0.1.0
 * @category commands
 */
export const fsfreezeFreeze = (
  options?: GuestAgentCallOptions
): Effect.Effect<number, GuestAgentError | QmpDecodeError, GuestAgent> =>
  executeSchema("guest-fsfreeze-freeze", undefined, Schema.Number, options)

/**
 * `guest-fsfreeze-thaw`: thaws the guest's filesystems and returns how many.
 *
 * @since 0.1.0
 * @category commands
 */
export const fsfreezeThaw = (
  options?: GuestAgentCallOptions
): Effect.Effect<number, GuestAgentError | QmpDecodeError, GuestAgent> =>
  executeSchema("guest-fsfreeze-thaw", undefined, Schema.Number, options)
