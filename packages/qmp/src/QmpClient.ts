/**
 * QMP client: connects to a QEMU monitor socket, reads the greeting, negotiates `qmp_capabilities`, then runs
 * commands matched to their replies by `id` (never by order) and publishes asynchronous events.
 *
 * **QEMU serves one QMP client per monitor socket.** A second client connected to the same socket gets its
 * greeting only after the first one disconnects, so `make` bounds the whole handshake with one
 * `handshakeTimeout` and fails with `QmpConnectError` (`Timeout`) instead of waiting. Hold a client only inside
 * the scope (or layer) that needs it, and expect other tools (Proxmox's own) to compete for the socket.
 *
 * The byte transport is the `QmpTransport` service: `NodeQmpTransport.layer` (Unix/TCP sockets) or
 * `FdQmpTransport.layer` (Unix sockets with file-descriptor passing, needed by {@link getfd} and {@link addFd}).
 *
 * ```ts
 * const program = Effect.gen(function*() {
 *   const status = yield* QmpClient.queryStatus()
 *   yield* Effect.scoped(Effect.gen(function*() {
 *     const qmp = yield* QmpClient.QmpClient
 *     const events = yield* qmp.subscribe                       // subscribed before the command
 *     yield* QmpClient.cont()
 *     yield* QmpClient.awaitEvent(events, QmpClient.isEvent("RESUME"), "5 seconds")
 *   }))
 * }).pipe(Effect.provide(QmpClient.layer({ address: "/run/qemu/100.qmp" })), Effect.provide(NodeQmpTransport.layer))
 * ```
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
import * as Option from "effect/Option"
import * as ParseResult from "effect/ParseResult"
import type { Predicate, Refinement } from "effect/Predicate"
import * as PubSub from "effect/PubSub"
import * as Schema from "effect/Schema"
import type * as Scope from "effect/Scope"
import * as Stream from "effect/Stream"
import * as internal from "./internal/jsonConnection.js"
import {
  QmpClosedError,
  QmpCommandError,
  QmpConnectError,
  QmpDecodeError,
  QmpEventTimeoutError,
  QmpProtocolError,
  QmpTimeoutError
} from "./QmpError.js"
import type { QmpConnectionError, QmpExecuteError } from "./QmpError.js"
import {
  AddfdInfo,
  BlockDeviceInfo,
  BlockExportInfo,
  BlockInfo,
  BlockJobInfo,
  FdsetInfo,
  JobInfo,
  QmpErrorBody,
  QmpEvent,
  QmpGreeting,
  StatusInfo,
  VersionInfo
} from "./QmpSchema.js"
import type {
  BlockdevBackupArgs,
  BlockdevOptions,
  BlockDirtyBitmapAddArgs,
  BlockDirtyBitmapArgs,
  BlockDirtyBitmapMergeArgs,
  BlockExportNbdArgs,
  NbdServerStartArgs,
  TransactionAction,
  TransactionProperties
} from "./QmpSchema.js"
import { formatAddress, QmpTransport, toAddress } from "./QmpTransport.js"
import type { QmpAddress } from "./QmpTransport.js"

/**
 * @since 0.1.0
 * @category models
 */
export interface QmpClientOptions {
  /** The monitor socket: a Unix socket path, or a `QmpTransport.unix`/`QmpTransport.tcp` address. */
  readonly address: string | QmpAddress
  /** Bound on connect + greeting + `qmp_capabilities`. Default 5 seconds. */
  readonly handshakeTimeout?: Duration.DurationInput | undefined
  /** Default timeout of every command; `ExecuteOptions.timeout` overrides it per call. Default 30 seconds. */
  readonly commandTimeout?: Duration.DurationInput | undefined
  /** Events kept per subscriber before the oldest are dropped (sliding). Default 1024. */
  readonly eventBufferSize?: number | undefined
  /** Longest accepted line, in bytes; longer breaks the connection. Default 16 MiB. */
  readonly maxLineBytes?: number | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface ExecuteOptions {
  /** Overrides the client's `commandTimeout` for this call. */
  readonly timeout?: Duration.DurationInput | undefined
  /**
   * File descriptors sent with the command (`SCM_RIGHTS`), for `getfd` and `add-fd`. Needs `FdQmpTransport`;
   * other transports fail with `QmpTransportError` (`FdPassingUnsupported`). The caller keeps ownership and may
   * close its copies once the command has returned.
   */
  readonly fds?: ReadonlyArray<number> | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export interface QmpClientService {
  readonly address: QmpAddress
  /** The greeting QEMU sent (version, capabilities). */
  readonly greeting: QmpGreeting
  /**
   * Runs one command and returns its `return` value undecoded. Error replies fail with `QmpCommandError`.
   * Commands may run concurrently; each reply finds its caller by `id`. Interrupting a call (or its timeout)
   * abandons only that wait: the command may still run in QEMU.
   */
  readonly execute: (
    command: string,
    args?: object | undefined,
    options?: ExecuteOptions
  ) => Effect.Effect<unknown, QmpExecuteError>
  /**
   * Subscribes to events now; the stream yields every event from this moment until the scope closes, and ends
   * when the connection closes. Subscribe before issuing the command whose events you want. The stream may be
   * run several times (e.g. by successive `awaitEvent`s): each run continues where the previous one stopped.
   * A subscriber that falls more than `eventBufferSize` events behind loses the oldest ones.
   */
  readonly subscribe: Effect.Effect<Stream.Stream<QmpEvent>, never, Scope.Scope>
  /** Waits until the connection has ended and returns why. */
  readonly closed: Effect.Effect<QmpConnectionError>
}

/**
 * @since 0.1.0
 * @category tags
 */
export class QmpClient extends Context.Tag("@vzdump/qmp/QmpClient")<QmpClient, QmpClientService>() {}

const decodeGreeting = Schema.decodeUnknownEither(QmpGreeting)
const decodeEvent = Schema.decodeUnknownEither(QmpEvent)
const decodeErrorBody = Schema.decodeUnknownEither(QmpErrorBody)

const preview = (value: unknown): string => {
  const text = JSON.stringify(value) ?? String(value)
  return text.length > 200 ? `${text.slice(0, 200)}…` : text
}

const narrow = (error: internal.Terminal): QmpConnectionError =>
  error._tag === "QmpConnectError" ? new QmpClosedError({ reason: "PeerClosed", detail: error.message }) : error

const dispatchValue = (
  events: PubSub.PubSub<QmpEvent>,
  greeting: Deferred.Deferred<QmpGreeting>
) =>
(value: unknown, connection: internal.JsonConnection<QmpCommandError>) =>
  Effect.suspend((): Effect.Effect<void, QmpProtocolError> => {
    if (!internal.isRecord(value)) {
      return Effect.fail(new QmpProtocolError({ reason: "InvalidMessage", detail: `not an object: ${preview(value)}` }))
    }
    if ("QMP" in value) {
      const decoded = decodeGreeting(value)
      if (decoded._tag === "Left") {
        return Effect.fail(
          new QmpProtocolError({
            reason: "InvalidMessage",
            detail: `bad greeting: ${ParseResult.TreeFormatter.formatErrorSync(decoded.left)}`
          })
        )
      }
      return Deferred.succeed(greeting, decoded.right)
    }
    if ("event" in value) {
      const decoded = decodeEvent(value)
      if (decoded._tag === "Left") return Effect.logWarning(`dropping malformed QMP event ${preview(value)}`)
      return PubSub.publish(events, decoded.right)
    }
    if ("return" in value) {
      return Effect.flatMap(
        connection.complete(value.id, () => Exit.succeed(value.return)),
        (found) => found ? Effect.void : Effect.logWarning(`dropping QMP reply for unknown id ${preview(value.id)}`)
      )
    }
    if ("error" in value) {
      const body = decodeErrorBody(value.error)
      if (body._tag === "Left") {
        return Effect.fail(
          new QmpProtocolError({ reason: "InvalidMessage", detail: `bad error reply ${preview(value)}` })
        )
      }
      return Effect.flatMap(
        connection.complete(
          value.id,
          (command) =>
            Exit.fail(new QmpCommandError({ command, errorClass: body.right.class, desc: body.right.desc }))
        ),
        (found) =>
          found ? Effect.void : Effect.logWarning(`dropping QMP error reply for unknown id: ${preview(value)}`)
      )
    }
    return Effect.logWarning(`dropping unknown QMP message ${preview(value)}`)
  })

const dispatch = (events: PubSub.PubSub<QmpEvent>, greeting: Deferred.Deferred<QmpGreeting>) => {
  const onValue = dispatchValue(events, greeting)
  return (message: internal.Incoming, connection: internal.JsonConnection<QmpCommandError>) =>
    message._tag === "Line"
      ? Effect.flatMap(internal.parseLine(message.text), (value) => onValue(value, connection))
      : Effect.void
}

/**
 * Connects, reads the greeting and negotiates capabilities, all within `handshakeTimeout`. The connection lives
 * as long as the surrounding `Scope`; closing it fails every pending command with `QmpClosedError`
 * (`ClientClosed`). QEMU serves one QMP client per socket: while another client is connected, this fails with
 * `QmpConnectError` (`Timeout`) after `handshakeTimeout`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const make: (
  options: QmpClientOptions
) => Effect.Effect<QmpClientService, QmpConnectError, Scope.Scope | QmpTransport> = Effect.fn("QmpClient.make")(
  function*(options: QmpClientOptions) {
    const transport = yield* QmpTransport
    const address = toAddress(options.address)
    const addressText = formatAddress(address)
    const handshakeTimeout = Duration.decode(options.handshakeTimeout ?? Duration.seconds(5))
    const commandTimeout = Duration.decode(options.commandTimeout ?? Duration.seconds(30))
    const events = yield* PubSub.sliding<QmpEvent>(options.eventBufferSize ?? 1024)
    const greeting = yield* Deferred.make<QmpGreeting>()

    const connection = yield* internal.start<QmpCommandError>(transport, {
      address,
      openTimeout: handshakeTimeout,
      delimiter0xFF: false,
      maxLineBytes: options.maxLineBytes ?? 16 * 1024 * 1024,
      dispatch: dispatch(events, greeting),
      onTerminate: (error) =>
        Effect.zipRight(
          // A failed connect is reported by `make`; a closed scope is the normal end.
          error._tag === "QmpConnectError" || (error._tag === "QmpClosedError" && error.reason === "ClientClosed")
            ? Effect.logDebug(`QMP connection ended: ${error.message}`)
            : Effect.logWarning(`QMP connection ended: ${error.message}`),
          PubSub.shutdown(events)
        )
    })

    const execute = (
      command: string,
      args?: object | undefined,
      executeOptions?: ExecuteOptions
    ): Effect.Effect<unknown, QmpExecuteError> => {
      const timeout = executeOptions?.timeout !== undefined ? Duration.decode(executeOptions.timeout) : commandTimeout
      return connection.request({
        command,
        encode: (id) =>
          internal.encodeLine(
            args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }
          ),
        fds: executeOptions?.fds,
        timeout,
        onTimeout: () => new QmpTimeoutError({ command, timeout })
      }).pipe(
        Effect.mapError((error) =>
          error._tag === "QmpConnectError" ? narrow(error) : error
        ),
        Effect.withSpan("QmpClient.execute", { attributes: { command } })
      )
    }

    const handshake = Effect.gen(function*() {
      yield* connection.awaitOpen
      const received = yield* Effect.raceFirst(Effect.interruptible(Deferred.await(greeting)), Effect.interruptible(connection.terminated))
      yield* execute("qmp_capabilities", undefined, { timeout: handshakeTimeout })
      return received
    }).pipe(
      Effect.timeoutFail({
        duration: handshakeTimeout,
        onTimeout: () =>
          new QmpConnectError({
            reason: "Timeout",
            address: addressText,
            detail: `no QMP greeting and capabilities reply within ${
              Duration.format(handshakeTimeout)
            } (QEMU serves one QMP client per socket: is another client connected?)`
          })
      }),
      Effect.catchAll((error) =>
        Effect.fail(
          error._tag === "QmpConnectError"
            ? error
            : new QmpConnectError({ reason: "Handshake", address: addressText, detail: error.message })
        )
      )
    )
    const received = yield* handshake
    const qemu = received.QMP.version.qemu
    yield* Effect.logDebug(`QMP connected to ${addressText}: QEMU ${qemu.major}.${qemu.minor}.${qemu.micro}`)

    // One event per pull, and the subscription lives until the scope closes (not until a run ends): the stream
    // can be run several times, each run continuing where the last stopped, and `runHead` loses nothing.
    const subscribe: Effect.Effect<Stream.Stream<QmpEvent>, never, Scope.Scope> = Effect.flatMap(
      PubSub.isShutdown(events),
      (shutdown) =>
        shutdown
          ? Effect.succeed(Stream.empty)
          : Effect.map(PubSub.subscribe(events), (queue) => Stream.fromQueue(queue, { maxChunkSize: 1 }))
    )

    return QmpClient.of({
      address,
      greeting: received,
      execute,
      subscribe,
      closed: Effect.map(Effect.flip(connection.terminated), narrow)
    })
  },
  Effect.annotateLogs({ package: "@vzdump/qmp", module: "QmpClient" })
)

/**
 * A layer holding one QMP connection for its lifetime. QEMU serves one QMP client per socket, so keep the layer's
 * scope as short as the work that needs the monitor.
 *
 * @since 0.1.0
 * @category layers
 */
export const layer = (options: QmpClientOptions): Layer.Layer<QmpClient, QmpConnectError, QmpTransport> =>
  Layer.scoped(QmpClient, make(options))

/**
 * Like {@link layer}, with options read from `Config`s, e.g.
 * `layerConfig({ address: Config.string("QMP_SOCKET") })`.
 *
 * @since 0.1.0
 * @category layers
 */
export const layerConfig = (
  config: Config.Config.Wrap<QmpClientOptions>
): Layer.Layer<QmpClient, QmpConnectError | ConfigError.ConfigError, QmpTransport> =>
  Layer.scoped(QmpClient, Effect.flatMap(Config.unwrap(config), make))

// ---------------------------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------------------------

/**
 * Runs a command with the `QmpClient` from the context and returns its `return` value undecoded.
 *
 * @since 0.1.0
 * @category commands
 */
export const execute = (
  command: string,
  args?: object | undefined,
  options?: ExecuteOptions
): Effect.Effect<unknown, QmpExecuteError, QmpClient> =>
  Effect.flatMap(QmpClient, (client) => client.execute(command, args, options))

/**
 * Runs a command and decodes its `return` value with `schema`; a mismatch fails with `QmpDecodeError`.
 *
 * @since 0.1.0
 * @category commands
 */
export const executeSchema = <A, I, R>(
  command: string,
  args: object | undefined,
  schema: Schema.Schema<A, I, R>,
  options?: ExecuteOptions
): Effect.Effect<A, QmpExecuteError | QmpDecodeError, QmpClient | R> =>
  Effect.flatMap(
    execute(command, args, options),
    (value) =>
      Schema.decodeUnknown(schema)(value).pipe(
        Effect.mapError((error) =>
          new QmpDecodeError({ command, detail: ParseResult.TreeFormatter.formatErrorSync(error) })
        )
      )
  )

const run = (command: string, args: object | undefined, options: ExecuteOptions | undefined) =>
  Effect.asVoid(execute(command, args, options))

/**
 * `query-status`: the run state (`prelaunch`, `running`, `paused`, …).
 *
 * @since 0.1.0
 * @category commands
 */
export const queryStatus = (
  options?: ExecuteOptions
): Effect.Effect<StatusInfo, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("query-status", undefined, StatusInfo, options)

/**
 * `query-version`.
 *
 * @since 0.1.0
 * @category commands
 */
export const queryVersion = (
  options?: ExecuteOptions
): Effect.Effect<VersionInfo, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("query-version", undefined, VersionInfo, options)

/**
 * `query-block`: every block backend and the node inserted into it.
 *
 * @since 0.1.0
 * @category commands
 */
export const queryBlock = (
  options?: ExecuteOptions
): Effect.Effect<ReadonlyArray<BlockInfo>, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("query-block", undefined, Schema.Array(BlockInfo), options)

/**
 * `query-named-block-nodes`; with `flat: true` backing images are not nested.
 *
 * @since 0.1.0
 * @category commands
 */
export const queryNamedBlockNodes = (
  args?: { readonly flat?: boolean },
  options?: ExecuteOptions
): Effect.Effect<ReadonlyArray<BlockDeviceInfo>, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("query-named-block-nodes", args, Schema.Array(BlockDeviceInfo), options)

/**
 * `query-jobs`.
 *
 * @since 0.1.0
 * @category commands
 */
export const queryJobs = (
  options?: ExecuteOptions
): Effect.Effect<ReadonlyArray<JobInfo>, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("query-jobs", undefined, Schema.Array(JobInfo), options)

/**
 * `query-block-jobs`.
 *
 * @since 0.1.0
 * @category commands
 */
export const queryBlockJobs = (
  options?: ExecuteOptions
): Effect.Effect<ReadonlyArray<BlockJobInfo>, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("query-block-jobs", undefined, Schema.Array(BlockJobInfo), options)

/**
 * `query-block-exports`.
 *
 * @since 0.1.0
 * @category commands
 */
export const queryBlockExports = (
  options?: ExecuteOptions
): Effect.Effect<ReadonlyArray<BlockExportInfo>, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("query-block-exports", undefined, Schema.Array(BlockExportInfo), options)

/**
 * `blockdev-add`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockdevAdd = (
  blockdev: BlockdevOptions,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("blockdev-add", blockdev, options)

/**
 * `blockdev-del`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockdevDel = (
  nodeName: string,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("blockdev-del", { "node-name": nodeName }, options)

/**
 * `transaction`: all actions take effect atomically, or none.
 *
 * @since 0.1.0
 * @category commands
 */
export const transaction = (
  actions: ReadonlyArray<TransactionAction>,
  properties?: TransactionProperties,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("transaction", properties === undefined ? { actions } : { actions, properties }, options)

/**
 * `blockdev-backup`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockdevBackup = (
  args: BlockdevBackupArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("blockdev-backup", args, options)

/**
 * `block-job-cancel` (`device` is the job id). A `sync=none` backup job ends this way.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockJobCancel = (
  device: string,
  args?: { readonly force?: boolean },
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-job-cancel", { device, ...args }, options)

/**
 * `nbd-server-start`.
 *
 * @since 0.1.0
 * @category commands
 */
export const nbdServerStart = (
  args: NbdServerStartArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("nbd-server-start", args, options)

/**
 * `nbd-server-stop`.
 *
 * @since 0.1.0
 * @category commands
 */
export const nbdServerStop = (options?: ExecuteOptions): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("nbd-server-stop", undefined, options)

/**
 * `block-export-add` of an NBD export.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockExportAdd = (
  args: BlockExportNbdArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-export-add", args, options)

/**
 * `block-export-del`; the export is gone once `BLOCK_EXPORT_DELETED` arrives.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockExportDel = (
  id: string,
  args?: { readonly mode?: "safe" | "hard" },
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-export-del", { id, ...args }, options)

/**
 * `block-dirty-bitmap-add`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockDirtyBitmapAdd = (
  args: BlockDirtyBitmapAddArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-dirty-bitmap-add", args, options)

/**
 * `block-dirty-bitmap-remove`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockDirtyBitmapRemove = (
  args: BlockDirtyBitmapArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-dirty-bitmap-remove", args, options)

/**
 * `block-dirty-bitmap-clear`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockDirtyBitmapClear = (
  args: BlockDirtyBitmapArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-dirty-bitmap-clear", args, options)

/**
 * `block-dirty-bitmap-enable`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockDirtyBitmapEnable = (
  args: BlockDirtyBitmapArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-dirty-bitmap-enable", args, options)

/**
 * `block-dirty-bitmap-disable`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockDirtyBitmapDisable = (
  args: BlockDirtyBitmapArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-dirty-bitmap-disable", args, options)

/**
 * `block-dirty-bitmap-merge`.
 *
 * @since 0.1.0
 * @category commands
 */
export const blockDirtyBitmapMerge = (
  args: BlockDirtyBitmapMergeArgs,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("block-dirty-bitmap-merge", args, options)

/**
 * `human-monitor-command`: runs an HMP command line and returns its output.
 *
 * @since 0.1.0
 * @category commands
 */
export const humanMonitorCommand = (
  commandLine: string,
  options?: ExecuteOptions
): Effect.Effect<string, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("human-monitor-command", { "command-line": commandLine }, Schema.String, options)

/**
 * `stop`: pauses the guest (a `STOP` event follows unless it was not running).
 *
 * @since 0.1.0
 * @category commands
 */
export const stop = (options?: ExecuteOptions): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("stop", undefined, options)

/**
 * `cont`: resumes the guest (a `RESUME` event follows).
 *
 * @since 0.1.0
 * @category commands
 */
export const cont = (options?: ExecuteOptions): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("cont", undefined, options)

/**
 * `system_powerdown`: sends an ACPI power-button press to the guest.
 *
 * @since 0.1.0
 * @category commands
 */
export const systemPowerdown = (options?: ExecuteOptions): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("system_powerdown", undefined, options)

/**
 * `quit`: QEMU exits right after replying; the connection then closes.
 *
 * @since 0.1.0
 * @category commands
 */
export const quit = (options?: ExecuteOptions): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("quit", undefined, options)

/**
 * `getfd`: hands `fd` to QEMU under `fdname` (usable as `/dev/fdname/<fdname>`). Needs `FdQmpTransport`. The
 * caller keeps its own copy and may close it afterwards.
 *
 * @since 0.1.0
 * @category commands
 */
export const getfd = (
  fdname: string,
  fd: number,
  options?: Omit<ExecuteOptions, "fds">
): Effect.Effect<void, QmpExecuteError, QmpClient> => run("getfd", { fdname }, { ...options, fds: [fd] })

/**
 * `closefd`: closes a descriptor received with `getfd`.
 *
 * @since 0.1.0
 * @category commands
 */
export const closefd = (fdname: string, options?: ExecuteOptions): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("closefd", { fdname }, options)

/**
 * `add-fd`: adds `fd` to an fd set (usable as `/dev/fdset/<id>`). Needs `FdQmpTransport`.
 *
 * @since 0.1.0
 * @category commands
 */
export const addFd = (
  fd: number,
  args?: { readonly "fdset-id"?: number; readonly opaque?: string },
  options?: Omit<ExecuteOptions, "fds">
): Effect.Effect<AddfdInfo, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("add-fd", args ?? {}, AddfdInfo, { ...options, fds: [fd] })

/**
 * `remove-fd`: removes one descriptor, or the whole set when `fd` is omitted.
 *
 * @since 0.1.0
 * @category commands
 */
export const removeFd = (
  fdsetId: number,
  fd?: number,
  options?: ExecuteOptions
): Effect.Effect<void, QmpExecuteError, QmpClient> =>
  run("remove-fd", fd === undefined ? { "fdset-id": fdsetId } : { "fdset-id": fdsetId, fd }, options)

/**
 * `query-fdsets`.
 *
 * @since 0.1.0
 * @category commands
 */
export const queryFdsets = (
  options?: ExecuteOptions
): Effect.Effect<ReadonlyArray<FdsetInfo>, QmpExecuteError | QmpDecodeError, QmpClient> =>
  executeSchema("query-fdsets", undefined, Schema.Array(FdsetInfo), options)

// ---------------------------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------------------------

/**
 * A predicate matching events by name.
 *
 * @since 0.1.0
 * @category events
 */
export const isEvent = (name: string): Predicate<QmpEvent> => (event) => event.event === name

/**
 * Decodes an event's `data` with `schema` (e.g. `QmpSchema.JobStatusChangeData`).
 *
 * @since 0.1.0
 * @category events
 */
export const decodeEventData = <A, I, R>(
  schema: Schema.Schema<A, I, R>
) =>
(event: QmpEvent): Effect.Effect<A, QmpDecodeError, R> =>
  Schema.decodeUnknown(schema)(event.data ?? {}).pipe(
    Effect.mapError((error) =>
      new QmpDecodeError({ command: event.event, detail: ParseResult.TreeFormatter.formatErrorSync(error) })
    )
  )

/**
 * Waits for the first event matching `predicate`, failing with `QmpEventTimeoutError` after `timeout`, or with
 * `QmpClosedError` (`EventStreamEnded`) if the connection closes first.
 *
 * Pass a stream obtained from `subscribe` **before** issuing the command that triggers the event; passing the
 * client subscribes only now, so events that already happened are missed. Each call consumes events from a
 * shared subscription.
 *
 * @since 0.1.0
 * @category events
 */
export const awaitEvent: {
  <B extends QmpEvent>(
    source: Stream.Stream<QmpEvent> | QmpClientService,
    refinement: Refinement<QmpEvent, B>,
    timeout: Duration.DurationInput,
    description?: string
  ): Effect.Effect<B, QmpEventTimeoutError | QmpClosedError>
  (
    source: Stream.Stream<QmpEvent> | QmpClientService,
    predicate: Predicate<QmpEvent>,
    timeout: Duration.DurationInput,
    description?: string
  ): Effect.Effect<QmpEvent, QmpEventTimeoutError | QmpClosedError>
} = (
  source: Stream.Stream<QmpEvent> | QmpClientService,
  predicate: Predicate<QmpEvent>,
  timeout: Duration.DurationInput,
  description?: string
): Effect.Effect<QmpEvent, QmpEventTimeoutError | QmpClosedError> => {
  const duration = Duration.decode(timeout)
  const what = description ?? "matching QMP event"
  const first = (stream: Stream.Stream<QmpEvent>) =>
    Stream.runHead(Stream.filter(stream, predicate)).pipe(
      Effect.flatMap(Option.match({
        onNone: () =>
          Effect.fail(new QmpClosedError({ reason: "EventStreamEnded", detail: `events ended before ${what}` })),
        onSome: Effect.succeed
      })),
      // interruptible inside the timeout, so the timeout also fires for uninterruptible callers
      Effect.interruptible,
      Effect.timeoutFail({
        duration,
        onTimeout: () => new QmpEventTimeoutError({ description: what, timeout: duration })
      })
    )
  return "subscribe" in source
    ? Effect.scoped(Effect.flatMap(source.subscribe, first))
    : first(source)
}
